"""The one definition of the detection classes, their order, the head's class groups and
the regression channel layout.

Every heat map, label array, cache and results file in this project uses these orders. The
cache fingerprint records them, so a student refuses targets made for a different order.
"""
from __future__ import annotations

# The 10 nuScenes detection classes, in the order of every label index and heat-map channel.
CLASS_NAMES: tuple[str, ...] = (
    "car",
    "truck",
    "construction_vehicle",
    "bus",
    "trailer",
    "barrier",
    "motorcycle",
    "bicycle",
    "pedestrian",
    "traffic_cone",
)
NUM_CLASSES = len(CLASS_NAMES)
CLASS_INDEX: dict[str, int] = {name: i for i, name in enumerate(CLASS_NAMES)}

# The CenterHead's six class groups (spec §3.6); each group has its own heat map branch.
# Concatenating the groups' heat maps in this order gives CLASS_NAMES order.
TASKS: tuple[tuple[str, ...], ...] = (
    ("car",),
    ("truck", "construction_vehicle"),
    ("bus", "trailer"),
    ("barrier",),
    ("motorcycle", "bicycle"),
    ("pedestrian", "traffic_cone"),
)
assert tuple(c for t in TASKS for c in t) == CLASS_NAMES

# Regression channels of one task, in order (spec §3.6). The detector's `regression` output is
# these 11 channels for task 0, then task 1, ... : [B, 6 * 11, H, W].
REGRESSION_CHANNELS: tuple[tuple[str, int], ...] = (
    ("reg", 2),  # sub-cell centre offset (x, y) in cells
    ("height", 1),  # box centre z in metres
    ("dim", 3),  # log(dx), log(dy), log(dz) in metres
    ("rot", 2),  # sin(yaw), cos(yaw)
    ("vel", 2),  # vx, vy in m/s
    ("iou", 1),  # IoU-aware score, 2 * (IoU - 0.5)
)
REGRESSION_PER_TASK = sum(n for _, n in REGRESSION_CHANNELS)
NUM_REGRESSION = REGRESSION_PER_TASK * len(TASKS)


def regression_channel_names() -> list[str]:
    """Names of all regression channels in output order, e.g. 't0.reg.x', 't0.rot.sin'."""
    suffix = {"reg": ("x", "y"), "height": ("z",), "dim": ("l", "w", "h"), "rot": ("sin", "cos"),
              "vel": ("x", "y"), "iou": ("iou",)}
    return [f"t{t}.{name}.{s}" for t in range(len(TASKS)) for name, _ in REGRESSION_CHANNELS
            for s in suffix[name]]


# Attribute given to a predicted box when the model does not predict attributes; the choice
# follows the original release's speed heuristic (spec §6): moving above 0.2 m/s.
def default_attribute(class_name: str, speed: float) -> str:
    """nuScenes attribute name for a detection of `class_name` moving at `speed` m/s."""
    moving = speed > 0.2
    if class_name in ("car", "truck", "construction_vehicle", "bus", "trailer"):
        if moving:
            return "vehicle.moving"
        # The devkit's (and mmdetection3d's, and the original's) convention: a standing bus waits at a
        # stop, any other standing vehicle is parked.
        return "vehicle.stopped" if class_name == "bus" else "vehicle.parked"
    if class_name in ("motorcycle", "bicycle"):
        return "cycle.with_rider" if moving else "cycle.without_rider"
    if class_name == "pedestrian":
        return "pedestrian.moving" if moving else "pedestrian.standing"
    return ""
