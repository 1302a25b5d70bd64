"""UniDistill losses (models/distill.py): keypoints, keypoint sampling in the BEV frame, the
Gaussian response mask, the three losses against hand-computed values, gradients, switches and
the per-path defaults (spec §2, §9)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from models.bev_grid import BEVGrid
from models.classes import NUM_CLASSES, NUM_REGRESSION
from models.distill import (DistillAdaptation, UniDistillLoss, box_keypoints, feature_distill_loss,
                            relation_distill_loss, relation_matrix, response_distill_loss, sample_at_keypoints)
from models.gaussian_mask import box_gaussian_mask, gaussian_radius
from pipeline.config import ConfigError
from pipeline.engine.distill_config import (DEFAULT_DISTILL_CONFIG, PATH_DEFAULTS, build_distill_loss, path_defaults,
                                            resolve_distill_config)

# The paper's grid: +-54 m, 180 x 180 cells of 0.6 m.
PAPER = BEVGrid((-54.0, -54.0, -5.0, 54.0, 54.0, 3.0), (0.075, 0.075, 0.2), 8)
# A small square grid of 1 m cells: x, y in [-4, 4), 8 x 8 cells.
SMALL = BEVGrid((-4.0, -4.0, -1.0, 4.0, 4.0, 1.0), (0.5, 0.5, 0.5), 2)
# A non-square grid (H != W) of 1 m cells: x in [-6, 6) (12 columns), y in [-4, 4) (8 rows).
WIDE = BEVGrid((-6.0, -4.0, -1.0, 6.0, 4.0, 1.0), (0.5, 0.5, 0.5), 2)


def box(x: float, y: float, dx: float, dy: float, yaw: float = 0.0) -> list[float]:
    return [x, y, -1.0, dx, dy, 1.5, yaw, 0.0, 0.0]


def index_map(grid: BEVGrid, batch: int = 1) -> torch.Tensor:
    """[B, 1, H, W] whose value is col * 1000 + row."""
    rows = torch.arange(grid.H, dtype=torch.float32)[:, None]
    cols = torch.arange(grid.W, dtype=torch.float32)[None, :]
    return (cols * 1000 + rows).expand(batch, 1, grid.H, grid.W).clone()


def cfg_with(**over) -> dict:
    """A resolved distill config: all three losses on with weight 1, no adaptation."""
    cfg = resolve_distill_config({"feature": {"weight": 1.0}, "relation": {"weight": 1.0},
                                  "response": {"weight": 1.0, "teacher_eps": 1e-4}})
    for key, value in over.items():
        section, _, leaf = key.partition("__")
        if leaf:
            cfg[section][leaf] = value
        else:
            cfg[section] = value
    return cfg


def outputs(b: int, c_low: int, c_high: int, grid: BEVGrid, seed: int = 0, requires_grad: bool = False) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {"low": torch.randn(b, c_low, grid.H, grid.W, generator=g),
           "high": torch.randn(b, c_high, grid.H, grid.W, generator=g),
           "heatmap": torch.randn(b, NUM_CLASSES, grid.H, grid.W, generator=g) * 3,
           "regression": torch.randn(b, NUM_REGRESSION, grid.H, grid.W, generator=g)}
    return {k: v.requires_grad_(requires_grad) for k, v in out.items()}


def some_boxes() -> tuple[torch.Tensor, torch.Tensor]:
    """Two samples on SMALL: 2 boxes + 1 padding row, 1 box + 2 padding rows (one with garbage)."""
    boxes = torch.tensor([[box(1.3, -2.2, 2.5, 1.2, 0.4), box(-2.0, 1.5, 1.0, 0.8, -1.0), [0.0] * 9],
                          [box(0.2, 0.7, 4.5, 1.9, 2.0), [0.0] * 9, box(3.0, 3.0, 2.0, 2.0)]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    return boxes, mask


# --- (a) keypoints and sampling ---------------------------------------------------------------------
def test_box_keypoints_order_and_rotation():
    kp = box_keypoints(torch.tensor([[box(10.0, 20.0, 4.0, 2.0)]]))  # [1, 1, 9, 2]
    assert kp.shape == (1, 1, 9, 2)
    expect = torch.tensor([[8, 19], [8, 21], [12, 21], [12, 19],  # c0 (-,-), c1 (-,+), c2 (+,+), c3 (+,-)
                           [10, 20],  # centre
                           [8, 20], [10, 21], [12, 20], [10, 19]],  # e01, e12, e23, e03
                          dtype=torch.float32)
    torch.testing.assert_close(kp[0, 0], expect)
    # Rotated counter-clockwise by yaw about the centre: x' = x cos - y sin, y' = x sin + y cos.
    yaw = 0.7
    kp = box_keypoints(torch.tensor([[box(10.0, 20.0, 4.0, 2.0, yaw)]]))[0, 0]
    local = expect - torch.tensor([10.0, 20.0])
    c, s = math.cos(yaw), math.sin(yaw)
    rot = torch.stack([local[:, 0] * c - local[:, 1] * s, local[:, 0] * s + local[:, 1] * c], dim=1)
    torch.testing.assert_close(kp, rot + torch.tensor([10.0, 20.0]))


def test_sampling_at_centres_and_corners_reads_col_x_row_y():
    # Off the diagonal: x = 1.5 (col 5), y = -2.5 (row 1); 2 x 2 m so every keypoint is a cell centre.
    boxes = torch.tensor([[box(1.5, -2.5, 2.0, 2.0)]])
    kp = box_keypoints(boxes)
    got = sample_at_keypoints(index_map(SMALL), kp, SMALL)  # [1, 1, 9, 1]
    assert got.shape == (1, 1, 9, 1)
    # (col, row) of c0..c3, centre, e01, e12, e23, e03.
    cells = [(4, 0), (4, 2), (6, 2), (6, 0), (5, 1), (4, 1), (5, 2), (6, 1), (5, 0)]
    torch.testing.assert_close(got[0, 0, :, 0], torch.tensor([c * 1000.0 + r for c, r in cells]))
    # The original code's swapped (y_n, x_n) grid reads the cell mirrored across the diagonal.
    mirrored = sample_at_keypoints(index_map(SMALL), kp, SMALL, transpose=True)
    torch.testing.assert_close(mirrored[0, 0, :, 0], torch.tensor([r * 1000.0 + c for c, r in cells]))


def test_sampling_paper_grid_box_centres():
    # A car centred on cell (col 107, row 56) and a pedestrian on (col 20, row 150) of the paper grid.
    def centre(col: int, row: int) -> tuple[float, float]:
        return -54.0 + (col + 0.5) * 0.6, -54.0 + (row + 0.5) * 0.6

    boxes = torch.tensor([[box(*centre(107, 56), 4.5, 1.9, 0.3), box(*centre(20, 150), 0.7, 0.7)]])
    got = sample_at_keypoints(index_map(PAPER), box_keypoints(boxes), PAPER)
    torch.testing.assert_close(got[0, :, 4, 0], torch.tensor([107056.0, 20150.0]))
    got_t = sample_at_keypoints(index_map(PAPER), box_keypoints(boxes), PAPER, transpose=True)
    torch.testing.assert_close(got_t[0, :, 4, 0], torch.tensor([56107.0, 150020.0]))


def test_sampling_is_bilinear_in_the_bev_frame_and_zero_outside():
    # The index map is linear in (col, row), so bilinear sampling anywhere at least half a cell
    # inside the map returns exactly (u - 0.5) * 1000 + (v - 0.5), u, v continuous cell coordinates.
    g = torch.Generator().manual_seed(1)
    n = 20
    xy = torch.rand(n, 2, generator=g) * torch.tensor([10.0, 6.0]) + torch.tensor([-5.0, -3.0])
    boxes = torch.tensor([box(float(x), float(y), 0.6, 0.4, float(a))
                          for (x, y), a in zip(xy.tolist(), torch.rand(n, generator=g) * 6)])[None]
    kp = box_keypoints(boxes)  # [1, n, 9, 2]
    uv = WIDE.metric_to_cell(kp)
    got = sample_at_keypoints(index_map(WIDE), kp, WIDE)[..., 0]
    torch.testing.assert_close(got, (uv[..., 0] - 0.5) * 1000 + (uv[..., 1] - 0.5), rtol=0, atol=2e-3)
    # Far outside the map: zero padding.
    far = torch.tensor([[box(100.0, -100.0, 1.0, 1.0)]])
    assert sample_at_keypoints(index_map(WIDE), box_keypoints(far), WIDE).abs().max() == 0


def test_sampling_batches_channels_and_empty():
    feat = torch.stack([index_map(SMALL)[0, 0], -index_map(SMALL)[0, 0]])[None].repeat(2, 1, 1, 1)  # [2, 2, H, W]
    feat[1] += 7.0
    boxes = torch.tensor([[box(1.5, -2.5, 2.0, 2.0)], [box(-3.5, 0.5, 1.0, 1.0)]])
    got = sample_at_keypoints(feat, box_keypoints(boxes), SMALL)  # [2, 1, 9, 2]
    assert got.shape == (2, 1, 9, 2)
    torch.testing.assert_close(got[0, 0, 4], torch.tensor([5001.0, -5001.0]))
    torch.testing.assert_close(got[1, 0, 4], torch.tensor([4.0 + 7, -4.0 + 7]))
    empty = sample_at_keypoints(feat, box_keypoints(torch.zeros(2, 0, 9)), SMALL)
    assert empty.shape == (2, 0, 9, 2)


# --- (b) relation matrix ----------------------------------------------------------------------------
def test_relation_matrix_symmetric_unit_diagonal():
    f = torch.randn(3, 4, 9, 16) * 5
    r = relation_matrix(f)
    assert r.shape == (3, 4, 9, 9)
    torch.testing.assert_close(r, r.transpose(-1, -2))
    torch.testing.assert_close(torch.diagonal(r, dim1=-2, dim2=-1), torch.ones(3, 4, 9), atol=1e-4, rtol=0)
    assert r.abs().max() <= 1.0 + 1e-6
    # Cosine similarities: scale-free per vector.
    torch.testing.assert_close(relation_matrix(f * (torch.rand(3, 4, 9, 1) * 9 + 1)), r, atol=1e-4, rtol=0)
    # Zero vectors (keypoints off the map) give zero rows instead of NaN.
    f[0, 0, 3] = 0
    r = relation_matrix(f)
    assert torch.isfinite(r).all() and r[0, 0, 3].abs().max() == 0


# --- (c) Gaussian mask ------------------------------------------------------------------------------
def _reference_mask(boxes: np.ndarray, mask: np.ndarray, grid: BEVGrid) -> np.ndarray:
    """The original's per-box loop (CenterNet gaussian_radius + draw_umich_gaussian), padded rows skipped."""
    def radius(w: float, h: float, o: float = 0.7) -> float:
        b1, c1 = h + w, w * h * (1 - o) / (1 + o)
        r1 = (b1 + math.sqrt(b1 ** 2 - 4 * c1)) / 2
        b2, c2 = 2 * (h + w), (1 - o) * w * h
        r2 = (b2 + math.sqrt(b2 ** 2 - 16 * c2)) / 2
        a3, b3, c3 = 4 * o, -2 * o * (h + w), (o - 1) * w * h
        r3 = (b3 + math.sqrt(b3 ** 2 - 4 * a3 * c3)) / 2
        return min(r1, r2, r3)

    out = np.zeros((mask.shape[0], grid.H, grid.W), dtype=np.float32)
    for i in range(mask.shape[0]):
        for j in np.flatnonzero(mask[i]):
            x, y, _, dx, dy = boxes[i, j, :5]
            r = int(max(0, radius(dx / grid.cell, dy / grid.cell)))
            # floor = the original's int() on the map; centres just below x_min / y_min are skipped too.
            cx, cy = math.floor((x - grid.x_min) / grid.cell), math.floor((y - grid.y_min) / grid.cell)
            if not (0 <= cx < grid.W and 0 <= cy < grid.H):
                continue
            d = 2 * r + 1
            sigma = d / 6
            yy, xx = np.ogrid[-r:r + 1, -r:r + 1]
            gauss = np.exp(-(xx * xx + yy * yy) / (2 * sigma * sigma))
            left, right = min(cx, r), min(grid.W - cx, r + 1)
            top, bottom = min(cy, r), min(grid.H - cy, r + 1)
            region = out[i, cy - top:cy + bottom, cx - left:cx + right]
            np.maximum(region, gauss[r - top:r + bottom, r - left:r + right], out=region)
    return out


