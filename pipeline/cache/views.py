"""Views of a sample in the cache, and the foreground tiles kept in `foreground` storage.

View 0 of every sample is the canonical, un-augmented frame; views 1..K-1 are BEV augmentations
drawn from the teacher config's `data.bda` ranges with a generator seeded by (seed, token, view),
so the same cache settings always give the same matrices, and the student replays a stored
view's matrix exactly.
"""
from __future__ import annotations

import hashlib
from typing import Any, Mapping

import numpy as np
import torch

from models.bev_grid import BEVGrid
from models.box_ops import bev_corners
from models.gaussian_mask import gaussian_radius
from pipeline.data import augment

# Cells kept beyond a box's footprint in `foreground` storage: bilinear neighbours of keypoints
# (1), plus the response mask's Gaussian radius scaled for BEV-augmentation warps (x1.25), plus 1.
FOREGROUND_MARGIN_CELLS = 2


def view_matrix(token: str, view: int, bda_cfg: Mapping[str, Any], seed: int) -> np.ndarray:
    """BDA [4, 4] of one view of a sample (identity for view 0)."""
    if view == 0:
        return np.eye(4)
    digest = hashlib.sha256(f"{seed}/{token}/{view}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    return augment.bev_aug_matrix(rng, bda_cfg)


def view_matrices(token: str, views: int, bda_cfg: Mapping[str, Any], seed: int) -> np.ndarray:
    """BDA matrices [K, 4, 4] of every view of a sample."""
    return np.stack([view_matrix(token, k, bda_cfg, seed) for k in range(views)])


def foreground_tiles(gt_boxes: np.ndarray, grid: BEVGrid, tile: int) -> np.ndarray:
    """Tiles [ceil(H / tile), ceil(W / tile)] (bool) that the UniDistill losses can read for these boxes.

    A tile is kept when it meets a box's BEV footprint grown by FOREGROUND_MARGIN_CELLS plus 1.25x
    the box's response-mask Gaussian radius (in cells), which covers the 9 keypoints with their
    bilinear neighbours, the response mask, and both under a BEV-augmentation warp.
    """
    th, tw = -(-grid.H // tile), -(-grid.W // tile)
    keep = np.zeros((th, tw), dtype=bool)
    boxes = np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 9)
    if len(boxes) == 0:
        return keep
    corners = bev_corners(torch.as_tensor(boxes[:, :7])).numpy()  # [M, 4, 2] metric
    uv = grid.metric_to_cell(corners)  # [M, 4, 2] continuous (col, row)
    sizes = torch.as_tensor(boxes[:, 3:5] / grid.cell)
    radius = gaussian_radius(sizes).clamp(min=0).floor().numpy()  # [M] cells
    margin = FOREGROUND_MARGIN_CELLS + np.ceil(1.25 * radius)
    lo = np.floor(uv.min(axis=1) - margin[:, None]).astype(int)  # [M, 2]
    hi = np.floor(uv.max(axis=1) + margin[:, None]).astype(int)
    for (c0, r0), (c1, r1) in zip(lo, hi):
        c0, c1 = max(c0, 0), min(c1, grid.W - 1)
        r0, r1 = max(r0, 0), min(r1, grid.H - 1)
        if c0 > c1 or r0 > r1:
            continue
        keep[r0 // tile:r1 // tile + 1, c0 // tile:c1 // tile + 1] = True
    return keep


def tile_mask(tiles: np.ndarray, grid: BEVGrid, tile: int) -> np.ndarray:
    """Cell mask [H, W] (bool) of a tile mask."""
    return np.repeat(np.repeat(tiles, tile, axis=0), tile, axis=1)[:grid.H, :grid.W]

