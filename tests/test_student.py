"""UniDistill students: cached targets against the online teacher, view policies, warping, refusals,
training with resume through Ray, and a sweep of variants over one cache."""
from __future__ import annotations

import math
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from models.bev_grid import BEVGrid
from models.detector import build_detector
from models.head_coding import ideal_outputs
from pipeline.cache import store
from pipeline.cache.reader import CacheReader
from pipeline.cache.schema import CacheError, CacheMismatchError
from pipeline.cache.warp import warp_teacher_maps
from pipeline.config import ConfigError, load_config
from pipeline.data import augment
from pipeline.data.collate import collate
from pipeline.data.dataset import DetectionDataset
from pipeline.data.index import load_index
from pipeline.engine.distill_config import build_distill_loss
from pipeline.engine.distill_task import (DistillDataset, DistillLosses, collate_with_teacher, plan_student,
                                   resolve_view_policy)
from pipeline.model_files import load_detector

from tests.conftest import REPO, committed_checkpoints

VERSION, SPLIT = "v1.0-mini", "mini_val"


def split_tokens(root) -> list[str]:
    return [r["token"] for r in load_index(root, VERSION, SPLIT)]


# --- warping a single-view cache ------------------------------------------------------------------
def test_warped_ideal_maps_decode_to_the_augmented_boxes():
    """Canonical maps that encode GT exactly, warped to a BEV augmentation, decode to the augmented GT."""
    cfg = load_config("tiny_lidar")
    head = build_detector(cfg).head
    boxes = torch.tensor([[[10.3, -7.7, -0.8, 4.5, 1.9, 1.6, 0.4, 3.0, -1.0, ],
                           [-20.2, 15.1, -1.0, 10.5, 2.9, 3.4, -2.5, 0.0, 0.0],
                           [5.0, 25.0, -0.5, 0.7, 0.6, 1.7, 1.2, 1.0, 0.5]]])
    labels = torch.tensor([[0, 3, 8]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    heatmap, regression = ideal_outputs(head.get_targets(boxes, labels, mask))
    grid = head.grid
    for angle, scale, flip_x, flip_y in ((30.0, 1.05, False, False), (-40.0, 0.93, True, False), (10.0, 1.0, True, True)):
        c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
        bda = np.diag([-1.0 if flip_x else 1.0, -1.0 if flip_y else 1.0, 1.0, 1.0]) @ np.array(
            [[scale * c, -scale * s, 0, 0.4], [scale * s, scale * c, 0, -0.3], [0, 0, scale, 0.2], [0, 0, 0, 1]])
        warped = warp_teacher_maps({"heatmap": heatmap, "regression": regression},
                                   torch.tensor(bda, dtype=torch.float32)[None], grid)
        det = head.decode(warped["heatmap"], warped["regression"])[0]
        want = augment.transform_boxes(boxes[0].numpy().astype(np.float64), bda)
        for b, label in zip(want, labels[0]):
            same = (det["labels"] == label).nonzero().squeeze(1)
            d = torch.linalg.norm(det["boxes"][same, :2] - torch.tensor(b[:2], dtype=torch.float32), dim=1)
            got = det["boxes"][same[d.argmin()]].numpy()
            assert d.min() < 0.05, (angle, label, d.min())
            np.testing.assert_allclose(got[2:6], b[2:6], rtol=1e-3, atol=1e-3)
            assert abs(math.remainder(got[6] - b[6], 2 * math.pi)) < 1e-3
            np.testing.assert_allclose(got[7:9], b[7:9], atol=1e-3)


def test_identity_warp_is_exact_and_view_policies_resolve():
    grid = BEVGrid.from_config(load_config("tiny")["grid"])
    maps = {"low": torch.randn(2, 3, grid.H, grid.W), "regression": torch.randn(2, 66, grid.H, grid.W)}
    out = warp_teacher_maps(maps, torch.eye(4).expand(2, 4, 4), grid)
    assert all(torch.equal(out[k], maps[k]) for k in maps)
    assert resolve_view_policy("auto", 3, True) == "replay"
    assert resolve_view_policy("auto", 1, True) == "warp"
    assert resolve_view_policy("auto", 1, False) == "canonical"
    with pytest.raises(ConfigError, match="replay needs a cache with --views > 1"):
        resolve_view_policy("replay", 1, True)
    with pytest.raises(ConfigError, match="not one of"):
        resolve_view_policy("mirror", 2, True)


# --- cached against online -------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name,policy", [("dense1", "canonical"), ("dense2", "replay"), ("kp2", "replay"),
                                         ("kp2", "canonical")])
