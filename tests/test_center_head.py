"""CenterHead (models/center_head.py, models/head_coding.py) and rotated BEV box geometry (models/box_ops.py)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from shapely import affinity
from shapely.geometry import box as shapely_box

from models.bev_grid import BEVGrid
from models.box_ops import aligned_iou_bev, iou_bev, paired_iou_bev, rotated_nms
from models.center_head import CenterHead
from models.classes import CLASS_INDEX, CLASS_NAMES, REGRESSION_CHANNELS, TASKS
from models.head_coding import BOX_CODE_SIZE, HeadTargets, ideal_outputs, split_heatmap, split_regression
from pipeline.config import load_config
from pipeline.engine.comm import mean_over_workers

# Paper widths (nuscenes) and small widths (tiny) of the head.
PRESET_WIDTHS = {"nuscenes": dict(c_in=512, c_shared=64, c_head=64), "tiny": dict(c_in=32, c_shared=16, c_head=16)}


def grid_of(preset: str) -> BEVGrid:
    return BEVGrid.from_config(load_config(preset)["grid"])


@pytest.fixture(autouse=True, scope="module")
def no_onednn_warmup():
    """oneDNN compiles kernels on each new conv shape (seconds on 2 cores); the native path does not."""
    enabled = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    yield
    torch.backends.mkldnn.enabled = enabled


@pytest.fixture(scope="module")
def tiny_head() -> CenterHead:
    torch.manual_seed(0)
    return CenterHead(grid_of("tiny"), **PRESET_WIDTHS["tiny"], max_candidates=300)


def batch(rows: list[list[tuple[str, list[float]]]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Padded (gt_boxes [B, M, 9], gt_labels [B, M], gt_mask [B, M]) from per-sample (class, box) lists."""
    m = max(len(r) for r in rows) + 1  # always at least one padding row
    boxes = torch.zeros(len(rows), m, 9)
    labels = torch.full((len(rows), m), -1, dtype=torch.long)
    for b, row in enumerate(rows):
        for i, (name, values) in enumerate(row):
            boxes[b, i] = torch.tensor(values)
            labels[b, i] = CLASS_INDEX[name]
    return boxes, labels, labels >= 0


def task_of(name: str) -> int:
    return next(t for t, names in enumerate(TASKS) if name in names)


def nearest_cells(grid: BEVGrid, x: float, y: float, k: int = 9) -> tuple[set[tuple[int, int]], float]:
    """(set of (row, col) of the k cell centres nearest to (x, y), gap between the k-th and next distance)."""
    xs, ys = grid.cell_centers()
    d = np.hypot(xs[None, :] - x, ys[:, None] - y)  # [H, W]
    order = np.argsort(d, axis=None)
    rows, cols = np.unravel_index(order[:k], d.shape)
    flat = np.sort(d, axis=None)
    return set(zip(rows.tolist(), cols.tolist())), float(flat[k] - flat[k - 1])


def all_class_scene() -> list[list[tuple[str, list[float]]]]:
    """Two samples with every class, rotated boxes (yaws in every quadrant), velocities, far apart."""
    spots = [(-40.0, -35.0), (-20.0, -35.0), (0.0, -35.0), (20.0, -35.0), (40.0, -35.0),
             (-40.0, 25.0), (-20.0, 25.0), (0.0, 25.0), (20.0, 25.0), (40.0, 25.0)]
    sizes = {"car": (4.6, 1.9, 1.7), "truck": (7.0, 2.5, 3.0), "construction_vehicle": (6.5, 2.8, 3.2),
             "bus": (11.0, 2.9, 3.5), "trailer": (12.0, 2.9, 3.8), "barrier": (2.5, 0.6, 1.0),
             "motorcycle": (2.1, 0.8, 1.5), "bicycle": (1.7, 0.6, 1.3), "pedestrian": (0.7, 0.7, 1.8),
             "traffic_cone": (0.4, 0.4, 1.0)}
    yaws = [0.0, 0.6, 1.7, 2.9, -0.4, -1.6, -2.8, 3.0, 1.1, -2.2]
    rows = []
    for b in range(2):
        row = []
        for i, name in enumerate(CLASS_NAMES):
            (x, y), (dx, dy, dz) = spots[(i + 3 * b) % 10], sizes[name]
            x, y = x + 0.37 * b + 0.11 * i, y - 0.23 * i  # off-centre sub-cell positions
            yaw, vx, vy = yaws[(i + b) % 10], 0.5 * i - 2.0, 1.0 - 0.3 * i
            row.append((name, [x, y, -1.0 + 0.1 * i, dx, dy, dz, yaw, vx, vy]))
        rows.append(row[: 10 - 3 * b])  # samples with different box counts
    return rows


