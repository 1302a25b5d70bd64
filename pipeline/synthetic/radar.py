"""RADAR: the five Continental ARS 408 radars of the nuScenes car, as key-frame sample_data files
in the devkit's radar `.pcd` format (`RadarPointCloud.from_file` reads them unchanged).

Returns are coarse, like the real radar's clusters: one to three points inside every annotated
object that a radar's field of view covers and that the key frame's LiDAR saw (num_lidar_pts > 0,
a stand-in for line of sight, which also keeps the devkit's "no points, not evaluated" filter as it
was), with the object's radial velocity, and one stationary return off every pole in view. Each
radar fires at its own time near the key frame, at its own ego pose, as on the nuScenes car. The
detectors here do not read radar; the records exist so that a loader that assumes every sensor is
a camera or the LiDAR, or miscounts `num_radar_pts`, fails on the stand-in as it would on
nuScenes. No radar sweeps between key frames are written.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.synthetic.rig import Sensor, rotation_zyx
from pipeline.synthetic.world import World

RADARS = ("RADAR_FRONT", "RADAR_FRONT_LEFT", "RADAR_FRONT_RIGHT", "RADAR_BACK_LEFT", "RADAR_BACK_RIGHT")
# channel: (translation in the ego frame (m), yaw of the boresight (deg)), near the nuScenes car's.
_RADAR_SPECS: dict[str, tuple[tuple[float, float, float], float]] = {
    "RADAR_FRONT": ((3.41, 0.0, 0.50), 0.0),
    "RADAR_FRONT_LEFT": ((2.42, 0.80, 0.78), 90.0),
    "RADAR_FRONT_RIGHT": ((2.42, -0.80, 0.77), -90.0),
    "RADAR_BACK_LEFT": ((-0.56, 0.63, 0.53), 180.0 - 20.0),
    "RADAR_BACK_RIGHT": ((-0.56, -0.63, 0.53), -180.0 + 20.0),
}
MAX_RANGE = 70.0          # m: the ARS 408's near-range mode
HALF_FOV_DEG = 60.0
TRIGGER_JITTER_US = 35_000  # radars run at ~13 Hz, unsynchronised with the LiDAR

# The devkit's radar point layout (RadarPointCloud.from_file, nuScenes v1.0).
FIELDS = ("x", "y", "z", "dyn_prop", "id", "rcs", "vx", "vy", "vx_comp", "vy_comp", "is_quality_valid",
          "ambig_state", "x_rms", "y_rms", "invalid_state", "pdh0", "vx_rms", "vy_rms")
_SIZES = (4, 4, 4, 1, 2, 4, 4, 4, 4, 4, 1, 1, 1, 1, 1, 1, 1, 1)
_TYPES = ("F", "F", "F", "I", "I", "F", "F", "F", "F", "F", "I", "I", "I", "I", "I", "I", "I", "I")
POINT_DTYPE = np.dtype([(name, f"<{'f' if t == 'F' else 'i'}{size}")
                        for name, size, t in zip(FIELDS, _SIZES, _TYPES)])
MOVING, STATIONARY = 0, 1        # dyn_prop values
UNAMBIGUOUS, VALID = 3, 0        # ambig_state and invalid_state the devkit keeps by default


def make_radars(rng: np.random.Generator) -> tuple[Sensor, ...]:
    """The five radars (x forward, y left, z up) with ~1 cm / 0.3 degree calibration jitter."""
    radars = []
    for channel in RADARS:
        t, yaw = _RADAR_SPECS[channel]
        dyaw = np.deg2rad(rng.normal(0.0, 0.3))
        radars.append(Sensor(channel, np.array(t) + rng.normal(0.0, 0.01, size=3),
                             rotation_zyx(np.deg2rad(yaw) + dyaw)))
    return tuple(radars)


def trigger_offset_us(rng: np.random.Generator) -> int:
    """When a radar's key-frame record is stamped relative to the LiDAR key frame (microseconds)."""
    return int(rng.integers(-TRIGGER_JITTER_US, TRIGGER_JITTER_US + 1))


