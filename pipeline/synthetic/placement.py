"""Building a scene's world (pipeline/synthetic/world.py): the road, the ego's path, the annotated
objects placed where their class belongs (lanes, parking, sidewalks, verges) without overlaps, and
the unannotated clutter. A world depends on the seed and its scene spec only."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.synthetic import catalog
from pipeline.synthetic.rig import make_rig
from pipeline.synthetic.road import (CARRIAGEWAY_EDGE, LANE_CENTRES, PARKING_EDGE, SIDEWALK_EDGE, VERGE_EDGE,
                                     draw_ground, make_road)
from pipeline.synthetic.scenes import SCENES, SceneSpec, mini_scenes
from pipeline.synthetic.tokens import make_rng, make_token
from pipeline.synthetic.world import (CLUTTER_MARGIN, EGO_CENTRE_OFFSET, EGO_SIZE, EGO_TILT_DEG, KEYFRAME_INTERVAL_US,
                                      PLACEMENT_MARGIN, ROAD_MARGIN, SWEEP_INTERVAL_US, Clutter, Motion, World,
                                      WorldObject, motion_pose)

# Relative frequency of each class among the extra objects (every class also gets one forced
# object near the ego in every scene, so all classes appear in both mini splits).
_CLASS_WEIGHTS = {"car": 0.30, "pedestrian": 0.22, "barrier": 0.10, "traffic_cone": 0.10, "truck": 0.07,
                  "bicycle": 0.05, "motorcycle": 0.05, "bus": 0.04, "trailer": 0.035, "construction_vehicle": 0.035}


def scene_start_us(seed: int, scene_index: int) -> int:
    """Timestamp (us) of a scene's first key frame: mid-2018, one scene every few hours in
    `SceneSpec.index` order."""
    rng = make_rng(seed, "start", scene_index)
    return 1_531_000_000_000_000 + scene_index * 14_400_000_000 + int(rng.integers(0, 3_600_000_000))


def build_world(seed: int, scene: SceneSpec | int, samples: int) -> World:
    """The world of `scene` (a SceneSpec, or an index 0-9 into the mini SCENES) with `samples` key
    frames. It depends on the seed and the spec only, never on the other scenes of the dataset."""
    if not isinstance(scene, SceneSpec):
        if not 0 <= scene < len(SCENES):
            raise ValueError(f"scene_index must be in 0..{len(SCENES) - 1}, got {scene}")
        scene = mini_scenes(seed)[scene]
    if samples < 2:
        raise ValueError(f"samples per scene must be >= 2 (velocities need two key frames), got {samples}")
    name, location, profile = scene.name, scene.location, scene.profile
    rng = make_rng(seed, "world", name)
    duration = (samples - 1) * KEYFRAME_INTERVAL_US * 1e-6
    speeds = {"stopped": (0.0, 0.0), "cruise": (rng.uniform(5, 10),) * 2,
              "accelerate": (rng.uniform(0, 2), rng.uniform(6, 10)),
              "decelerate": (rng.uniform(6, 10), 0.0)}[profile]
    path = 0.5 * (speeds[0] + speeds[1]) * duration  # smoothstep easing covers the mean speed
    extent = path + ROAD_MARGIN
    right_hand = location.startswith("boston")
    start = tuple(extent + 60.0 + rng.uniform(0, 80, size=2))
    road = make_road(rng, start, rng.uniform(-np.pi, np.pi), -ROAD_MARGIN - 5, path + ROAD_MARGIN + 5,
                     curviness=rng.choice([0.0005, 1 / 250, 1 / 120]), right_hand=right_hand)
    ego_d = float(rng.choice(LANE_CENTRES)) * (-1 if right_hand else 1)
    crossings = sorted(float(x) for x in rng.uniform(-20, path + 30, size=int(rng.integers(1, 3))))
    world = World(seed=seed, scene_index=scene.index, name=name, location=location, samples=samples,
                  start_us=scene_start_us(seed, scene.index), road=road,
                  ground=draw_ground(road, (-ROAD_MARGIN, path + ROAD_MARGIN), crossings, rng),
                  rig=make_rig(rng), ego_profile=profile, ego_speeds=(float(speeds[0]), float(speeds[1])),
                  ego_s0=0.0, ego_d=ego_d, crossings=crossings)
    tilt_rng = make_rng(seed, "tilt", name)  # its own stream: the rest of the world does not move
    world.tilt = np.stack([np.deg2rad(tilt_rng.uniform(0.2, 1.0, size=2) * EGO_TILT_DEG),
                           tilt_rng.uniform(2.0, 6.0, size=2), tilt_rng.uniform(-np.pi, np.pi, size=2)], -1)
    sun_azimuth = rng.uniform(-np.pi, np.pi)
    world.sun = np.array([np.cos(sun_azimuth) * 0.5, np.sin(sun_azimuth) * 0.5, 0.866])
    _add_clutter(world, rng, (-CLUTTER_MARGIN, path + CLUTTER_MARGIN))
    _add_objects(world, rng, (-PLACEMENT_MARGIN, path + PLACEMENT_MARGIN), make_rng(seed, "others", name))
    for obj in world.objects:
        obj.instance_token = make_token(seed, "instance", name, obj.index)
    return world


def _add_clutter(world: World, rng: np.random.Generator, s_range: tuple[float, float]) -> None:
    """Buildings (with gaps, some walled off), street lights and poles along both sides."""
    road = world.road
    facades = [(185, 175, 160), (160, 160, 166), (200, 190, 172), (140, 132, 126), (176, 166, 150)]
    for side in (-1, 1):
        s = s_range[0]
        while s < s_range[1]:
            length = rng.uniform(10, 24)
            gap = rng.uniform(2, 10)
            mid = min(s + length / 2, s_range[1])
            if rng.uniform() < 0.85:
                depth, height = rng.uniform(8, 18), rng.uniform(5, 22)
                d = side * (VERGE_EDGE + 0.8 + rng.uniform(0, 3) + depth / 2)
                xy, heading = road.point(np.array(mid), np.array(d))
                world.clutter.append(Clutter(tuple(xy), float(heading), (length, depth, height),
                                             facades[int(rng.integers(len(facades)))], float(rng.uniform(20, 40)),
                                             True))
            elif rng.uniform() < 0.6:
                xy, heading = road.point(np.array(mid), np.array(side * (VERGE_EDGE + 0.3)))
                world.clutter.append(Clutter(tuple(xy), float(heading), (length, 0.3, rng.uniform(1.0, 2.2)),
                                             (150, 150, 148), 25.0, False))
            s += length + gap
        s = s_range[0] + rng.uniform(0, 20)
        while s < s_range[1]:
            xy, heading = road.point(np.array(s), np.array(side * (SIDEWALK_EDGE + 0.3)))
            world.clutter.append(Clutter(tuple(xy), float(heading), (0.3, 0.3, rng.uniform(5, 8)), (88, 88, 94),
                                         55.0, False))
            s += rng.uniform(18, 40)


@dataclass
class _Track:
    """Oriented rectangles over the time grid, for overlap tests: centre [T, 2], yaw [T], half sizes."""

    xy: np.ndarray
    yaw: np.ndarray
    half: tuple[float, float]


def _overlaps(a: _Track, others: list[_Track], margin: float = 0.25) -> bool:
    """Whether rectangle track `a` (inflated by margin) overlaps any of `others` at any grid time,
    by the separating-axis test on the 4 edge normals."""
    if not others:
        return False
    radius_a = np.hypot(*a.half) + margin
    others = [o for o in others
              if (np.hypot(*(o.xy - a.xy).T) < radius_a + np.hypot(*o.half) + margin).any()]
    if not others:
        return False
    bxy = np.stack([np.broadcast_to(o.xy, a.xy.shape) for o in others])    # [N, T, 2]
    byaw = np.stack([np.broadcast_to(o.yaw, a.yaw.shape) for o in others])  # [N, T]
    bhalf = np.array([o.half for o in others])[:, None, :] + margin / 2     # [N, 1, 2]
    ahalf = np.array(a.half) + margin / 2
    delta = bxy - a.xy  # [N, T, 2]
    au = np.stack([np.cos(a.yaw), np.sin(a.yaw)], -1)       # [T, 2]
    av = np.stack([-np.sin(a.yaw), np.cos(a.yaw)], -1)
    bu = np.stack([np.cos(byaw), np.sin(byaw)], -1)         # [N, T, 2]
    bv = np.stack([-np.sin(byaw), np.cos(byaw)], -1)
    separated = np.zeros(delta.shape[:2], dtype=bool)
    for axis in (au, av, bu, bv):
        axis = np.broadcast_to(axis, delta.shape)
        ra = ahalf[0] * np.abs((au * axis).sum(-1)) + ahalf[1] * np.abs((av * axis).sum(-1))
        rb = bhalf[..., 0] * np.abs((bu * axis).sum(-1)) + bhalf[..., 1] * np.abs((bv * axis).sum(-1))
        separated |= np.abs((delta * axis).sum(-1)) > ra + rb
    return bool((~separated).any())


def _parts_in_metres(parts: tuple[catalog.Part, ...], size: tuple[float, float, float],
                     colour: np.ndarray, reflectivity: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    l, w, h = size
    bounds = np.array([(x0 * l, x1 * l, y0 * w, y1 * w, z0 * h, z1 * h) for x0, x1, y0, y1, z0, z1, _ in parts])
    colours, refl = [], []
    for *_, kind in parts:
        if kind == "dark":
            colours.append(catalog.DARK_COLOUR)
            refl.append(catalog.DARK_REFLECTIVITY)
        elif kind == "glass":
            colours.append(tuple(colour * catalog.GLASS_SHADE))
            refl.append(catalog.GLASS_REFLECTIVITY)
        else:
            colours.append(tuple(colour))
            refl.append(reflectivity)
    return bounds, np.array(colours, dtype=np.float32), np.array(refl, dtype=np.float32)


def _propose(world: World, rng: np.random.Generator, cls: catalog.ObjectClass, s: float,
             group_offset: float = 0.0, template: tuple | None = None) -> tuple[Motion, catalog.Placement,
                                                                                 tuple[float, float, float], str]:
    """A random motion, placement, box size and category for one object of class `cls` near s."""
    road = world.road
    if template is not None:  # a member of a group (cones, barriers) copies the first one's choices
        placement, size, category, side, d = template
    else:
        weights = np.array([p.weight for p in cls.placements])
        placement = cls.placements[int(rng.choice(len(weights), p=weights / weights.sum()))]
        names, probs = zip(*cls.categories)
        category = str(rng.choice(names, p=probs))
        scale = rng.uniform(0.92, 1.08, size=3)
        l, w, h = cls.size
        if not placement.rider:
            h = cls.height_without_rider
        if category == "human.pedestrian.child":
            l, w, h = 0.8 * l, 0.8 * w, 0.7 * h
        size = (float(l * scale[0]), float(w * scale[1]), float(h * scale[2]))
        side = int(rng.choice([-1, 1]))
        d = _zone_offset(rng, placement.zone, size, side)
    s = s + group_offset
    speed = float(rng.uniform(*placement.speed)) if placement.speed[1] > 0 else 0.0
    if placement.zone == "crossing":
        sc = float(rng.choice(world.crossings)) + rng.uniform(-1.5, 1.5)
        centre, heading = road.point(np.array(sc), np.array(0.0))
        normal = np.array([-np.sin(heading), np.cos(heading)])
        direction = -side  # start on one side, walk towards the other
        p0 = centre + d * normal
        vel = direction * speed * normal
        return Motion("line", p0=(float(p0[0]), float(p0[1])), velocity=(float(vel[0]), float(vel[1])),
                      yaw=float(np.arctan2(vel[1], vel[0]))), placement, size, category
    if speed > 0:
        if placement.zone in ("lane", "outer_lane", "parking"):
            direction = road.lane_direction(d)
        else:
            direction = int(rng.choice([-1, 1]))
        return Motion("road", s0=s, d=d, speed=direction * speed, yaw=0.0 if direction > 0 else np.pi), \
            placement, size, category
    if cls.name in ("traffic_cone", "pedestrian"):
        yaw = rng.uniform(-np.pi, np.pi)
    else:
        flip = rng.uniform() < 0.5
        if placement.attribute.startswith("vehicle.") and (placement.attribute == "vehicle.stopped"
                                                            or rng.uniform() < 0.9):
            flip = road.lane_direction(d) < 0  # waiting or parked along the kerb: faces its lane's way
        yaw = placement.heading + (np.pi if flip else 0.0) + rng.normal(0, 0.04)
    return Motion("road", s0=s, d=d, speed=0.0, yaw=float(yaw)), placement, size, category


def _zone_offset(rng: np.random.Generator, zone: str, size: tuple[float, float, float], side: int) -> float:
    """Lateral offset d (signed) of an object's centre in a zone on one side of the road."""
    width = size[1]
    if zone == "lane":
        return side * (float(rng.choice(LANE_CENTRES)) + rng.uniform(-0.2, 0.2))
    if zone == "outer_lane":
        return side * (LANE_CENTRES[1] + rng.uniform(-0.2, 0.2))
    if zone == "parking":
        return side * (CARRIAGEWAY_EDGE + 0.15 + min(width, 2.0) / 2 + rng.uniform(0, 0.2))
    if zone == "kerb":
        return side * (PARKING_EDGE + 0.4 + rng.uniform(0, 0.3))
    if zone == "sidewalk":
        return side * rng.uniform(PARKING_EDGE + 0.8, SIDEWALK_EDGE - 0.6)
    if zone == "verge":
        return side * rng.uniform(SIDEWALK_EDGE + 1.0, VERGE_EDGE - 1.5)
    if zone == "crossing":
        return side * rng.uniform(PARKING_EDGE, SIDEWALK_EDGE - 0.5)
    raise ValueError(f"unknown placement zone {zone!r}")


