"""Generate one scene: ray-cast its LiDAR sweeps, render its camera key frames and write its radar
key frames into files, and build its records of the nuScenes tables (log, scene, sample, sample_data, ego_pose,
calibrated_sensor, instance, sample_annotation).

`num_lidar_pts` is counted the way the devkit counts: the key-frame file read back with
`LidarPointCloud.from_file`, the annotation box moved into the LIDAR_TOP frame with the ego pose
and calibration records exactly as `NuScenes.get_sample_data` does, then `points_in_box`.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
from nuscenes.utils.data_classes import Box, LidarPointCloud, RadarPointCloud
from nuscenes.utils.geometry_utils import points_in_box
from pyquaternion import Quaternion

from pipeline.synthetic import camera, lidar, radar
from pipeline.synthetic.catalog import visibility_token
from pipeline.synthetic.placement import build_world
from pipeline.synthetic.rig import CAMERAS, LIDAR, camera_trigger_offset_us
from pipeline.synthetic.road import Road
from pipeline.synthetic.scenes import SceneSpec
from pipeline.synthetic.tokens import make_rng, make_token
from pipeline.synthetic.world import (ANNOTATION_RANGE, KEYFRAME_INTERVAL_US, ROAD_MARGIN, SWEEP_INTERVAL_US,
                                      SWEEPS_PER_INTERVAL, World)

Record = dict


@dataclass
class SceneResult:
    """A generated scene's table records (by table name) and its road, for the map mask."""

    tables: dict[str, list[Record]]
    location: str
    log_token: str
    road: Road
    s_range: tuple[float, float]


def yaw_quaternion(yaw: float) -> list[float]:
    """nuScenes quaternion [w, x, y, z] of a rotation by yaw about z."""
    return [float(np.cos(yaw / 2)), 0.0, 0.0, float(np.sin(yaw / 2))]


def box_in_sensor(annotation: Record, ego_pose: Record, calibration: Record) -> Box:
    """The annotation's box in the sensor frame, by the same steps as NuScenes.get_sample_data."""
    box = Box(annotation["translation"], annotation["size"], Quaternion(annotation["rotation"]))
    box.translate(-np.array(ego_pose["translation"]))
    box.rotate(Quaternion(ego_pose["rotation"]).inverse)
    box.translate(-np.array(calibration["translation"]))
    box.rotate(Quaternion(calibration["rotation"]).inverse)
    return box


def _log_record(world: World) -> Record:
    boston = world.location.startswith("boston")
    tz = timezone(timedelta(hours=-4 if boston else 8))
    local = datetime.fromtimestamp(world.start_us / 1e6, tz)
    vehicle = "n008" if boston else "n015"
    return {"token": make_token(world.seed, "log", world.name),
            "logfile": f"{vehicle}-{local:%Y-%m-%d-%H-%M-%S}{local:%z}",
            "vehicle": vehicle, "date_captured": f"{local:%Y-%m-%d}", "location": world.location}


def _link(records: list[Record]) -> None:
    """Set prev/next tokens along a list of records in time order."""
    for a, b in zip(records[:-1], records[1:]):
        a["next"], b["prev"] = b["token"], a["token"]


