"""The paper's main table and loss ablation in one command (the body of stages/paper_table.py).

For the chosen UniDistill paths (teacher modality -> student modality) and seeds:

    the seed-0 detector of every modality a path needs (tiny_lidar, tiny_camera, tiny_fusion)
      -> evaluation (the LiDAR and camera ones double as the baselines, as in the paper)
    -> the teacher-target cache of each teacher modality, once (replayed views, foreground storage)
    -> per seed and path: the baseline (the student modality's detector, train.seed=s for s > 0)
       and the distilled student from that cache, same recipe and budget -> evaluation
    -> the loss ablation on lidar -> camera: feature, relation, response alone and all three, as one
       sweep over the LiDAR teacher's cache (pipeline.experiments.sweep)
    -> OUT/results.csv, OUT/results.md (the table in the paper's form), OUT/results.png,
       OUT/ablation/results.md

Everything is found instead of redone on a second call: finished runs (same config and identity),
caches (same fingerprint) and evaluations; their times are the ones recorded when they ran.
OUT/runs/NAME holds each run (and NAME/eval its evaluation), OUT/caches/ the caches.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

from pipeline.config import ConfigError
from pipeline.evaluation.report import markdown_table
from pipeline.experiments.paper_plan import (ABLATION_CONCURRENT, ABLATION_PATH, CACHE_SHARD_SAMPLES, CACHE_STORAGE,
                                             CACHE_VIEWS, LOG, PATH_LABELS, PATHS, Step, TablePlan, check_preset,
                                             needed_configs, plan_table, run_name, table_dataset)

class TableRunner:
    """Runs a TablePlan's steps under OUT, with progress lines, and keeps what each produced."""

    def __init__(self, plan: TablePlan, out: Path, dataroot: Path, version: str, overrides: Sequence[str] = (),
                 address: str | None = None) -> None:
        from pipeline.data import nusc_db
        from pipeline.experiments.runs import StepTimes

        self.plan, self.out, self.dataroot, self.version = plan, Path(out), Path(dataroot), version
        self.overrides, self.address = list(overrides), address
        self.train_split = nusc_db.default_split(version)
        self.eval_split = nusc_db.default_split(version, "eval")
        self.times = StepTimes(self.out / "timings.json")  # caches and the ablation
        self.models: dict[str, str] = {}
        self.results: dict[str, tuple[dict, float]] = {}  # run -> (metrics summary, training seconds)
        self.cache_seconds: dict[str, float] = {}
        self.eval_seconds: dict[str, float] = {}
        self.ablation_rows: list[dict] = []

    def run_dir(self, name: str) -> Path:
        return self.out / "runs" / name

    def cache_uri(self, modality: str) -> str:
        return str(self.out / "caches" / f"{self.plan.preset}_{modality}_{self.train_split}")

    def looks_done(self, step: Step) -> bool:
        """Whether a step's output is there already (for the ETA only; each step checks properly)."""
        from pipeline.experiments.runs import METRICS_SUMMARY

        return {"train": lambda: (self.run_dir(step.target) / "model.pt").is_file(),
                "evaluate": lambda: (self.run_dir(step.target) / "eval" / METRICS_SUMMARY).is_file(),
                "cache": lambda: f"cache {step.target}" in self.times.seconds,
                "ablation": lambda: (self.out / "ablation" / "results.csv").is_file()}[step.action]()

    def run(self) -> None:
        """Every step in order, each line with the elapsed time and an ETA."""
        from pipeline.experiments.runs import Progress

        progress = Progress(LOG, len(self.plan.steps))
        for k, step in enumerate(self.plan.steps, 1):
            todo = [kind for s in self.plan.steps[k - 1:] if not self.looks_done(s)
                    for kind in ((s.kind,) if s.eta is None else s.eta)]
            progress.begin(k, f"{step.action} {step.target}", todo)
            seconds, reused = getattr(self, f"_{step.action}")(step.target)
            progress.add(step.kind, seconds)
            print(f"{LOG} {step.action} {step.target}: {'reused, took' if reused else 'done in'} "
                  f"{seconds / 60:.1f} min", flush=True)

    def _train(self, name: str) -> tuple[float, bool]:
        from pipeline.experiments.sweep import train_variant

        run = self.plan.runs[name]
        variant = {"name": name, "overrides": run.overrides(self.overrides), "baseline": run.teacher is None,
                   "run": str(self.run_dir(name))}
        cache = self.cache_uri(run.teacher) if run.teacher else None
        model, seconds, reused = train_variant(variant, run.config, cache, str(self.dataroot), self.version,
                                               self.train_split, str(self.out / "runs"))
        self.models[name] = model
        self.results[name] = ({}, seconds)
        return seconds, reused

    def _evaluate(self, name: str) -> tuple[float, bool]:
        from pipeline.experiments.runs import evaluate_once

        summary, seconds, reused = evaluate_once(self.models[name], self.dataroot, self.version, self.eval_split,
                                                 self.run_dir(name) / "eval", address=self.address)
        self.results[name] = (summary, self.results[name][1])
        self.eval_seconds[name] = seconds
        return seconds, reused

    def _cache(self, modality: str) -> tuple[float, bool]:
        from pipeline.cache.build import build_cache
        from pipeline.cache.plan import CacheRequest

        summary = build_cache(CacheRequest(self.models[self.plan.caches[modality]], str(self.dataroot), self.version,
                              self.train_split, self.cache_uri(modality), views=CACHE_VIEWS, storage=CACHE_STORAGE,
                              shard_samples=CACHE_SHARD_SAMPLES, address=self.address))
        reused = summary.shards_written == 0
        self.cache_seconds[modality] = self.times.record(f"cache {modality}", summary.seconds, reused)
        return self.cache_seconds[modality], reused

    def _ablation(self, path: str) -> tuple[float, bool]:
        from pipeline.experiments.sweep import run_sweep

        start = time.perf_counter()
        variants = [dict(v, overrides=[*self.overrides, *v["overrides"]],
                         **({"run": str(self.run_dir(v["run"]))} if "run" in v else {}))
                    for v in self.plan.ablation_variants]
        self.ablation_rows = run_sweep(variants, f"{self.plan.preset}_{path}", self.cache_uri(PATHS[path][0]),
                                       str(self.dataroot), self.version, self.train_split, self.eval_split,
                                       str(self.out / "ablation"), ABLATION_CONCURRENT, address=self.address)
        return time.perf_counter() - start, False  # each variant's own time is in its row

    def rows(self) -> list[dict[str, Any]]:
        """results.csv's rows, in the plan's cell order."""
        out = []
        for cell in self.plan.cells:
            summary, seconds = self.results[cell.run]
            out.append({"path": cell.path, "role": cell.role, "seed": cell.seed,
                        "config": self.plan.runs[cell.run].config, "mAP": summary["mean_ap"],
                        "NDS": summary["nd_score"], "minutes": seconds / 60, "run": cell.run})
        return out


