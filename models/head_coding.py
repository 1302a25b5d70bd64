"""The CenterHead's output layout and box coding (spec §3.6): per-task views of the heat map and
regression maps, box codes relative to anchor cells, and the dense training targets with their
ideal outputs (an oracle for tests of decoding, evaluation and the losses)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from models.classes import CLASS_INDEX, NUM_CLASSES, REGRESSION_CHANNELS, REGRESSION_PER_TASK, TASKS

# The 10 box-code channels of a task (its regression channels without "iou"):
# offset x, offset y (cells), z (m), log dx, log dy, log dz (m), sin yaw, cos yaw, vx, vy (m/s).
BOX_CODE_SIZE = REGRESSION_PER_TASK - 1
IOU_CHANNEL = REGRESSION_PER_TASK - 1
# Decoded sizes are clamped to this range (spec §3.6), which also keeps exp() finite.
DIM_MIN, DIM_MAX = 1e-3, 30.0

# First heat-map channel of each task, and the task of each class index.
TASK_OFFSETS: tuple[int, ...] = tuple(sum(len(t) for t in TASKS[:k]) for k in range(len(TASKS) + 1))
TASK_OF_CLASS: tuple[int, ...] = tuple(t for t, names in enumerate(TASKS) for _ in names)
assert [CLASS_INDEX[n] for t in TASKS for n in t] == list(range(NUM_CLASSES))


def split_heatmap(heatmap: Tensor) -> list[Tensor]:
    """Per-task views [B, n_cls_t, H, W] of a heat map [B, 10, H, W]."""
    return [heatmap[:, TASK_OFFSETS[t]:TASK_OFFSETS[t + 1]] for t in range(len(TASKS))]


def split_regression(regression: Tensor) -> list[dict[str, Tensor]]:
    """Per-task dicts {"reg": [B, 2, H, W], "height": [B, 1, H, W], ...} of a regression map [B, 66, H, W]."""
    out = []
    for t in range(len(TASKS)):
        start, branches = t * REGRESSION_PER_TASK, {}
        for name, n in REGRESSION_CHANNELS:
            branches[name] = regression[:, start:start + n]
            start += n
        out.append(branches)
    return out


def encode_boxes(boxes: Tensor, anchors: Tensor, cell: float) -> Tensor:
    """Box codes [P, 10] of boxes [P, 9] at anchor points [P, 2] (metres) on cells of `cell` metres.

    Non-finite codes (zero sizes, missing velocities) are set to 0, as in the original.
    """
    offset = (boxes[:, :2] - anchors) / cell
    codes = torch.cat([offset, boxes[:, 2:3], torch.log(boxes[:, 3:6]),
                       torch.sin(boxes[:, 6:7]), torch.cos(boxes[:, 6:7]), boxes[:, 7:9]], dim=1)
    return torch.where(torch.isfinite(codes), codes, torch.zeros_like(codes))


def decode_boxes(codes: Tensor, anchors: Tensor, cell: float) -> Tensor:
    """Boxes [P, 9] (x, y, z, dx, dy, dz, yaw, vx, vy) of box codes [P, >=10] at anchors [P, 2]."""
    xy = anchors + codes[:, :2] * cell
    dims = codes[:, 3:6].clamp(math.log(DIM_MIN), math.log(DIM_MAX)).exp()
    yaw = torch.atan2(codes[:, 6:7], codes[:, 7:8])
    return torch.cat([xy, codes[:, 2:3], dims, yaw, codes[:, 8:10]], dim=1)


@dataclass
class HeadTargets:
    """Training targets of one batch, dense on the BEV grid (T = len(TASKS)).

    heatmap:  [B, 10, H, W] float, 1 at a positive cell in its assigned GT's class channel, else 0
    positive: [B, T, H, W] bool, the positive cells of each task
    box:      [B, T, 10, H, W] float, box codes at positives (0 elsewhere)
    gt_index: [B, T, H, W] int64, the GT row each positive is assigned to (-1 elsewhere)
    """

    heatmap: Tensor
    positive: Tensor
    box: Tensor
    gt_index: Tensor


def ideal_outputs(targets: HeadTargets, logit: float = 20.0) -> tuple[Tensor, Tensor]:
    """The head outputs that match `targets` exactly: (heatmap [B, 10, H, W], regression [B, 66, H, W]).

    Heat-map logits are +logit at positives and -logit elsewhere; the box channels equal the
    targets and the IoU channel says IoU = 1. Decoding them gives back the ground truth (an
    oracle for testing decode, evaluation and the loss).
    """
    heatmap = torch.where(targets.heatmap > 0, logit, -logit).to(targets.box.dtype)
    b, t, _, h, w = targets.box.shape
    iou = targets.positive.to(targets.box.dtype)[:, :, None]  # [B, T, 1, H, W]: 2 * (1 - 0.5) at positives
    return heatmap, torch.cat([targets.box, iou], dim=2).reshape(b, t * REGRESSION_PER_TASK, h, w)
