"""What a nuScenes-format dataset on disk holds, read through the devkit: scenes, samples,
sample_data, annotations per detection class, split sizes, files and bytes. Works on the
generated dataset and on real nuScenes alike.
"""
from __future__ import annotations

import os
from pathlib import Path

from nuscenes.eval.detection.utils import category_to_detection_name
from nuscenes.nuscenes import NuScenes
from nuscenes.utils.splits import create_splits_scenes

from models.classes import CLASS_NAMES
from pipeline.data.nusc_db import SPLITS_OF_VERSION


def summarize(dataroot: Path, version: str = "v1.0-mini") -> dict:
    """Counts of the dataset at `dataroot` (see module docstring) as a JSON-ready dict; "splits"
    holds the detection splits of `version` (mini_train/mini_val, train/val, test) it has scenes of."""
    dataroot = Path(dataroot)
    if not (dataroot / version).is_dir():
        raise FileNotFoundError(f"{dataroot / version} does not exist: not a nuScenes {version} dataroot")
    nusc = NuScenes(version=version, dataroot=str(dataroot), verbose=False)
    boxes = {name: 0 for name in CLASS_NAMES}
    with_points = {name: 0 for name in CLASS_NAMES}
    for ann in nusc.sample_annotation:
        name = category_to_detection_name(ann["category_name"])
        if name is not None:
            boxes[name] += 1
            with_points[name] += ann["num_lidar_pts"] + ann["num_radar_pts"] > 0
    scene_names = {s["token"]: s["name"] for s in nusc.scene}
    splits = {}
    all_splits = create_splits_scenes()
    for split in SPLITS_OF_VERSION.get(version, ()):  # mini_train/mini_val, train/val or test
        names = set(all_splits[split])
        n_samples = sum(scene_names[s["scene_token"]] in names for s in nusc.sample)
        n_scenes = sum(n in names for n in scene_names.values())
        if n_scenes:
            splits[split] = {"scenes": n_scenes, "samples": n_samples}
    files, size = 0, 0
    for folder, _, names in os.walk(dataroot):
        for name in names:
            files += 1
            size += os.path.getsize(os.path.join(folder, name))
    return {
        "dataroot": str(dataroot),
        "version": version,
        "scenes": len(nusc.scene),
        "samples": len(nusc.sample),
        "sample_data": len(nusc.sample_data),
        "lidar_key_frames": sum(sd["channel"] == "LIDAR_TOP" and sd["is_key_frame"] for sd in nusc.sample_data),
        "lidar_sweeps": sum(sd["channel"] == "LIDAR_TOP" and not sd["is_key_frame"] for sd in nusc.sample_data),
        "camera_images": sum(sd["sensor_modality"] == "camera" for sd in nusc.sample_data),
        "instances": len(nusc.instance),
        "annotations": len(nusc.sample_annotation),
        "boxes_per_class": boxes,
        "boxes_with_points_per_class": with_points,
        "splits": splits,
        "files": files,
        "bytes": size,
    }


def format_summary(summary: dict) -> str:
    """A readable multi-line table of a summary."""
    lines = [f"nuScenes {summary['version']} at {summary['dataroot']}"]
    rows = [("scenes", summary["scenes"]), ("samples (key frames)", summary["samples"]),
            ("sample_data", summary["sample_data"]), ("  LiDAR key frames", summary["lidar_key_frames"]),
            ("  LiDAR sweeps", summary["lidar_sweeps"]), ("  camera images", summary["camera_images"]),
            ("instances", summary["instances"]), ("annotations", summary["annotations"])]
    rows += [(f"split {name}", f"{v['scenes']} scenes, {v['samples']} samples")
             for name, v in summary["splits"].items()]
    rows += [("files", summary["files"]), ("size on disk", f"{summary['bytes'] / 2**20:.1f} MiB")]
    width = max(len(r[0]) for r in rows)
    lines += [f"  {k:<{width}}  {v}" for k, v in rows]
    lines.append(f"  {'class':<22}{'boxes':>8}{'with points':>13}")
    for name, n in summary["boxes_per_class"].items():
        lines.append(f"  {name:<22}{n:>8}{summary['boxes_with_points_per_class'][name]:>13}")
    if "seconds" in summary:
        lines.append(f"  generated in {summary['seconds']:.1f} s")
    return "\n".join(lines)
