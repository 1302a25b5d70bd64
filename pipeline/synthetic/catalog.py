"""What the generated world is made of: nuScenes categories, attributes and visibility levels,
and for each detection class (and a few annotated categories outside them, OTHER_CLASSES) its size,
simple 3D shape, colour, LiDAR reflectivity and the ways it is placed in a street.

Shapes are unions of axis-aligned parts in the object's box frame (x along the heading, y to
the left, z up from the ground), given as fractions of the box: x, y in [-0.5, 0.5], z in
[0, 1]. Parts stay 2 % inside the box so that LiDAR hits never sit on a box face, and for every
class the part that holds the box centre has the class colour, so that the centre of an
unoccluded box is always seen in that colour.
"""
from __future__ import annotations

from dataclasses import dataclass

# --- nuScenes tables that do not depend on the scene ------------------------------------------

# The 23 nuScenes object categories (name, description in our own words).
CATEGORIES: tuple[tuple[str, str], ...] = (
    ("animal", "Any animal on or near the road."),
    ("human.pedestrian.adult", "An adult walking, standing or sitting."),
    ("human.pedestrian.child", "A child walking, standing or sitting."),
    ("human.pedestrian.construction_worker", "A person working on a construction site."),
    ("human.pedestrian.personal_mobility", "A person on a scooter, skateboard or segway."),
    ("human.pedestrian.police_officer", "A police officer directing traffic or on duty."),
    ("human.pedestrian.stroller", "A stroller or pram, with or without a child in it."),
    ("human.pedestrian.wheelchair", "A wheelchair, with or without its user."),
    ("movable_object.barrier", "A temporary road barrier that redirects traffic."),
    ("movable_object.debris", "Movable debris lying on the road."),
    ("movable_object.pushable_pullable", "A cart, bin or similar object moved by a person."),
    ("movable_object.trafficcone", "A traffic cone."),
    ("static_object.bicycle_rack", "A rack or area where bicycles are parked."),
    ("vehicle.bicycle", "A human-powered two-wheeler, with or without a rider."),
    ("vehicle.bus.bendy", "An articulated bus."),
    ("vehicle.bus.rigid", "A rigid bus."),
    ("vehicle.car", "A passenger car, van or SUV."),
    ("vehicle.construction", "A vehicle for construction work: excavator, crane, bulldozer."),
    ("vehicle.emergency.ambulance", "An ambulance."),
    ("vehicle.emergency.police", "A police car or motorcycle."),
    ("vehicle.motorcycle", "A motorcycle or scooter, with or without a rider."),
    ("vehicle.trailer", "A trailer pulled by another vehicle, or parked on its own."),
    ("vehicle.truck", "A vehicle for cargo: pickup, lorry, semi-tractor."),
)

# The 8 nuScenes attributes (name, description).
ATTRIBUTES: tuple[tuple[str, str], ...] = (
    ("vehicle.moving", "The vehicle is moving."),
    ("vehicle.stopped", "The vehicle has a driver and is waiting, e.g. at a light."),
    ("vehicle.parked", "The vehicle is parked with no one inside."),
    ("cycle.with_rider", "Someone is riding the bicycle or motorcycle."),
    ("cycle.without_rider", "No one is riding the bicycle or motorcycle."),
    ("pedestrian.sitting_lying_down", "The person is sitting or lying down."),
    ("pedestrian.standing", "The person is standing still."),
    ("pedestrian.moving", "The person is walking or running."),
)

# nuScenes visibility levels: the visible fraction of an object over all six camera images.
VISIBILITY: tuple[tuple[str, str, str], ...] = (
    ("1", "v0-40", "visibility of whole object is between 0 and 40%"),
    ("2", "v40-60", "visibility of whole object is between 40 and 60%"),
    ("3", "v60-80", "visibility of whole object is between 60 and 80%"),
    ("4", "v80-100", "visibility of whole object is between 80 and 100%"),
)


def visibility_token(visible_fraction: float) -> str:
    """nuScenes visibility token ('1'..'4') for a visible fraction in [0, 1]."""
    for token, upper in (("1", 0.4), ("2", 0.6), ("3", 0.8)):
        if visible_fraction < upper:
            return token
    return "4"


# --- object classes -------------------------------------------------------------------------

# Part = (x0, x1, y0, y1, z0, z1, kind); kind is "body" (class colour), "glass" (darker class
# colour) or "dark" (tyres and tracks).
Part = tuple[float, float, float, float, float, float, str]


def _wheels(xs: tuple[tuple[float, float], ...], y_in: float, z_top: float) -> list[Part]:
    return [(x0, x1, y0, y1, 0.0, z_top, "dark") for x0, x1 in xs
            for y0, y1 in ((y_in, 0.48), (-0.48, -y_in))]


