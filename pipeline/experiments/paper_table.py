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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from pipeline.config import CONFIG_DIR, ConfigError

PATHS = {  # path -> (teacher modality, student modality), in the paper's order
    "lidar_to_camera": ("lidar", "camera"),
    "fusion_to_camera": ("fusion", "camera"),
    "camera_to_lidar": ("camera", "lidar"),
    "fusion_to_lidar": ("fusion", "lidar"),
}
PATH_LABELS = {"lidar_to_camera": "L -> C", "fusion_to_camera": "L+C -> C", "camera_to_lidar": "C -> L",
               "fusion_to_lidar": "L+C -> L"}
MODALITIES = ("lidar", "camera", "fusion")
# The dataset generated into OUT/nuscenes when no --dataroot is given, per preset
# (pipeline.synthetic.generate's keywords): the mini set for tiny, and for small the trainval-format
# set of README "Toward a setting where detectors learn" (384 train / 96 val samples, 2.5 GiB).
TABLE_DATASETS: dict[str, dict[str, Any]] = {
    "tiny": dict(samples_per_scene=10, seed=0),
    "small": dict(version="v1.0-trainval", scenes=80, val_scenes=16, samples_per_scene=6, image_size=(400, 225),
                  seed=0),
}


def table_dataset(preset: str) -> dict[str, Any]:
    """The generated dataset of a preset's table (the tiny one for presets without their own)."""
    return TABLE_DATASETS.get(preset, TABLE_DATASETS["tiny"])
# Caches as the demo builds them: replayed BEV-augmentation views, foreground tiles.
CACHE_VIEWS, CACHE_STORAGE, CACHE_SHARD_SAMPLES = 4, "foreground", 8
ABLATION_PATH = "lidar_to_camera"
ABLATION_GRID = CONFIG_DIR / "sweeps" / "losses.yaml"
ABLATION_CONCURRENT = 1  # one student at a time: two would only share 2 cores
LOG = "[paper_table]"


@dataclass(frozen=True)
class Run:
    """A training run: its folder under OUT/runs, config and seed; `teacher` is the modality of the
    cache a distilled student reads (None: a detector trained without distillation)."""

    name: str
    config: str
    seed: int
    teacher: str | None = None

    def overrides(self, common: Sequence[str]) -> list[str]:
        """The run's --set overrides: the common ones, then its seed (seed 0 is the config's own)."""
        return [*common, *([f"train.seed={self.seed}"] if self.seed else [])]


@dataclass(frozen=True)
class Step:
    """One step of the table: `action` train | evaluate (a run name), cache (a teacher modality) or
    ablation (a path); `kind` groups steps of one cost for the ETA ('train camera distilled');
    `eta` the kinds of the steps it stands for (default: its own kind)."""

    action: str
    target: str
    kind: str
    eta: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Cell:
    """A row of results.csv: the run that fills `role` of `path` at `seed`."""

    path: str
    role: str
    seed: int
    run: str


@dataclass
class TablePlan:
    preset: str
    paths: list[str]
    seeds: list[int]
    runs: dict[str, Run] = field(default_factory=dict)
    caches: dict[str, str] = field(default_factory=dict)  # teacher modality -> the seed-0 run it caches
    steps: list[Step] = field(default_factory=list)
    cells: list[Cell] = field(default_factory=list)
    ablation_variants: list[dict[str, Any]] = field(default_factory=list)


def parse_paths(text: str) -> list[str]:
    """'lidar_to_camera,camera_to_lidar' -> the paths, checked, in the given order."""
    paths = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in paths if p not in PATHS]
    if bad or not paths:
        raise ConfigError(f"--paths: unknown path {', '.join(map(repr, bad)) or '(none given)'}; "
                          f"allowed: {', '.join(PATHS)}")
    if len(set(paths)) != len(paths):
        raise ConfigError(f"--paths: {text!r} names a path twice")
    return paths


def parse_seeds(text: str) -> list[int]:
    """'0,1,2' -> [0, 1, 2]: distinct non-negative integers."""
    items = [s.strip() for s in text.split(",") if s.strip()]
    if not items or not all(s.isdigit() for s in items):
        raise ConfigError(f"--seeds: {text!r} is not a comma-separated list of non-negative integers (e.g. 0,1,2)")
    seeds = [int(s) for s in items]
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds: {text!r} names a seed twice")
    return seeds


def needed_configs(preset: str, paths: Sequence[str]) -> list[str]:
    """Config names the table of these paths trains from."""
    names = []
    for path in paths:
        for suffix in (*PATHS[path], path):
            if f"{preset}_{suffix}" not in names:
                names.append(f"{preset}_{suffix}")
    return names


def check_preset(preset: str, paths: Sequence[str]) -> None:
    """Raise ConfigError unless stages/configs/ holds every config the paths need under `preset`."""
    missing = [n for n in needed_configs(preset, paths) if not (CONFIG_DIR / f"{n}.yaml").is_file()]
    if missing:
        full = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")
                      if all((CONFIG_DIR / f"{n}.yaml").is_file() for n in needed_configs(p.stem, paths)))
        raise ConfigError(f"--preset {preset!r}: stages/configs/ has no {', '.join(missing)}; "
                          f"presets with every config these paths need: {', '.join(full) or 'none'}")