def test_gaussian_radius_car_and_pedestrian():
    size = torch.tensor([[4.5, 1.9], [0.7, 0.7], [0.4, 0.4], [12.0, 2.9]], dtype=torch.float64) / 0.6
    r = gaussian_radius(size)
    assert r.shape == (4,)
    assert int(r[0]) == 1 and int(r[1]) == 0 and int(r[2]) == 0
    # The CornerNet r3 root for a 7.5 x 3.1667 cell car: (-1.4 * 10.6667 + sqrt(14.9333^2 + 4 * 2.8 * 7.125)) / 2.
    assert r[0].item() == pytest.approx(1.23397, abs=1e-4)
    assert gaussian_radius(torch.zeros(1, 2)).item() == 0.0


def test_gaussian_mask_peaks_at_row_y_col_x_with_expected_radii():
    # A car at col 107, row 56 (off the diagonal) and a pedestrian at col 20, row 150 of the paper grid.
    boxes = torch.tensor([[box(10.3, -20.1, 4.5, 1.9, 0.4), box(-41.9, 36.2, 0.7, 0.7), [0.0] * 9]])
    assert int((10.3 + 54) / 0.6) == 107 and int((-20.1 + 54) / 0.6) == 56
    mask = box_gaussian_mask(boxes, torch.tensor([[True, True, False]]), PAPER)
    assert mask.shape == (1, 180, 180)
    assert mask[0, 56, 107] == 1.0 and mask[0, 150, 20] == 1.0
    # Car: r = 1, sigma = 0.5, a 3 x 3 patch with exp(-2) at the sides and exp(-4) at the corners.
    patch = mask[0, 55:58, 106:109]
    e1, e2 = math.exp(-2.0), math.exp(-4.0)
    torch.testing.assert_close(patch, torch.tensor([[e2, e1, e2], [e1, 1.0, e1], [e2, e1, e2]]))
    # Pedestrian: r = 0, a single pixel.
    assert (mask > 0).sum() == 9 + 1
    # Nothing at the transposed cell, nothing at the ego cell (no padded-row peak).
    assert mask[0, 107, 56] == 0 and mask[0, 90, 90] == 0
    # Two cars one column apart overlap: merged by max (draw_umich_gaussian), not summed.
    two = torch.tensor([[box(10.3, -20.1, 4.5, 1.9), box(10.9, -20.1, 4.5, 1.9)]])
    merged = box_gaussian_mask(two, torch.tensor([[True, True]]), PAPER)
    torch.testing.assert_close(merged[0, 56, 106:110], torch.tensor([e1, 1.0, 1.0, e1]))
    torch.testing.assert_close(merged[0, 55, 106:110], torch.tensor([e2, e1, e1, e2]))