_CAR = [(-0.48, 0.48, -0.46, 0.46, 0.18, 0.55, "body"), (-0.30, 0.18, -0.42, 0.42, 0.55, 0.98, "glass"),
        *_wheels(((0.22, 0.38), (-0.38, -0.22)), 0.36, 0.22)]
_TRUCK = [(-0.48, 0.22, -0.48, 0.48, 0.16, 0.98, "body"), (0.25, 0.48, -0.45, 0.45, 0.12, 0.80, "body"),
          (0.42, 0.48, -0.44, 0.44, 0.50, 0.78, "glass"),
          *_wheels(((-0.40, -0.28), (0.30, 0.42)), 0.36, 0.16)]
_CONSTRUCTION = [(-0.48, 0.10, -0.48, 0.48, 0.12, 0.55, "body"), (-0.30, 0.05, -0.40, 0.40, 0.55, 0.98, "glass"),
                 (0.10, 0.48, -0.12, 0.12, 0.25, 0.75, "body"),
                 (-0.45, 0.05, 0.30, 0.48, 0.0, 0.12, "dark"), (-0.45, 0.05, -0.48, -0.30, 0.0, 0.12, "dark")]
_BUS = [(-0.48, 0.48, -0.46, 0.46, 0.10, 0.98, "body"), (-0.45, 0.45, -0.48, 0.48, 0.55, 0.85, "glass"),
        *_wheels(((-0.35, -0.25), (0.25, 0.35)), 0.38, 0.12)]
_TRAILER = [(-0.48, 0.48, -0.48, 0.48, 0.25, 0.98, "body"),
            *_wheels(((-0.42, -0.25),), 0.35, 0.25),
            (0.30, 0.36, 0.30, 0.40, 0.0, 0.25, "dark"), (0.30, 0.36, -0.40, -0.30, 0.0, 0.25, "dark")]
_BARRIER = [(-0.48, 0.48, -0.48, 0.48, 0.0, 0.25, "body"), (-0.22, 0.22, -0.48, 0.48, 0.25, 0.98, "body")]
_CONE = [(-0.48, 0.48, -0.48, 0.48, 0.0, 0.06, "body"), (-0.34, 0.34, -0.34, 0.34, 0.06, 0.35, "body"),
         (-0.25, 0.25, -0.25, 0.25, 0.35, 0.70, "body"), (-0.14, 0.14, -0.14, 0.14, 0.70, 0.98, "body")]
_PEDESTRIAN = [(-0.15, 0.15, -0.30, 0.30, 0.0, 0.47, "body"), (-0.22, 0.22, -0.45, 0.45, 0.47, 0.85, "body"),
               (-0.14, 0.14, -0.16, 0.16, 0.86, 0.98, "body")]


def _cycle(frame_half_width: float, rider: bool) -> list[Part]:
    """Two wheels, a frame and, if ridden, a rider (all in the class colour but the tyres)."""
    w = frame_half_width
    if rider:
        return [(-0.46, 0.46, -w, w, 0.22, 0.60, "body"),
                (0.28, 0.48, -0.08, 0.08, 0.0, 0.40, "dark"), (-0.48, -0.28, -0.08, 0.08, 0.0, 0.40, "dark"),
                (-0.25, 0.10, -0.40, 0.40, 0.60, 0.90, "body"), (-0.15, 0.02, -0.15, 0.15, 0.90, 0.98, "body")]
    return [(-0.46, 0.46, -w, w, 0.25, 0.80, "body"),
            (0.28, 0.48, -0.08, 0.08, 0.0, 0.55, "dark"), (-0.48, -0.28, -0.08, 0.08, 0.0, 0.55, "dark"),
            (0.30, 0.40, -0.48, 0.48, 0.80, 0.98, "body")]


@dataclass(frozen=True)
class Placement:
    """One way an object of a class appears in a street.

    zone: where across the road ("lane", "outer_lane", "parking", "kerb", "sidewalk", "crossing").
    speed: (min, max) m/s; 0 for static objects. heading: extra yaw relative to the road (rad).
    attribute: nuScenes attribute name or "" (barrier, cone).
    """

    weight: float
    zone: str
    speed: tuple[float, float]
    attribute: str
    heading: float = 0.0
    rider: bool = True


@dataclass(frozen=True)
class ObjectClass:
    """A detection class: its devkit categories, mean box size (length, width, height in m),
    parts, colour (RGB), LiDAR reflectivity (0-255) and placements."""

    name: str
    categories: tuple[tuple[str, float], ...]  # (nuScenes category, probability)
    size: tuple[float, float, float]
    parts: tuple[Part, ...]
    colour: tuple[int, int, int]
    reflectivity: float
    placements: tuple[Placement, ...]
    parts_without_rider: tuple[Part, ...] = ()
    height_without_rider: float = 0.0


