"""One generated scene as a 3D world in time: a road, the ego vehicle driving along it, annotated
objects of the 10 detection classes moving consistently, and unannotated clutter (buildings,
poles, walls).

Everything is a function of time (seconds from the scene's first key frame), so LiDAR sweeps,
cameras and annotations all see the same world at their own times. The global frame is flat:
the ground is z = 0 and objects stand on it; ego poses have z = 0 (as in nuScenes) and the road's
yaw with a small pitch and roll (the car rocking on its suspension), which every sensor shares.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pipeline.synthetic.rig import Rig, Sensor, rotation_zyx
from pipeline.synthetic.road import Ground, Road

KEYFRAME_INTERVAL_US = 500_000  # 2 Hz key frames
SWEEP_INTERVAL_US = 50_000      # 20 Hz LiDAR
SWEEPS_PER_INTERVAL = KEYFRAME_INTERVAL_US // SWEEP_INTERVAL_US - 1  # 9 sweeps between key frames
ANNOTATION_RANGE = 60.0         # objects annotated within this xy distance of the ego (m)
PLACEMENT_MARGIN = 45.0         # objects are placed up to this far before / beyond the ego's path (m)
ROAD_MARGIN = 160.0             # road and ground drawn this far before / beyond the ego's path (m)
CLUTTER_MARGIN = 90.0           # buildings and poles this far (farther ones would be specks in the haze)

# Ego vehicle footprint relative to its origin (rear axle): centre offset, length, width, height.
EGO_CENTRE_OFFSET = 1.3
EGO_SIZE = (4.1, 1.8, 1.6)
EGO_TILT_DEG = 0.6  # largest ego pitch and roll: a car rocking on its suspension (nuScenes: ~1 degree)

@dataclass(frozen=True)
class Motion:
    """How an object moves. kind "road": along the road at lateral offset d with signed speed
    along s; kind "line": straight line from p0 with constant velocity (static if zero)."""

    kind: str
    s0: float = 0.0
    d: float = 0.0
    speed: float = 0.0
    p0: tuple[float, float] = (0.0, 0.0)
    velocity: tuple[float, float] = (0.0, 0.0)
    yaw: float = 0.0  # heading offset from the road ("road") or absolute heading ("line")


@dataclass
class WorldObject:
    """An annotated object: class, nuScenes category and attribute, box size and shape."""

    index: int
    class_name: str
    category: str
    attribute: str
    size: tuple[float, float, float]  # length, width, height (m)
    parts: np.ndarray                 # [P, 6] x0, x1, y0, y1, z0, z1 in metres, box frame, z from ground
    colours: np.ndarray               # [P, 3] RGB
    reflectivity: np.ndarray          # [P] 0-255
    motion: Motion
    instance_token: str = ""

    @property
    def moving(self) -> bool:
        return self.motion.speed != 0.0 or self.motion.velocity != (0.0, 0.0)


@dataclass
class Clutter:
    """An unannotated static solid (building, pole, wall) as one box."""

    centre: tuple[float, float]
    yaw: float
    size: tuple[float, float, float]
    colour: tuple[int, int, int]
    reflectivity: float
    facade: bool  # draw floors of windows on its sides


@dataclass
class Solids:
    """Every solid of the world at one time, for ray casting: objects first, then clutter.

    bounds[i] [P_i, 6] are solid i's parts in its own frame (origin on the ground at the box
    centre, x along its heading). Part p of solid i is row first[i] + p of the part tables."""

    centre: np.ndarray        # [S, 2] global xy
    yaw: np.ndarray           # [S]
    extent: np.ndarray        # [S, 3] length, width, height
    corners: np.ndarray       # [S, 8, 3] global box corners, bottom 4 then top 4
    bounds: list[np.ndarray]
    first: np.ndarray         # [S] first row of each solid in the part tables
    colours: np.ndarray       # [sum P, 3] float32 RGB
    reflectivity: np.ndarray  # [sum P] float32, 0-255
    facade: np.ndarray        # [S] bool
    num_objects: int


def box_corners(centre: np.ndarray, yaw: np.ndarray, extent: np.ndarray) -> np.ndarray:
    """Corners [S, 8, 3] of boxes standing on the ground: centre [S, 2], yaw [S], extent [S, 3]."""
    sx = np.array([1, 1, -1, -1, 1, 1, -1, -1]) * 0.5
    sy = np.array([1, -1, -1, 1, 1, -1, -1, 1]) * 0.5
    sz = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    x, y = sx * extent[:, :1], sy * extent[:, 1:2]            # [S, 8]
    c, s = np.cos(yaw)[:, None], np.sin(yaw)[:, None]
    return np.stack([centre[:, :1] + c * x - s * y, centre[:, 1:] + s * x + c * y, sz * extent[:, 2:]], -1)


@dataclass
class World:
    """One scene's world; see module docstring."""

    seed: int
    scene_index: int
    name: str
    location: str
    samples: int
    start_us: int
    road: Road
    ground: Ground
    rig: Rig
    ego_profile: str
    ego_speeds: tuple[float, float]  # speed at the first and last key frame (m/s)
    ego_s0: float
    ego_d: float
    crossings: list[float]
    # Ego pitch and roll as sines of time: rows pitch, roll; columns amplitude (rad), period (s), phase (rad).
    tilt: np.ndarray = field(default_factory=lambda: np.array([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]]))
    objects: list[WorldObject] = field(default_factory=list)
    clutter: list[Clutter] = field(default_factory=list)
    sun: np.ndarray = field(default_factory=lambda: np.array([0.4, 0.3, 0.87]))
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def duration(self) -> float:
        """Seconds from the first to the last key frame."""
        return (self.samples - 1) * KEYFRAME_INTERVAL_US * 1e-6

    # --- ego ---

    def ego_s(self, t: np.ndarray | float) -> np.ndarray:
        """Arc length of the ego at time t: speed eases from v0 to v1 over the scene (smoothstep)."""
        v0, v1 = self.ego_speeds
        u = np.clip(np.asarray(t, dtype=np.float64) / self.duration, 0.0, 1.0)
        return self.ego_s0 + v0 * np.asarray(t) + (v1 - v0) * self.duration * (u ** 3 - 0.5 * u ** 4)

    def ego_pose(self, t: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
        """Ego origin [..., 2] (global xy) and yaw [...] at time t (s)."""
        s = self.ego_s(t)
        return self.road.point(s, np.full_like(s, self.ego_d))

    def ego_rotation(self, t: np.ndarray | float) -> np.ndarray:
        """Ego -> global rotation [..., 3, 3] at time t: the road's yaw, then the ego's pitch and roll."""
        t = np.asarray(t, dtype=np.float64)
        _, yaw = self.ego_pose(t)
        pitch, roll = (a * np.sin(2 * np.pi * t / period + phase) for a, period, phase in self.tilt)
        return rotation_zyx(yaw, pitch, roll)

    def sensor_pose(self, sensor: Sensor, t: float) -> tuple[np.ndarray, np.ndarray]:
        """Origin [3] and rotation sensor -> global [3, 3] of a rig sensor at time t (s)."""
        xy, _ = self.ego_pose(t)
        r_ego = self.ego_rotation(t)
        return np.array([xy[0], xy[1], 0.0]) + r_ego @ sensor.translation, r_ego @ sensor.rotation

    # --- objects ---

    def object_pose(self, obj: WorldObject, t: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
        """Box centre on the ground [..., 2] and heading [...] of `obj` at time t."""
        return motion_pose(self.road, obj.motion, np.asarray(t, dtype=np.float64))

    def object_velocity(self, obj: WorldObject, t: np.ndarray | float) -> np.ndarray:
        """Instantaneous global velocity [..., 2] (m/s) of `obj` at time t."""
        m = obj.motion
        t = np.asarray(t, dtype=np.float64)
        if m.kind == "line":
            return np.broadcast_to(np.array(m.velocity), t.shape + (2,)).copy()
        _, heading, curvature = self.road.frame(m.s0 + m.speed * t)
        # d/dt of centre(s) + d * normal(s) = speed * (1 - d * curvature) * tangent(s)
        factor = m.speed * (1.0 - m.d * curvature)
        return np.stack([factor * np.cos(heading), factor * np.sin(heading)], -1)

    def solids(self, t: float) -> Solids:
        """All objects at time t and the clutter, ready for ray casting."""
        st = self._static()
        n = len(self.objects)
        centre = st["centre"].copy()
        yaw = st["yaw"].copy()
        on_road, on_line = st["on_road"], ~st["on_road"][:n]
        if on_road.any():
            s = st["s0"] + st["speed"] * t
            xy, heading = self.road.point(s, st["d"])
            centre[:n][on_road], yaw[:n][on_road] = xy, heading + st["yaw_offset"]
        if on_line.any():
            centre[:n][on_line] = st["p0"] + t * st["velocity"]
        return Solids(centre=centre, yaw=yaw, extent=st["extent"], corners=box_corners(centre, yaw, st["extent"]),
                      bounds=st["bounds"], first=st["first"], colours=st["colours"],
                      reflectivity=st["reflectivity"], facade=st["facade"], num_objects=n)

    def _static(self) -> dict:
        """Arrays of the solids that do not change with time (built once)."""
        if "solids" in self._cache:
            return self._cache["solids"]
        objs, clutter = self.objects, self.clutter
        road_objs = [o.motion for o in objs if o.motion.kind == "road"]
        line_objs = [o.motion for o in objs if o.motion.kind != "road"]
        bounds = [o.parts for o in objs] + [np.array([[-c.size[0] / 2, c.size[0] / 2, -c.size[1] / 2, c.size[1] / 2,
                                                       0.0, c.size[2]]]) for c in clutter]
        sizes = np.array([len(b) for b in bounds], dtype=np.int64)
        st = {
            "on_road": np.array([o.motion.kind == "road" for o in objs], dtype=bool),
            "s0": np.array([m.s0 for m in road_objs]), "d": np.array([m.d for m in road_objs]),
            "speed": np.array([m.speed for m in road_objs]), "yaw_offset": np.array([m.yaw for m in road_objs]),
            "p0": np.array([m.p0 for m in line_objs]).reshape(-1, 2),
            "velocity": np.array([m.velocity for m in line_objs]).reshape(-1, 2),
            "centre": np.array([(0.0, 0.0)] * len(objs) + [c.centre for c in clutter], dtype=np.float64).reshape(-1, 2),
            "yaw": np.array([0.0] * len(objs) + [c.yaw for c in clutter], dtype=np.float64),
            "extent": np.array([o.size for o in objs] + [c.size for c in clutter], dtype=np.float64).reshape(-1, 3),
            "bounds": bounds,
            "first": np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64),
            "colours": np.concatenate([o.colours for o in objs] + [np.array([c.colour], dtype=np.float32)
                                                                   for c in clutter]).astype(np.float32),
            "reflectivity": np.concatenate([o.reflectivity for o in objs] + [np.array([c.reflectivity])
                                                                          for c in clutter]).astype(np.float32),
            "facade": np.array([False] * len(objs) + [c.facade for c in clutter], dtype=bool),
        }
        line_yaw = np.array([m.yaw for m in line_objs])
        st["yaw"][:len(objs)][~st["on_road"]] = line_yaw
        self._cache["solids"] = st
        return st


def motion_pose(road: Road, m: Motion, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ground centre [..., 2] and heading [...] of a motion at times t [...]."""
    if m.kind == "line":
        xy = np.array(m.p0) + t[..., None] * np.array(m.velocity)
        return xy, np.full(t.shape, m.yaw)
    s = m.s0 + m.speed * t
    xy, heading = road.point(s, np.full(s.shape, m.d))
    return xy, heading + m.yaw