def test_gaussian_mask_padding_rows_draw_nothing():
    boxes, valid = some_boxes()
    mask = box_gaussian_mask(boxes, valid, SMALL)
    only_valid = box_gaussian_mask(boxes[:, :2] * valid[:, :2, None], valid[:, :2], SMALL)
    torch.testing.assert_close(mask, only_valid)
    # The garbage padding row (sample 1, row 2, centre (3, 3): cell col 7, row 7) draws nothing.
    assert mask[1, 7, 7] == 0
    # All padding: an empty mask (the original draws an ego-cell peak per padded row, spec §2.5).
    assert box_gaussian_mask(torch.zeros(2, 3, 9), torch.zeros(2, 3, dtype=torch.bool), SMALL).abs().sum() == 0
    assert box_gaussian_mask(torch.zeros(2, 0, 9), torch.zeros(2, 0, dtype=torch.bool), SMALL).shape == (2, 8, 8)


def test_gaussian_mask_matches_per_box_reference():
    g = torch.Generator().manual_seed(3)
    b, m = 3, 25
    xy = (torch.rand(b, m, 2, generator=g) - 0.5) * 120  # some centres off the map
    size = torch.rand(b, m, 2, generator=g) * torch.tensor([12.0, 3.0]) + 0.3
    boxes = torch.cat([xy, torch.zeros(b, m, 1), size, torch.ones(b, m, 1),
                       torch.rand(b, m, 1, generator=g) * 6, torch.zeros(b, m, 2)], dim=2)
    valid = torch.rand(b, m, generator=g) < 0.8
    got = box_gaussian_mask(boxes, valid, PAPER)
    ref = _reference_mask(boxes.double().numpy(), valid.numpy(), PAPER)
    torch.testing.assert_close(got, torch.from_numpy(ref), atol=1e-6, rtol=0)
    # Overlapping boxes merge by max, not by sum.
    assert got.max() <= 1.0


