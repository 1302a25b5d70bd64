"""Bird's-eye-view box geometry in torch: corners, the IoU of rotated boxes, the axis-snapped IoUs
used by the CenterHead's losses, and greedy rotated NMS.

Boxes are rows [..., >=7] of (x, y, z, dx, dy, dz, yaw, ...) in the LiDAR frame (DESIGN §3.1):
z is the box centre, dx the length along the heading, yaw counter-clockwise from +x. In BEV only
x, y, dx, dy and yaw matter.

The rotated IoU clips one box's outline by the other's four edges (Sutherland-Hodgman), batched
over box pairs, so it runs on any device without a compiled op (the original uses OpenPCDet's
`iou3d_nms_cuda`, spec §3.6).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

# Clipping a quadrilateral by 4 half-planes leaves at most 8 vertices; the slack keeps the extra
# (collinear) points that rounding can create near-degenerate contacts.
_MAX_VERTICES = 16
# Pairs per batch in the pairwise IoU, to bound the memory of the clipping step.
_PAIR_CHUNK = 65536


def _check_boxes(boxes: Tensor, name: str) -> None:
    if boxes.dim() != 2 or boxes.shape[1] < 7:
        raise ValueError(f"{name}: expected boxes [N, >=7] (x, y, z, dx, dy, dz, yaw, ...), "
                         f"got shape {tuple(boxes.shape)}")


def bev_corners(boxes: Tensor) -> Tensor:
    """Counter-clockwise BEV corners [..., 4, 2] of boxes [..., >=7].

    Order in the box's own frame: (-dx/2, -dy/2), (+dx/2, -dy/2), (+dx/2, +dy/2), (-dx/2, +dy/2),
    then rotated by yaw and moved to (x, y). Negative sizes are taken as their magnitude.
    """
    sx = boxes.new_tensor([-0.5, 0.5, 0.5, -0.5])
    sy = boxes.new_tensor([-0.5, -0.5, 0.5, 0.5])
    lx = boxes[..., 3:4].abs() * sx  # [..., 4]
    ly = boxes[..., 4:5].abs() * sy
    cos, sin = torch.cos(boxes[..., 6:7]), torch.sin(boxes[..., 6:7])
    x = boxes[..., 0:1] + cos * lx - sin * ly
    y = boxes[..., 1:2] + sin * lx + cos * ly
    return torch.stack([x, y], dim=-1)


def _cross(u: Tensor, v: Tensor) -> Tensor:
    """z of the 2D cross product u x v over the last dimension."""
    return u[..., 0] * v[..., 1] - u[..., 1] * v[..., 0]


def _next_vertex(poly: Tensor, count: Tensor) -> tuple[Tensor, Tensor]:
    """(mask of the first `count` slots [N, V], the cyclically next valid vertex of each slot [N, V, 2])."""
    n, v, _ = poly.shape
    slot = torch.arange(v, device=poly.device)
    valid = slot[None] < count[:, None]
    nxt = (slot[None] + 1) % count.clamp(min=1)[:, None]  # [N, V]
    return valid, poly.gather(1, nxt[..., None].expand(n, v, 2))


def _clip_left_of(poly: Tensor, count: Tensor, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """One Sutherland-Hodgman step: the part of each polygon left of the directed line a -> b.

    poly [N, V, 2] holds `count` [N] vertices in order at its front; a, b [N, 2]. Returns the
    clipped polygons in the same packed form, [N, min(2V, 16), 2] and their counts.
    """
    n, v, _ = poly.shape
    valid, nxt = _next_vertex(poly, count)
    edge = (b - a)[:, None, :]  # [N, 1, 2]
    d_here = _cross(edge, poly - a[:, None, :])  # [N, V]: >= 0 left of (or on) the line
    d_next = _cross(edge, nxt - a[:, None, :])
    inside_here, inside_next = d_here >= 0, d_next >= 0
    keep = valid & inside_here
    cut = valid & (inside_here != inside_next)
    # Where the edge crosses the line the two signed distances differ in sign, so the ratio is
    # well defined and in [0, 1]; elsewhere it is unused.
    denom = torch.where(cut, d_here - d_next, torch.ones_like(d_here))
    t = (d_here / denom).clamp(0.0, 1.0)
    crossing = poly + t[..., None] * (nxt - poly)
    # Each vertex emits itself (if inside) then the crossing on its outgoing edge (if any); the
    # emitted points are packed to the front in order (a running count gives each one its slot).
    cand = torch.stack([poly, crossing], dim=2).reshape(n, 2 * v, 2)
    mask = torch.stack([keep, cut], dim=2).reshape(n, 2 * v)
    width = min(2 * v, _MAX_VERTICES)
    slot = torch.cumsum(mask, dim=1) - 1
    slot = torch.where(mask & (slot < width), slot, torch.full_like(slot, width))  # width: discard slot
    packed = poly.new_zeros(n, width + 1, 2).scatter_(1, slot[..., None].expand(n, 2 * v, 2), cand)
    return packed[:, :width], mask.sum(dim=1).clamp(max=width)


def _polygon_area(poly: Tensor, count: Tensor) -> Tensor:
    """Signed (shoelace) area [N] of packed polygons [N, V, 2] with `count` vertices."""
    valid, nxt = _next_vertex(poly, count)
    return 0.5 * (_cross(poly, nxt) * valid).sum(dim=1)


def paired_iou_bev(boxes_a: Tensor, boxes_b: Tensor) -> Tensor:
    """Rotated BEV IoU [N] of row-aligned pairs boxes_a[i], boxes_b[i] ([N, >=7] each)."""
    _check_boxes(boxes_a, "paired_iou_bev boxes_a")
    _check_boxes(boxes_b, "paired_iou_bev boxes_b")
    if boxes_a.shape[0] != boxes_b.shape[0]:
        raise ValueError(f"paired_iou_bev: {boxes_a.shape[0]} boxes_a rows but {boxes_b.shape[0]} boxes_b rows")
    if boxes_a.shape[0] == 0:
        return boxes_a.new_zeros(0)
    # Work in a frame centred on box a so that large map coordinates cost no precision.
    local_b = torch.cat([boxes_b[:, :2] - boxes_a[:, :2], boxes_b[:, 2:7]], dim=1)
    local_a = torch.cat([torch.zeros_like(boxes_a[:, :2]), boxes_a[:, 2:7]], dim=1)
    poly = bev_corners(local_a)  # [N, 4, 2], counter-clockwise
    clip = bev_corners(local_b)
    count = torch.full((boxes_a.shape[0],), 4, dtype=torch.long, device=boxes_a.device)
    for k in range(4):
        poly, count = _clip_left_of(poly, count, clip[:, k], clip[:, (k + 1) % 4])
    inter = _polygon_area(poly, count).clamp(min=0.0)
    area_a = (boxes_a[:, 3] * boxes_a[:, 4]).abs()
    area_b = (boxes_b[:, 3] * boxes_b[:, 4]).abs()
    # A zero-area box clips nothing along its degenerate edges; it overlaps nothing.
    inter = torch.where((area_a > 0) & (area_b > 0), torch.minimum(inter, torch.minimum(area_a, area_b)),
                        torch.zeros_like(inter))
    union = area_a + area_b - inter
    return torch.where(union > 0, inter / union.clamp(min=torch.finfo(union.dtype).tiny), torch.zeros_like(union))


def iou_bev(boxes_a: Tensor, boxes_b: Tensor) -> Tensor:
    """Rotated BEV IoU matrix [N, M] between boxes_a [N, >=7] and boxes_b [M, >=7].

    Only pairs whose enclosing circles overlap are clipped; all others are 0.
    """
    _check_boxes(boxes_a, "iou_bev boxes_a")
    _check_boxes(boxes_b, "iou_bev boxes_b")
    out = boxes_a.new_zeros(boxes_a.shape[0], boxes_b.shape[0])
    if out.numel() == 0:
        return out
    radius_a = 0.5 * torch.hypot(boxes_a[:, 3], boxes_a[:, 4])  # [N]
    radius_b = 0.5 * torch.hypot(boxes_b[:, 3], boxes_b[:, 4])  # [M]
    dist = torch.cdist(boxes_a[:, :2], boxes_b[:, :2])  # [N, M]
    ia, ib = torch.nonzero(dist < radius_a[:, None] + radius_b[None, :], as_tuple=True)
    for s in range(0, ia.numel(), _PAIR_CHUNK):
        i, j = ia[s:s + _PAIR_CHUNK], ib[s:s + _PAIR_CHUNK]
        out[i, j] = paired_iou_bev(boxes_a[i], boxes_b[j])
    return out


def rotated_nms(boxes: Tensor, scores: Tensor, iou_threshold: float, max_keep: int | None = None) -> Tensor:
    """Greedy NMS on rotated BEV IoU: indices [K] (int64) of the kept boxes, best score first.

    A box is dropped when its BEV IoU with a kept, higher-scoring box exceeds `iou_threshold`.
    IoUs are computed only from each kept box to the lower-scoring boxes still alive whose
    enclosing circles touch it, so a dense cluster costs one clipping call per kept box.
    Args:
        boxes: [N, >=7]; scores: [N]; max_keep: stop after this many kept boxes (None: no limit).
    """
    _check_boxes(boxes, "rotated_nms boxes")
    if scores.shape != (boxes.shape[0],):
        raise ValueError(f"rotated_nms: scores must have shape ({boxes.shape[0]},), got {tuple(scores.shape)}")
    order = torch.argsort(scores, descending=True, stable=True)
    n = order.numel()
    if n == 0:
        return order
    ranked = boxes[order]
    radius = 0.5 * torch.hypot(ranked[:, 3], ranked[:, 4])
    near = torch.cdist(ranked[:, :2], ranked[:, :2]) < radius[:, None] + radius[None, :]  # [N, N]
    near = torch.triu(near, diagonal=1).cpu().numpy()  # only lower-scoring neighbours
    limit = n if max_keep is None else max_keep
    alive = np.ones(n, dtype=bool)
    keep: list[int] = []
    for i in range(n):
        if len(keep) >= limit:
            break
        if not alive[i]:
            continue
        keep.append(i)
        rivals = np.flatnonzero(near[i] & alive)
        if rivals.size:
            idx = torch.as_tensor(rivals, device=ranked.device)
            iou = paired_iou_bev(ranked[i].expand(rivals.size, -1), ranked[idx])
            alive[rivals[(iou > iou_threshold).cpu().numpy()]] = False
    return order[torch.as_tensor(keep, dtype=torch.long, device=order.device)]


def _snap_to_axes(boxes: Tensor) -> tuple[Tensor, Tensor]:
    """(x, y) [N, 2] and BEV size along x and y [N, 2] of each box turned to its nearest axis.

    The yaw is folded to [-pi/2, pi/2); beyond pi/4 from the x axis, length and width swap. The
    choice is discrete, so gradients flow to the centre and sizes only.
    """
    yaw = boxes[:, 6].detach()
    folded = yaw - torch.floor(yaw / math.pi + 0.5) * math.pi
    swap = folded.abs() > math.pi / 4
    dx, dy = boxes[:, 3].abs(), boxes[:, 4].abs()
    size = torch.stack([torch.where(swap, dy, dx), torch.where(swap, dx, dy)], dim=1)
    return boxes[:, :2], size


def _overlap_1d(ca: Tensor, sa: Tensor, cb: Tensor, sb: Tensor) -> Tensor:
    """Length of the overlap of intervals centre ca, size sa and centre cb, size sb (elementwise)."""
    lo = torch.maximum(ca - sa / 2, cb - sb / 2)
    hi = torch.minimum(ca + sa / 2, cb + sb / 2)
    return (hi - lo).clamp(min=0.0)


def aligned_iou_bev(boxes_a: Tensor, boxes_b: Tensor) -> Tensor:
    """BEV IoU [N] of pairs after snapping each box to its nearest axis (the IoU-aware target, spec §3.6)."""
    _check_boxes(boxes_a, "aligned_iou_bev boxes_a")
    _check_boxes(boxes_b, "aligned_iou_bev boxes_b")
    (ca, sa), (cb, sb) = _snap_to_axes(boxes_a), _snap_to_axes(boxes_b)
    inter = _overlap_1d(ca, sa, cb, sb).prod(dim=1)
    union = sa.prod(dim=1) + sb.prod(dim=1) - inter
    return inter / union.clamp(min=1e-6)


def aligned_iou_3d(boxes_a: Tensor, boxes_b: Tensor) -> Tensor:
    """3D IoU [N] of pairs, each snapped to its nearest axis in BEV; z is the box centre, dz the height.

    Differentiable in centres and sizes (the 5 x (1 - IoU3D) term of the head loss). Unlike the
    original (spec §3.6, which mixes up dy and dz) the extents are x: snapped size, y: snapped
    size, z: dz.
    """
    _check_boxes(boxes_a, "aligned_iou_3d boxes_a")
    _check_boxes(boxes_b, "aligned_iou_3d boxes_b")
    (ca, sa), (cb, sb) = _snap_to_axes(boxes_a), _snap_to_axes(boxes_b)
    inter = _overlap_1d(ca, sa, cb, sb).prod(dim=1) * _overlap_1d(
        boxes_a[:, 2], boxes_a[:, 5].abs(), boxes_b[:, 2], boxes_b[:, 5].abs())
    vol_a = sa.prod(dim=1) * boxes_a[:, 5].abs()
    vol_b = sb.prod(dim=1) * boxes_b[:, 5].abs()
    return inter / (vol_a + vol_b - inter).clamp(min=1e-6)
