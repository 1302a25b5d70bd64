"""LIDAR_TOP: a spinning 32-beam sensor like the Velodyne HDL-32E of nuScenes, ray-cast against
the world at one instant per sweep.

A scan is float32 [N, 5] (x, y, z, intensity, ring) in the LIDAR_TOP frame, the layout of
nuScenes `.pcd.bin` files. Points come in firing order (azimuth column by column).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.synthetic.raycast import box_hits, ground_hits, into_solid, to_local
from pipeline.synthetic.road import MATERIAL_REFLECTIVITY
from pipeline.synthetic.world import World

ELEVATIONS_DEG = np.linspace(-30.67, 10.67, 32)  # HDL-32E beam elevations, 1.33 degree apart
AZIMUTH_STEPS = 1080                              # columns per revolution at 20 Hz (~0.33 degrees)
MAX_RANGE = 70.0                                  # m; farther surfaces give no return
MIN_RANGE = 1.0
RANGE_NOISE = 0.015                               # m, standard deviation
DROPOUT = 0.01                                    # fraction of returns lost at random
_GROUND, _NONE = -1, -2


def beam_directions() -> np.ndarray:
    """Unit ray directions [C, B, 3] in the LIDAR_TOP frame: C azimuth columns, B beams."""
    az = -np.pi + (np.arange(AZIMUTH_STEPS) + 0.5) * (2 * np.pi / AZIMUTH_STEPS)  # [C]
    el = np.deg2rad(ELEVATIONS_DEG)                                             # [B]
    return np.stack([np.cos(el)[None] * np.cos(az)[:, None], np.cos(el)[None] * np.sin(az)[:, None],
                     np.broadcast_to(np.sin(el)[None], (len(az), len(el)))], -1)


_DIRS = beam_directions()


def scan(world: World, t: float, rng: np.random.Generator) -> np.ndarray:
    """One sweep at time t (s from the first key frame): float32 [N, 5] x, y, z, intensity, ring."""
    origin, rot = world.sensor_pose(world.rig.lidar, t)
    n_cols, n_beams = _DIRS.shape[:2]
    dirs = (_DIRS @ rot.T).reshape(-1, 3)             # [C * B, 3] global, unit
    dist = ground_hits(origin, dirs)                  # [R]
    owner = np.where(np.isfinite(dist), _GROUND, _NONE)
    part = np.zeros(len(dirs), dtype=np.int64)
    incidence = np.abs(dirs[:, 2])                    # [R] cosine between ray and surface normal

    solids = world.solids(t)
    step = 2 * np.pi / n_cols
    half_diag = 0.5 * np.hypot(solids.extent[:, 0], solids.extent[:, 1])  # [S]
    centre_dist = np.hypot(*(solids.centre - origin[:2]).T)                 # [S]
    near = centre_dist - half_diag  # no surface of solid i is nearer than this
    # Azimuth span of each solid seen from the sensor (the sensor is outside its bounding circle,
    # so the span is under 180 degrees and its corners bound it).
    corners = (solids.corners - origin) @ rot                              # [S, 8, 3] lidar frame
    az = np.arctan2(corners[..., 1], corners[..., 0])                      # [S, 8]
    rel = (az - az[:, :1] + np.pi) % (2 * np.pi) - np.pi
    first_col = np.floor((az[:, 0] + rel.min(1) + np.pi) / step).astype(int) - 1
    last_col = np.ceil((az[:, 0] + rel.max(1) + np.pi) / step).astype(int) + 1
    # Elevation span: the box lies between the ground and its top, at horizontal distance
    # near .. far from the sensor; 2 degrees of margin cover the sensor's and the ego's tilt.
    far = centre_dist + half_diag
    top = solids.extent[:, 2] - origin[2]
    r_near = np.maximum(near, 0.1)
    el_max = np.arctan2(top, np.where(top > 0, r_near, far)) + np.deg2rad(2.0)
    el_min = np.arctan2(-origin[2], r_near) - np.deg2rad(2.0)
    elevations = np.deg2rad(ELEVATIONS_DEG)
    for i in np.argsort(near, kind="stable"):  # front to back, so occluded rays are skipped early
        if near[i] > MAX_RANGE:
            break
        if centre_dist[i] < half_diag[i] + 0.5:  # the sensor is beside or inside the footprint: all columns
            cols = np.arange(n_cols)
        else:
            cols = np.arange(first_col[i], last_col[i] + 1) % n_cols
        beams = np.flatnonzero((elevations >= el_min[i]) & (elevations <= el_max[i]))
        rays = (cols[:, None] * n_beams + beams).ravel()
        rays = rays[dist[rays] > near[i]]  # rays that already hit something nearer cannot reach it
        if len(rays) == 0:
            continue
        centre = np.array([solids.centre[i, 0], solids.centre[i, 1], 0.0])
        local_dirs = dirs[rays] @ into_solid(solids.yaw[i]).T
        t_hit, part_hit, face_hit = box_hits(to_local(origin, centre, solids.yaw[i]), local_dirs, solids.bounds[i])
        closer = t_hit < dist[rays]
        if not closer.any():
            continue
        rays = rays[closer]
        dist[rays] = t_hit[closer]
        owner[rays] = i
        part[rays] = part_hit[closer]
        incidence[rays] = np.abs(local_dirs[closer, face_hit[closer] // 2])

    keep = (dist > MIN_RANGE) & (dist < MAX_RANGE) & (rng.uniform(size=len(dist)) >= DROPOUT)
    rays = np.flatnonzero(keep)
    rng_noise = rng.normal(0.0, RANGE_NOISE, size=len(rays))
    ranges = dist[rays] + rng_noise

    reflect = np.empty(len(rays))
    on_ground = owner[rays] == _GROUND
    hit_xy = origin[:2] + dist[rays[on_ground], None] * dirs[rays[on_ground], :2]
    material, shade = world.ground.lookup(hit_xy)
    reflect[on_ground] = MATERIAL_REFLECTIVITY[material] * shade
    on_solid = rays[~on_ground]
    reflect[~on_ground] = solids.reflectivity[solids.first[owner[on_solid]] + part[on_solid]]
    intensity = reflect * (0.35 + 0.65 * incidence[rays]) + rng.normal(0.0, 1.5, size=len(rays))

    points = np.empty((len(rays), 5), dtype=np.float32)
    points[:, :3] = _DIRS.reshape(-1, 3)[rays] * ranges[:, None]
    points[:, 3] = np.clip(np.round(intensity), 0, 255)
    points[:, 4] = rays % n_beams
    return points


def write_scan(points: np.ndarray, path: Path) -> None:
    """Write a scan as a nuScenes .pcd.bin file (float32 x, y, z, intensity, ring per point)."""
    if points.dtype != np.float32 or points.ndim != 2 or points.shape[1] != 5:
        raise ValueError(f"{path}: expected float32 [N, 5] points, got {points.dtype} {points.shape}")
    path.parent.mkdir(parents=True, exist_ok=True)
    points.tofile(path)