# --- (d) zero when student equals teacher -----------------------------------------------------------
def test_losses_zero_when_student_equals_teacher():
    boxes, valid = some_boxes()
    student = outputs(2, 8, 16, SMALL)
    teacher = {k: v.clone() for k, v in student.items()}
    teacher["heatmap"] = student["heatmap"] * 2.0  # logits / T == student logits
    losses = build_distill_loss(SMALL, cfg_with())(student, teacher, boxes, valid)
    assert set(losses) == {"feature", "relation", "response_cls", "response_reg", "distill"}
    for name, value in losses.items():
        assert value.dim() == 0 and value.abs().item() < 1e-6, (name, value)
    # Not zero otherwise (the test can fail).
    other = outputs(2, 8, 16, SMALL, seed=5)
    losses = build_distill_loss(SMALL, cfg_with())(student, other, boxes, valid)
    assert all(losses[k] > 1e-3 for k in ("feature", "relation", "response_cls", "response_reg"))


# --- (e) hand-computed values -----------------------------------------------------------------------
def test_feature_loss_hand_computed():
    # Spatially constant maps: every keypoint inside the map samples the constant vector.
    s = torch.tensor([1.0, -2.0, 0.5]).view(1, 3, 1, 1).expand(2, 3, 8, 8).clone()
    t = torch.tensor([0.0, 1.0, 0.5]).view(1, 3, 1, 1).expand(2, 3, 8, 8).clone()
    t[1] += 1.0
    boxes, valid = some_boxes()
    boxes[0, 0] = torch.tensor(box(0.0, 0.0, 2.0, 1.0, 0.3))
    boxes[0, 1] = torch.tensor(box(-1.0, 1.0, 1.0, 1.0))
    boxes[1, 0] = torch.tensor(box(1.0, -1.0, 2.0, 2.0, 1.0))
    kp = box_keypoints(boxes)
    ss, tt = sample_at_keypoints(s, kp, SMALL), sample_at_keypoints(t, kp, SMALL)
    l0 = (1.0 + 3.0 + 0.0) / 3  # sample 0: |1-0|, |-2-1|, |0.5-0.5|
    l1 = (0.0 + 4.0 + 1.0) / 3  # sample 1: teacher + 1
    expect = (2 * l0 + l1) / (3 + 1e-4)
    assert feature_distill_loss(ss, tt, valid).item() == pytest.approx(expect, rel=1e-6)
    # The count goes through reduce_count (e.g. the mean over DDP workers).
    got = feature_distill_loss(ss, tt, valid, reduce_count=lambda c: c * 2)
    assert got.item() == pytest.approx((2 * l0 + l1) / (6 + 1e-4), rel=1e-6)
    # And through UniDistillLoss, weighted.
    cfg = cfg_with(feature__weight=7.0, relation__weight=0.0, response__weight=0.0)
    out = build_distill_loss(SMALL, cfg)({"low": s, "high": s, "heatmap": None, "regression": None},
                                     {"low": t, "high": t, "heatmap": None, "regression": None}, boxes, valid)
    assert out["feature"].item() == pytest.approx(7 * expect, rel=1e-6)
    assert out["distill"].item() == pytest.approx(7 * expect, rel=1e-6)


