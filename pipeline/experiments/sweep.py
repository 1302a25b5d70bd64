"""Student ablations that share one cache: Ray Tune trials, each a Ray Train run plus an evaluation
(the body of stages/sweep_students.py).

A grid file lists the variants as config overrides, explicitly, as a Cartesian grid, or both:

    variants:                       # each: a name and --set style overrides
      - {name: all_losses}
      - {name: no_relation, set: {distill.relation.enabled: false}}
      - {name: baseline, baseline: true}   # no distillation (detection loss only)
    grid:                           # every combination, crossed with every variant
      train.seed: [0, 1, 2]

Every variant trains from the same cache (or, for baselines, without one), is evaluated on the
validation split, and lands in one table (results.md and results.csv in the sweep folder). A
variant whose run and evaluation finished before (same config and identity) is reused, with the
times recorded when it ran.
"""
from __future__ import annotations

import csv
import itertools
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from pipeline import storage
from pipeline.config import ConfigError, load_config
from pipeline.evaluation.report import markdown_table
from pipeline.experiments.runs import TIMES_FILE, StepTimes, evaluate_once, finished_model

RESULT_COLUMNS = ("variant", "kind", "overrides", "mAP", "NDS", "mATE", "mASE", "mAOE", "mAVE", "mAAE", "minutes")
TP_KEYS = (("mATE", "trans_err"), ("mASE", "scale_err"), ("mAOE", "orient_err"), ("mAVE", "vel_err"),
           ("mAAE", "attr_err"))


def _fmt_value(v: Any) -> str:
    return yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip()


def read_grid(path: str | Path) -> list[dict[str, Any]]:
    """Variants of a grid file: [{name, overrides: ['k=v', ...], baseline: bool}]."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"grid file {p} does not exist")
    doc = yaml.safe_load(p.read_text()) or {}
    unknown = set(doc) - {"variants", "grid"}
    if unknown or not doc:
        raise ConfigError(f"grid file {p}: expected keys 'variants' and/or 'grid', got {sorted(doc)}")
    base = doc.get("variants") or [{"name": "default"}]
    grid = doc.get("grid") or {}
    if not isinstance(grid, Mapping) or any(not isinstance(v, list) or not v for v in grid.values()):
        raise ConfigError(f"grid file {p}: 'grid' must map config keys to non-empty lists of values")
    out = []
    for var in base:
        if not isinstance(var, Mapping) or "name" not in var:
            raise ConfigError(f"grid file {p}: every variant needs a name, got {var!r}")
        extra = set(var) - {"name", "set", "baseline"}
        if extra:
            raise ConfigError(f"grid file {p}: variant {var['name']!r} has unknown keys {sorted(extra)}")
        own = [f"{k}={_fmt_value(v)}" for k, v in (var.get("set") or {}).items()]
        for combo in itertools.product(*grid.values()) if grid else [()]:
            crossed = [f"{k}={_fmt_value(v)}" for k, v in zip(grid, combo)]
            suffix = "".join(f"_{k.rsplit('.', 1)[-1]}{_fmt_value(v)}" for k, v in zip(grid, combo))
            out.append({"name": f"{var['name']}{suffix}", "overrides": own + crossed,
                        "baseline": bool(var.get("baseline", False))})
    names = [v["name"] for v in out]
    if len(set(names)) != len(names):
        raise ConfigError(f"grid file {p}: variant names repeat: {names}")
    return out


def variant_run(variant: Mapping[str, Any], out_dir: str) -> str:
    """A variant's run folder: its own `run` when it names one (e.g. a finished run to reuse), else OUT/NAME."""
    return str(variant.get("run") or Path(out_dir) / variant["name"])


