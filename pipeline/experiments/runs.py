"""Pieces shared by the drivers that chain many runs (the demo, student sweeps, the paper table):
a generated dataset made once, finished runs and evaluations found instead of redone, step times
kept across calls, progress lines with an ETA, and a table of mean +- std over seeds.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from pipeline.evaluation.report import markdown_table

METRICS_SUMMARY = "metrics_summary.json"  # what evaluate_model leaves in its folder
TIMES_FILE = "timings.json"                # StepTimes' file inside a run or evaluation folder


class StepTimes:
    """Wall times of named steps, kept in a JSON file so that a re-run that reuses a finished step
    reports the time it took when it ran, not the seconds of reuse."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.seconds: dict[str, float] = json.loads(self.path.read_text()) if self.path.exists() else {}

    def record(self, name: str, seconds: float, reused: bool) -> float:
        """The step's time: `seconds` when it ran now, else the time stored when it ran (a step
        finished before times were kept has none: the seconds of reuse are all there is)."""
        if reused:
            return self.seconds.get(name, seconds)
        self.seconds[name] = round(seconds, 1)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.seconds, indent=1) + "\n")
        return self.seconds[name]  # as stored: a later call that reuses the step reports the same


def dataset_matches(meta: Mapping[str, Any], settings: Mapping[str, Any]) -> bool:
    """Whether a generated dataset's settings file (synthetic.json) records `settings` (generate's
    keywords) and this generator version: scene counts are compared with its scene lists, a missing
    version is v1.0-mini, a camera trigger not given is the generator's default (version 2 files
    always record theirs)."""
    from pipeline.synthetic.dataset import DEFAULT_CAMERA_TRIGGER, GENERATOR_VERSION

    if meta.get("generator_version", 1) != GENERATOR_VERSION:  # older data is easier: make it again
        return False
    for key, want in {"camera_trigger": DEFAULT_CAMERA_TRIGGER, **settings}.items():
        have = meta.get(key, "v1.0-mini" if key == "version" else None)
        if key in ("scenes", "val_scenes") and isinstance(have, list):
            have = len(have)
        if (list(want) if isinstance(want, tuple) else want) != have:
            return False
    return True


def ensure_dataset(root: Path, settings: Mapping[str, Any], log: str = "[demo]") -> dict:
    """Generate a dataset under `root` with pipeline.synthetic.generate(**settings) unless a complete
    one made with the same settings is there; return its summary.

    The generator writes its settings file last, so a dataset cut off mid-way is regenerated.
    """
    from pipeline.synthetic import META_FILE, generate, summarize

    meta_path = Path(root) / META_FILE
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    if meta and dataset_matches(meta, settings):
        print(f"{log} dataset: reusing {root}", flush=True)
        return summarize(root, settings.get("version", "v1.0-mini"))
    t0 = time.perf_counter()
    print(f"{log} dataset: generating {dict(settings)} into {root} ...", flush=True)
    summary = generate(root, **settings, overwrite=True)
    print(f"{log} dataset: done in {time.perf_counter() - t0:.1f} s", flush=True)
    return summary


def finished_model(run: str | Path, cfg: Mapping[str, Any], dataroot: str | Path, version: str, split: str,
                   identity: Mapping[str, Any]) -> str | None:
    """RUN/model.pt when the run folder holds a finished run of `cfg` and `identity` on this data,
    else None. A finished run made with other settings raises ConfigError, as fit would."""
    from pipeline.engine.trainer import MODEL_FILE, prepare_run_folder

    model = Path(run) / MODEL_FILE
    if not model.is_file():
        return None
    # The run identity as fit stores it beside the config.
    prepare_run_folder(str(run), cfg, {"dataroot": str(Path(dataroot).expanduser().resolve()), "version": version,
                                       "split": split, **dict(identity)})
    return str(model)


def finished_evaluation(model: str | Path, out_dir: str | Path) -> dict[str, Any] | None:
    """The metrics summary an earlier evaluation of `model` left in `out_dir` (written after the
    model file), else None."""
    path = Path(out_dir) / METRICS_SUMMARY
    if not path.is_file():
        return None
    model = Path(model)
    if model.is_file() and path.stat().st_mtime < model.stat().st_mtime:
        return None  # the model was trained again since
    return json.loads(path.read_text())