def write_scene(seed: int, scene: SceneSpec, samples: int, image_size: tuple[int, int], root: Path,
                camera_trigger: str = "sweep") -> SceneResult:
    """Generate `scene` under dataroot `root` and return its records (the same whichever process
    runs it and whatever other scenes the dataset holds). Cameras fire at the LiDAR key frame's
    timestamp ("keyframe") or as the LiDAR sweeps past them ("sweep", rig.camera_trigger_offset_us)."""
    world = build_world(seed, scene, samples)
    name = world.name
    log = _log_record(world)
    sensor_tokens = {ch: make_token(seed, "sensor", ch) for ch in (*CAMERAS, LIDAR, *radar.RADARS)}
    radars = radar.make_radars(make_rng(seed, "radar_rig", name))
    calib: dict[str, Record] = {}
    for sensor in (*world.rig.cameras, world.rig.lidar, *radars):
        calib[sensor.channel] = {
            "token": make_token(seed, "calibrated_sensor", name, sensor.channel),
            "sensor_token": sensor_tokens[sensor.channel],
            "translation": [float(v) for v in sensor.translation],
            "rotation": sensor.quaternion,
            "camera_intrinsic": ([] if sensor.intrinsic is None
                                 else sensor.intrinsic_for(image_size).tolist()),
        }

    scene_token = make_token(seed, "scene", name)
    sample_records = [{"token": make_token(seed, "sample", name, k),
                       "timestamp": world.start_us + k * KEYFRAME_INTERVAL_US,
                       "prev": "", "next": "", "scene_token": scene_token} for k in range(samples)]
    _link(sample_records)
    ego_poses: list[Record] = []
    sample_data: list[Record] = []

    def add_sample_data(channel: str, key: str, timestamp: int, sample_token: str, is_key: bool,
                        filename: str, size: tuple[int, int]) -> Record:
        token = make_token(seed, "sample_data", name, channel, key)
        t = (timestamp - world.start_us) * 1e-6
        xy, _ = world.ego_pose(t)
        rotation = [float(v) for v in Quaternion(matrix=world.ego_rotation(t), atol=1e-9).elements]
        ego = {"token": token, "timestamp": timestamp, "rotation": rotation,
               "translation": [float(xy[0]), float(xy[1]), 0.0]}
        ego_poses.append(ego)
        record = {"token": token, "sample_token": sample_token, "ego_pose_token": token,
                  "calibrated_sensor_token": calib[channel]["token"], "timestamp": timestamp,
                  "fileformat": "jpg" if channel in CAMERAS else "pcd", "is_key_frame": is_key,
                  "height": size[1], "width": size[0], "filename": filename, "prev": "", "next": ""}
        sample_data.append(record)
        return record

    # LiDAR: key frames and the 9 sweeps before each (a sweep belongs to the next key frame's sample).
    lidar_chain: list[Record] = []
    key_lidar: list[tuple[Record, Path]] = []
    for k, sample in enumerate(sample_records):
        ticks = [] if k == 0 else [(k - 1) * (SWEEPS_PER_INTERVAL + 1) + m for m in range(1, SWEEPS_PER_INTERVAL + 1)]
        ticks.append(k * (SWEEPS_PER_INTERVAL + 1))
        for tick in ticks:
            timestamp = world.start_us + tick * SWEEP_INTERVAL_US
            is_key = tick == ticks[-1]
            folder = "samples" if is_key else "sweeps"
            filename = f"{folder}/{LIDAR}/{log['logfile']}__{LIDAR}__{timestamp}.pcd.bin"
            points = lidar.scan(world, (timestamp - world.start_us) * 1e-6, make_rng(seed, "lidar", name, tick))
            lidar.write_scan(points, root / filename)
            record = add_sample_data(LIDAR, str(tick), timestamp, sample["token"], is_key, filename, (0, 0))
            lidar_chain.append(record)
            if is_key:
                key_lidar.append((record, root / filename))
    _link(lidar_chain)

    # Cameras at the key frames; their renders also measure each object's visibility.
    n_obj = len(world.objects)
    visible = np.zeros((samples, n_obj), dtype=np.int64)
    covered = np.zeros((samples, n_obj), dtype=np.int64)
    for channel in CAMERAS:
        chain = []
        for k, sample in enumerate(sample_records):
            timestamp = sample["timestamp"] + (camera_trigger_offset_us(channel) if camera_trigger == "sweep" else 0)
            filename = f"samples/{channel}/{log['logfile']}__{channel}__{timestamp}.jpg"
            frame = camera.render(world, (timestamp - world.start_us) * 1e-6, channel, image_size,
                                  make_rng(seed, "camera", name, channel, k))
            camera.write_jpeg(frame.rgb, root / filename)
            shown = frame.owner[(frame.owner >= 0) & (frame.owner < n_obj)]
            visible[k] += np.bincount(shown, minlength=n_obj)
            covered[k] += frame.footprint
            chain.append(add_sample_data(channel, str(k), timestamp, sample["token"], True, filename, image_size))
        _link(chain)

    annotations, instances = _annotate(world, sample_records, key_lidar, ego_poses, calib[LIDAR], visible, covered)
    _write_radar(world, radars, sample_records, annotations, log["logfile"], root, add_sample_data, calib, ego_poses)
    scene = {"token": scene_token, "log_token": log["token"], "nbr_samples": samples,
             "first_sample_token": sample_records[0]["token"], "last_sample_token": sample_records[-1]["token"],
             "name": name, "description": _describe(world, len(instances))}
    tables = {"log": [log], "scene": [scene], "sample": sample_records, "sample_data": sample_data,
              "ego_pose": ego_poses, "calibrated_sensor": list(calib.values()),
              "sample_annotation": annotations, "instance": instances}
    path = float(world.ego_s(world.duration))
    return SceneResult(tables, world.location, log["token"], world.road, (-ROAD_MARGIN, path + ROAD_MARGIN))