def shapely_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Reference BEV IoU of two (x, y, z, dx, dy, dz, yaw) boxes with shapely."""
    def poly(v: np.ndarray):
        p = shapely_box(-v[3] / 2, -v[4] / 2, v[3] / 2, v[4] / 2)
        return affinity.translate(affinity.rotate(p, float(v[6]), origin=(0, 0), use_radians=True), v[0], v[1])
    pa, pb = poly(a), poly(b)
    union = pa.union(pb).area
    return pa.intersection(pb).area / union if union > 0 else 0.0


# --- layers --------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["nuscenes", "tiny"])
def test_head_output_shapes_per_preset(preset: str) -> None:
    grid, widths = grid_of(preset), PRESET_WIDTHS[preset]
    # The paper-width head runs on the meta device: shapes without the compute.
    with torch.device("meta" if preset == "nuscenes" else "cpu"):
        head = CenterHead(grid, **widths)
        heatmap, regression = head(torch.randn(2, widths["c_in"], grid.H, grid.W))
    assert heatmap.shape == (2, len(CLASS_NAMES), grid.H, grid.W)
    assert regression.shape == (2, 11 * len(TASKS), grid.H, grid.W)
    assert [t.shape[1] for t in split_heatmap(heatmap)] == [len(t) for t in TASKS]
    parts = split_regression(regression)
    assert [list(p) for p in parts] == [[n for n, _ in REGRESSION_CHANNELS]] * len(TASKS)
    assert all(p[name].shape[1] == n for p in parts for name, n in REGRESSION_CHANNELS)
    if preset == "tiny":  # the split is a view of the same channels, in order
        assert torch.equal(torch.cat([v for p in parts for v in p.values()], dim=1), regression)
        assert all(torch.allclose(t.branches["hm"][-1].bias, torch.tensor(-2.19)) for t in head.tasks)


def test_head_rejects_maps_of_another_grid(tiny_head: CenterHead) -> None:
    with pytest.raises(ValueError, match=r"high must be \[B, C, 64, 64\]"):
        tiny_head(torch.zeros(1, 32, 32, 64))
    with pytest.raises(ValueError, match="gt_labels"):
        tiny_head.get_targets(torch.zeros(1, 2, 9), torch.zeros(1, 3, dtype=torch.long),
                              torch.ones(1, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="gt_labels must be < 10"):
        tiny_head.get_targets(torch.zeros(1, 1, 9), torch.full((1, 1), 10), torch.ones(1, 1, dtype=torch.bool))


# --- targets -------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["nuscenes", "tiny"])
def test_positives_are_the_nine_nearest_cell_centres(preset: str) -> None:
    grid = grid_of(preset)
    head = CenterHead(grid, 8, 8, 8)
    x, y, name = 10.37, -20.71, "bus"  # x != y so a row/column swap would show
    expected, gap = nearest_cells(grid, x, y)
    assert gap > 1e-3  # no tie for the 9th place at this position
    t = head.get_targets(*batch([[(name, [x, y, 0.5, 11.0, 2.9, 3.5, 0.3, 1.0, 0.0])]]))
    rows, cols = torch.nonzero(t.positive[0, task_of(name)], as_tuple=True)
    assert set(zip(rows.tolist(), cols.tolist())) == expected
    assert int(t.positive.sum()) == 9
    channel = CLASS_INDEX[name]
    assert torch.equal(t.heatmap[0, channel].bool(), t.positive[0, task_of(name)])
    assert float(t.heatmap.sum()) == 9.0
    # Offsets are measured in cells from each positive's centre.
    xs, ys = grid.cell_centers()
    box = t.box[0, task_of(name)]
    for r, c in expected:
        assert box[0, r, c].item() == pytest.approx((x - xs[c]) / grid.cell, abs=1e-5)
        assert box[1, r, c].item() == pytest.approx((y - ys[r]) / grid.cell, abs=1e-5)
        assert box[3, r, c].item() == pytest.approx(math.log(11.0), abs=1e-5)
        assert box[6, r, c].item() == pytest.approx(math.sin(0.3), abs=1e-6)


def test_shared_candidates_go_to_the_nearest_gt_of_the_task(tiny_head: CenterHead) -> None:
    grid = tiny_head.grid
    a, b = (3.1, 4.2), (5.3, 4.9)  # 1.4 cells apart: their candidate sets overlap
    rows = [[("truck", [*a, 0, 6.0, 2.5, 3.0, 0, 0, 0]),
             ("construction_vehicle", [*b, 0, 6.0, 2.5, 3.0, 1.0, 0, 0]),
             ("car", [*a, 0, 4.5, 1.9, 1.6, 0, 0, 0])]]  # another task: assigned on its own
    t = tiny_head.get_targets(*batch(rows))
    near_a, gap_a = nearest_cells(grid, *a)
    near_b, gap_b = nearest_cells(grid, *b)
    assert min(gap_a, gap_b) > 1e-3  # no ties for the 9th place
    task = task_of("truck")
    rr, cc = torch.nonzero(t.positive[0, task], as_tuple=True)
    assert set(zip(rr.tolist(), cc.tolist())) == near_a | near_b
    assert len(near_a & near_b) > 0
    xs, ys = grid.cell_centers()
    for r, c in near_a | near_b:
        owner = 0 if math.hypot(xs[c] - a[0], ys[r] - a[1]) < math.hypot(xs[c] - b[0], ys[r] - b[1]) else 1
        assert int(t.gt_index[0, task, r, c]) == owner
        cls = CLASS_INDEX["truck" if owner == 0 else "construction_vehicle"]
        assert t.heatmap[0, cls, r, c] == 1 and t.heatmap[0, 3 - cls, r, c] == 0  # channels 1 and 2
    car = t.positive[0, task_of("car")]
    assert int(car.sum()) == 9 and bool((t.gt_index[0, task_of("car")][car] == 2).all())


# --- encode -> ideal outputs -> decode -----------------------------------------------------------
@pytest.mark.parametrize("preset", ["nuscenes", "tiny"])
def test_decoding_ideal_outputs_recovers_the_ground_truth(preset: str) -> None:
    head = CenterHead(grid_of(preset), 8, 8, 8)
    rows = all_class_scene()
    gt_boxes, gt_labels, gt_mask = batch(rows)
    detections = head.decode(*ideal_outputs(head.get_targets(gt_boxes, gt_labels, gt_mask)))
    assert len(detections) == len(rows)
    for det, row in zip(detections, rows):
        assert det["boxes"].shape == (len(row), 9) and det["labels"].dtype == torch.int64
        assert bool((det["scores"] > 0.99).all())
        for name, values in row:
            gt = torch.tensor(values)
            same = det["labels"] == CLASS_INDEX[name]
            assert int(same.sum()) == 1, name
            got = det["boxes"][same][0]
            assert torch.allclose(got[[0, 1, 2, 3, 4, 5, 7, 8]], gt[[0, 1, 2, 3, 4, 5, 7, 8]], atol=1e-3), name
            assert abs(math.remainder(float(got[6] - gt[6]), 2 * math.pi)) < 1e-3, name


def test_decode_applies_score_range_and_count_limits() -> None:
    grid = grid_of("tiny")
    rows = [[("car", [-45.0, 0.0, 0, 4.5, 1.9, 1.6, 0, 0, 0]), ("car", [20.0, 0.0, 0, 4.5, 1.9, 1.6, 0, 0, 0])]]
    head = CenterHead(grid, 8, 8, 8, post_center_range=[-40.0, -40.0, -5.0, 40.0, 40.0, 5.0])
    targets = head.get_targets(*batch(rows))
    heatmap, regression = ideal_outputs(targets)
    (det,) = head.decode(heatmap, regression)
    assert det["boxes"].shape[0] == 1 and float(det["boxes"][0, 0]) == pytest.approx(20.0, abs=1e-3)
    faint = torch.where(heatmap > 0, torch.logit(torch.tensor(0.09)), heatmap)  # scores below 0.1
    assert head.decode(faint, regression)[0]["boxes"].shape[0] == 0
    head = CenterHead(grid, 8, 8, 8, max_per_sample=1)
    assert head.decode(*ideal_outputs(head.get_targets(*batch(rows))))[0]["boxes"].shape[0] == 1


# --- losses --------------------------------------------------------------------------------------
def test_losses_vanish_for_ideal_outputs_and_measure_errors(tiny_head: CenterHead) -> None:
    targets = tiny_head.get_targets(*batch(all_class_scene()))
    heatmap, regression = ideal_outputs(targets)
    ideal = tiny_head.loss_terms(heatmap, regression, targets)
    for name, value in ideal.items():
        assert value.shape == (len(TASKS),) and float(value.abs().max()) < 1e-4, name

    pos = targets.positive.repeat_interleave(11, dim=1).float()  # [B, 66, H, W]: 1 at positives
    def shifted(channel: int, by: float) -> dict[str, torch.Tensor]:
        mask = torch.zeros(11)
        mask[channel] = by
        shift = pos * mask.repeat(len(TASKS))[None, :, None, None]
        return tiny_head.loss_terms(heatmap, regression + shift, targets)
    # L1 per positive with code weights 1 (offset) and 0.2 (velocity).
    assert torch.allclose(shifted(0, 0.5)["box"], torch.full((6,), 0.5), atol=1e-5)
    assert torch.allclose(shifted(8, 0.5)["box"], torch.full((6,), 0.1), atol=1e-5)
    # The IoU branch regresses 2 * (IoU - 0.5) = 1 for exact boxes.
    assert torch.allclose(shifted(10, -1.0)["iou_aware"], torch.ones(6), atol=1e-5)
    # A small box error costs IoU3D; a large one (box loss >= 1) switches the IoU3D term off.
    assert bool((shifted(0, 0.3)["iou3d"] > 0.05).all())
    assert bool((shifted(0, 1.5)["iou3d"] == 0).all())
    wrong = tiny_head.loss_terms(-heatmap, regression, targets)["heatmap"]
    assert bool((wrong > 1.0).all())
    total_ideal = tiny_head.compute_loss(heatmap, regression, *batch(all_class_scene()))["loss"]
    total_wrong = tiny_head.compute_loss(-heatmap, regression + 0.3 * pos, *batch(all_class_scene()))["loss"]
    assert float(total_wrong.detach()) > float(total_ideal.detach()) + 1.0


def test_losses_are_finite_without_objects(tiny_head: CenterHead) -> None:
    empty = torch.zeros(2, 3, 9), torch.full((2, 3), -1), torch.zeros(2, 3, dtype=torch.bool)
    targets = tiny_head.get_targets(*empty)
    assert not bool(targets.positive.any()) and float(targets.heatmap.sum()) == 0
    x = torch.randn(2, 32, 64, 64)
    terms = tiny_head.loss_terms(*tiny_head(x), targets)
    assert bool((terms["heatmap"] > 0).all())  # negatives are still scored
    for name in ("box", "iou_aware", "iou3d"):
        assert bool((terms[name] == 0).all()), name
    total = tiny_head.compute_loss(*tiny_head(x), *empty)["loss"]
    tiny_head.zero_grad()
    total.backward()
    assert torch.isfinite(total)
    assert all(bool(torch.isfinite(p.grad).all()) for p in tiny_head.parameters() if p.grad is not None)


def test_gradient_reaches_every_parameter() -> None:
    torch.manual_seed(1)
    head = CenterHead(grid_of("tiny"), **PRESET_WIDTHS["tiny"])
    high = torch.randn(2, 32, 64, 64, requires_grad=True)
    losses = head.compute_loss(*head(high), *batch(all_class_scene()))
    assert set(losses) == {"heatmap", "box", "iou_aware", "iou3d", "loss"}
    parts = losses["heatmap"] + losses["box"] + losses["iou_aware"] + losses["iou3d"]
    assert torch.allclose(losses["loss"], parts)
    losses["loss"].backward()
    for name, p in head.named_parameters():
        assert p.grad is not None and bool(torch.isfinite(p.grad).all()), name
        # (A 1-channel bias gets the sum of L1 signs, which can cancel; its weights cannot all.)
        assert p.numel() == 1 or float(p.grad.abs().sum()) > 0, name
    assert float(high.grad.abs().sum()) > 0


def test_uncertainty_weighting() -> None:
    head = CenterHead(grid_of("tiny"), 8, 8, 8)
    terms = {name: torch.arange(6, dtype=torch.float32) + i for i, name in
             enumerate(("heatmap", "box", "iou_aware", "iou3d"))}
    with torch.no_grad():
        head.uncertainty.copy_(torch.tensor([1.0, 2.0, 0.5]))
    out = {k: v.detach() for k, v in head.weigh_losses(terms).items()}
    # Per task 0.5 / p^2 * L + log(1 + p^2), summed over the 6 tasks; IoU3D weighted 5.
    assert float(out["heatmap"]) == pytest.approx(0.5 * 15 + 6 * math.log(2))
    assert float(out["box"]) == pytest.approx(0.125 * 21 + 6 * math.log(5))
    assert float(out["iou_aware"]) == pytest.approx(2.0 * 27 + 6 * math.log(1.25))
    assert float(out["iou3d"]) == pytest.approx(5 * 33)
    parts = sum(float(out[k]) for k in ("heatmap", "box", "iou_aware", "iou3d"))
    assert float(out["loss"]) == pytest.approx(parts)


def test_positive_count_can_be_reduced(tiny_head: CenterHead) -> None:
    targets = tiny_head.get_targets(*batch(all_class_scene()))
    heatmap, regression = ideal_outputs(targets)
    regression = regression + 0.2
    plain = tiny_head.loss_terms(heatmap, regression, targets)
    seen = []
    def doubled(count: torch.Tensor) -> torch.Tensor:
        seen.append(count.clone())
        return 2 * count
    halved = tiny_head.loss_terms(heatmap, regression, targets, reduce_count=doubled)
    assert torch.equal(seen[0], targets.positive.sum(dim=(0, 2, 3)).float())
    for name in ("heatmap", "box", "iou_aware"):
        assert torch.allclose(halved[name], plain[name] / 2, rtol=1e-5), name
    assert torch.equal(mean_over_workers(seen[0]), seen[0])  # not distributed: unchanged


# --- box geometry --------------------------------------------------------------------------------
def random_boxes(n: int, gen: torch.Generator, spread: float) -> torch.Tensor:
    boxes = torch.zeros(n, 9, dtype=torch.float64)
    boxes[:, :2] = 40.0 + (torch.rand(n, 2, generator=gen, dtype=torch.float64) - 0.5) * spread
    boxes[:, 3:5] = 0.3 + 5.0 * torch.rand(n, 2, generator=gen, dtype=torch.float64)
    boxes[:, 5] = 1.5
    boxes[:, 6] = (torch.rand(n, generator=gen, dtype=torch.float64) - 0.5) * 4 * math.pi
    return boxes


def special_pairs() -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """Hand-made pairs (a, b, exact IoU): identical, disjoint, contained, touching, rotated copies."""
    def bx(x, y, dx, dy, yaw):
        return [x, y, 0.0, dx, dy, 1.0, yaw, 0.0, 0.0]
    pairs = [
        (bx(3, 4, 4, 2, 0.7), bx(3, 4, 4, 2, 0.7), 1.0),  # identical
        (bx(3, 4, 4, 2, 0.7), bx(3, 4, 2, 4, 0.7 + math.pi / 2), 1.0),  # same box, other parameters
        (bx(3, 4, 4, 2, 0.7), bx(3, 4, 4, 2, 0.7 + math.pi), 1.0),  # heading reversed
        (bx(0, 0, 2, 2, 0.0), bx(10, 0, 2, 2, 0.3), 0.0),  # disjoint
        (bx(0, 0, 4, 4, 0.0), bx(0.5, -0.3, 1, 2, 0.4), 2.0 / 16.0),  # contained
        (bx(0, 0, 2, 2, 0.0), bx(2, 0, 2, 2, 0.0), 0.0),  # touching along an edge
        (bx(0, 0, 2, 2, 0.0), bx(2, 2, 2, 2, 0.0), 0.0),  # touching at a corner
        (bx(0, 0, 2, 2, 0.0), bx(1 + math.sqrt(2), 0, 2, 2, math.pi / 4), 0.0),  # corner touching an edge
        (bx(0, 0, 2, 2, 0.0), bx(1, 0, 2, 2, 0.0), 1.0 / 3.0),  # half overlap
        (bx(0, 0, 4, 1, 0.0), bx(0, 0, 4, 1, math.pi / 2), 1.0 / 7.0),  # a cross
    ]
    a = torch.tensor([p[0] for p in pairs], dtype=torch.float64)
    b = torch.tensor([p[1] for p in pairs], dtype=torch.float64)
    return a, b, [p[2] for p in pairs]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_rotated_iou_matches_shapely(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    a, b = random_boxes(400, gen, spread=8.0), random_boxes(400, gen, spread=8.0)
    sa, sb, exact = special_pairs()
    a, b = torch.cat([a, sa]), torch.cat([b, sb])
    expected = np.array([shapely_iou(x, y) for x, y in zip(a.numpy(), b.numpy())])
    assert 0.2 < (expected > 0).mean() < 0.9  # a real mix of overlapping and disjoint pairs
    assert np.allclose(expected[-len(exact):], exact, atol=1e-9)
    got = paired_iou_bev(a.to(dtype), b.to(dtype)).double().numpy()
    assert np.abs(got - expected).max() < 1e-4
    # The pairwise matrix agrees with the paired form, both ways round.
    matrix = iou_bev(a[:40].to(dtype), b[:30].to(dtype)).double().numpy()
    ref = np.array([[shapely_iou(x, y) for y in b[:30].numpy()] for x in a[:40].numpy()])
    assert matrix.shape == (40, 30) and np.abs(matrix - ref).max() < 1e-4
    assert np.allclose(iou_bev(b[:30], a[:40]).numpy(), matrix.T, atol=1e-4)


def test_axis_snapped_iou() -> None:
    a = torch.tensor([[0, 0, 0, 4, 2, 1, 0.0, 0, 0], [0, 0, 0, 4, 2, 1, 0.0, 0, 0], [0, 0, 0, 4, 2, 1, 0.3, 0, 0]])
    b = torch.tensor([[0, 0, 0, 2, 4, 1, math.pi / 2, 0, 0], [1, 0, 0, 4, 2, 1, 0.0, 0, 0],
                      [0, 0, 0, 4, 2, 1, 0.0, 0, 0]])
    # Same footprint after snapping; a 1 m shift is IoU 6/10; a small yaw snaps back to the axis.
    assert torch.allclose(aligned_iou_bev(a, b), torch.tensor([1.0, 0.6, 1.0]), atol=1e-6)


def test_rotated_nms_drops_duplicates_and_keeps_distinct_boxes() -> None:
    car = [10.0, 5.0, 0.0, 4.5, 1.9, 1.6, 0.4, 0.0, 0.0]
    boxes = torch.tensor([
        car,
        [10.05, 5.02, 0.0, 4.4, 1.9, 1.6, 0.42, 0.0, 0.0],  # near-duplicate of 0, higher score
        [20.0, 5.0, 0.0, 4.5, 1.9, 1.6, 0.4, 0.0, 0.0],  # far away
        [10.0, 7.3, 0.0, 4.5, 1.9, 1.6, 0.4, 0.0, 0.0],  # side by side with 0: no overlap
        [10.0, 5.0, 0.0, 4.5, 1.9, 1.6, 0.4 + math.pi, 0.0, 0.0],  # 0 turned round: a duplicate
    ])
    scores = torch.tensor([0.8, 0.9, 0.3, 0.5, 0.7])
    keep = rotated_nms(boxes, scores, iou_threshold=0.1)
    assert keep.tolist() == [1, 3, 2]
    assert rotated_nms(boxes, scores, 0.1, max_keep=2).tolist() == [1, 3]
    assert rotated_nms(boxes[:0], scores[:0], 0.1).numel() == 0
    # With a threshold above the near-duplicates' IoU nothing is dropped.
    assert sorted(rotated_nms(boxes[:4], scores[:4], iou_threshold=0.99).tolist()) == [0, 1, 2, 3]


def test_targets_dataclass_shapes(tiny_head: CenterHead) -> None:
    t = tiny_head.get_targets(*batch(all_class_scene()))
    assert isinstance(t, HeadTargets)
    assert t.heatmap.shape == (2, 10, 64, 64) and t.positive.shape == (2, 6, 64, 64)
    assert t.box.shape == (2, 6, BOX_CODE_SIZE, 64, 64) and t.gt_index.dtype == torch.int64
    assert bool((t.gt_index >= 0).eq(t.positive).all())
    # Every GT of the scene owns positives of its class (none lost to a neighbour).
    for b, row in enumerate(all_class_scene()):
        owners = set(t.gt_index[b][t.positive[b]].tolist())
        assert owners == set(range(len(row)))