def run_name(preset: str, suffix: str, seed: int) -> str:
    """Run folder name: tiny_camera, tiny_camera_seed1, tiny_lidar_to_camera_seed2, ..."""
    return f"{preset}_{suffix}" + (f"_seed{seed}" if seed else "")


def plan_table(preset: str, paths: Sequence[str], seeds: Sequence[int], ablation: bool) -> TablePlan:
    """Which runs, caches and evaluations the table needs, in the order they run (no I/O).

    The seed-0 detectors come first (a cache needs its teacher), then the caches, then each seed's
    baselines and students path by path; a baseline shared by two paths of one student modality is
    trained once. The ablation, last, reuses the seed-0 lidar -> camera student as its all-losses row.
    """
    plan = TablePlan(preset, list(paths), list(seeds))

    def add(suffix: str, seed: int, teacher: str | None) -> str:
        name = run_name(preset, suffix, seed)
        if name not in plan.runs:
            plan.runs[name] = Run(name, f"{preset}_{suffix}", seed, teacher)
            kind = f"train {PATHS[suffix][1]} distilled" if teacher else f"train {suffix}"
            plan.steps += [Step("train", name, kind), Step("evaluate", name, "evaluate")]
        return name

    teachers = [m for m in MODALITIES if any(PATHS[p][0] == m for p in paths)]
    for m in MODALITIES:  # seed-0 detectors: teachers, and the seed-0 baselines
        if m in teachers or (0 in seeds and any(PATHS[p][1] == m for p in paths)):
            add(m, 0, None)
    for m in teachers:
        plan.caches[m] = run_name(preset, m, 0)
        plan.steps.append(Step("cache", m, f"cache {m}"))
    for seed in seeds:
        for p in paths:
            add(PATHS[p][1], seed, None)
            add(p, seed, PATHS[p][0])
    for p in paths:
        plan.cells.append(Cell(p, "teacher", 0, plan.caches[PATHS[p][0]]))
        plan.cells += [Cell(p, "baseline", s, run_name(preset, PATHS[p][1], s)) for s in seeds]
        plan.cells += [Cell(p, "student", s, run_name(preset, p, s)) for s in seeds]
    if ablation:
        if ABLATION_PATH not in paths:
            raise ConfigError(f"--ablation needs {ABLATION_PATH} among --paths (its cache and baseline)")
        plan.ablation_variants = ablation_variants(plan)
        new = sum(1 for v in plan.ablation_variants if "run" not in v)
        plan.steps.append(Step("ablation", ABLATION_PATH, "ablation",
                               (f"train {PATHS[ABLATION_PATH][1]} distilled",) * new + ("evaluate",) * new))
    return plan


def ablation_variants(plan: TablePlan) -> list[dict[str, Any]]:
    """The loss ablation's variants (ABLATION_GRID without its baseline: the table has it); the
    all-losses variant names the table's seed-0 student run, which it is, when the table has one."""
    from pipeline.experiments.sweep import read_grid

    student = run_name(plan.preset, ABLATION_PATH, 0)
    out = []
    for v in read_grid(ABLATION_GRID):
        if v["baseline"]:
            continue
        if not v["overrides"] and student in plan.runs:
            v = dict(v, run=student)  # a run name here; made a folder by TableRunner
        out.append(v)
    return out


class TableRunner:
    """Runs a TablePlan's steps under OUT, with progress lines, and keeps what each produced."""

    def __init__(self, plan: TablePlan, out: Path, dataroot: Path, version: str, overrides: Sequence[str] = (),
                 address: str | None = None) -> None:
        from pipeline.data import nusc_db
        from pipeline.experiments.runs import StepTimes
        from pipeline.engine.trainer import default_train_split

        self.plan, self.out, self.dataroot, self.version = plan, Path(out), Path(dataroot), version
        self.overrides, self.address = list(overrides), address
        self.train_split = default_train_split(version)
        self.eval_split = nusc_db.SPLITS_OF_VERSION[version][-1]
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
        from pipeline.cache.writer import build_cache

        summary = build_cache(self.models[self.plan.caches[modality]], str(self.dataroot), self.version,
                              self.train_split, self.cache_uri(modality), views=CACHE_VIEWS, storage=CACHE_STORAGE,
                              shard_samples=CACHE_SHARD_SAMPLES, address=self.address)
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
    lines = ["", f"## Loss ablation ({PATH_LABELS[ABLATION_PATH]}, seed 0, one cache)", "",
             "| variant | mAP | NDS | gain mAP | gain NDS | minutes |", "|---|---|---|---|---|---|"]
    for r in runner.ablation_rows:
        gains = [f"{r[m] - base[k]:+.4f}" if base else "-" for m, k in (("mAP", "mean_ap"), ("NDS", "nd_score"))]
        lines.append(f"| {r['variant']} | {r['mAP']:.4f} | {r['NDS']:.4f} | {gains[0]} | {gains[1]} | "
                     f"{r['minutes']:.1f} |")
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


def make_table(out: str | Path, paths: Sequence[str], seeds: Sequence[int], preset: str = "tiny",
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
