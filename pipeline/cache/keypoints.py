"""Keypoint storage (issue 16): a cache of exactly what the UniDistill losses read.

Per (sample, view) the writer keeps, for every GT box of the view, exactly the teacher terms the
three losses compare with:

    L_Fea  the low map bilinearly sampled at the box's 9 keypoints           [9, C_low]
    L_Rel  the 9 x 9 cosine relations of the high map's keypoint samples     [9, 9] (not 9 x C_high:
           the loss compares relations only, whatever the widths)
    L_Resp at each cell where the boxes' Gaussian response mask is non-zero, the class-max heat-map
           logit (the loss takes the class max of a monotone function of the logits, so the max
           logit gives the same value for any temperature) and the 66 regression channels

with the boxes themselves, so that a student can tell which stored box is which of its own. On
nuScenes' paper grid that is ~2 % of the dense float16 cache, small enough to store a fresh
augmented view for every epoch.

The student's loss then sees the values a dense cache would give it (to float16 rounding): the same
bilinear samples and relations, taken from float32 maps instead of float16 ones, and the same cells. What it
cannot see is anything else: a fresh augmentation (warp), mirrored keypoints (keypoint_transpose),
a wider response mask (lower min_overlap) or boxes the teacher's GT filter dropped are refused
(pipeline.engine.distill_task), and at run time a box or mask cell outside the stored support
raises a CacheError naming the sample.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import pyarrow as pa
import torch

from models.bev_grid import BEVGrid
from models.distill import box_keypoints, relation_matrix, sample_at_keypoints
from models.gaussian_mask import box_gaussian_mask, gaussian_radius
from pipeline.cache import store
from pipeline.cache.schema import CacheError, CacheLayout
from pipeline.data.sample import BOX_DIM

# The response mask's CenterNet overlap the stored cells are drawn with: the paper's value and the
# `distill.response.min_overlap` default. A student may ask for a larger overlap (a smaller mask).
KEYPOINT_MIN_OVERLAP = 0.7
# A student's box is the stored one when their 9 keypoints agree to this many metres.
BOX_MATCH_TOL_M = 1e-3


def keypoint_capacity(index: pa.Table, grid: BEVGrid, bda_cfg: Mapping[str, Any],
                      min_overlap: float = KEYPOINT_MIN_OVERLAP) -> tuple[int, int]:
    """Per-row capacities (boxes, response cells) of a split's index: bounds that hold for every view.

    Boxes: the most annotations of any sample (views only drop boxes). Cells: the most summed
    (2r + 1)^2 Gaussian squares of any sample, with each box's size grown by the largest BEV scale a
    view may draw (the radius grows with the size); at most the map's cell count.
    """
    scale = max(float(s) for s in bda_cfg.get("scale_lim", [1.0, 1.0]))
    max_boxes, max_cells = 0, 0
    for flat in index.column("gt_boxes").to_pylist():
        boxes = np.asarray(flat, dtype=np.float64).reshape(-1, BOX_DIM)
        max_boxes = max(max_boxes, len(boxes))
        if len(boxes):
            sizes = torch.as_tensor(np.abs(boxes[:, 3:5]) * scale / grid.cell)
            r = gaussian_radius(sizes, min_overlap).clamp(min=0).floor().numpy()
            max_cells = max(max_cells, int(((2 * r + 1) ** 2).sum()))
    return max(1, max_boxes), max(1, min(max_cells, grid.H * grid.W))


@torch.no_grad()
def encode_keypoint_rows(outputs: Mapping[str, torch.Tensor], boxes: list[np.ndarray], layout: CacheLayout,
                         grid: BEVGrid, dtype: str, min_overlap: float = KEYPOINT_MIN_OVERLAP) -> dict[str, np.ndarray]:
    """Teacher maps of R rows ({low, high, heatmap, regression} [R, C, H, W]) and each row's GT boxes
    [M_r, 9] -> the padded arrays of a keypoint cache (schema.py), in the cache's precision."""
    r_count = len(boxes)
    m_cap, n_cap = max(1, layout.max_boxes), max(1, layout.max_cells)
    low, high = outputs["low"].float(), outputs["high"].float()  # [R, C, H, W]
    heat_max = outputs["heatmap"].float().amax(dim=1, keepdim=True)  # [R, 1, H, W] class-max logit
    response = torch.cat([heat_max, outputs["regression"].float()], dim=1).flatten(2)  # [R, 67, H*W]
    out = {"boxes": np.zeros((r_count, m_cap, BOX_DIM), np.float32), "counts": np.zeros((r_count, 2), np.int32),
           "keypoint_low": torch.zeros(r_count, m_cap, 9, low.shape[1]), "relations": torch.zeros(r_count, m_cap, 9, 9),
           "cells": np.zeros((r_count, n_cap), np.int32), "cell_values": torch.zeros(r_count, n_cap, response.shape[1])}
    for r, row_boxes in enumerate(boxes):
        b = torch.as_tensor(np.asarray(row_boxes, dtype=np.float32).reshape(-1, BOX_DIM))[None]  # [1, M, 9]
        m = b.shape[1]
        if m > m_cap:
            raise CacheError(f"keypoint cache: a row has {m} GT boxes, more than the {m_cap} planned from the index")
        cells = torch.nonzero(box_gaussian_mask(b, torch.ones(1, m, dtype=torch.bool), grid, min_overlap)
                              .flatten()).flatten()  # [N] flat cell indices, ascending
        if len(cells) > n_cap:
            raise CacheError(f"keypoint cache: a row's response mask has {len(cells)} cells, more than the "
                             f"{n_cap} planned from the index")
        out["boxes"][r, :m] = b[0].numpy()
        out["counts"][r] = (m, len(cells))
        if m:
            kp = box_keypoints(b)  # [1, M, 9, 2]
            out["keypoint_low"][r, :m] = sample_at_keypoints(low[r:r + 1], kp, grid)[0]
            out["relations"][r, :m] = relation_matrix(sample_at_keypoints(high[r:r + 1], kp, grid))[0]
        out["cells"][r, :len(cells)] = cells.numpy()
        out["cell_values"][r, :len(cells)] = response[r, :, cells].T
    for name in ("keypoint_low", "relations", "cell_values"):
        out[name] = store.encode_maps(out[name], dtype)
    return out


