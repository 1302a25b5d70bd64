"""Evaluate an exported model on a nuScenes split (the body of stages/evaluate.py).

Writes into OUT:
    nuscenes_results.json   detections in the nuScenes submission format (every split)
    metrics_summary.json    the devkit's DetectionEval summary (splits with annotations)
    metrics_details.json    the devkit's per-class, per-threshold details
    metrics_table.txt       mAP, NDS, TP errors and per-class AP as printed
    plots/                  the devkit's PR and TP curves
    bev/                    BEV pictures of a few samples: points, GT (green), predictions (red)
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from models.bev_grid import BEVGrid
from models.checkpoint import CheckpointError
from pipeline.config import diff_keys, load_config
from pipeline.data import nusc_db
from pipeline.data.dataset import index_sweeps
from pipeline.data.index import build_index, share_index, table_to_rows
from pipeline.evaluation.devkit_metrics import describe_detection_config, detection_config, evaluate_results, format_metrics_table
from pipeline.evaluation.inference import eval_dataset, predict_split
from pipeline.evaluation.results import global_results_to_lidar, write_results_json
from pipeline.evaluation.visualize import render_bev_sample
from pipeline.model_files import read_model_file
from pipeline.ray_env import ray_session

RESULTS_FILE = "nuscenes_results.json"
BEV_SAMPLES = 4


def check_model_matches(model_path: str | Path, preset: str | None) -> dict[str, Any]:
    """The model file's config; with `preset`, refuse a model whose grid or model differ from it."""
    cfg = read_model_file(model_path)["config"]
    if preset is not None:
        want = load_config(preset)
        differ = diff_keys({"grid": cfg["grid"], "model": cfg["model"]},
                           {"grid": want["grid"], "model": want["model"]})
        if differ:
            raise CheckpointError(f"model file {model_path} was not built with config {preset!r} "
                                  f"(differing: {', '.join(differ)})")
    return cfg


def render_examples(out_dir: Path, cfg: Mapping[str, Any], dataroot: str | Path, version: str, split: str,
                    results: Mapping[str, list[dict]], count: int = BEV_SAMPLES) -> list[Path]:
    """BEV pictures of the first `count` samples: points and GT from the dataset, predictions from `results`."""
    dataset = eval_dataset(cfg, dataroot, version, split, "lidar")
    grid = BEVGrid.from_config(cfg["grid"])
    paths = []
    for item in np.linspace(0, len(dataset) - 1, num=min(count, len(dataset))).astype(int):
        sample, row = dataset.get(int(item)), dataset.row(int(item))
        dets = [d for d in results.get(row["token"], []) if d["detection_score"] >= 0.3]
        boxes = global_results_to_lidar(row, dets)
        paths.append(render_bev_sample(out_dir / "bev" / f"{item:04d}_{row['token'][:8]}.png", grid,
                                       sample["points"], sample["gt_boxes"], sample["gt_labels"], boxes,
                                       np.zeros(len(boxes), dtype=int),
                                       title=f"{row['scene_name']} {row['token'][:8]}: {len(dets)} detections >= 0.3"))
    return paths


def evaluate_model(model_path: str | Path, dataroot: str | Path, version: str, split: str, out_dir: str | Path,
                   runtime: Mapping[str, Any] | None = None, preset: str | None = None,
                   address: str | None = None, render: bool = True) -> dict[str, Any] | None:
    """Predict the split with Ray Data, write the results JSON and (with annotations) the devkit metrics.

    Returns the metrics summary, or None for the test split (submission file only).
    """
    nusc_db.check_dataroot(dataroot, version)
    nusc_db.check_split(version, split)
    cfg = check_model_matches(model_path, preset)
    rt = dict(load_config("nuscenes")["runtime"], **(runtime or {}))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = build_index(dataroot, version, split, max_sweeps=index_sweeps(cfg))
    rows = table_to_rows(table)
    with ray_session(address):
        index = share_index(table)
        results = predict_split(model_path, Path(dataroot).resolve(), version, split, len(rows), index=index,
                                actors=int(rt["eval_actors"]), batch_size=int(rt["eval_batch_size"]),
                                cpus_per_actor=float(rt["eval_cpus_per_actor"]),
                                gpus_per_actor=1.0 if rt["use_gpu"] else 0.0)
    modality = cfg["model"]["modality"]
    results_path = write_results_json(out / RESULTS_FILE, results, [r["token"] for r in rows],
                                      use_camera=modality != "lidar", use_lidar=modality != "camera")
    print(f"[evaluate] wrote {results_path} ({sum(map(len, results.values()))} boxes, {len(results)} samples)")
    if split == "test":
        return None
    config = detection_config(cfg.get("eval"))
    summary = evaluate_results(dataroot, version, split, results_path, out, render_curves=render, config=config)
    table = format_metrics_table(summary) + "\n" + describe_detection_config(config)
    (out / "metrics_table.txt").write_text(table + "\n")
    print(table)
    if render:
        render_examples(out, cfg, dataroot, version, split, results)
    return summary
