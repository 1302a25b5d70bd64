"""Bird's-eye-view pictures: a sample's LiDAR points with ground-truth and predicted boxes, and BEV
maps (features, heat maps) with boxes drawn on them. PNG files via matplotlib's Agg backend."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from models.bev_grid import BEVGrid  # noqa: E402
from models.classes import CLASS_NAMES  # noqa: E402


def box_outline(box: np.ndarray) -> np.ndarray:
    """Closed BEV outline [5, 2] of a box (x, y, z, dx, dy, dz, yaw, ...), with the heading edge first."""
    x, y, _, dx, dy, _, yaw = box[:7]
    local = np.array([[dx, dy], [dx, -dy], [-dx, -dy], [-dx, dy], [dx, dy]]) / 2.0
    c, s = np.cos(yaw), np.sin(yaw)
    return local @ np.array([[c, s], [-s, c]]) + np.array([x, y])


def _draw_boxes(ax, boxes: np.ndarray, colour: str, labels: Sequence[int] | None = None) -> None:
    for i, box in enumerate(np.asarray(boxes).reshape(-1, 9)):
        outline = box_outline(box)
        ax.plot(outline[:, 0], outline[:, 1], color=colour, linewidth=0.8)
        ax.plot([box[0], outline[:2, 0].mean()], [box[1], outline[:2, 1].mean()], color=colour, linewidth=0.8)
        if labels is not None:
            ax.text(box[0], box[1], CLASS_NAMES[int(labels[i])][:3], color=colour, fontsize=4)


def render_bev_sample(path: str | Path, grid: BEVGrid, points: np.ndarray, gt_boxes: np.ndarray,
                      gt_labels: np.ndarray, pred_boxes: np.ndarray, pred_labels: np.ndarray,
                      title: str = "") -> Path:
    """PNG of LiDAR points (grey), GT boxes (green) and predictions (red) over the grid's x/y range."""
    r = grid.point_cloud_range
    fig, ax = plt.subplots(figsize=(6, 6), dpi=150)
    pts = np.asarray(points)
    if len(pts):
        keep = grid.contains(pts[:, :2])
        pts = pts[keep][:: max(1, int(keep.sum()) // 60000)]
        ax.scatter(pts[:, 0], pts[:, 1], s=0.05, c="0.5", linewidths=0)
    _draw_boxes(ax, gt_boxes, "tab:green", gt_labels)
    _draw_boxes(ax, pred_boxes, "tab:red")
    ax.set_xlim(r[0], r[3])
    ax.set_ylim(r[1], r[4])
    ax.set_aspect("equal")
    ax.set_title(title or "green: ground truth, red: predictions", fontsize=7)
    ax.tick_params(labelsize=5)
    return _save(fig, path)


def _save(fig: Any, path: str | Path) -> Path:
    """Write a figure as PNG (creating folders) and free it."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, bbox_inches="tight")
    plt.close(fig)
    return out


def render_bev_maps(path: str | Path, grid: BEVGrid, maps: Sequence[tuple[str, np.ndarray]],
                    gt_boxes: np.ndarray | None = None, keypoints: np.ndarray | None = None) -> Path:
    """PNG with one panel per (title, map [H, W]) in the BEV frame (rows = y, up), GT boxes and
    their keypoints (metric [M, P, 2], red dots) overlaid."""
    r = grid.point_cloud_range
    fig, axes = plt.subplots(1, len(maps), figsize=(3.2 * len(maps), 3.2), dpi=150, squeeze=False)
    for ax, (name, m) in zip(axes[0], maps):
        ax.imshow(np.asarray(m, dtype=np.float32), origin="lower", extent=(r[0], r[3], r[1], r[4]), cmap="viridis")
        if gt_boxes is not None:
            _draw_boxes(ax, gt_boxes, "white")
        if keypoints is not None and len(keypoints):
            kp = np.asarray(keypoints).reshape(-1, 2)
            ax.scatter(kp[:, 0], kp[:, 1], s=1.5, c="red", linewidths=0)
        ax.set_xlim(r[0], r[3])
        ax.set_ylim(r[1], r[4])
        ax.set_title(name, fontsize=7)
        ax.tick_params(labelsize=5)
    return _save(fig, path)