def test_relation_loss_hand_computed():
    # A box centred on cell (col 4, row 4) of SMALL, 2 x 2 cells: its 9 keypoints are the 3 x 3 cell
    # centres around it. Teacher: (1, 0) everywhere. Student: (1, 0) in columns 3-4, (0, 1) in
    # column 5, so c2, c3, e23 (the +x side) differ from the other 6 keypoints.
    boxes = torch.tensor([[box(0.5, 0.5, 2.0, 2.0)]])
    valid = torch.tensor([[True]])
    t = torch.zeros(1, 2, 8, 8)
    t[:, 0] = 1.0
    s = torch.zeros(1, 2, 8, 8)
    s[:, 0, :, 3:5] = 1.0
    s[:, 1, :, 5] = 1.0
    kp = box_keypoints(boxes)
    ss, tt = sample_at_keypoints(s, kp, SMALL), sample_at_keypoints(t, kp, SMALL)
    assert ss[0, 0, :, 1].tolist() == [0, 0, 1, 1, 0, 0, 0, 1, 0]
    same = 1.0 / (1.0 + 1e-4) ** 2  # cosine of two equal unit vectors with the 1e-4 norm epsilon
    expect = (2 * 3 * 6 / 81) * same / (1 + 1e-4)
    assert relation_distill_loss(ss, tt, valid).item() == pytest.approx(expect, rel=1e-6)
    cfg = cfg_with(feature__weight=0.0, relation__weight=3.0, response__weight=0.0)
    out = build_distill_loss(SMALL, cfg)({"low": s, "high": s}, {"low": t, "high": t}, boxes, valid)
    assert out["relation"].item() == pytest.approx(3 * expect, rel=1e-6)