def detection_config_lines(runner: TableRunner) -> list[str]:
    """describe_detection_config of every devkit config the table's evaluations used (once each)."""
    from nuscenes.eval.detection.data_classes import DetectionConfig

    from pipeline.config import load_config
    from pipeline.evaluation.devkit_metrics import describe_detection_config, detection_config

    lines: list[str] = []
    for name, (summary, _) in runner.results.items():
        if "detection_config" in summary:
            config = DetectionConfig.deserialize(summary["detection_config"])
        else:  # an evaluation written before summaries carried it: the run's own eval settings
            config = detection_config(load_config(runner.plan.runs[name].config, runner.overrides).get("eval"))
        line = describe_detection_config(config)
        if line not in lines:
            lines.append(line)
    return lines


def ablation_lines(runner: TableRunner) -> list[str]:
    """The ablation's rows beside the seed-0 baseline, and a link to its full table."""
    if not runner.ablation_rows:
        return []
    base = runner.results.get(run_name(runner.plan.preset, PATHS[ABLATION_PATH][1], 0), ({}, 0))[0]
    def gain(r: dict, metric: str, key: str) -> str:
        return f"{r[metric] - base[key]:+.4f}" if base else "-"

    lines = ["", f"## Loss ablation ({PATH_LABELS[ABLATION_PATH]}, seed 0, one cache)", "",
             *markdown_table(["variant", "mAP", "NDS", "gain mAP", "gain NDS", "minutes"],
                             [(r["variant"], f"{r['mAP']:.4f}", f"{r['NDS']:.4f}", gain(r, "mAP", "mean_ap"),
                               gain(r, "NDS", "nd_score"), f"{r['minutes']:.1f}") for r in runner.ablation_rows])]
    return lines + ["", "Gains against the seed-0 baseline; TP errors and overrides in "
                        "[ablation/results.md](ablation/results.md)."]


