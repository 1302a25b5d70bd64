"""CenterNet's Gaussian radius and the class-agnostic Gaussian mask of GT boxes on the BEV grid:
the support of UniDistill's response loss (spec §2.5), also what a foreground cache must keep."""
from __future__ import annotations

import torch
from torch import Tensor

from models.bev_grid import BEVGrid


def gaussian_radius(size: Tensor, min_overlap: float = 0.7) -> Tensor:
    """CornerNet/CenterPoint Gaussian radius [...] (in cells, not rounded) of box sizes [..., 2] in cells.

    The minimum of the three roots, in the (b + sqrt(disc)) / 2 form of the original code.
    """
    w, h = size[..., 0], size[..., 1]
    o = min_overlap
    b1, c1 = h + w, w * h * (1 - o) / (1 + o)
    r1 = (b1 + torch.sqrt(b1 ** 2 - 4 * c1)) / 2
    b2, c2 = 2 * (h + w), (1 - o) * w * h
    r2 = (b2 + torch.sqrt(b2 ** 2 - 16 * c2)) / 2
    a3, b3, c3 = 4 * o, -2 * o * (h + w), (o - 1) * w * h
    r3 = (b3 + torch.sqrt(b3 ** 2 - 4 * a3 * c3)) / 2
    return torch.minimum(torch.minimum(r1, r2), r3)


@torch.no_grad()
def box_gaussian_mask(gt_boxes: Tensor, gt_mask: Tensor, grid: BEVGrid, min_overlap: float = 0.7) -> Tensor:
    """Class-agnostic CenterNet Gaussian mask [B, H, W] (float32) of the valid boxes (spec §2.5).

    Per box: radius r = int(max(0, gaussian_radius(size in cells))) with no minimum; centre
    cell (col, row) = int((x - x_min) / cell), int((y - y_min) / cell); a (2r+1)^2 Gaussian of
    sigma (2r+1)/6 and peak 1 drawn at [row, col], merged by max (draw_umich_gaussian). Rows
    with gt_mask False draw nothing; neither do boxes whose centre cell is off the map (floor,
    so centres just below x_min are off too; the original's int() would put them in column 0).
    Vectorised: one scatter per distinct radius.
    """
    b, m = gt_mask.shape
    h, w = grid.H, grid.W
    out = torch.zeros(b * h * w, dtype=torch.float32, device=gt_boxes.device)
    boxes = gt_boxes.detach().double()  # float64 like the original's numpy, for the int() cuts
    ok = gt_mask.bool() & torch.isfinite(boxes[..., :5]).all(dim=-1)
    col = torch.floor((boxes[..., 0] - grid.x_min) / grid.cell)
    row = torch.floor((boxes[..., 1] - grid.y_min) / grid.cell)
    ok &= (col >= 0) & (col < w) & (row >= 0) & (row < h)
    if not bool(ok.any()):
        return out.view(b, h, w)
    radius = torch.floor(gaussian_radius(boxes[..., 3:5].abs() / grid.cell, min_overlap).clamp(min=0))
    bi = torch.arange(b, device=out.device)[:, None].expand(b, m)[ok]  # [P]
    cols, rows, radii = col[ok].long(), row[ok].long(), radius[ok].long()
    for r in torch.unique(radii).tolist():
        sel = radii == r
        k = min(r, max(h, w))  # cells farther than the map size are off the map anyway
        off = torch.arange(-k, k + 1, device=out.device)
        dy, dx = off[:, None], off[None, :]  # [K, 1], [1, K]
        sigma = (2 * r + 1) / 6
        gauss = torch.exp(-(dx * dx + dy * dy).double() / (2 * sigma * sigma)).float()  # [K, K]
        rr = rows[sel][:, None, None] + dy  # [P_r, K, 1]
        cc = cols[sel][:, None, None] + dx  # [P_r, 1, K]
        inside = (rr >= 0) & (rr < h) & (cc >= 0) & (cc < w)  # [P_r, K, K]
        flat = (bi[sel][:, None, None] * h + rr) * w + cc
        out.scatter_reduce_(0, flat[inside], gauss.expand_as(inside)[inside], reduce="amax", include_self=True)
    return out.view(b, h, w)