def test_response_loss_hand_computed():
    # One pedestrian (r = 0) at col 2, row 1 of SMALL: the mask is that single pixel.
    boxes = torch.tensor([[box(-1.5, -2.5, 0.7, 0.7), [0.0] * 9]])
    valid = torch.tensor([[True, False]])
    mask = box_gaussian_mask(boxes, valid, SMALL)
    assert mask.sum() == 1 and mask[0, 1, 2] == 1
    hm_s = torch.zeros(1, NUM_CLASSES, 8, 8)  # p = 0.5 for every class
    hm_t = torch.full((1, NUM_CLASSES, 8, 8), -30.0)
    hm_t[:, 3] = 2 * math.log(3.0)  # sigmoid(logit / 2) = 0.75 in one class
    hm_t[:, :, 5, 5] = 30.0  # a large difference outside the mask is ignored
    reg_s = torch.zeros(1, NUM_REGRESSION, 8, 8)
    reg_t = torch.zeros(1, NUM_REGRESSION, 8, 8)
    reg_t[0, 10, 1, 2] = 1.0
    reg_t[0, :, 6, 6] = 100.0
    cls, reg = response_distill_loss(hm_s, reg_s, hm_t, reg_t, mask)
    assert cls.item() == pytest.approx(0.25 / (1 + 1e-4), rel=1e-5)
    assert reg.item() == pytest.approx((1 / 66) / (1 + 1e-4), rel=1e-6)
    # The teacher clamp eps: logits of -30 give eps, not 0; the student's clamp is fixed at 1e-4.
    hm_t2 = torch.full((1, NUM_CLASSES, 8, 8), -30.0)
    cls, _ = response_distill_loss(hm_s - 40.0, reg_s, hm_t2, reg_t, mask, teacher_eps=1e-3)
    assert cls.item() == pytest.approx((1e-3 - 1e-4) / (1 + 1e-4), rel=1e-3)
    # Temperature: T = 1 reads sigmoid(2 log 3) = 0.9.
    cls, _ = response_distill_loss(hm_s, reg_s, hm_t, reg_t, mask, temperature=1.0)
    assert cls.item() == pytest.approx(0.4 / (1 + 1e-4), rel=1e-5)
    # A car (r = 1 on the 0.6 m grid) weights a 3 x 3 patch; mask sum through reduce_count.
    car = torch.tensor([[box(10.3, -20.1, 4.5, 1.9)]])
    pmask = box_gaussian_mask(car, torch.tensor([[True]]), PAPER)
    total = 1 + 4 * math.exp(-2) + 4 * math.exp(-4)
    z = torch.zeros(1, NUM_CLASSES, 180, 180)
    t = torch.full_like(z, -30.0)
    t[:, 0] = 2 * math.log(3.0)
    cls, reg = response_distill_loss(z, torch.zeros(1, 66, 180, 180), t, torch.ones(1, 66, 180, 180), pmask,
                                     reduce_count=lambda c: c * 4)
    assert cls.item() == pytest.approx(0.25 * total / (4 * total + 1e-4), rel=1e-5)
    assert reg.item() == pytest.approx(total / (4 * total + 1e-4), rel=1e-5)
    # Through UniDistillLoss, weighted (one weight for both parts).
    cfg = cfg_with(feature__weight=0.0, relation__weight=0.0, response__weight=10.0)
    out = build_distill_loss(PAPER, cfg)({"heatmap": z, "regression": torch.zeros(1, 66, 180, 180)},
                                     {"heatmap": t, "regression": torch.ones(1, 66, 180, 180)}, car,
                                     torch.tensor([[True]]))
    assert out["response_cls"].item() == pytest.approx(10 * 0.25 * total / (total + 1e-4), rel=1e-5)
    assert out["response_reg"].item() == pytest.approx(10 * total / (total + 1e-4), rel=1e-5)
    assert out["distill"].item() == pytest.approx(out["response_cls"].item() + out["response_reg"].item())


def test_keypoint_transpose_flag_in_loss():
    # Student = index map, teacher = 0: the feature loss is the mean sampled value, at the true
    # cells without the flag and at the mirrored cells with it.
    boxes = torch.tensor([[box(1.5, -2.5, 2.0, 2.0)]])
    valid = torch.tensor([[True]])
    s, t = index_map(SMALL), torch.zeros(1, 1, 8, 8)
    cfg = cfg_with(relation__weight=0.0, response__weight=0.0)
    straight = build_distill_loss(SMALL, cfg)({"low": s}, {"low": t}, boxes, valid)["feature"]
    cfg["keypoint_transpose"] = True
    swapped = build_distill_loss(SMALL, cfg)({"low": s}, {"low": t}, boxes, valid)["feature"]
    cells = [(4, 0), (4, 2), (6, 2), (6, 0), (5, 1), (4, 1), (5, 2), (6, 1), (5, 0)]
    assert straight.item() == pytest.approx(np.mean([c * 1000 + r for c, r in cells]) / (1 + 1e-4))
    assert swapped.item() == pytest.approx(np.mean([r * 1000 + c for c, r in cells]) / (1 + 1e-4))


# --- (f) gradients ----------------------------------------------------------------------------------
def test_gradients_reach_student_and_adaptation_not_teacher():
    boxes, valid = some_boxes()
    student = outputs(2, 6, 10, SMALL, requires_grad=True)
    teacher = outputs(2, 8, 12, SMALL, seed=1, requires_grad=True)
    cfg = cfg_with(adaptation={"enabled": True, "kernel_size": 1},
                   channels={"student_low": 6, "student_high": 10, "teacher_low": 8, "teacher_high": 12})
    loss_fn = build_distill_loss(SMALL, cfg)
    losses = loss_fn(student, teacher, boxes, valid)
    losses["distill"].backward()
    for name, t in student.items():
        assert t.grad is not None and t.grad.abs().sum() > 0, name
    for name, t in teacher.items():
        assert t.grad is None, name
    params = list(loss_fn.parameters())
    assert len(params) == 4  # weight and bias of the low and the high adapter
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    # The student's feature gradient is zero far from every box (the loss only reads keypoints).
    assert student["low"].grad[0, :, 7, 0].abs().sum() == 0