def evaluate_once(model: str, dataroot: str | Path, version: str, split: str, out_dir: str | Path,
                  address: str | None = None) -> tuple[dict[str, Any], float, bool]:
    """evaluate_model into `out_dir` (no pictures), or the summary an earlier call left there.

    Returns (metrics summary, seconds the evaluation took when it ran, reused).
    """
    from pipeline.evaluation.model_eval import evaluate_model

    times = StepTimes(Path(out_dir) / TIMES_FILE)
    start = time.perf_counter()
    summary = finished_evaluation(model, out_dir)
    if summary is not None:
        return summary, times.record("evaluate", time.perf_counter() - start, reused=True), True
    summary = evaluate_model(model, dataroot, version, split, out_dir, address=address, render=False)
    return summary, times.record("evaluate", time.perf_counter() - start, reused=False), False


class Progress:
    """'PREFIX step k/N: what' lines with the elapsed time and an ETA.

    The ETA sums, over the steps still to do, the mean seconds of the steps of the same kind seen
    so far, else of the nearest kind by word prefix (see `estimate`); kinds with nothing near
    are counted and named instead of guessed.
    """

    def __init__(self, prefix: str, total: int) -> None:
        self.prefix, self.total = prefix, total
        self.start = time.perf_counter()
        self.seconds: dict[str, list[float]] = {}

    def add(self, kind: str, seconds: float) -> None:
        """One step of `kind` took `seconds` (ran now, or recorded when it ran)."""
        self.seconds.setdefault(kind, []).append(float(seconds))

    def estimate(self, kind: str) -> float | None:
        """Mean seconds of a step of `kind` ('train camera distilled'), else of the kinds sharing its
        longest word prefix that has times ('train camera', then 'train'); None when none has."""
        words = kind.split()
        for n in range(len(words), 0, -1):
            same = [s for k, v in self.seconds.items() if k.split()[:n] == words[:n] for s in v]
            if same:
                return sum(same) / len(same)
        return None

    def eta(self, kinds: Sequence[str]) -> str:
        """'ETA 12.5 min' for steps of these kinds (one entry per step), naming untimed kinds."""
        guesses = [self.estimate(k) for k in kinds]
        untimed = sorted({k for k, g in zip(kinds, guesses) if g is None})
        known = [g for g in guesses if g is not None]
        text = f"ETA {sum(known) / 60:.1f} min" if known or not kinds else "ETA ?"
        return text + (f" + {len(guesses) - len(known)} steps not timed yet ({', '.join(untimed)})"
                       if untimed else "")

    def begin(self, k: int, what: str, todo: Sequence[str]) -> None:
        """Print the line of step k (1-based); `todo` are the kinds of the steps left to do, this one included."""
        elapsed = (time.perf_counter() - self.start) / 60
        print(f"\n{self.prefix} step {k}/{self.total}: {what} (elapsed {elapsed:.1f} min, {self.eta(todo)})",
              flush=True)


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (ddof=1; None for a single value)."""
    import numpy as np

    v = np.asarray(values, dtype=float)
    return float(v.mean()), (float(v.std(ddof=1)) if len(v) > 1 else None)


def format_seed_table(runs: dict[str, list[tuple[int, dict]]]) -> str:
    """Markdown table of mAP / NDS per seed and their mean and standard deviation, per model."""
    rows = []
    for name, results in runs.items():
        rows += [(name, seed, f"{s['mean_ap']:.4f}", f"{s['nd_score']:.4f}") for seed, s in results]
        spread = []
        for key in ("mean_ap", "nd_score"):
            mean, std = mean_std([s[key] for _, s in results])
            spread.append(f"**{mean:.4f} +- {std or 0.0:.4f}**")
        rows.append((f"**{name}**", f"mean +- std over {len(results)}", *spread))
    return "\n".join(markdown_table(["model", "seed", "mAP", "NDS"], rows))