def test_cached_losses_equal_online_losses_on_identical_batches(caches, tiny_teacher, nusc_root, name, policy):
    cfg = load_config("tiny_lidar_to_camera")
    torch.manual_seed(0)
    student = build_detector(cfg).eval()  # eval: batch statistics must not differ between the two passes
    teacher, _ = load_detector(tiny_teacher)
    teacher.eval()
    reader = CacheReader(str(caches[name][0]))
    base = DetectionDataset(nusc_root, VERSION, SPLIT, cfg, train=True, seed=3, with_images=True)
    cached = DistillDataset(base, reader, policy)
    if policy == "canonical":
        cfg["distill"]["view_policy"] = "canonical"
    loop, _ = plan_student(cfg, VERSION, SPLIT, split_tokens(nusc_root), cache=str(caches[name][0]))
    kd = torch.nn.ModuleDict({"distill": build_distill_loss(student.grid, loop["distill"])})
    views_seen = set()
    for epoch in (0, 1):
        cached.set_epoch(epoch)
        samples = [cached[i] for i in range(len(cached))]
        views_seen |= {int(round(float(np.arctan2(s["bda"][1, 0], s["bda"][0, 0])) * 1e4)) for s in samples}
        batch_cached = collate_with_teacher([dict(s) for s in samples])
        batch_online = collate([{k: v for k, v in s.items() if k != "teacher"} for s in samples])
        with torch.no_grad():
            a = DistillLosses(student.grid, None, warp=False)(student, kd, batch_cached)
            b = DistillLosses(student.grid, teacher, warp=False)(student, kd, batch_online)
        for key in ("feature", "relation", "response_cls", "response_reg", "distill", "det"):
            assert a[key] > 0
            torch.testing.assert_close(a[key], b[key], rtol=5e-3, atol=1e-5, msg=key)
    if policy == "replay":
        assert len(views_seen) > 1, "replay draws stored augmented views"


def test_a_cache_that_does_not_fit_is_refused(caches, tiny_teacher, nusc_root, tmp_path):
    uri = str(caches["dense1"][0])
    tokens = split_tokens(nusc_root)
    other_grid = load_config("tiny_lidar_to_camera", ["grid.voxel_size=[0.1, 0.1, 0.2]"])
    with pytest.raises(CacheMismatchError, match="grid.voxel_size"):
        plan_student(other_grid, VERSION, SPLIT, tokens, cache=uri)
    with pytest.raises(CacheMismatchError, match="holds v1.0-mini mini_val, the student trains on v1.0-mini mini_train"):
        plan_student(load_config("tiny_lidar_to_camera"), VERSION, "mini_train", tokens, cache=uri)
    with pytest.raises(ConfigError, match="expects a fusion teacher"):
        plan_student(load_config("tiny_fusion_to_camera"), VERSION, SPLIT, tokens, cache=uri)
    with pytest.raises(ConfigError, match="replay needs a cache with --views > 1"):
        plan_student(load_config("tiny_lidar_to_camera", ["distill.view_policy=replay"]), VERSION, SPLIT, tokens,
                     cache=uri)
    with pytest.raises(ValueError, match="exactly one of --cache"):
        plan_student(load_config("tiny_lidar_to_camera"), VERSION, SPLIT, tokens)
    # A cache whose job has not finished: refused with the number of missing shards.
    partial = tmp_path / "partial"
    shutil.copytree(uri, partial)
    store.remove_marker(str(partial), 1)
    store.remove_marker(str(partial), 2)
    group = store.open_cache_group(str(partial), mode="r+")
    group.attrs["complete"] = False
    with pytest.raises(CacheError, match="incomplete: 2 of 3 shards are missing"):
        plan_student(load_config("tiny_lidar_to_camera"), VERSION, SPLIT, tokens, cache=str(partial))
    # Online: a teacher with other input settings than the student's is refused.
    with pytest.raises(CacheMismatchError, match="data.image_size"):
        plan_student(load_config("tiny_lidar_to_camera", ["data.image_size=[32, 88]"]), VERSION, SPLIT, tokens,
                     teacher=str(tiny_teacher))