def test_no_boxes_gives_zero_losses_with_a_graph():
    student = outputs(2, 4, 4, SMALL, requires_grad=True)
    teacher = outputs(2, 4, 4, SMALL, seed=1)
    losses = build_distill_loss(SMALL, cfg_with())(student, teacher, torch.zeros(2, 0, 9),
                                               torch.zeros(2, 0, dtype=torch.bool))
    assert all(v.item() == 0 for v in losses.values())
    losses["distill"].backward()  # every enabled part stays connected to the student (DDP-safe)
    assert all(t.grad is not None for t in student.values())


# --- (g) weights, switches, channels, adaptation, config --------------------------------------------
def test_weights_and_switches():
    boxes, valid = some_boxes()
    student = outputs(2, 4, 4, SMALL, requires_grad=True)
    teacher = outputs(2, 4, 4, SMALL, seed=1)
    base = build_distill_loss(SMALL, cfg_with())(student, teacher, boxes, valid)
    scaled = build_distill_loss(SMALL, cfg_with(feature__weight=2.0, relation__weight=3.0,
                                            response__weight=0.5))(student, teacher, boxes, valid)
    torch.testing.assert_close(scaled["feature"], 2 * base["feature"])
    torch.testing.assert_close(scaled["relation"], 3 * base["relation"])
    torch.testing.assert_close(scaled["response_cls"], 0.5 * base["response_cls"])
    torch.testing.assert_close(scaled["response_reg"], 0.5 * base["response_reg"])
    torch.testing.assert_close(scaled["distill"], scaled["feature"] + scaled["relation"]
                               + scaled["response_cls"] + scaled["response_reg"])
    # Off by weight 0 or by enabled: false; an off loss is 0 and does not touch its inputs.
    for off in (cfg_with(feature__weight=0.0), cfg_with(feature__enabled=False)):
        student["low"].grad = None
        out = build_distill_loss(SMALL, off)(student, teacher, boxes, valid)
        assert out["feature"].item() == 0
        torch.testing.assert_close(out["relation"], base["relation"])
        out["distill"].backward()
        assert student["low"].grad is None
    out = build_distill_loss(SMALL, cfg_with(relation__enabled=False, response__enabled=False))(
        {"low": student["low"]}, {"low": teacher["low"]}, boxes, valid)
    assert out["relation"].item() == 0 and out["response_cls"].item() == 0 and out["response_reg"].item() == 0
    torch.testing.assert_close(out["distill"], base["feature"])
    # Disabling a loss needs no maps for it; an enabled one names the missing map.
    with pytest.raises(KeyError, match="high"):
        build_distill_loss(SMALL, cfg_with(response__enabled=False))({"low": student["low"]},
                                                                {"low": teacher["low"]}, boxes, valid)


def test_channel_mismatch_error_and_adaptation():
    boxes, valid = some_boxes()
    student = outputs(2, 6, 10, SMALL)
    teacher = outputs(2, 8, 10, SMALL, seed=1)
    with pytest.raises(ValueError, match=r"6.*8|8.*6"):
        build_distill_loss(SMALL, cfg_with())(student, teacher, boxes, valid)
    # Adaptation on without channel counts: a clear error at construction.
    with pytest.raises(ValueError, match="channels"):
        build_distill_loss(SMALL, cfg_with(adaptation={"enabled": True, "kernel_size": 1}))
    channels = {"student_low": 6, "student_high": 10, "teacher_low": 8, "teacher_high": 10}
    for k in (1, 3):
        loss_fn = build_distill_loss(SMALL, cfg_with(adaptation={"enabled": True, "kernel_size": k}, channels=channels))
        assert isinstance(loss_fn.adaptation, DistillAdaptation)
        assert loss_fn.adaptation.low.kernel_size == (k, k)
        out = loss_fn(student, teacher, boxes, valid)
        assert torch.isfinite(out["distill"])
    # Maps whose widths differ from the declared channels are refused.
    with pytest.raises(ValueError, match="7"):
        loss_fn(outputs(2, 7, 10, SMALL), teacher, boxes, valid)
    with pytest.raises(ValueError, match="kernel_size"):
        build_distill_loss(SMALL, cfg_with(adaptation={"enabled": True, "kernel_size": 2}, channels=channels))
    # Maps must be on the loss's grid.
    with pytest.raises(ValueError, match="8, 8"):
        build_distill_loss(SMALL, cfg_with())(outputs(2, 6, 10, WIDE), outputs(2, 6, 10, WIDE), boxes, valid)


