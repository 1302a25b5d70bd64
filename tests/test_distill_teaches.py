"""Distillation teaches (issue 12): a camera student trained with the UniDistill losses ends up closer to
its LiDAR teacher at the GT keypoints than the same student trained on its detection loss alone.

- Teacher: the tiny LiDAR detector, seeded and trained for a few steps on the batches below, so that its
  maps carry the objects (LiDAR features where the points hit them, heat-map peaks and box regression at
  the GT), BatchNorm statistics set from those batches, then frozen in eval mode. A random teacher would
  only show that a student can copy arbitrary maps; a trained one also makes the response comparison
  fair, since the detection loss alone already pulls a student's heat map and regression towards it.
- Students: two copies of the tiny camera detector from one seed, trained on the same real batches in
  the same order with the recipe's optimiser (AdamW of `train`, its gradient clipping, constant lr):
  `baseline` on `model.loss`, `distilled` through pipeline.engine.distill_task's DistillLosses and
  UniDistillLoss with the lidar->camera config resolved as distill_task resolves it (distill_settings:
  the paper's weights 100 / 40 / 10). The teacher's maps reach it as a cache gives them, float16 in
  `batch["teacher"]`.
- Measure, on the training batches: the three UniDistill losses with the path's weights (feature,
  relation, response = cls + reg), and, independently of the keypoint sampling, the cosine distance
  between student and teacher low maps at the cell of each GT centre.
"""
from __future__ import annotations

import copy
import math
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models.bev_grid import BEVGrid
from models.detector import BEVDetector, build_detector
from models.distill import UniDistillLoss, box_keypoints, sample_at_keypoints
from pipeline.config import load_config
from pipeline.data.collate import collate
from pipeline.data.dataset import DetectionDataset
from pipeline.engine.distill_config import build_distill_loss
from pipeline.engine.distill_task import DistillLosses, collate_with_teacher, distill_settings
from pipeline.engine.optim import build_optimizer, clip_gradients
from tests.conftest import deterministic_torch

VERSION = "v1.0-mini"
# One sample per batch, the first key frames of four mini_train scenes (~25-37 boxes each).
ITEMS = (0, 6, 12, 18)
TEACHER_STEPS, TEACHER_LR = 20, 1e-2
STUDENT_STEPS = 40
SEED = 0


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("index")


def set_batchnorm_statistics(model: nn.Module, batches: list[Mapping[str, Any]]) -> None:
    """Running statistics of every BatchNorm = the mean over `batches` of their batch statistics."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    model.train()
    with torch.no_grad():
        for batch in batches:
            model(batch)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum


def train_teacher(cfg: Mapping[str, Any], batches: list[dict[str, Any]]) -> BEVDetector:
    teacher = build_detector(cfg).train()
    opt = torch.optim.AdamW(teacher.parameters(), lr=TEACHER_LR, weight_decay=0.0)
    for step in range(TEACHER_STEPS):
        loss = teacher.loss(batches[step % len(batches)])["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    set_batchnorm_statistics(teacher, batches)
    return teacher.eval().requires_grad_(False)


def train_student(student: BEVDetector, cfg: Mapping[str, Any], settings: Mapping[str, Any] | None,
                  batches: list[dict[str, Any]]) -> None:
    """STUDENT_STEPS over `batches` in order: detection loss only (settings None), or detection +
    UniDistill losses through distill_task's DistillLosses (cached-teacher path: batch["teacher"])."""
    extra = nn.ModuleDict({"distill": build_distill_loss(student.grid, settings)}) if settings is not None else nn.ModuleDict()
    losses = DistillLosses(student.grid, None, warp=False)
    tr = cfg["train"]
    opt = build_optimizer(list(student.parameters()) + list(extra.parameters()), tr, float(tr["lr"]))
    student.train()
    for step in range(STUDENT_STEPS):
        batch = batches[step % len(batches)]
        loss = student.loss(batch)["loss"] if settings is None else losses(student, extra, batch)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        clip_gradients([student, extra], float(tr["grad_clip"]))
        opt.step()


def keypoint_cosine_distance(student_low: torch.Tensor, teacher_low: torch.Tensor, batch: Mapping[str, Any],
                             grid: BEVGrid) -> torch.Tensor:
    """Mean over GT boxes and their 9 keypoints of 1 - cos(student, teacher) of the low maps there."""
    keypoints = box_keypoints(batch["gt_boxes"])
    s = sample_at_keypoints(student_low, keypoints, grid)[batch["gt_mask"]]  # [N, 9, C]
    t = sample_at_keypoints(teacher_low, keypoints, grid)[batch["gt_mask"]]
    return 1 - F.cosine_similarity(s, t, dim=-1).mean()


def centre_cosine_distance(student_low: torch.Tensor, teacher_low: torch.Tensor, batch: Mapping[str, Any],
                           grid: BEVGrid) -> torch.Tensor:
    """Mean over GT boxes of 1 - cos(student, teacher) of the low maps at the cell holding the box centre
    (integer cell lookup, not models.distill's keypoint sampling)."""
    boxes, mask = batch["gt_boxes"], batch["gt_mask"]
    col = torch.floor((boxes[..., 0] - grid.x_min) / grid.cell).long()
    row = torch.floor((boxes[..., 1] - grid.y_min) / grid.cell).long()
    ok = mask & (col >= 0) & (col < grid.W) & (row >= 0) & (row < grid.H)
    b = torch.arange(boxes.shape[0])[:, None].expand_as(col)
    s = student_low[b[ok], :, row[ok], col[ok]]  # [N, C]
    t = teacher_low[b[ok], :, row[ok], col[ok]]
    return 1 - F.cosine_similarity(s, t, dim=1).mean()


