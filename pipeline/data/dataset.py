"""A torch Dataset of augmented, network-ready samples (pipeline/data/sample.py) for one nuScenes split.

index row -> `load_sample` (raw points, images, GT) -> augmentation -> normalised images, BEV-
augmented points and boxes, boxes kept when at least one of their 8 corners lies inside the grid's
3-D point-cloud range (the original code's rule, spec §5.4).

Training draws a random per-camera image augmentation (IDA) and one global BEV augmentation
(BDA); evaluation uses the deterministic eval resize/crop and the identity BDA. The random draws
of item i in epoch e depend only on (seed, e, i): IDA from the stream `[seed, e, i, 0]` and BDA
from `[seed, e, i, 1]`, so a run is reproducible and `bev_aug_matrix_of(i, e)` gives the BDA of a
view without loading anything (the teacher-target cache uses it to replay views).

With DataLoader workers, call `set_epoch` before each epoch and do not use persistent workers
(they keep their own copy of the epoch).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from models.bev_grid import BEVGrid
from models.classes import CLASS_NAMES, NUM_CLASSES
from pipeline.data import augment
from pipeline.data.index import index_rows, load_index
from pipeline.data.loading import filter_gt, load_sample
from pipeline.data.sample import Sample

INDEX_SWEEPS = 10  # sweeps listed in the index; a config may load fewer


def index_sweeps(cfg: Mapping[str, Any]) -> int:
    """Sweeps the index of a run with this config lists (one index serves every preset up to 10)."""
    return max(INDEX_SWEEPS, int(cfg["data"]["lidar_sweeps"]))


def view_rng(seed: int, epoch: int, item: int, stream: int) -> np.random.Generator:
    """The random stream of one view: stream 0 = image augmentation, 1 = BEV augmentation."""
    return np.random.default_rng([int(seed), int(epoch), int(item), int(stream)])


def box_corners(boxes: np.ndarray) -> np.ndarray:
    """The 8 corners of boxes [M, >=7] (x, y, z, dx, dy, dz, yaw) -> [M, 8, 3]."""
    signs = np.array([[sx, sy, sz] for sx in (-0.5, 0.5) for sy in (-0.5, 0.5) for sz in (-0.5, 0.5)])
    local = signs[None] * boxes[:, None, 3:6]  # [M, 8, 3]
    c, s = np.cos(boxes[:, 6])[:, None], np.sin(boxes[:, 6])[:, None]
    x = local[..., 0] * c - local[..., 1] * s
    y = local[..., 0] * s + local[..., 1] * c
    return np.stack([x, y, local[..., 2]], axis=-1) + boxes[:, None, :3]


def boxes_in_range(boxes: np.ndarray, point_cloud_range: Sequence[float]) -> np.ndarray:
    """Mask [M] of boxes with at least one of their 8 corners inside the 3-D range (x/y/z min, max)."""
    if len(boxes) == 0:
        return np.zeros(0, dtype=bool)
    r = np.asarray(point_cloud_range, dtype=np.float64)
    corners = box_corners(boxes.astype(np.float64))  # [M, 8, 3]
    inside = np.all((corners >= r[:3]) & (corners <= r[3:]), axis=-1)  # [M, 8]
    return inside.any(axis=1)


def cbgs_indices(rows: Sequence[Mapping[str, Any]], min_points: int, seed: int) -> np.ndarray:
    """Class-balanced resampling of a split (spec §5.4), drawn once with replacement.

    For each class c with n_c frames containing it (after the GT filter), draw
    int(n_c * (1 / NUM_CLASSES) / frac_c) of those frames, frac_c = n_c / sum of all n_c.
    Concatenated class by class; the sampler shuffles. A split without boxes keeps its order.
    """
    frames: dict[int, list[int]] = {c: [] for c in range(NUM_CLASSES)}
    for idx, row in enumerate(rows):
        _, labels = filter_gt(row, min_points)
        for c in np.unique(labels):
            frames[int(c)].append(idx)
    total = sum(len(v) for v in frames.values())
    if total == 0:
        return np.arange(len(rows))
    rng = np.random.default_rng([int(seed), 0xCB65])
    out = []
    for c in range(NUM_CLASSES):
        if not frames[c]:
            continue
        frac = len(frames[c]) / total
        n = int(len(frames[c]) * (1.0 / NUM_CLASSES) / frac)
        out.append(rng.choice(np.asarray(frames[c]), size=n, replace=True))
    return np.concatenate(out)


def view_boxes(boxes: np.ndarray, mat: np.ndarray, grid: BEVGrid) -> tuple[np.ndarray, np.ndarray]:
    """GT boxes [M, 9] moved by a BDA [4, 4], those wholly outside the grid's range dropped:
    (the kept boxes float32 [M', 9], keep [M] bool)."""
    moved = augment.transform_boxes(boxes, mat)
    keep = boxes_in_range(moved, grid.point_cloud_range)
    return moved[keep].astype(np.float32), keep


def augment_bev(sample: Sample, mat: np.ndarray, grid: BEVGrid) -> Sample:
    """Apply a BDA [4, 4] to an un-augmented sample's points and boxes in place (also setting its
    `bda`), then drop boxes wholly outside the grid's range. Returns the sample."""
    sample["points"] = augment.transform_points(sample["points"], mat)
    sample["gt_boxes"], keep = view_boxes(sample["gt_boxes"], mat, grid)
    sample["gt_labels"] = sample["gt_labels"][keep]
    sample["bda"] = np.asarray(mat, dtype=np.float32)
    return sample


class DetectionDataset(torch.utils.data.Dataset):
    """Augmented samples of one split, in the sample contract of pipeline/data/sample.py.

    Args:
        dataroot, version, split: the nuScenes data (e.g. 'v1.0-mini', 'mini_train').
        cfg: the full run config (uses `grid` and `data`).
        train: random augmentation (and CBGS if cfg data.cbgs) if True, else the eval transform.
        seed: base seed of augmentation and CBGS.
        cache_dir: where the sample index is kept (default: see pipeline.data.index.index_path).
        index: the split's index as shared by the driver (pipeline.data.index.share_index: an ObjectRef,
            or the table); None builds or reads it here, which only local, single-process uses should do.
        with_images: False skips the cameras' images (LiDAR-only models); samples then lack
            `images` and `ida`.
    Returns per item: token, points float32 [N, 5], images float32 [C, 3, H, W], intrinsics
        [C, 3, 3], cam2lidar [C, 4, 4], ida [C, 3, 3], bda [4, 4], gt_boxes float32 [M, 9],
        gt_labels int64 [M].
    """

    def __init__(self, dataroot: str | Path, version: str, split: str, cfg: Mapping[str, Any], train: bool,
                 seed: int = 0, cache_dir: str | Path | None = None, with_images: bool = True,
                 index: Any = None) -> None:
        self.dataroot = Path(dataroot)
        self.data_cfg = cfg["data"]
        self.grid = BEVGrid.from_config(cfg["grid"])
        self.train = bool(train)
        self.seed = int(seed)
        self.with_images = with_images
        self.epoch = 0
        self.out_hw = tuple(int(x) for x in self.data_cfg["image_size"])
        self.mean = np.asarray(self.data_cfg["image_mean"], dtype=np.float32)
        self.std = np.asarray(self.data_cfg["image_std"], dtype=np.float32)
        if index is not None:
            self.rows = index_rows(index)
        else:
            self.rows = load_index(self.dataroot, version, split, cache_dir=cache_dir, max_sweeps=index_sweeps(cfg))
        if self.train and self.data_cfg.get("cbgs", False):
            self.indices = cbgs_indices(self.rows, int(self.data_cfg["min_points_in_box"]), self.seed)
        else:
            self.indices = np.arange(len(self.rows))

    def __len__(self) -> int:
        return len(self.indices)

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation draws of epoch `epoch` (training)."""
        self.epoch = int(epoch)

    def row(self, item: int) -> dict[str, Any]:
        """The index row behind dataset item `item` (after CBGS resampling)."""
        return self.rows[int(self.indices[item])]

    def bev_aug_matrix_of(self, item: int, epoch: int | None = None) -> np.ndarray:
        """The BDA [4, 4] item `item` gets in `epoch` (default: current); identity when not training."""
        epoch = self.epoch if epoch is None else epoch
        rng = view_rng(self.seed, epoch, item, 1) if self.train else None
        return augment.bev_aug_matrix(rng, self.data_cfg["bda"])

    def __getitem__(self, item: int) -> Sample:
        return self.get(item)

    def get(self, item: int, epoch: int | None = None, bda: np.ndarray | None = None) -> Sample:
        """Item `item` as seen in `epoch` (default: current); `bda` [4, 4] replaces the drawn BDA."""
        if not 0 <= item < len(self):
            raise IndexError(f"item {item} out of range for a dataset of {len(self)}")
        epoch = self.epoch if epoch is None else epoch
        sample = load_sample(self.row(item), self.dataroot, self.data_cfg, with_images=self.with_images)
        if self.with_images:
            rng = view_rng(self.seed, epoch, item, 0) if self.train else None
            self._augment_images(sample, rng)
        mat = self.bev_aug_matrix_of(item, epoch) if bda is None else np.asarray(bda, dtype=np.float64)
        self._augment_bev(sample, mat)
        return sample

    def _augment_images(self, sample: Sample, rng: np.random.Generator | None) -> None:
        """uint8 [C, h, w, 3] source images -> normalised float32 [C, 3, H, W]; sets `ida`."""
        src = sample["images"]
        src_hw = src.shape[1:3]
        out = np.empty((len(src), 3, *self.out_hw), dtype=np.float32)
        ida = np.empty((len(src), 3, 3), dtype=np.float32)
        for c, img in enumerate(src):
            mat = augment.image_aug_matrix(rng, src_hw, self.out_hw, self.data_cfg["ida"])
            warped = augment.warp_image(img, mat, self.out_hw)  # [H, W, 3] uint8
            out[c] = ((warped.astype(np.float32) - self.mean) / self.std).transpose(2, 0, 1)
            ida[c] = mat
        sample["images"], sample["ida"] = out, ida

    def _augment_bev(self, sample: Sample, mat: np.ndarray) -> None:
        augment_bev(sample, mat, self.grid)


def class_counts(dataset: DetectionDataset) -> dict[str, int]:
    """Frames per class over the dataset's items (after CBGS), from the index only (for logs and tests)."""
    counts = dict.fromkeys(CLASS_NAMES, 0)
    min_points = int(dataset.data_cfg["min_points_in_box"])
    for item in range(len(dataset)):
        _, labels = filter_gt(dataset.row(item), min_points)
        for c in np.unique(labels):
            counts[CLASS_NAMES[int(c)]] += 1
    return counts