def test_adaptation_identity_init_and_only_enabled_parts():
    # Same widths: the adapters start as the identity, so distillation starts as without them.
    adapt = DistillAdaptation(student_low=4, teacher_low=4, student_high=5, teacher_high=5, kernel_size=3)
    x = torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(adapt.low(x), x)
    # Only the adapters of enabled losses exist (an unused parameter would break DDP).
    cfg = cfg_with(relation__weight=0.0, adaptation={"enabled": True, "kernel_size": 1},
                   channels={"student_low": 4, "student_high": 4, "teacher_low": 4, "teacher_high": 4})
    loss_fn = build_distill_loss(SMALL, cfg)
    assert loss_fn.adaptation.low is not None and loss_fn.adaptation.high is None
    # Without adaptation the loss has no parameters: the exported student stays the plain detector.
    assert list(build_distill_loss(SMALL, cfg_with()).parameters()) == []


def test_path_defaults_and_config_resolution():
    assert path_defaults("lidar", "camera")["feature"]["weight"] == 100
    expect = {("lidar", "camera"): (100, 40, 10, 1e-4, False), ("fusion", "camera"): (10, 5, 10, 1e-3, False),
              ("camera", "lidar"): (10, 5, 1, 1e-4, True), ("fusion", "lidar"): (10, 1, 10, 1e-4, False)}
    assert set(PATH_DEFAULTS) == set(expect)
    for (teacher, student), (f, r, p, eps, adapt) in expect.items():
        cfg = resolve_distill_config(DEFAULT_DISTILL_CONFIG, teacher, student)
        assert (cfg["feature"]["weight"], cfg["relation"]["weight"], cfg["response"]["weight"]) == (f, r, p)
        assert cfg["response"]["teacher_eps"] == eps and cfg["adaptation"]["enabled"] is adapt
        assert cfg["response"]["temperature"] == 2.0 and cfg["keypoint_transpose"] is False
    # Explicit values win over the path's defaults; channels fill in where given.
    cfg = resolve_distill_config({"relation": {"weight": 0.0}, "adaptation": {"enabled": False}},
                                 "camera", "lidar", student_channels=(64, 128), teacher_channels=(64, 128))
    assert cfg["relation"]["weight"] == 0.0 and cfg["feature"]["weight"] == 10 and not cfg["adaptation"]["enabled"]
    assert cfg["channels"] == {"student_low": 64, "student_high": 128, "teacher_low": 64, "teacher_high": 128}
    # An unknown path with unset weights is an error naming the known paths.
    with pytest.raises(ValueError, match="lidar->camera"):
        resolve_distill_config(DEFAULT_DISTILL_CONFIG, "lidar", "fusion")
    # Unresolved weights and unknown keys are refused by the loss.
    with pytest.raises(ValueError, match="resolve_distill_config"):
        build_distill_loss(SMALL, DEFAULT_DISTILL_CONFIG)
    with pytest.raises(ValueError, match="tempreature"):
        resolve_distill_config({"response": {"tempreature": 3.0}}, "lidar", "camera")

    with pytest.raises(ConfigError, match=r"distill\.response must be a mapping"):
        resolve_distill_config({"response": 3.0}, "lidar", "camera")


def test_loss_from_explicit_arguments_equals_the_built_one():
    # The constructor takes plain arguments (models/ knows no config); the builder maps a section onto them.
    boxes, valid = some_boxes()
    student, teacher = outputs(2, 4, 6, SMALL), outputs(2, 4, 6, SMALL, seed=1)
    cfg = cfg_with(feature__weight=2.0, relation__weight=3.0, response__weight=4.0)
    built = build_distill_loss(SMALL, cfg)(student, teacher, boxes, valid)
    plain = UniDistillLoss(SMALL, feature_weight=2.0, relation_weight=3.0, response_weight=4.0,
                           temperature=cfg["response"]["temperature"], teacher_eps=cfg["response"]["teacher_eps"])
    direct = plain(student, teacher, boxes, valid)
    assert set(built) == set(direct) and all(torch.equal(built[k], direct[k]) for k in built)
    assert float(direct["feature"]) > 0 and float(direct["response_cls"]) > 0
    with pytest.raises(ValueError, match="weights must be >= 0"):
        UniDistillLoss(SMALL, feature_weight=-1.0, relation_weight=0.0, response_weight=0.0)

# --- (h) float16 teacher ----------------------------------------------------------------------------
def test_float16_teacher_inputs():
    boxes, valid = some_boxes()
    student = outputs(2, 4, 6, SMALL, requires_grad=True)
    teacher16 = {k: v.half() for k, v in outputs(2, 4, 6, SMALL, seed=1).items()}
    teacher32 = {k: v.float() for k, v in teacher16.items()}
    loss_fn = build_distill_loss(SMALL, cfg_with())
    a, b = loss_fn(student, teacher16, boxes, valid), loss_fn(student, teacher32, boxes, valid)
    for name in a:
        assert a[name].dtype == torch.float32
        torch.testing.assert_close(a[name], b[name])
    a["distill"].backward()
    assert student["high"].grad is not None
