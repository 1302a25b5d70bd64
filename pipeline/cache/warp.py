"""Warp canonical-frame teacher maps to a student's fresh BEV augmentation (single-view caches).

A map cached in the canonical LiDAR frame is resampled onto the augmented frame's grid: the
value at augmented cell centre p is the canonical map's bilinear sample at bda^-1 p. Channels that
are vectors or lengths in the BEV frame are then transformed the way `pipeline.data.augment` moves
boxes (per task of the regression map):

    reg (x, y offset, cells)  -> A @ offset        A = the BDA's 2x2 xy block (rotation, scale, flips)
    height z (m)              -> m_zz * z + t_z
    dim log(l, w, h)          -> + log(scale)
    rot (sin, cos)            -> heading (cos, sin) turned by A / scale
    vel (vx, vy)              -> A @ v
    iou, heat-map logits, low/high features: resampled only.

Features are not equivariant to rotations of the input, so warped features approximate what the
teacher would compute on the augmented input; tests/bench/bench_student.py measures how closely.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from models.bev_grid import BEVGrid
from models.classes import REGRESSION_CHANNELS, REGRESSION_PER_TASK, TASKS

_OFFSET = {name: sum(n for _, n in REGRESSION_CHANNELS[:i]) for i, (name, _) in enumerate(REGRESSION_CHANNELS)}


def _source_grid(bda: Tensor, grid: BEVGrid) -> Tensor:
    """grid_sample coordinates [B, H, W, 2] of the canonical points under each augmented cell centre."""
    xs, ys = (torch.as_tensor(v, dtype=torch.float32, device=bda.device) for v in grid.cell_centers())
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")  # [H, W]
    pts = torch.stack([xx, yy, torch.zeros_like(xx), torch.ones_like(xx)], dim=-1)  # [H, W, 4]
    inv = torch.linalg.inv(bda.double()).float()  # [B, 4, 4]
    src = torch.einsum("bij,hwj->bhwi", inv, pts)[..., :2]  # [B, H, W, 2] metric
    return grid.metric_to_normalized(src)


def resample(maps: Tensor, bda: Tensor, grid: BEVGrid) -> Tensor:
    """Canonical maps [B, C, H, W] sampled onto each sample's augmented grid (zeros outside)."""
    return F.grid_sample(maps.float(), _source_grid(bda, grid), mode="bilinear", padding_mode="zeros",
                         align_corners=False)


def transform_regression(reg: Tensor, bda: Tensor) -> Tensor:
    """Apply the BDA to the vector/length channels of resampled regression maps [B, 66, H, W]."""
    out = reg.clone()
    a = bda[:, :2, :2].float()  # [B, 2, 2]
    scale = torch.det(bda[:, :3, :3].double()).abs().pow(1.0 / 3.0).float()  # [B]
    rot = a / scale[:, None, None]
    m_zz, t_z = bda[:, 2, 2].float(), bda[:, 2, 3].float()

    def turn(mat: Tensor, v: Tensor) -> Tensor:  # [B, 2, 2] x [B, 2, H, W]
        return torch.einsum("bij,bjhw->bihw", mat, v)

    for t in range(len(TASKS)):
        base = t * REGRESSION_PER_TASK
        o = base + _OFFSET["reg"]
        out[:, o:o + 2] = turn(a, reg[:, o:o + 2])
        z = base + _OFFSET["height"]
        out[:, z] = m_zz[:, None, None] * reg[:, z] + t_z[:, None, None]
        d = base + _OFFSET["dim"]
        out[:, d:d + 3] = reg[:, d:d + 3] + torch.log(scale)[:, None, None, None]
        r = base + _OFFSET["rot"]  # (sin, cos) -> heading vector (cos, sin), turned, back to (sin, cos)
        heading = turn(rot, torch.stack([reg[:, r + 1], reg[:, r]], dim=1))
        out[:, r], out[:, r + 1] = heading[:, 1], heading[:, 0]
        v = base + _OFFSET["vel"]
        out[:, v:v + 2] = turn(a, reg[:, v:v + 2])
    return out


def warp_teacher_maps(maps: dict[str, Tensor], bda: Tensor, grid: BEVGrid) -> dict[str, Tensor]:
    """Canonical teacher outputs {low, high, heatmap, regression} [B, C, H, W] -> the augmented frames
    of `bda` [B, 4, 4] (see module docstring). Identity BDAs return the maps unchanged."""
    eye = torch.eye(4, dtype=bda.dtype, device=bda.device)
    if torch.allclose(bda, eye.expand_as(bda), atol=1e-7):
        return {k: v.float() for k, v in maps.items()}
    out = {k: resample(v, bda, grid) for k, v in maps.items()}
    if "regression" in out:
        out["regression"] = transform_regression(out["regression"], bda)
    return out

