"""What a teacher-target cache holds and how it is identified (DESIGN §3.4).

A cache is a Zarr v3 group. Rows are (sample, view) pairs: sample i of the split, view k, is row
i * K + k. Per row it stores the teacher's four output maps and the view's BEV-augmentation
matrix:

    low         [R, C_low, H, W]   float16 (or bfloat16 / float32)
    high        [R, C_high, H, W]
    heatmap     [R, 10, H, W]      logits, CLASS_NAMES order
    regression  [R, 66, H, W]      REGRESSION_CHANNELS per task, TASKS order
    bda         [R, 4, 4]          float32, LiDAR frame -> the view's augmented frame

A `keypoints` cache stores instead only what the UniDistill losses read (issue 16), padded per row
to capacities fixed when the cache is planned (M boxes, N cells; zeros past each row's counts):

    boxes          [R, M, 9]        float32, the view's GT boxes the keypoints belong to
    counts         [R, 2]           int32, (boxes, cells) of the row
    keypoint_low   [R, M, 9, C_low] the low map's bilinear samples at each box's 9 keypoints (L_Fea)
    relations      [R, M, 9, 9]     cosine relations of the high map's 9 keypoint samples (L_Rel)
    cells          [R, N]           int32, flat cells (row * W + col) of the response mask
    cell_values    [R, N, 1 + 66]   the class-max heat-map logit | the regression at those cells (L_Resp)
    bda            [R, 4, 4]

Maps are chunked in (1 row, all channels, tile x tile cells) and sharded in whole groups of
`shard_samples` samples (all their views, the full map): a shard is the unit of writing, a
chunk (one tile of one view) the unit of reading. All-zero chunks are never stored. Dense caches
default to one tile the size of the map (a student reads whole rows and every chunk read has a
fixed cost); foreground caches to smaller tiles, so that tiles away from objects can be left out
(`writer.default_tile`).

The fingerprint (group attribute) names everything that changes what the cache holds; a cache is
reused only for an identical fingerprint, and a student checks the parts that must match its own
model (grid, class order, channel layout).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Mapping

from models.classes import CLASS_NAMES, NUM_CLASSES, NUM_REGRESSION, regression_channel_names
from models.errors import UserError

SCHEMA_VERSION = 1
MAP_NAMES: tuple[str, ...] = ("low", "high", "heatmap", "regression")
DTYPES = ("float16", "bfloat16", "float32")
STORAGE_MODES = ("dense", "foreground", "keypoints")
# Arrays of each storage mode with their number of dimensions (the shard object keys depend on it).
DENSE_ARRAYS: dict[str, int] = {**dict.fromkeys(MAP_NAMES, 4), "bda": 3}
KEYPOINT_ARRAYS: dict[str, int] = {"boxes": 3, "counts": 2, "keypoint_low": 4, "relations": 4, "cells": 2,
                                   "cell_values": 3, "bda": 3}
MANIFEST_FILE = "manifest.parquet"
MARKER_DIR = "shards"


class CacheError(UserError):
    """A cache is missing, incomplete, corrupt, or does not fit what is asked of it."""


class CacheMismatchError(CacheError):
    """A cache was built with other settings than required; `fields` names the differing ones."""

    def __init__(self, message: str, fields: list[str]) -> None:
        super().__init__(message)
        self.fields = fields


def storage_arrays(storage: str) -> dict[str, int]:
    """{array name: ndim} of a storage mode's cache."""
    if storage not in STORAGE_MODES:
        raise CacheError(f"storage {storage!r} is not one of {STORAGE_MODES}")
    return dict(KEYPOINT_ARRAYS if storage == "keypoints" else DENSE_ARRAYS)


def storage_of(fingerprint: Mapping[str, Any]) -> str:
    """The storage mode a cache fingerprint records (dense for fingerprints without one)."""
    return str(fingerprint.get("storage", "dense"))


def channel_layout(low: int, high: int) -> dict[str, Any]:
    """Channel counts (and names where they have meaning) of the four maps."""
    return {"low": int(low), "high": int(high), "heatmap": list(CLASS_NAMES),
            "regression": regression_channel_names()}


def map_channels(layout: Mapping[str, Any]) -> dict[str, int]:
    """Channels of each stored map from a channel layout."""
    return {"low": int(layout["low"]), "high": int(layout["high"]), "heatmap": NUM_CLASSES,
            "regression": NUM_REGRESSION}


def fingerprint_hash(fingerprint: Mapping[str, Any]) -> str:
    """Stable SHA-256 of a fingerprint (canonical JSON)."""
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()


@dataclass(frozen=True)
class CacheLayout:
    """Sizes of a cache's arrays: N samples x K views, shards of S samples, square tiles; for
    keypoint storage the per-row capacities of boxes and response-mask cells."""

    num_samples: int
    views: int
    shard_samples: int
    tile: int
    height: int
    width: int
    channels: Mapping[str, int]
    max_boxes: int = 0
    max_cells: int = 0

    @property
    def rows(self) -> int:
        return self.num_samples * self.views

    @property
    def num_shards(self) -> int:
        return -(-self.num_samples // self.shard_samples)

    def shard_samples_range(self, shard: int) -> range:
        """Sample positions of a shard."""
        if not 0 <= shard < self.num_shards:
            raise CacheError(f"shard {shard} does not exist (the cache has {self.num_shards})")
        return range(shard * self.shard_samples, min(self.num_samples, (shard + 1) * self.shard_samples))

    def shard_rows(self, shard: int) -> range:
        """Rows of a shard: every view of each of its samples."""
        samples = self.shard_samples_range(shard)
        return range(samples.start * self.views, samples.stop * self.views)

    def to_dict(self) -> dict[str, Any]:
        d = {"num_samples": self.num_samples, "views": self.views, "shard_samples": self.shard_samples,
             "tile": self.tile, "height": self.height, "width": self.width, "channels": dict(self.channels)}
        if self.max_boxes or self.max_cells:  # keypoint storage only: other layouts stay as they were
            d.update(max_boxes=self.max_boxes, max_cells=self.max_cells)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CacheLayout":
        return cls(int(d["num_samples"]), int(d["views"]), int(d["shard_samples"]), int(d["tile"]),
                   int(d["height"]), int(d["width"]), {k: int(v) for k, v in d["channels"].items()},
                   int(d.get("max_boxes", 0)), int(d.get("max_cells", 0)))
