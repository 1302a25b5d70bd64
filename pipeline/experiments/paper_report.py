"""The paper table's outputs from its result rows (see pipeline/experiments/paper_table.py): results.csv, the
table in the paper's form (results.md) and a bar chart (PNG).

A row is one evaluated model in one role of one path: {path, role (teacher | baseline | student),
seed, config, mAP, NDS, minutes, run}. A path's teacher has one row (seed 0); its baseline and
student have one row per seed. Gains are paired by seed (student - baseline of the same seed).
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from pipeline.evaluation.report import markdown_table
from pipeline.experiments.runs import mean_std

CSV_COLUMNS = ("path", "role", "seed", "config", "mAP", "NDS", "minutes", "run")
ROLES = ("teacher", "baseline", "student")
METRICS = ("mAP", "NDS")


@dataclass
class PathResult:
    """One path's values per role and metric (in seed order), and the student's per-seed gains."""

    path: str
    values: dict[tuple[str, str], list[float]]  # (role, metric) -> values over seeds
    gains: dict[str, list[float]]                # metric -> student - baseline, per seed both have


def group_by_path(rows: Sequence[Mapping[str, Any]]) -> list[PathResult]:
    """The rows of each path (in the order paths first appear), gains paired by seed."""
    out: dict[str, PathResult] = {}
    for row in rows:
        res = out.setdefault(row["path"], PathResult(row["path"], {}, {m: [] for m in METRICS}))
        for metric in METRICS:
            res.values.setdefault((row["role"], metric), []).append(float(row[metric]))
    for res in out.values():
        seeds = {(r["role"], int(r["seed"])): r for r in rows if r["path"] == res.path}
        for seed in sorted(s for role, s in seeds if role == "student"):
            if ("baseline", seed) in seeds:
                for metric in METRICS:
                    res.gains[metric].append(float(seeds["student", seed][metric]) -
                                             float(seeds["baseline", seed][metric]))
    return list(out.values())


def format_mean_std(values: Sequence[float], signed: bool = False) -> str:
    """'0.1234 +- 0.0050' (sample std), '0.1234' for one value, '-' for none; `signed` writes '+0.0123'."""
    if not values:
        return "-"
    mean, std = mean_std(values)
    text = f"{mean:+.4f}" if signed else f"{mean:.4f}"
    return text if std is None else f"{text} +- {std:.4f}"


def beat_line(res: PathResult, label: str) -> str:
    """How many seeds the student beat its baseline in, and whether the mean gain clears twice the
    larger of the two seed standard deviations (the issue's bar for a clear gain)."""
    parts, clear = [], []
    for metric in METRICS:
        gains = res.gains[metric]
        parts.append(f"{sum(g > 0 for g in gains)} of {len(gains)} seeds on {metric}")
        stds = [mean_std(res.values.get((role, metric), [0.0]))[1] for role in ("baseline", "student")]
        if len(gains) > 1 and None not in stds:
            bar = 2 * max(stds)
            mean = mean_std(gains)[0]
            clear.append(f"{metric} {'yes' if mean > bar else 'no'} ({mean:+.4f} vs {bar:.4f})")
    text = f"- {label}: the student beat the baseline in " + " and ".join(parts)
    return text + (f"; mean gain above twice the larger seed std: {', '.join(clear)}" if clear else "") + "."


def format_results_md(rows: Sequence[Mapping[str, Any]], labels: Mapping[str, str] | None = None,
                      before: Sequence[str] = (), after: Sequence[str] = ()) -> str:
    """The table in the paper's form (one line per path: teacher, baseline, distilled student and
    gain, mAP and NDS each as mean +- std over seeds), the beat counts, and the given extra lines."""
    labels = dict(labels or {})
    results = group_by_path(rows)
    head = ["path"] + [f"{role} {m}" for role in ROLES for m in METRICS] + [f"gain {m}" for m in METRICS] + ["seeds"]
    lines = [*before, *markdown_table(head, (
        [labels.get(res.path, res.path),
         *[format_mean_std(res.values.get((role, m), [])) for role in ROLES for m in METRICS],
         *[f"**{format_mean_std(res.gains[m], signed=True)}**" for m in METRICS],
         len(res.values.get(("student", "mAP"), []))] for res in results))]
    lines += ["", "Student against its baseline, seed by seed:"]
    lines += [beat_line(res, labels.get(res.path, res.path)) for res in results]
    return "\n".join([*lines, *after]) + "\n"


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    """results.csv: one line per row, CSV_COLUMNS."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for row in rows:
            w.writerow({k: (round(v, 5) if isinstance(v, float) else v) for k, v in row.items()})
    return path


def plot_results(path: Path, rows: Sequence[Mapping[str, Any]], labels: Mapping[str, str] | None = None,
                 title: str = "") -> Path:
    """Bar chart: baseline against distilled student per path (mean, sample-std error bars), mAP and
    NDS side by side, the teacher as a marker."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels = dict(labels or {})
    results = group_by_path(rows)
    x = np.arange(len(results))
    fig, axes = plt.subplots(1, len(METRICS), figsize=(4 + 2.2 * len(results), 4), squeeze=False)
    for ax, metric in zip(axes[0], METRICS):
        for offset, role, colour in ((-0.2, "baseline", "#9e9e9e"), (0.2, "student", "#1f77b4")):
            stats = [mean_std(r.values.get((role, metric), [np.nan])) for r in results]
            ax.bar(x + offset, [m for m, _ in stats], width=0.4, yerr=[s or 0.0 for _, s in stats], capsize=4,
                   color=colour, label=role if role == "baseline" else "student (UniDistill)")
        teacher = [mean_std(r.values.get(("teacher", metric), [np.nan]))[0] for r in results]
        ax.plot(x, teacher, "kD", label="teacher")
        ax.set_xticks(x, [labels.get(r.path, r.path) for r in results])
        ax.set_title(metric)
        ax.set_ylim(bottom=0)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(loc="best", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
