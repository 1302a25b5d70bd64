"""The BEV grid: the only source of H, W, cell size and cell centres (DESIGN §3.1).

Frame: the LiDAR (LIDAR_TOP) frame of the key frame, after BEV augmentation when there is one.
BEV tensors are [B, C, H, W] with rows = y and columns = x. Cell (row i, col j) covers
x in [x_min + j * cell, x_min + (j + 1) * cell) and y likewise with i; its centre is
(x_min + (j + 0.5) * cell, y_min + (i + 0.5) * cell).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch

from models.errors import UserError


@dataclass(frozen=True)
class BEVGrid:
    """A detector's geometry: the point-cloud range, the voxel size and the BEV down-sampling.

    Args:
        point_cloud_range: (x_min, y_min, z_min, x_max, y_max, z_max) in metres.
        voxel_size: (vx, vy, vz) of the LiDAR voxeliser in metres.
        out_size_factor: BEV cell size / voxel size in x and y (8 in the paper).
    """

    point_cloud_range: tuple[float, float, float, float, float, float]
    voxel_size: tuple[float, float, float]
    out_size_factor: int

    def __post_init__(self) -> None:
        r, v = self.point_cloud_range, self.voxel_size
        if len(r) != 6 or len(v) != 3:
            raise UserError(f"grid: point_cloud_range needs 6 values and voxel_size 3, got {r}, {v}")
        if not (r[3] > r[0] and r[4] > r[1] and r[5] > r[2]):
            raise UserError(f"grid: point_cloud_range {r} must be (min x, y, z, max x, y, z)")
        for axis, n in zip("xyz", self.voxel_grid_size):
            extent = r["xyz".index(axis) + 3] - r["xyz".index(axis)]
            if abs(n * v["xyz".index(axis)] - extent) > 1e-4:
                raise UserError(f"grid: {axis} extent {extent} m is not a whole number of "
                                 f"{v['xyz'.index(axis)]} m voxels")
        if self.voxel_grid_size[0] % self.out_size_factor or self.voxel_grid_size[1] % self.out_size_factor:
            raise UserError(f"grid: voxel grid {self.voxel_grid_size[:2]} is not divisible by "
                             f"out_size_factor {self.out_size_factor}")

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "BEVGrid":
        """Build from a config's `grid` section (keys: point_cloud_range, voxel_size, out_size_factor)."""
        return cls(tuple(float(x) for x in cfg["point_cloud_range"]),  # type: ignore[arg-type]
                   tuple(float(x) for x in cfg["voxel_size"]),  # type: ignore[arg-type]
                   int(cfg["out_size_factor"]))

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form, as stored in configs and cache fingerprints."""
        return {"point_cloud_range": list(self.point_cloud_range), "voxel_size": list(self.voxel_size),
                "out_size_factor": self.out_size_factor}

    # --- sizes -------------------------------------------------------------------------------
    @property
    def voxel_grid_size(self) -> tuple[int, int, int]:
        """Number of voxels along (x, y, z)."""
        r, v = self.point_cloud_range, self.voxel_size
        return tuple(int(round((r[i + 3] - r[i]) / v[i])) for i in range(3))  # type: ignore[return-value]

    @property
    def x_min(self) -> float:
        return self.point_cloud_range[0]

    @property
    def y_min(self) -> float:
        return self.point_cloud_range[1]

    @property
    def cell(self) -> float:
        """BEV cell size in metres (square cells)."""
        return self.voxel_size[0] * self.out_size_factor

    @property
    def W(self) -> int:  # noqa: N802 - the usual tensor dimension name
        """Columns (x)."""
        return self.voxel_grid_size[0] // self.out_size_factor

    @property
    def H(self) -> int:  # noqa: N802
        """Rows (y)."""
        return self.voxel_grid_size[1] // self.out_size_factor

    # --- coordinates -------------------------------------------------------------------------
    def cell_centers(self) -> tuple[np.ndarray, np.ndarray]:
        """(xs [W], ys [H]): metric x of every column centre and y of every row centre."""
        xs = self.x_min + (np.arange(self.W) + 0.5) * self.cell
        ys = self.y_min + (np.arange(self.H) + 0.5) * self.cell
        return xs, ys

    def metric_to_cell(self, xy: torch.Tensor | np.ndarray):
        """Continuous cell coordinates (u = column, v = row) of metric (x, y) [..., 2].

        A point at a cell's centre maps to (j + 0.5, i + 0.5); int() of the result is its cell.
        """
        lo = xy.new_tensor([self.x_min, self.y_min]) if isinstance(xy, torch.Tensor) \
            else np.array([self.x_min, self.y_min], dtype=xy.dtype)
        return (xy - lo) / self.cell

    def metric_to_normalized(self, xy: torch.Tensor) -> torch.Tensor:
        """grid_sample coordinates of metric (x, y) [..., 2] -> [..., 2] in (x_n, y_n) order.

        For `F.grid_sample(bev, grid, align_corners=False)` on a [B, C, H, W] map: x_n indexes
        W (columns = x) and y_n indexes H (rows = y), -1 and +1 at the outer cell edges.
        """
        uv = self.metric_to_cell(xy)
        size = xy.new_tensor([self.W, self.H])
        return uv / size * 2.0 - 1.0

    def contains(self, xy: np.ndarray) -> np.ndarray:
        """Mask of metric points [..., 2] inside the x/y range."""
        r = self.point_cloud_range
        return (xy[..., 0] >= r[0]) & (xy[..., 0] < r[3]) & (xy[..., 1] >= r[1]) & (xy[..., 1] < r[4])
