"""Results JSON (LiDAR-frame boxes -> global sample_results) and the DetectionEval wrapper."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from nuscenes.eval.common.utils import quaternion_yaw
from nuscenes.utils.geometry_utils import transform_matrix
from pyquaternion import Quaternion

from models.classes import CLASS_INDEX, CLASS_NAMES
from pipeline.data.index import load_index
from pipeline.data.loading import filter_gt
from pipeline.evaluation.devkit_metrics import evaluate_results, format_metrics_table
from pipeline.evaluation.results import lidar_boxes_to_results, results_document, write_results_json

VERSION = "v1.0-mini"


@pytest.fixture(scope="module")
def val_rows(nusc_root: Path, tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return load_index(nusc_root, VERSION, "mini_val", cache_dir=tmp_path_factory.mktemp("index"))


def _row(token: str = "tok") -> dict:
    """LiDAR rotated +90 deg about z and shifted on the ego; ego rotated 180 deg in the global frame."""
    return {
        "token": token,
        "lidar2ego": transform_matrix([1.0, 2.0, 0.5], Quaternion(axis=[0, 0, 1], degrees=90)),
        "ego2global": transform_matrix([100.0, 200.0, 0.0], Quaternion(axis=[0, 0, 1], degrees=180)),
    }


def test_box_to_global_by_hand():
    box = np.array([[1.0, 0.0, 0.0, 4.0, 2.0, 1.5, 0.0, 1.0, 0.0]])
    (res,) = lidar_boxes_to_results(_row(), box, np.array([0.7]), np.array([CLASS_INDEX["car"]]))
    # (1, 0, 0) -> ego: rot90 -> (0, 1, 0) + (1, 2, 0.5) = (1, 3, 0.5) -> global: rot180 -> (-1, -3, 0.5)
    # + (100, 200, 0) = (99, 197, 0.5). Heading 0 + 90 + 180 = 270 deg; velocity (1, 0) -> (0, 1) -> (0, -1).
    np.testing.assert_allclose(res["translation"], [99.0, 197.0, 0.5], atol=1e-9)
    np.testing.assert_allclose(res["size"], [2.0, 4.0, 1.5])  # w, l, h
    yaw = Quaternion(res["rotation"]).yaw_pitch_roll[0]
    assert abs(np.cos(yaw) - 0.0) < 1e-9 and abs(np.sin(yaw) + 1.0) < 1e-9
    np.testing.assert_allclose(res["velocity"], [0.0, -1.0], atol=1e-9)
    assert res["detection_name"] == "car" and res["detection_score"] == pytest.approx(0.7)
    assert res["attribute_name"] == "vehicle.moving" and res["sample_token"] == "tok"
    # Standing vehicles take the devkit's convention: parked, except a bus, which waits at a stop.
    standing = box.copy()
    standing[0, 7] = 0.0
    labels = [CLASS_INDEX[n] for n in ("car", "truck", "trailer", "construction_vehicle", "bus")]
    res = lidar_boxes_to_results(_row(), np.repeat(standing, 5, axis=0), np.linspace(0.9, 0.5, 5), np.array(labels))
    assert [r["attribute_name"] for r in res] == ["vehicle.parked"] * 4 + ["vehicle.stopped"]


def test_at_most_500_boxes_keeping_the_best_and_bad_labels_rejected():
    rng = np.random.default_rng(0)
    boxes = np.tile([5.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0], (600, 1))
    scores = rng.permutation(600) / 600.0
    res = lidar_boxes_to_results(_row(), boxes, scores, np.zeros(600, dtype=int))
    kept = sorted(r["detection_score"] for r in res)
    assert len(res) == 500 and kept[0] == pytest.approx(100 / 600)
    with pytest.raises(ValueError, match="labels \\[10\\]"):
        lidar_boxes_to_results(_row(), boxes[:1], scores[:1], np.array([10]))
    with pytest.raises(ValueError, match="same length"):
        lidar_boxes_to_results(_row(), boxes[:2], scores[:1], np.array([0]))


def test_results_document_covers_every_token():
    doc = results_document({"a": [{"x": 1}]}, ["a", "b"], use_camera=True, use_lidar=False)
    assert doc["results"] == {"a": [{"x": 1}], "b": []}
    assert doc["meta"]["use_camera"] is True and doc["meta"]["use_lidar"] is False
    with pytest.raises(ValueError, match="outside the split"):
        results_document({"c": []}, ["a"], use_camera=False, use_lidar=True)
    with pytest.raises(ValueError, match="501 boxes"):
        results_document({"a": [{}] * 501}, ["a"], use_camera=False, use_lidar=True)


def test_index_boxes_go_back_to_the_annotation_records(nusc, val_rows):
    """An index box sent through the results path lands on its annotation record. The LiDAR frame
    tilts with the ego's pitch and roll (and its mounting), which the index's yaw-only box drops:
    the heading and velocity come back exact up to second order in that tilt."""
    checked = 0
    for row in val_rows:
        labels = np.zeros(len(row["gt_boxes"]), dtype=int)  # the class is irrelevant here
        # Equal scores keep the input order, so results[i] is annotation i.
        results = lidar_boxes_to_results(row, row["gt_boxes"], np.ones(len(labels)), labels)
        assert len(results) == len(row["gt_tokens"])
        tilt = np.arccos((row["ego2global"] @ row["lidar2ego"])[2, 2])  # LiDAR z axis against global z
        for ann_token, res in zip(row["gt_tokens"], results):
            ann = nusc.get("sample_annotation", ann_token)
            np.testing.assert_allclose(res["translation"], ann["translation"], atol=1e-6)
            np.testing.assert_allclose(res["size"], ann["size"], atol=1e-6)
            dyaw = quaternion_yaw(Quaternion(res["rotation"])) - quaternion_yaw(Quaternion(ann["rotation"]))
            assert abs(np.arctan2(np.sin(dyaw), np.cos(dyaw))) < 2 * np.sin(tilt) ** 2 + 1e-9
            vel = np.nan_to_num(nusc.box_velocity(ann_token)[:2], nan=0.0)
            np.testing.assert_allclose(res["velocity"], vel, atol=np.linalg.norm(vel) * np.sin(tilt) ** 2 + 1e-6)
            checked += 1
    assert checked > 0


def test_ground_truth_evaluates_to_perfect_scores(nusc, val_rows, tmp_path):
    results = {}
    for row in val_rows:
        boxes, labels = filter_gt(row, 1)
        results[row["token"]] = lidar_boxes_to_results(row, boxes, np.ones(len(labels)), labels)
    path = write_results_json(tmp_path / "results.json", results, [r["token"] for r in val_rows],
                              use_camera=False, use_lidar=True)
    assert json.loads(path.read_text())["meta"]["use_lidar"] is True
    summary = evaluate_results(nusc, VERSION, "mini_val", path, tmp_path / "eval")
    assert json.loads((tmp_path / "eval" / "metrics_summary.json").read_text())["mean_ap"] == summary["mean_ap"]
    assert summary["mean_ap"] >= 0.99, summary["mean_dist_aps"]
    for key in ("trans_err", "scale_err", "orient_err", "vel_err"):
        assert summary["tp_errors"][key] < 0.05, (key, summary["label_tp_errors"])

    table = format_metrics_table(summary)
    assert f"mAP: {summary['mean_ap']:.4f}" in table and f"NDS: {summary['nd_score']:.4f}" in table
    assert sum(line.split()[0] in CLASS_NAMES for line in table.splitlines() if line.strip()) == len(CLASS_NAMES)


def test_evaluation_rejects_bad_input(nusc, tmp_path):
    with pytest.raises(ValueError, match="not valid for nuScenes v1.0-mini"):
        evaluate_results(nusc, VERSION, "val", tmp_path / "r.json", tmp_path)
    with pytest.raises(FileNotFoundError, match="r.json"):
        evaluate_results(nusc, VERSION, "mini_val", tmp_path / "r.json", tmp_path)
    with pytest.raises(ValueError, match="v1.0-trainval"):
        evaluate_results(nusc, "v1.0-trainval", "val", tmp_path / "r.json", tmp_path)


def test_bev_pictures_are_written_as_pngs_with_content(tmp_path):
    import matplotlib.image as mpimg

    from models.bev_grid import BEVGrid
    from pipeline.config import load_config
    from pipeline.evaluation.visualize import render_bev_maps, render_bev_sample

    grid = BEVGrid.from_config(load_config("tiny_lidar")["grid"])
    box = np.array([[1.0, 2.0, 0.0, 4.0, 2.0, 1.5, 0.3, 0.0, 0.0]], dtype=np.float32)
    maps = render_bev_maps(tmp_path / "maps" / "m.png", grid, [("a", np.random.rand(grid.H, grid.W)),
                                                              ("b", np.zeros((grid.H, grid.W)))], box)
    points = np.random.default_rng(0).uniform(-20, 20, (500, 5)).astype(np.float32)
    sample = render_bev_sample(tmp_path / "s.png", grid, points, box, np.array([0]), box, np.array([0]), "t")
    for png in (maps, sample):
        img = mpimg.imread(png)  # [h, w, 4] floats
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
        assert img[..., :3].std() > 0.05, f"{png} is blank"
    assert mpimg.imread(maps).shape[1] > mpimg.imread(maps).shape[0], "two panels side by side"
