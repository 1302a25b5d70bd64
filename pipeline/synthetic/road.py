"""The street a scene happens in: a smooth road centre line, its cross-section (lanes, parking
strip, kerb, sidewalk, verge), and the ground it paints (a material raster used by the camera
and LiDAR, and the devkit's map mask).

Positions along the road are (s, d): arc length along the centre line and signed lateral
offset, d > 0 to the left of the +s direction.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

# Cross-section, |d| in metres.
LANE_WIDTH = 3.5
LANE_CENTRES = (1.75, 5.25)      # inner and outer travel lane of each direction
CARRIAGEWAY_EDGE = 7.0
PARKING_EDGE = 9.2               # parking strip is CARRIAGEWAY_EDGE .. PARKING_EDGE
SIDEWALK_EDGE = 12.0             # sidewalk is PARKING_EDGE .. SIDEWALK_EDGE
VERGE_EDGE = 15.0                # verge (grass) is SIDEWALK_EDGE .. VERGE_EDGE; buildings beyond

# Ground materials of the raster.
GRASS, ASPHALT, MARKING, SIDEWALK, KERB = 0, 1, 2, 3, 4
MATERIAL_COLOURS = np.array([(92, 104, 78), (82, 82, 86), (222, 222, 215), (152, 150, 142), (178, 178, 172)],
                            dtype=np.float32)  # [M, 3] RGB
MATERIAL_REFLECTIVITY = np.array([14.0, 7.0, 85.0, 24.0, 30.0], dtype=np.float32)  # [M], 0-255 scale

RASTER_RESOLUTION = 0.1  # m per cell, ground raster and devkit map mask (the devkit's native 0.1 m)
_SHADE_TILE = 256


@dataclass
class Road:
    """Centre line sampled every `ds` metres from s[0]; heading and curvature per sample."""

    s: np.ndarray          # [K] arc length (m)
    xy: np.ndarray         # [K, 2] global position (m)
    heading: np.ndarray    # [K] direction of +s (rad)
    curvature: np.ndarray  # [K] 1/m, > 0 turning left
    right_hand: bool       # traffic drives on the right (Boston) or the left (Singapore)

    def frame(self, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Centre point [..., 2], heading [...], curvature [...] at arc lengths s [...]."""
        s = np.asarray(s, dtype=np.float64)
        if np.any(s < self.s[0]) or np.any(s > self.s[-1]):
            raise ValueError(f"arc length outside the road [{self.s[0]}, {self.s[-1]}]: "
                             f"{float(np.min(s))}..{float(np.max(s))}")
        x = np.interp(s, self.s, self.xy[:, 0])
        y = np.interp(s, self.s, self.xy[:, 1])
        return np.stack([x, y], -1), np.interp(s, self.s, self.heading), np.interp(s, self.s, self.curvature)

    def point(self, s: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Global position [..., 2] of (s, d) and the road heading there [...]."""
        centre, heading, _ = self.frame(s)
        normal = np.stack([-np.sin(heading), np.cos(heading)], -1)
        return centre + np.asarray(d, dtype=np.float64)[..., None] * normal, heading

    def lane_direction(self, d: float) -> int:
        """+1 if traffic in the lane at offset d drives towards +s, else -1."""
        left_side = d > 0
        return -1 if left_side == self.right_hand else 1


def make_road(rng: np.random.Generator, start_xy: tuple[float, float], start_heading: float,
              s_min: float, s_max: float, curviness: float, right_hand: bool, ds: float = 0.5) -> Road:
    """A smooth road through `start_xy` (s = 0) whose curvature is a sum of two slow waves with
    amplitude up to `curviness` (1/m)."""
    n_back = int(np.ceil(-s_min / ds))
    n_fwd = int(np.ceil(s_max / ds))
    s = np.arange(-n_back, n_fwd + 1) * ds  # contains 0 exactly at index n_back
    waves = [(rng.uniform(0.3, 1.0) * curviness * rng.choice([-1, 1]), rng.uniform(150, 400), rng.uniform(0, 2 * np.pi))
             for _ in range(2)]
    curvature = sum(a * np.sin(2 * np.pi * s / length + phase) for a, length, phase in waves) / 1.3
    # Heading and position by trapezoidal integration outwards from s = 0.
    heading = start_heading + _integrate_from(s, curvature, n_back)
    x = start_xy[0] + _integrate_from(s, np.cos(heading), n_back)
    y = start_xy[1] + _integrate_from(s, np.sin(heading), n_back)
    return Road(s=s, xy=np.stack([x, y], -1), heading=heading, curvature=np.asarray(curvature, dtype=np.float64),
                right_hand=right_hand)


def _integrate_from(s: np.ndarray, f: np.ndarray, i0: int) -> np.ndarray:
    """Cumulative integral of f over s, zero at index i0."""
    steps = 0.5 * (f[1:] + f[:-1]) * np.diff(s)
    cum = np.concatenate([[0.0], np.cumsum(steps)])
    return cum - cum[i0]


# --- ground raster ----------------------------------------------------------------------------


@dataclass
class Ground:
    """Material per 0.1 m cell over the scene's area, plus a tiled brightness texture."""

    origin: np.ndarray     # [2] global (x, y) of cell (0, 0)'s corner
    material: np.ndarray   # uint8 [H, W]; rows along +y, columns along +x
    shade: np.ndarray      # float32 [256, 256] brightness factors around 1

    def lookup(self, xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Material [N] and brightness factor [N] at global points xy [N, 2]; outside: grass."""
        ij = np.floor((xy - self.origin) / RASTER_RESOLUTION).astype(np.int64)  # [N, 2] (col, row)
        h, w = self.material.shape
        inside = (ij[:, 0] >= 0) & (ij[:, 0] < w) & (ij[:, 1] >= 0) & (ij[:, 1] < h)
        material = np.full(len(xy), GRASS, dtype=np.uint8)
        material[inside] = self.material[ij[inside, 1], ij[inside, 0]]
        shade = self.shade[ij[:, 1] & (_SHADE_TILE - 1), ij[:, 0] & (_SHADE_TILE - 1)]
        return material, shade


def _strip(road: Road, s: np.ndarray, d0: float, d1: float) -> np.ndarray:
    """Polygon [2K, 2] of the band d0..d1 along the road samples s."""
    a, _ = road.point(s, np.full_like(s, d0))
    b, _ = road.point(s[::-1], np.full_like(s, d1))
    return np.concatenate([a, b])


def _dashes(road: Road, s: np.ndarray, d: float, on: float, off: float) -> list[np.ndarray]:
    """Polylines of a dashed line at offset d."""
    period = on + off
    out = []
    for start in np.arange(np.ceil(s[0] / period) * period, s[-1] - on, period):
        ss = np.linspace(start, start + on, 4)
        out.append(road.point(ss, np.full_like(ss, d))[0])
    return out


def draw_ground(road: Road, s_range: tuple[float, float], crossings: list[float], rng: np.random.Generator,
                lateral: float = 40.0) -> Ground:
    """Rasterise the road's cross-section, markings and crosswalks over s_range."""
    s = np.arange(s_range[0], s_range[1] + 1e-9, 2.0)
    corners = np.concatenate([road.point(s, np.full_like(s, dd))[0] for dd in (-lateral, lateral)])
    origin = np.floor(corners.min(0)) - 1.0
    size = np.ceil((corners.max(0) + 1.0 - origin) / RASTER_RESOLUTION).astype(int)  # (W, H)
    material = np.full((size[1], size[0]), GRASS, dtype=np.uint8)

    def px(points: np.ndarray) -> np.ndarray:  # global -> fixed-point pixel coords (shift 2)
        return np.round((points - origin) / RASTER_RESOLUTION * 4).astype(np.int32)

    def fill(poly: np.ndarray, value: int) -> None:
        cv2.fillPoly(material, [px(poly)], int(value), lineType=cv2.LINE_8, shift=2)

    def line(poly: np.ndarray, width_m: float) -> None:
        cv2.polylines(material, [px(poly)], False, int(MARKING), max(1, int(round(width_m / RASTER_RESOLUTION))),
                      lineType=cv2.LINE_8, shift=2)

    for sign in (-1, 1):
        fill(_strip(road, s, sign * PARKING_EDGE, sign * SIDEWALK_EDGE), SIDEWALK)
        fill(_strip(road, s, sign * (PARKING_EDGE - 0.25), sign * PARKING_EDGE), KERB)
    fill(_strip(road, s, -(PARKING_EDGE - 0.25), PARKING_EDGE - 0.25), ASPHALT)
    for d in (-0.12, 0.12):  # double centre line
        line(road.point(s, np.full_like(s, d))[0], 0.12)
    for sign in (-1, 1):
        line(road.point(s, np.full_like(s, sign * CARRIAGEWAY_EDGE))[0], 0.15)  # edge line
        for dash in _dashes(road, s, sign * LANE_WIDTH, 3.0, 6.0):  # lane divider
            line(dash, 0.15)
    for sc in crossings:  # zebra crossing: bars along the road, repeated across it
        for d0 in np.arange(-CARRIAGEWAY_EDGE + 0.3, CARRIAGEWAY_EDGE - 0.3, 1.1):
            ss = np.linspace(sc - 2.0, sc + 2.0, 3)
            fill(_strip(road, ss, d0, d0 + 0.55), MARKING)

    # Brightness texture: blotches at three scales, tiled.
    shade = np.zeros((_SHADE_TILE, _SHADE_TILE), dtype=np.float32)
    for cells, amplitude in ((8, 0.06), (32, 0.04), (_SHADE_TILE, 0.05)):
        coarse = rng.standard_normal((cells, cells)).astype(np.float32)
        shade += amplitude * cv2.resize(np.tile(coarse, (2, 2)), (2 * _SHADE_TILE, 2 * _SHADE_TILE),
                                        interpolation=cv2.INTER_CUBIC)[:_SHADE_TILE, :_SHADE_TILE]
    return Ground(origin=origin, material=material, shade=1.0 + np.clip(shade, -0.25, 0.25))


def draw_map_mask(roads: list[Road], s_ranges: list[tuple[float, float]]) -> np.ndarray:
    """The devkit's semantic prior for one location: 255 on road and sidewalk, 0 elsewhere.

    uint8 [H, W] at 0.1 m, global (0, 0) at the bottom-left corner (row H-1), as the devkit's
    MapMask expects (pixel row = H - y / 0.1, column = x / 0.1).
    """
    polys = []
    for road, (s0, s1) in zip(roads, s_ranges):
        s = np.arange(s0, s1 + 1e-9, 2.0)
        polys.append(_strip(road, s, -SIDEWALK_EDGE, SIDEWALK_EDGE))
    top = np.max([p.max(0) for p in polys], axis=0)
    if np.min([p.min(0) for p in polys]) < 0:
        raise ValueError("map mask: road has negative global coordinates; the devkit map frame starts at (0, 0)")
    w, h = np.ceil((top + 20.0) / RASTER_RESOLUTION).astype(int)
    mask = np.zeros((h, w), dtype=np.uint8)
    for p in polys:
        pix = np.stack([p[:, 0] / RASTER_RESOLUTION, h - p[:, 1] / RASTER_RESOLUTION], -1)
        cv2.fillPoly(mask, [np.round(pix * 4).astype(np.int32)], 255, lineType=cv2.LINE_8, shift=2)
    return mask