_HALF_PI = 1.5707963267948966

OBJECT_CLASSES: dict[str, ObjectClass] = {c.name: c for c in (
    ObjectClass("car", (("vehicle.car", 1.0),), (4.63, 1.95, 1.73), tuple(_CAR), (210, 45, 30), 35.0, (
        Placement(0.45, "lane", (3.0, 10.0), "vehicle.moving"),
        Placement(0.10, "lane", (0.0, 0.0), "vehicle.stopped"),
        Placement(0.45, "parking", (0.0, 0.0), "vehicle.parked"))),
    ObjectClass("truck", (("vehicle.truck", 1.0),), (6.93, 2.51, 2.84), tuple(_TRUCK), (40, 90, 215), 30.0, (
        Placement(0.5, "lane", (3.0, 9.0), "vehicle.moving"),
        Placement(0.3, "parking", (0.0, 0.0), "vehicle.parked"),
        Placement(0.2, "lane", (0.0, 0.0), "vehicle.stopped"))),
    ObjectClass("construction_vehicle", (("vehicle.construction", 1.0),), (6.4, 2.85, 3.2), tuple(_CONSTRUCTION),
                (230, 210, 20), 40.0, (
        Placement(0.6, "parking", (0.0, 0.0), "vehicle.parked"),
        Placement(0.2, "verge", (0.0, 0.0), "vehicle.parked", _HALF_PI),
        Placement(0.2, "outer_lane", (1.0, 3.0), "vehicle.moving"))),
    ObjectClass("bus", (("vehicle.bus.rigid", 0.9), ("vehicle.bus.bendy", 0.1)), (11.0, 2.94, 3.47), tuple(_BUS),
                (30, 165, 65), 30.0, (
        Placement(0.55, "lane", (3.0, 9.0), "vehicle.moving"),
        Placement(0.45, "parking", (0.0, 0.0), "vehicle.stopped"))),
    ObjectClass("trailer", (("vehicle.trailer", 1.0),), (12.29, 2.90, 3.87), tuple(_TRAILER), (120, 50, 200), 25.0, (
        Placement(0.6, "parking", (0.0, 0.0), "vehicle.parked"),
        Placement(0.4, "outer_lane", (2.0, 7.0), "vehicle.moving"))),
    # A barrier's long side is its width: its heading is across the road.
    ObjectClass("barrier", (("movable_object.barrier", 1.0),), (0.50, 2.50, 0.98), tuple(_BARRIER), (235, 80, 140),
                60.0, (
        Placement(0.5, "kerb", (0.0, 0.0), "", _HALF_PI),
        Placement(0.3, "parking", (0.0, 0.0), "", _HALF_PI),
        Placement(0.2, "verge", (0.0, 0.0), "", _HALF_PI))),
    ObjectClass("motorcycle", (("vehicle.motorcycle", 1.0),), (2.11, 0.77, 1.47), tuple(_cycle(0.20, True)),
                (200, 40, 190), 25.0, (
        Placement(0.6, "lane", (4.0, 10.0), "cycle.with_rider"),
        Placement(0.4, "sidewalk", (0.0, 0.0), "cycle.without_rider", _HALF_PI, rider=False)),
        parts_without_rider=tuple(_cycle(0.20, False)), height_without_rider=1.15),
    ObjectClass("bicycle", (("vehicle.bicycle", 1.0),), (1.70, 0.60, 1.28), tuple(_cycle(0.15, True)),
                (20, 185, 195), 20.0, (
        Placement(0.5, "parking", (2.0, 6.0), "cycle.with_rider"),
        Placement(0.5, "sidewalk", (0.0, 0.0), "cycle.without_rider", _HALF_PI, rider=False)),
        parts_without_rider=tuple(_cycle(0.15, False)), height_without_rider=1.02),
    ObjectClass("pedestrian", (("human.pedestrian.adult", 0.8), ("human.pedestrian.child", 0.1),
                               ("human.pedestrian.construction_worker", 0.1)),
                (0.73, 0.67, 1.77), tuple(_PEDESTRIAN), (125, 205, 30), 12.0, (
        Placement(0.5, "sidewalk", (0.8, 1.7), "pedestrian.moving"),
        Placement(0.3, "sidewalk", (0.0, 0.0), "pedestrian.standing"),
        Placement(0.2, "crossing", (1.0, 1.6), "pedestrian.moving"))),
    ObjectClass("traffic_cone", (("movable_object.trafficcone", 1.0),), (0.41, 0.41, 1.07), tuple(_CONE),
                (245, 120, 10), 90.0, (
        Placement(0.5, "kerb", (0.0, 0.0), ""),
        Placement(0.5, "parking", (0.0, 0.0), ""))),
)}