def distances(student: BEVDetector, measure: UniDistillLoss, batches: list[dict[str, Any]],
              teacher_maps: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """The student's distances to the teacher, averaged over `batches` (training-mode BatchNorm: the
    function the steps trained; a few dozen steps leave the running statistics near their init)."""
    student.train()
    sums: dict[str, float] = {}
    with torch.no_grad():
        for batch, maps in zip(batches, teacher_maps):
            out = student(batch)
            kd = measure(out, maps, batch["gt_boxes"], batch["gt_mask"])
            d = {"feature": kd["feature"], "relation": kd["relation"],
                 "response": kd["response_cls"] + kd["response_reg"],
                 "response_cls": kd["response_cls"], "response_reg": kd["response_reg"],
                 "keypoint_cosine": keypoint_cosine_distance(out["low"], maps["low"], batch, student.grid),
                 "centre_cosine": centre_cosine_distance(out["low"], maps["low"], batch, student.grid)}
            for k, v in d.items():
                sums[k] = sums.get(k, 0.0) + float(v) / len(batches)
    return sums


def teach(dataroot: Path, index_dir: Path, seed: int, disable: Sequence[str] = ()) -> dict[str, dict[str, float]]:
    """Distances to the teacher of the student `before` training, the `baseline` and the `distilled` one
    (trained without the losses named in `disable`: the check that a broken loss fails the test)."""
    student_cfg = load_config("tiny_lidar_to_camera")
    teacher_cfg = load_config("tiny_lidar")
    ds = DetectionDataset(dataroot, VERSION, "mini_train", student_cfg, train=False, cache_dir=index_dir,
                          with_images=True)
    samples = [ds[i] for i in ITEMS]
    batches = [collate([dict(s)]) for s in samples]
    assert all(int(b["gt_mask"].sum()) >= 10 for b in batches)
    with deterministic_torch(seed, threads=2):
        teacher = train_teacher(teacher_cfg, batches)
        with torch.no_grad():
            teacher_maps = [teacher(b) for b in batches]
        # The distilled student's batches carry the teacher's maps as a cache delivers them: per
        # sample, float16, stacked by distill_task's collate.
        cached = [collate_with_teacher([dict(s, teacher={k: v[0].half() for k, v in maps.items()})])
                  for s, maps in zip(samples, teacher_maps)]
        student = build_detector(student_cfg)
        # The config path of distill_task (plan_student -> distill_settings): the per-path defaults
        # of lidar->camera, channel widths from the two detectors.
        settings = distill_settings(student_cfg, teacher.modality, student,
                                    (teacher.low_channels, teacher.high_channels))
        assert [settings[k]["weight"] for k in ("feature", "relation", "response")] == [100.0, 40.0, 10.0]
        measure = build_distill_loss(student.grid, settings)
        before = distances(copy.deepcopy(student), measure, batches, teacher_maps)
        baseline, distilled = copy.deepcopy(student), copy.deepcopy(student)
        train_student(baseline, student_cfg, None, batches)
        trained = copy.deepcopy(settings)
        for name in disable:
            trained[name]["enabled"] = False
        train_student(distilled, student_cfg, trained, cached)
        return {"before": before, "baseline": distances(baseline, measure, batches, teacher_maps),
                "distilled": distances(distilled, measure, batches, teacher_maps)}


def test_distilled_student_is_closer_to_its_teacher(nusc_root: Path, index_dir: Path) -> None:
    start = time.perf_counter()
    d = teach(nusc_root, index_dir, SEED)
    base, dist = d["baseline"], d["distilled"]
    ratio = {k: dist[k] / base[k] for k in base}
    print(f"distill teaches ({time.perf_counter() - start:.0f} s): before {fmt(d['before'])}; baseline {fmt(base)}; "
          f"distilled {fmt(dist)}; distilled / baseline {fmt(ratio)}")
    assert all(math.isfinite(v) for v in (*base.values(), *dist.values())), d
    for key, bound in RATIO_BOUNDS.items():
        assert ratio[key] <= bound, (key, ratio, base, dist)


# Upper bounds of distilled / baseline distance. Measured (ratios at seeds 0-4, 1 thread; seed 0 on 2
# threads in brackets): feature 0.79 0.48 0.73 0.80 0.79 (0.80), relation 0.47 0.45 0.41 0.38 0.32 (0.41),
# response 0.57 0.79 0.29 0.23 0.84 (0.60), keypoint cosine 0.36 0.28 0.45 0.29 0.26, centre cosine 0.59
# 0.55 0.65 0.57 0.53. The trained teacher's heat map and regression are GT-like, so the detection loss
# alone already brings the baseline most of the way there (response before training ~43, baseline
# ~7-12): the feature and response bounds ask for 10 % more, the cosine measures for 20-40 %.
# With the three losses disabled the two students train identically and every ratio is exactly 1.
RATIO_BOUNDS = {"feature": 0.9, "relation": 0.65, "response": 0.9, "keypoint_cosine": 0.6, "centre_cosine": 0.8}


def fmt(d: Mapping[str, float]) -> str:
    return ", ".join(f"{k} {v:.3g}" for k, v in d.items())