def _annotate(world: World, samples: list[Record], key_lidar: list[tuple[Record, Path]], ego_poses: list[Record],
              lidar_calib: Record, visible: np.ndarray, covered: np.ndarray) -> tuple[list[Record], list[Record]]:
    """sample_annotation and instance records of every object within ANNOTATION_RANGE of the ego
    at some key frame, annotated at every key frame from its first to its last time in range."""
    seed, name = world.seed, world.name
    times = (np.array([s["timestamp"] for s in samples]) - world.start_us) * 1e-6  # [K]
    ego_xy, _ = world.ego_pose(times)                                             # [K, 2]
    pose_by_token = {p["token"]: p for p in ego_poses}
    points = [LidarPointCloud.from_file(str(path)).points[:3] for _, path in key_lidar]  # as the devkit reads them
    per_sample: list[list[Record]] = [[] for _ in samples]
    instances = []
    for obj in world.objects:
        xy, yaw = world.object_pose(obj, times)
        in_range = np.flatnonzero(np.hypot(*(xy - ego_xy).T) <= ANNOTATION_RANGE)
        if len(in_range) == 0:
            continue
        l, w, h = obj.size
        chain = []
        for k in range(in_range[0], in_range[-1] + 1):
            record = {"token": make_token(seed, "sample_annotation", name, obj.index, k),
                      "sample_token": samples[k]["token"], "instance_token": obj.instance_token,
                      "visibility_token": visibility_token(visible[k, obj.index] / covered[k, obj.index]
                                                           if covered[k, obj.index] else 0.0),
                      "attribute_tokens": ([make_token(seed, "attribute", obj.attribute)] if obj.attribute else []),
                      "translation": [float(xy[k, 0]), float(xy[k, 1]), h / 2],
                      "size": [w, l, h], "rotation": yaw_quaternion(float(yaw[k])),
                      "prev": "", "next": "", "num_lidar_pts": 0, "num_radar_pts": 0}
            chain.append(record)
            per_sample[k].append(record)
        _link(chain)
        instances.append({"token": obj.instance_token, "category_token": make_token(seed, "category", obj.category),
                          "nbr_annotations": len(chain), "first_annotation_token": chain[0]["token"],
                          "last_annotation_token": chain[-1]["token"]})
    for k, records in enumerate(per_sample):  # count each key frame's points in its boxes
        pose = pose_by_token[key_lidar[k][0]["ego_pose_token"]]
        boxes = [box_in_sensor(r, pose, lidar_calib) for r in records]
        for record, count in zip(records, _count_points(boxes, points[k])):
            record["num_lidar_pts"] = count
    return [r for records in per_sample for r in records], instances


def _write_radar(world: World, radars: tuple, samples: list[Record], annotations: list[Record], logfile: str,
                 root: Path, add_sample_data: Callable[..., Record], calib: dict[str, Record],
                 ego_poses: list[Record]) -> None:
    """Each radar's key frames (radar.py) as files and sample_data records, and every annotation's
    `num_radar_pts`: the points of all five radars in its box, read back and counted the devkit's way."""
    seed, name = world.seed, world.name
    by_instance = {obj.instance_token: obj.index for obj in world.objects}
    per_sample: dict[str, list[Record]] = {}
    for record in annotations:
        per_sample.setdefault(record["sample_token"], []).append(record)
    for sensor in radars:
        chain = []
        for k, sample in enumerate(samples):
            rng = make_rng(seed, "radar", name, sensor.channel, k)
            timestamp = sample["timestamp"] + radar.trigger_offset_us(rng)
            records = per_sample.get(sample["token"], [])
            seen = np.zeros(len(world.objects), dtype=bool)
            seen[[by_instance[r["instance_token"]] for r in records if r["num_lidar_pts"] > 0]] = True
            filename = f"samples/{sensor.channel}/{logfile}__{sensor.channel}__{timestamp}.pcd"
            radar.write_pcd(radar.returns(world, sensor, (timestamp - world.start_us) * 1e-6, seen, rng),
                            root / filename)
            record = add_sample_data(sensor.channel, str(k), timestamp, sample["token"], True, filename, (0, 0))
            chain.append(record)
            points = RadarPointCloud.from_file(str(root / filename)).points[:3]
            if points.shape[1] and records:
                pose = ego_poses[-1]  # the one add_sample_data just made for this record
                assert pose["token"] == record["ego_pose_token"]
                boxes = [box_in_sensor(r, pose, calib[sensor.channel]) for r in records]
                for r, count in zip(records, _count_points(boxes, points)):
                    r["num_radar_pts"] += count
        _link(chain)


def _count_points(boxes: list[Box], points: np.ndarray) -> list[int]:
    """The devkit's points_in_box count of points [3, N] in each box, run on the points near the
    box only (the same per-point test; the rest cannot be inside). Near: in the box's
    circumscribed circle seen from above, found for all boxes at once."""
    if not boxes:
        return []
    centres = np.array([b.center[:2] for b in boxes])                       # [M, 2]
    radii = np.array([0.5 * float(np.linalg.norm(b.wlh)) + 0.01 for b in boxes])
    dx = points[0][None, :] - centres[:, :1]                                # [M, N]
    dy = points[1][None, :] - centres[:, 1:]
    near = dx * dx + dy * dy <= (radii ** 2)[:, None]
    return [int(points_in_box(b, points[:, np.flatnonzero(m)]).sum()) for b, m in zip(boxes, near)]


def _describe(world: World, n_instances: int) -> str:
    v0, v1 = world.ego_speeds
    motion = {"stopped": "ego stopped", "cruise": f"ego cruising at {v0:.1f} m/s",
              "accelerate": f"ego accelerating {v0:.1f} -> {v1:.1f} m/s",
              "decelerate": f"ego braking {v0:.1f} -> {v1:.1f} m/s"}[world.ego_profile]
    traffic = "right-hand" if world.road.right_hand else "left-hand"
    return f"Generated: {motion}, {traffic} traffic, {n_instances} annotated objects, {len(world.crossings)} crosswalks"