def train_variant(variant: Mapping[str, Any], config: str, cache: str | None, dataroot: str, version: str,
                  train_split: str, out_dir: str) -> tuple[str, float, bool]:
    """Train one variant (student from the cache, or a baseline), or find it trained.

    A run folder that holds a finished run of the same config and identity is reused (one with
    other settings is refused, as fit refuses it). Returns (model file, training seconds, reused):
    a reused run reports the seconds recorded when it trained.
    """
    from pipeline.engine.detection_task import detection_task
    from pipeline.engine.distill_task import distill_task
    from pipeline.engine.student import plan_student_run
    from pipeline.engine.trainer import fit

    start = time.perf_counter()
    cfg = load_config(config, variant["overrides"])
    run = variant_run(variant, out_dir)
    if variant["baseline"]:
        task, loop, identity = detection_task, None, {"stage": "sweep_baseline"}
    else:
        loop, identity = plan_student_run(cfg, dataroot, version, train_split, cache=cache)
        task = distill_task
    model = finished_model(run, cfg, dataroot, version, train_split, identity)
    reused = model is not None
    if not reused:
        model = fit(cfg, dataroot, version, train_split, run, task, identity=identity, extra_loop_config=loop)
    seconds = time.perf_counter() - start
    if storage.is_url(run):  # times are kept beside local runs only
        return model, seconds, reused
    return model, StepTimes(Path(run) / TIMES_FILE).record("train", seconds, reused), reused


def run_variant(variant: Mapping[str, Any], config: str, cache: str, dataroot: str, version: str, train_split: str,
                eval_split: str, out_dir: str) -> dict[str, Any]:
    """Train one variant and evaluate it (each reused when finished before); return its table row."""
    model, train_seconds, _ = train_variant(variant, config, cache, dataroot, version, train_split, out_dir)
    summary, eval_seconds, _ = evaluate_once(model, dataroot, version, eval_split,
                                             Path(variant_run(variant, out_dir)) / "eval")
    row = {"variant": variant["name"], "kind": "baseline" if variant["baseline"] else "distilled",
           "overrides": " ".join(variant["overrides"]), "mAP": summary["mean_ap"], "NDS": summary["nd_score"],
           "minutes": (train_seconds + eval_seconds) / 60.0}
    row.update({short: summary["tp_errors"][key] for short, key in TP_KEYS})
    return row


def _trial(config: dict[str, Any]) -> None:
    """Ray Tune function trainable: one variant."""
    from ray import tune

    tune.report(run_variant(**config))


def run_sweep(variants: Sequence[Mapping[str, Any]], config: str, cache: str, dataroot: str, version: str,
              train_split: str, eval_split: str, out_dir: str, concurrent: int, address: str | None = None) -> list[dict]:
    """All variants as Ray Tune trials (at most `concurrent` at once); returns the table rows."""
    from ray import tune

    from pipeline.ray_env import ray_session

    out = Path(out_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    common = {"config": config, "cache": cache, "dataroot": str(Path(dataroot).resolve()), "version": version,
              "train_split": train_split, "eval_split": eval_split, "out_dir": str(out)}
    with ray_session(address):
        tuner = tune.Tuner(
            tune.with_resources(_trial, {"cpu": 0.01}),
            param_space={**common, "variant": tune.grid_search(list(variants))},
            tune_config=tune.TuneConfig(max_concurrent_trials=concurrent),
            run_config=tune.RunConfig(name="tune", storage_path=str(out), verbose=1),
        )
        grid = tuner.fit()
    rows, failed = [], []
    for result in grid:
        if result.error is not None:
            failed.append(f"{result.config['variant']['name']}: {result.error}")
        else:
            rows.append({k: result.metrics[k] for k in RESULT_COLUMNS})
    rows.sort(key=lambda r: [v["name"] for v in variants].index(r["variant"]))
    write_tables(out, rows)
    if failed:
        raise RuntimeError("some variants failed:\n" + "\n".join(failed))
    return rows


def write_tables(out: Path, rows: Sequence[Mapping[str, Any]]) -> tuple[Path, Path]:
    """results.csv and results.md of a sweep."""
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=RESULT_COLUMNS)
        w.writeheader()
        w.writerows(rows)
    lines = markdown_table(RESULT_COLUMNS, ([f"{r[c]:.4f}" if isinstance(r[c], float) and c != "minutes" else
                                             (f"{r[c]:.1f}" if c == "minutes" else str(r[c]) or "-")
                                             for c in RESULT_COLUMNS] for r in rows))
    (out / "results.md").write_text("\n".join(lines) + "\n")
    return out / "results.csv", out / "results.md"