def _add_objects(world: World, rng: np.random.Generator, s_range: tuple[float, float],
                 others_rng: np.random.Generator) -> None:
    """Place one object of every class near the ego, then extra objects along its path, then a few
    annotated objects outside the detection classes (catalog.OTHER_CLASSES, drawn from `others_rng`
    so that the detection objects stay those of earlier versions), with no two boxes (nor a box and
    the ego or clutter) overlapping at any sweep time."""
    grid = np.arange(0, 10 * (world.samples - 1) + 1) * SWEEP_INTERVAL_US * 1e-6  # [T] every sweep
    ego_xy, ego_yaw = world.ego_pose(grid)
    ego_centre = ego_xy + EGO_CENTRE_OFFSET * np.stack([np.cos(ego_yaw), np.sin(ego_yaw)], -1)
    taken = [_Track(ego_centre, ego_yaw, (EGO_SIZE[0] / 2 + 0.5, EGO_SIZE[1] / 2 + 0.3))]
    taken += [_Track(np.array(c.centre), np.array(c.yaw), (c.size[0] / 2, c.size[1] / 2)) for c in world.clutter]
    mid_s = float(world.ego_s(world.duration / 2))
    names = list(_CLASS_WEIGHTS)
    weights = np.array([_CLASS_WEIGHTS[n] for n in names])

    def try_place(cls: catalog.ObjectClass, s: float, attempts: int, group: bool,
                  rng: np.random.Generator = rng) -> None:
        for _ in range(attempts):
            motion, placement, size, category = _propose(world, rng, cls, s)
            if _accept(world, cls, motion, placement, size, category, grid, taken):
                break
            s = s + rng.uniform(-8, 8)
        else:
            return
        if group and cls.name in ("traffic_cone", "barrier"):
            count = int(rng.integers(1, 5))
            template = (placement, size, category, int(np.sign(motion.d)), motion.d)
            step = (size[1] + 0.3) if cls.name == "barrier" else rng.uniform(1.5, 3.0)
            for k in range(1, count):
                m, p, sz, cat = _propose(world, rng, cls, motion.s0, k * step, template)
                _accept(world, cls, m, p, sz, cat, grid, taken)

    order = rng.permutation(len(names))
    for i in order:  # one of each class within ~25 m of the ego at mid-scene
        try_place(catalog.OBJECT_CLASSES[names[i]], mid_s + rng.uniform(-22, 22), 80, group=False)
    for _ in range(int(rng.integers(24, 40))):
        name = names[int(rng.choice(len(names), p=weights / weights.sum()))]
        try_place(catalog.OBJECT_CLASSES[name], rng.uniform(*s_range), 8, group=True)
    others = list(catalog.OTHER_CLASSES.values())
    for _ in range(int(others_rng.integers(3, 7))):
        cls = others[int(others_rng.integers(len(others)))]
        try_place(cls, mid_s + others_rng.uniform(-30, 30), 8, group=False, rng=others_rng)