def returns(world: World, sensor: Sensor, t: float, seen: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The radar's points at time t (s): a structured array of POINT_DTYPE in the sensor frame.

    seen [num objects] bool: the objects the key frame's LiDAR hit (the ones that may return)."""
    origin, rot = world.sensor_pose(sensor, t)             # sensor -> global
    ego_velocity = (rot.T @ _ego_velocity(world, t))[:2]    # [2] sensor frame
    rows = []
    for obj in (o for o, s in zip(world.objects, seen) if s):
        xy, yaw = world.object_pose(obj, t)
        centre = rot.T @ (np.array([xy[0], xy[1], 0.0]) - origin)  # [3] sensor frame (z: ground below)
        if not _in_view(centre):
            continue
        l, w, _ = obj.size
        count = 1 + int(rng.integers(0, 3 if l > 2.5 else 1))
        local = rng.uniform(-0.3, 0.3, size=(count, 2)) * np.array([l, w])      # inside the box's middle
        yaw_s = float(yaw) - np.arctan2(rot[1, 0], rot[0, 0])                     # heading in the sensor frame
        c, s = np.cos(yaw_s), np.sin(yaw_s)
        pts = centre[:2] + local @ np.array([[c, s], [-s, c]])
        velocity = rot.T @ np.append(world.object_velocity(obj, t), 0.0)          # [3] sensor frame
        rows.append(_points(pts, velocity[:2], ego_velocity, rng))
    for clutter in world.clutter:  # poles: strong stationary returns
        if max(clutter.size[:2]) > 0.5:
            continue
        centre = rot.T @ (np.array([*clutter.centre, 0.0]) - origin)
        if _in_view(centre):
            rows.append(_points(centre[None, :2], np.zeros(2), ego_velocity, rng))
    points = np.concatenate(rows) if rows else np.zeros(0, POINT_DTYPE)
    points["id"] = np.arange(len(points))
    return points


def write_pcd(points: np.ndarray, path: Path) -> None:
    """Write radar points (POINT_DTYPE) as a binary PCD v0.7 file the devkit reads; an empty scan is
    one NaN point, the devkit's convention for "no returns"."""
    if len(points) == 0:
        points = np.zeros(1, POINT_DTYPE)
        points["x"] = points["y"] = points["z"] = np.nan
    header = ("# .PCD v0.7 - Point Cloud Data file format\nVERSION 0.7\n"
              f"FIELDS {' '.join(FIELDS)}\nSIZE {' '.join(map(str, _SIZES))}\nTYPE {' '.join(_TYPES)}\n"
              f"COUNT {' '.join('1' for _ in FIELDS)}\nWIDTH {len(points)}\nHEIGHT 1\n"
              f"VIEWPOINT 0 0 0 1 0 0 0\nPOINTS {len(points)}\nDATA binary\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    # The devkit reads each field while its end offset stays below the data's length: end with a newline.
    path.write_bytes(header.encode("ascii") + points.astype(POINT_DTYPE).tobytes() + b"\n")


def _in_view(centre: np.ndarray) -> bool:
    rng_xy = float(np.hypot(centre[0], centre[1]))
    return 1.0 < rng_xy <= MAX_RANGE and abs(np.degrees(np.arctan2(centre[1], centre[0]))) <= HALF_FOV_DEG


def _ego_velocity(world: World, t: float, dt: float = 0.01) -> np.ndarray:
    (x0, y0), _ = world.ego_pose(t - dt)
    (x1, y1), _ = world.ego_pose(t + dt)
    return np.array([(x1 - x0) / (2 * dt), (y1 - y0) / (2 * dt), 0.0])


def _points(xy: np.ndarray, velocity: np.ndarray, ego_velocity: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Radar points at xy [N, 2] (sensor frame) of a target moving at `velocity` [2] (ground, sensor
    frame): velocities are radial, as the radar measures them; `_comp` ones with the ego's removed."""
    out = np.zeros(len(xy), POINT_DTYPE)
    ray = xy / np.maximum(np.linalg.norm(xy, axis=1, keepdims=True), 1e-6)   # [N, 2]
    comp = (ray @ velocity)[:, None] * ray                                    # over ground
    raw = (ray @ (velocity - ego_velocity))[:, None] * ray                    # as seen from the car
    moving = np.linalg.norm(velocity) > 0.2
    out["x"], out["y"] = xy[:, 0], xy[:, 1]
    out["dyn_prop"] = MOVING if moving else STATIONARY
    out["rcs"] = rng.uniform(-5.0, 20.0, size=len(xy))
    out["vx"], out["vy"] = raw[:, 0], raw[:, 1]
    out["vx_comp"], out["vy_comp"] = comp[:, 0], comp[:, 1]
    out["is_quality_valid"] = 1
    out["ambig_state"] = UNAMBIGUOUS
    out["x_rms"] = out["y_rms"] = out["vx_rms"] = out["vy_rms"] = 17
    out["invalid_state"] = VALID
    out["pdh0"] = 1
    return out