def match_boxes(student_boxes: np.ndarray, stored_boxes: np.ndarray) -> np.ndarray:
    """For each student GT box [M_s, 9], the index of the stored box [M_t, 9] with the same 9
    keypoints; -1 where none has."""
    s = box_keypoints(torch.as_tensor(np.asarray(student_boxes, np.float32).reshape(1, -1, BOX_DIM)))[0]  # [M_s, 9, 2]
    t = box_keypoints(torch.as_tensor(np.asarray(stored_boxes, np.float32).reshape(1, -1, BOX_DIM)))[0]  # [M_t, 9, 2]
    if len(s) == 0:
        return np.zeros(0, dtype=np.int64)
    if len(t) == 0:
        return np.full(len(s), -1, dtype=np.int64)
    dist = (s[:, None] - t[None]).abs().flatten(2).amax(dim=2)  # [M_s, M_t] metres
    best = dist.argmin(dim=1)
    ok = dist.gather(1, best[:, None])[:, 0] <= BOX_MATCH_TOL_M
    return torch.where(ok, best, torch.full_like(best, -1)).numpy()


def teacher_at_boxes(row: Mapping[str, Any], student_boxes: np.ndarray, where: str) -> dict:
    """A stored keypoint row -> the teacher targets of a student sample, aligned with its GT boxes:

        low_keypoints [M, 9, C_low], high_relations [M, 9, 9] (stored precision),
        response_cells [N] int64, heatmap_max_cells [N, 1], regression_cells [N, 66].

    Raises CacheError (naming `where`) for a student box the cache did not store.
    """
    m, n = (int(v) for v in row["counts"])
    perm = match_boxes(student_boxes, row["boxes"][:m])
    if (perm < 0).any():
        j = int(np.flatnonzero(perm < 0)[0])
        x, y = (float(v) for v in np.asarray(student_boxes)[j, :2])
        raise CacheError(f"{where}: the student's GT box {j} at (x {x:.2f}, y {y:.2f}) m is not among the {m} boxes the "
                         f"keypoint cache stored for this view; the student's GT (data.min_points_in_box, the "
                         f"grid's range) must be the teacher's, or use a dense cache")
    take = torch.as_tensor(perm)
    values = row["cell_values"][:n]  # [N, 1 + 66]
    return {"low_keypoints": row["keypoint_low"][take], "high_relations": row["relations"][take],
            "response_cells": torch.as_tensor(row["cells"][:n], dtype=torch.int64),
            "heatmap_max_cells": values[:, :1], "regression_cells": values[:, 1:]}