def _accept(world: World, cls: catalog.ObjectClass, motion: Motion, placement: catalog.Placement,
            size: tuple[float, float, float], category: str, grid: np.ndarray, taken: list[_Track]) -> bool:
    """Add the object to the world if its track stays on the road and overlaps nothing."""
    if motion.kind == "road":
        s_end = motion.s0 + motion.speed * grid[-1]
        if min(motion.s0, s_end) < world.road.s[0] + 1 or max(motion.s0, s_end) > world.road.s[-1] - 1:
            return False
    xy, yaw = motion_pose(world.road, motion, grid)
    track = _Track(xy, yaw, (size[0] / 2, size[1] / 2))
    if _overlaps(track, taken):
        return False
    taken.append(track)
    parts = cls.parts if placement.rider else cls.parts_without_rider
    shade = make_rng(world.seed, "shade", world.name, len(world.objects)).uniform(0.88, 1.08)
    colour = np.clip(np.array(cls.colour, dtype=np.float32) * shade, 0, 255)
    bounds, colours, refl = _parts_in_metres(parts, size, colour, cls.reflectivity)
    world.objects.append(WorldObject(index=len(world.objects), class_name=cls.name, category=category,
                                     attribute=placement.attribute, size=size, parts=bounds, colours=colours,
                                     reflectivity=refl, motion=motion))
    return True
