"""nuScenes detection metrics for a results JSON: the devkit's DetectionEval, quiet by default.

`evaluate_results` runs `DetectionEval` on one split, writes the devkit's `metrics_summary.json`
and `metrics_details.json` into `out_dir` and returns the summary dict (keys as the devkit writes
them: mean_ap, nd_score, mean_dist_aps, tp_errors, label_tp_errors, ...). The devkit config is
`detection_cvpr_2019` unless a run's `eval` section names another or caps the class ranges (a
smaller BEV grid than nuScenes' needs smaller ranges); `detection_config` builds it with the
devkit's own DetectionConfig class.
Example renders are never drawn; PR/TP curve plots (PDF, matplotlib) only when asked for.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping

from nuscenes.eval.common.config import config_factory
from nuscenes.eval.detection.data_classes import DetectionConfig
from nuscenes.eval.detection.evaluate import DetectionEval
from nuscenes.nuscenes import NuScenes

from models.classes import CLASS_NAMES
from pipeline.config import ConfigError
from pipeline.data import nusc_db

EVAL_CONFIG = "detection_cvpr_2019"
TP_NAMES: tuple[tuple[str, str], ...] = (
    ("trans_err", "mATE"), ("scale_err", "mASE"), ("orient_err", "mAOE"), ("vel_err", "mAVE"),
    ("attr_err", "mAAE"),
)


def detection_config(eval_cfg: Mapping[str, Any] | None = None) -> DetectionConfig:
    """The devkit DetectionConfig of a run's `eval` section (None: the devkit's `detection_cvpr_2019`).

    `eval_cfg["detection_config"]` names a devkit preset; `eval_cfg["max_range"]` (metres, or None)
    caps every class range, so that a model whose BEV grid ends nearer than the preset's ranges is
    scored on the objects it can see (the devkit filters both GT and predictions by these ranges).
    """
    eval_cfg = dict(eval_cfg or {})
    unknown = set(eval_cfg) - {"detection_config", "max_range"}
    if unknown:
        raise ConfigError(f"eval config: unknown keys {sorted(unknown)} (known: detection_config, max_range)")
    name = eval_cfg.get("detection_config") or EVAL_CONFIG
    try:
        base = config_factory(name)
    except Exception as e:  # the devkit raises a bare AssertionError for an unknown name
        raise ConfigError(f"eval.detection_config {name!r} is not a devkit detection config ({e})") from None
    max_range = eval_cfg.get("max_range")
    if max_range is None:
        return base
    if not isinstance(max_range, (int, float)) or isinstance(max_range, bool) or max_range <= 0:
        raise ConfigError(f"eval.max_range must be a positive number of metres or null, got {max_range!r}")
    fields = base.serialize()
    fields["class_range"] = {k: min(float(v), float(max_range)) for k, v in fields["class_range"].items()}
    return DetectionConfig.deserialize(fields)


def describe_detection_config(config: DetectionConfig) -> str:
    """One line naming what a table was scored with: class ranges and distance thresholds."""
    ranges = ", ".join(f"{k} {v:g}" for k, v in config.class_range.items())
    return (f"devkit DetectionConfig: class ranges (m) {ranges}; {config.dist_fcn} thresholds "
            f"{list(config.dist_ths)} m (TP errors at {config.dist_th_tp} m)")


def evaluate_results(nusc_or_dataroot: NuScenes | str | Path, version: str, split: str,
                     results_json: str | Path, out_dir: str | Path, render_curves: bool = False,
                     verbose: bool = False, config: DetectionConfig | None = None) -> dict[str, Any]:
    """Evaluate a nuScenes results JSON on `split`; write metrics files into `out_dir`; return the summary.

    Args:
        nusc_or_dataroot: an open NuScenes (its version must be `version`) or a dataroot to open.
        version, split: e.g. 'v1.0-mini', 'mini_val' (checked against each other).
        results_json: the file pipeline.evaluation.results.write_results_json wrote; it must cover every
            sample token of the split (the devkit asserts it).
        render_curves: also save the devkit's PR/TP curve plots under out_dir/plots.
        config: the devkit DetectionConfig (see `detection_config`); None: `detection_cvpr_2019`.
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

    config = config if config is not None else config_factory(EVAL_CONFIG)
    evaluator = DetectionEval(nusc, config=config, result_path=str(results_path),
                              eval_set=split, output_dir=str(out), verbose=verbose)
    metrics, metric_data = evaluator.evaluate()
    if render_curves:
        evaluator.render(metrics, metric_data)
    summary = metrics.serialize()
    summary["meta"] = dict(evaluator.meta)
    summary["detection_config"] = config.serialize()
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
