"""nuScenes detection metrics for a results JSON: the devkit's DetectionEval, quiet by default.

`evaluate_results` runs `DetectionEval` (config `detection_cvpr_2019`) on one split, writes the
devkit's `metrics_summary.json` and `metrics_details.json` into `out_dir` and returns the summary
dict (keys as the devkit writes them: mean_ap, nd_score, mean_dist_aps, tp_errors, label_tp_errors, ...).
Example renders are never drawn; PR/TP curve plots (PDF, matplotlib) only when asked for.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping

from nuscenes.eval.common.config import config_factory
from nuscenes.eval.detection.evaluate import DetectionEval
from nuscenes.nuscenes import NuScenes

from pipeline import nusc_db
from pipeline.classes import CLASS_NAMES

EVAL_CONFIG = "detection_cvpr_2019"
TP_NAMES: tuple[tuple[str, str], ...] = (
    ("trans_err", "mATE"), ("scale_err", "mASE"), ("orient_err", "mAOE"), ("vel_err", "mAVE"),
    ("attr_err", "mAAE"),
)


def evaluate_results(nusc_or_dataroot: NuScenes | str | Path, version: str, split: str,
                     results_json: str | Path, out_dir: str | Path, render_curves: bool = False,
                     verbose: bool = False) -> dict[str, Any]:
    """Evaluate a nuScenes results JSON on `split`; write metrics files into `out_dir`; return the summary.

    Args:
        nusc_or_dataroot: an open NuScenes (its version must be `version`) or a dataroot to open.
        version, split: e.g. 'v1.0-mini', 'mini_val' (checked against each other).
        results_json: the file pipeline.results.write_results_json wrote; it must cover every
            sample token of the split (the devkit asserts it).
        render_curves: also save the devkit's PR/TP curve plots under out_dir/plots.
    """
    nusc_db.check_split(version, split)
    if isinstance(nusc_or_dataroot, NuScenes):
        nusc = nusc_or_dataroot
        if nusc.version != version:
            raise ValueError(f"evaluate_results: NuScenes object is {nusc.version!r}, asked for {version!r}")
    else:
        nusc = nusc_db.open_nuscenes(nusc_or_dataroot, version)
    results_path = Path(results_json)
    if not results_path.is_file():
        raise FileNotFoundError(f"results file {str(results_path)!r} does not exist")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    evaluator = DetectionEval(nusc, config=config_factory(EVAL_CONFIG), result_path=str(results_path),
                              eval_set=split, output_dir=str(out), verbose=verbose)
    metrics, metric_data = evaluator.evaluate()
    if render_curves:
        evaluator.render(metrics, metric_data)
    summary = metrics.serialize()
    summary["meta"] = dict(evaluator.meta)
    # Same two files DetectionEval.main writes, without its prints and example renders.
    (out / "metrics_summary.json").write_text(json.dumps(summary, indent=2))
    (out / "metrics_details.json").write_text(json.dumps(metric_data.serialize(), indent=2))
    return summary


def _fmt(value: float) -> str:
    return "  nan" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def format_metrics_table(summary: Mapping[str, Any]) -> str:
    """Human-readable metrics: mAP, NDS, the five mean TP errors, then per-class AP and TP errors."""
    lines = [f"mAP: {summary['mean_ap']:.4f}   NDS: {summary['nd_score']:.4f}"]
    lines.append("   ".join(f"{short}: {_fmt(summary['tp_errors'][key])}" for key, short in TP_NAMES))
    header = f"{'class':<22}{'AP':>7}" + "".join(f"{short[1:]:>7}" for _, short in TP_NAMES)
    lines += ["", header, "-" * len(header)]
    aps, tps = summary["mean_dist_aps"], summary["label_tp_errors"]
    for name in CLASS_NAMES:
        if name not in aps:
            continue
        row = f"{name:<22}{_fmt(aps[name]):>7}"
        row += "".join(f"{_fmt(tps[name][key]):>7}" for key, _ in TP_NAMES)
        lines.append(row)
    return "\n".join(lines)