# Annotated objects whose categories map to no detection class (category_to_detection_name gives
# None): real key frames have them (animals, debris, bins, bicycle racks, people on scooters, with
# strollers or in wheelchairs), and a loader or evaluation that forgets to drop them should fail.
_BLOCK = [(-0.48, 0.48, -0.48, 0.48, 0.0, 0.98, "body")]
OTHER_CLASSES: dict[str, ObjectClass] = {c.name: c for c in (
    ObjectClass("animal", (("animal", 1.0),), (1.0, 0.35, 0.65),
                ((-0.48, 0.30, -0.48, 0.48, 0.35, 0.80, "body"), (0.30, 0.48, -0.35, 0.35, 0.55, 0.98, "body"),
                 (-0.40, 0.25, -0.30, 0.30, 0.0, 0.35, "dark")), (150, 110, 70), 20.0, (
        Placement(0.6, "sidewalk", (0.5, 1.5), ""), Placement(0.4, "verge", (0.0, 0.0), ""))),
    ObjectClass("debris", (("movable_object.debris", 1.0),), (0.8, 0.6, 0.25), tuple(_BLOCK), (110, 100, 90), 15.0, (
        Placement(0.5, "lane", (0.0, 0.0), ""), Placement(0.5, "parking", (0.0, 0.0), ""))),
    ObjectClass("pushable_pullable", (("movable_object.pushable_pullable", 1.0),), (0.70, 0.60, 1.10),
                ((-0.48, 0.48, -0.48, 0.48, 0.0, 0.90, "body"), (-0.48, 0.48, -0.48, 0.48, 0.90, 0.98, "dark")),
                (60, 120, 60), 30.0, (
        Placement(0.6, "sidewalk", (0.0, 0.0), ""), Placement(0.4, "kerb", (0.0, 0.0), ""))),
    ObjectClass("bicycle_rack", (("static_object.bicycle_rack", 1.0),), (3.0, 0.6, 0.9),
                ((-0.48, 0.48, -0.10, 0.10, 0.85, 0.98, "body"), (-0.48, -0.40, -0.48, 0.48, 0.0, 0.85, "body"),
                 (-0.05, 0.05, -0.48, 0.48, 0.0, 0.85, "body"), (0.40, 0.48, -0.48, 0.48, 0.0, 0.85, "body")),
                (170, 170, 175), 70.0, (Placement(1.0, "sidewalk", (0.0, 0.0), ""),)),
    ObjectClass("personal_mobility", (("human.pedestrian.personal_mobility", 1.0),), (0.9, 0.5, 1.75),
                ((-0.48, 0.48, -0.30, 0.30, 0.0, 0.08, "dark"), (-0.20, 0.20, -0.48, 0.48, 0.08, 0.98, "body")),
                (90, 160, 220), 12.0, (Placement(1.0, "sidewalk", (2.0, 4.0), "pedestrian.moving"),)),
    ObjectClass("stroller", (("human.pedestrian.stroller", 1.0),), (1.0, 0.6, 1.05),
                ((-0.48, 0.30, -0.48, 0.48, 0.25, 0.80, "body"), (0.30, 0.48, -0.10, 0.10, 0.50, 0.98, "dark"),
                 (-0.45, 0.45, -0.48, 0.48, 0.0, 0.25, "dark")), (200, 160, 200), 15.0, (
        Placement(0.7, "sidewalk", (0.8, 1.4), ""), Placement(0.3, "sidewalk", (0.0, 0.0), ""))),
    ObjectClass("wheelchair", (("human.pedestrian.wheelchair", 1.0),), (1.1, 0.7, 1.3),
                ((-0.30, 0.30, -0.40, 0.40, 0.30, 0.98, "body"), (-0.48, 0.20, 0.40, 0.48, 0.0, 0.60, "dark"),
                 (-0.48, 0.20, -0.48, -0.40, 0.0, 0.60, "dark")), (80, 80, 140), 15.0, (
        Placement(1.0, "sidewalk", (0.5, 1.2), ""),)),
)}

# Colours and LiDAR reflectivity of parts that do not take the class colour.
DARK_COLOUR = (38, 38, 40)
DARK_REFLECTIVITY = 4.0
GLASS_SHADE = 0.55
GLASS_REFLECTIVITY = 10.0


def class_colours() -> dict[str, tuple[int, int, int]]:
    """Detection class name -> the RGB colour its objects are painted in."""
    return {name: c.colour for name, c in OBJECT_CLASSES.items()}