# --- through Ray -----------------------------------------------------------------------------------
def _submit(cluster, args, wait=True, timeout=600):
    ray = str(sys.executable).rsplit("/", 1)[0] + "/ray"
    cmd = ["timeout", str(timeout), ray, "job", "submit", "--address", cluster["dashboard"], "--working-dir", str(REPO)]
    cmd += ([] if wait else ["--no-wait"]) + ["--", "python", *args]
    return subprocess.run(cmd, cwd=REPO, env=cluster["env"], capture_output=True, text=True, timeout=timeout + 30)


@pytest.mark.slow
def test_student_job_resumes_and_exports_the_student_alone(ray_cluster, caches, nusc_root, tmp_path):
    """A cached-mode student with adaptation layers, stopped after its first epoch and re-submitted."""
    run = tmp_path / "student"
    args = ["stages/train_student.py", "--config", "tiny_lidar_to_camera", "--cache", str(caches["dense2"][0]),
            "--dataroot", str(nusc_root), "--split", SPLIT, "--output", str(run),
            "--set", "distill.adaptation.enabled=true", "--set", "train.epochs=12", "--set", "train.batch_size=2",
            "--set", "runtime.loader_workers=1"]
    first = _submit(ray_cluster, args, wait=False)
    assert first.returncode == 0, first.stdout + first.stderr
    job = next(line.split("'")[1] for line in first.stdout.splitlines() if "submitted successfully" in line)
    deadline = time.time() + 300
    while time.time() < deadline and not committed_checkpoints(run):  # committed, not merely a folder
        time.sleep(0.1)
    ray = str(sys.executable).rsplit("/", 1)[0] + "/ray"
    subprocess.run([ray, "job", "stop", "--address", ray_cluster["dashboard"], job], env=ray_cluster["env"],
                   capture_output=True, timeout=120, check=True)
    stopped_at = int(committed_checkpoints(run)[-1].split("_")[1])  # what a re-submitted run resumes from
    assert stopped_at < 12, "the first job was stopped part-way"
    second = _submit(ray_cluster, args)
    log = second.stdout + second.stderr
    assert second.returncode == 0, log[-4000:]
    assert f"resuming from epoch {stopped_at}" in log
    for key in ("feature", "relation", "response_cls", "response_reg", "det_heatmap"):
        assert f" {key} " in log, key
    exported = torch.load(run / "model.pt", weights_only=False)
    plain = build_detector(load_config("tiny_camera")).state_dict()
    assert set(exported["state_dict"]) == set(plain), "model.pt is the student alone"
    state = torch.load(sorted(run.glob("epoch_*"))[-1] / "state.pt", weights_only=False)
    assert any(k.startswith("distill.adaptation.") for k in state["extra"]), "adapters are checkpointed for resume"
    model, cfg = load_detector(run / "model.pt")
    assert model.modality == "camera"


@pytest.mark.slow
def test_sweep_of_two_variants_over_one_cache(ray_cluster, caches, nusc_root, tmp_path):
    """Two students trained by Ray from one keypoint cache (the resume test covers a dense one)."""
    grid = tmp_path / "grid.yaml"
    grid.write_text("variants:\n  - {name: all_losses}\n  - {name: no_relation, set: {distill.relation.enabled: false}}\n")
    out = tmp_path / "sweep"
    done = _submit(ray_cluster, ["stages/sweep_students.py", "--config", "tiny_lidar_to_camera", "--cache",
                                 str(caches["kp2"][0]), "--grid", str(grid), "--dataroot", str(nusc_root),
                                 "--split", SPLIT, "--eval-split", SPLIT, "--output", str(out),
                                 "--concurrent", "2", "--set", "train.epochs=1", "--set", "train.batch_size=2",
                                 "--set", "runtime.loader_workers=1"], timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    table = (out / "results.md").read_text()
    assert "| all_losses | distilled |" in table and "| no_relation | distilled |" in table
    import csv

    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [r["variant"] for r in rows] == ["all_losses", "no_relation"]
    assert all(0.0 <= float(r["mAP"]) <= 1.0 and 0.0 <= float(r["NDS"]) <= 1.0 for r in rows)
    for name in ("all_losses", "no_relation"):
        assert (out / name / "model.pt").is_file() and (out / name / "eval" / "metrics_summary.json").is_file()