def write_outputs(runner: TableRunner, seconds: float) -> Path:
    """OUT/results.csv, results.md and results.png of a finished TableRunner; returns results.md."""
    from pipeline.experiments.paper_report import format_results_md, plot_results, write_csv

    plan, out = runner.plan, runner.out
    rows = runner.rows()
    write_csv(out / "results.csv", rows)
    seeds = ", ".join(map(str, plan.seeds))
    caches = ", ".join(f"{m} {s / 60:.1f} min" for m, s in runner.cache_seconds.items())
    spent = [sum(t for _, t in runner.results.values()), sum(runner.cache_seconds.values()),
             sum(runner.eval_seconds.values())]
    before = [f"# UniDistill: distilled students against their baselines ({plan.preset} presets)", "",
              f"Data: {runner.dataroot} ({runner.version}), trained on {runner.train_split}, evaluated by the devkit "
              f"on {runner.eval_split}. Seeds {seeds}; teachers are the seed-0 detectors, and the LiDAR and camera "
              "ones double as the seed-0 baselines. Each cell: mean +- sample std over the seeds.", ""]
    after = ["", f"Caches: {CACHE_VIEWS} replayed views, {CACHE_STORAGE} storage ({caches}). "
                 f"Overrides: {' '.join(runner.overrides) or 'none'}.",
             f"Wall time of the table's steps when they ran: {sum(spent) / 60:.1f} min (training "
             f"{spent[0] / 60:.1f}, caching {spent[1] / 60:.1f}, evaluation {spent[2] / 60:.1f}; the ablation's "
             f"in its rows); this call took {seconds / 60:.1f} min. Training minutes per run in "
             "[results.csv](results.csv), the chart in [results.png](results.png).",
             "The paper reports gains of +2.0 to +3.2 mAP / NDS points on nuScenes.", "",
             *[f"Scored with {line}" for line in detection_config_lines(runner)], *ablation_lines(runner)]
    md = format_results_md(rows, PATH_LABELS, before, after)
    (out / "results.md").write_text(md)
    plot_results(out / "results.png", rows, PATH_LABELS,
                 title=f"{plan.preset} presets, {runner.version} {runner.eval_split}, seeds {seeds}")
    return out / "results.md"


def make_table(out: str | Path, paths: Sequence[str], seeds: Sequence[int], preset: str = "small",
               dataroot: str | Path | None = None, version: str | None = None, ablation: bool | None = None,
               overrides: Sequence[str] = (), address: str | None = None) -> Path:
    """Check the inputs, run every step of the table in one Ray session and write its outputs.

    Without `dataroot` the preset's TABLE_DATASETS entry is generated into OUT/nuscenes (once). `ablation` None:
    on when lidar_to_camera is among the paths. Returns the path of results.md.
    """
    from pipeline.data import nusc_db
    from pipeline.config import load_config
    from pipeline.experiments.runs import ensure_dataset
    from pipeline.ray_env import ray_session

    check_preset(preset, paths)
    for name in needed_configs(preset, paths):  # a bad --set fails now, not after an hour of training
        load_config(name, overrides)
    plan = plan_table(preset, paths, seeds, ABLATION_PATH in paths if ablation is None else ablation)
    out = Path(out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    if dataroot is None:
        settings = table_dataset(preset)
        generated = settings.get("version", "v1.0-mini")
        if version not in (None, generated):
            raise ConfigError(f"--version {version} needs --dataroot: the generated dataset is {generated}")
        dataroot, version = out / "nuscenes", generated
        ensure_dataset(dataroot, settings, LOG)
    version = version or "v1.0-mini"
    nusc_db.check_dataroot(dataroot, version)
    runner = TableRunner(plan, out, Path(dataroot).expanduser().resolve(), version, overrides, address)
    start = time.perf_counter()
    print(f"{LOG} {len(plan.runs)} runs, {len(plan.caches)} caches, {len(plan.steps)} steps into {out}", flush=True)
    with ray_session(address):
        runner.run()
    md = write_outputs(runner, time.perf_counter() - start)
    print(f"\n{md.read_text()}\n{LOG} written to {md}, {out / 'results.csv'}, {out / 'results.png'}", flush=True)
    return md
