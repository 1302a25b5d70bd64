"""Detections in the key-frame LiDAR frame -> nuScenes results JSON (global frame).

A box [x, y, z, dx, dy, dz, yaw, vx, vy] becomes a devkit `Box` (size wlh = (dy, dx, dz)), is moved
LiDAR -> ego with the key LIDAR_TOP calibration and ego -> global with its ego pose (the index
row's `lidar2ego` and `ego2global`, the same records the devkit would look up), and is written
with a 2-D global velocity and the default attribute for its class and speed.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
from nuscenes.eval.common.utils import quaternion_yaw
from nuscenes.utils.data_classes import Box
from pyquaternion import Quaternion

from models.classes import CLASS_NAMES, default_attribute
from pipeline.data.sample import BOX_DIM

MAX_BOXES_PER_SAMPLE = 500  # detection_cvpr_2019 rejects more


def _quat(mat: np.ndarray) -> Quaternion:
    return Quaternion(matrix=np.asarray(mat, dtype=np.float64)[:3, :3])


def lidar_boxes_to_results(row: Mapping[str, Any], boxes: np.ndarray, scores: np.ndarray,
                           labels: np.ndarray, max_boxes: int = MAX_BOXES_PER_SAMPLE) -> list[dict]:
    """nuScenes sample_result dicts for one sample's detections.

    Args:
        row: the sample's index row (token, lidar2ego [4, 4], ego2global [4, 4]).
        boxes: [K, 9] in the key-frame LiDAR frame (not BEV-augmented). scores: [K]. labels: [K]
            int into CLASS_NAMES.
        max_boxes: keep only the highest-scoring boxes (nuScenes allows 500).
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, BOX_DIM)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    if not (len(boxes) == len(scores) == len(labels)):
        raise ValueError(f"sample {row['token']}: boxes {boxes.shape}, scores {scores.shape} and "
                         f"labels {labels.shape} must have the same length")
    bad = labels[(labels < 0) | (labels >= len(CLASS_NAMES))]
    if bad.size:
        raise ValueError(f"sample {row['token']}: labels {sorted(set(bad.tolist()))} are not in "
                         f"0..{len(CLASS_NAMES) - 1}")
    order = np.argsort(-scores, kind="stable")[:max_boxes]
    l2e, e2g = np.asarray(row["lidar2ego"]).reshape(4, 4), np.asarray(row["ego2global"]).reshape(4, 4)
    l2e_q, e2g_q = _quat(l2e), _quat(e2g)
    out = []
    for i in order:
        x, y, z, dx, dy, dz, yaw, vx, vy = boxes[i]
        box = Box([x, y, z], [dy, dx, dz], Quaternion(axis=[0.0, 0.0, 1.0], radians=yaw),
                  velocity=(vx, vy, 0.0))
        box.rotate(l2e_q)
        box.translate(l2e[:3, 3])
        box.rotate(e2g_q)
        box.translate(e2g[:3, 3])
        name = CLASS_NAMES[labels[i]]
        vel = box.velocity[:2]
        out.append({
            "sample_token": row["token"],
            "translation": box.center.tolist(),
            "size": box.wlh.tolist(),
            "rotation": box.orientation.elements.tolist(),
            "velocity": vel.tolist(),
            "detection_name": name,
            "detection_score": float(scores[i]),
            "attribute_name": default_attribute(name, float(np.hypot(*vel))),
        })
    return out


def global_results_to_lidar(row: Mapping[str, Any], results: list[dict]) -> np.ndarray:
    """Boxes [K, 9] in the key-frame LiDAR frame of nuScenes sample_results (the inverse of
    `lidar_boxes_to_results`, for drawing and checks)."""
    l2e, e2g = np.asarray(row["lidar2ego"]).reshape(4, 4), np.asarray(row["ego2global"]).reshape(4, 4)
    l2e_q, e2g_q = _quat(l2e), _quat(e2g)
    out = np.zeros((len(results), BOX_DIM))
    for i, det in enumerate(results):
        vel = det.get("velocity", [0.0, 0.0])
        box = Box(det["translation"], det["size"], Quaternion(det["rotation"]), velocity=(vel[0], vel[1], 0.0))
        box.translate(-e2g[:3, 3])
        box.rotate(e2g_q.inverse)
        box.translate(-l2e[:3, 3])
        box.rotate(l2e_q.inverse)
        w, length, h = box.wlh
        out[i] = [*box.center, length, w, h, quaternion_yaw(box.orientation), *box.velocity[:2]]
    return out


def results_document(results: Mapping[str, list[dict]], sample_tokens: Iterable[str], use_camera: bool,
                     use_lidar: bool) -> dict[str, Any]:
    """The results JSON document: meta block plus a (possibly empty) list for every split token.

    Raises ValueError when `results` holds a token outside the split or more than 500 boxes.
    """
    tokens = list(sample_tokens)
    extra = set(results) - set(tokens)
    if extra:
        raise ValueError(f"results hold {len(extra)} sample tokens outside the split, e.g. {sorted(extra)[:3]}")
    for tok, dets in results.items():
        if len(dets) > MAX_BOXES_PER_SAMPLE:
            raise ValueError(f"sample {tok}: {len(dets)} boxes, nuScenes allows {MAX_BOXES_PER_SAMPLE}")
    return {
        "meta": {"use_camera": bool(use_camera), "use_lidar": bool(use_lidar), "use_radar": False,
                 "use_map": False, "use_external": False},
        "results": {tok: list(results.get(tok, [])) for tok in tokens},
    }


def write_results_json(path: str | Path, results: Mapping[str, list[dict]], sample_tokens: Iterable[str],
                       use_camera: bool, use_lidar: bool) -> Path:
    """Write the results JSON (see `results_document`) atomically; return its path."""
    doc = results_document(results, sample_tokens, use_camera, use_lidar)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(doc, f)
    os.replace(tmp, p)
    return p
