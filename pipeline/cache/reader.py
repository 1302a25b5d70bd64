"""Reading teacher targets from a cache: what a student (or a check) does.

`CacheReader(uri)` opens a complete cache read-only, maps sample tokens to rows through the
manifest, and returns a sample's stored maps for one view as float32 numpy arrays. Opening checks
the cache is complete; `check_compatible` refuses a cache whose grid, class order or channel
layout differ from the student's, naming the differing fields. A keypoint cache (pipeline/cache/
keypoints.py) has no maps to read: `read_keypoints` returns its row instead.
"""
from __future__ import annotations

import asyncio
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from zarr.core.sync import sync as zarr_sync  # what zarr's own synchronous API runs coroutines with

from pipeline.cache import store
from pipeline.cache.schema import MAP_NAMES, CacheError, CacheLayout, CacheMismatchError, storage_arrays, storage_of
from pipeline.config import diff_keys

# Fingerprint fields a student's own model must agree with.
STUDENT_MUST_MATCH = ("grid", "class_order", "channels.heatmap", "channels.regression")


def loader_worker_init(worker_id: int) -> None:  # noqa: ARG001 - DataLoader's worker_init_fn signature
    """DataLoader worker_init_fn of datasets that read a cache: one decompression thread per worker."""
    store.limit_codec_threads(1)


class CacheReader:
    """Read-only access to a complete cache (see module docstring). Picklable: Zarr arrays pickle
    without data, so a reader can be handed to DataLoader workers."""

    def __init__(self, uri: str) -> None:
        self.uri = str(uri)
        group = store.open_cache_group(self.uri, mode="r")
        attrs = dict(group.attrs)
        if not attrs.get("complete"):
            layout = CacheLayout.from_dict(attrs["layout"])
            missing = layout.num_shards - len(store.read_markers(self.uri))
            raise CacheError(f"cache {self.uri} is incomplete: {missing} of {layout.num_shards} shards are "
                             f"missing; re-run stages/cache_teacher.py with the same arguments to finish it")
        self.fingerprint: dict[str, Any] = dict(attrs["fingerprint"])
        self.layout = CacheLayout.from_dict(attrs["layout"])
        self.dtype: str = attrs["dtype"]
        self.storage: str = storage_of(self.fingerprint)
        self.arrays = {name: group[name] for name in storage_arrays(self.storage)}
        manifest = store.read_manifest(self.uri).to_pydict()
        self.row_of: dict[str, int] = dict(zip(manifest["token"], manifest["row"]))
        self.shard_of: dict[str, int] = dict(zip(manifest["token"], manifest["shard"]))

    @property
    def views(self) -> int:
        return self.layout.views

    def __contains__(self, token: str) -> bool:
        return token in self.row_of

    def check_compatible(self, expected: Mapping[str, Any], keys: Sequence[str] = STUDENT_MUST_MATCH) -> None:
        """Raise CacheMismatchError naming every field under `keys` that differs from `expected`."""
        differ = diff_keys(self.fingerprint, expected, tuple(keys))
        if differ:
            have = {f: self._field(self.fingerprint, f) for f in differ}
            want = {f: self._field(expected, f) for f in differ}
            raise CacheMismatchError(f"cache {self.uri} does not fit this student: differing "
                                     f"{', '.join(differ)} (cache {have}, student {want})", differ)

    @staticmethod
    def _field(d: Mapping[str, Any], dotted: str) -> Any:
        for part in dotted.split("."):
            if not isinstance(d, Mapping) or part not in d:
                return None
            d = d[part]
        return d

    def row(self, token: str, view: int = 0) -> int:
        """Row of (sample token, view)."""
        if token not in self.row_of:
            raise CacheError(f"cache {self.uri} holds no sample {token} (built for "
                             f"{self.fingerprint['dataset']['version']} {self.fingerprint['dataset']['split']})")
        if not 0 <= view < self.views:
            raise CacheError(f"cache {self.uri} has {self.views} views per sample, asked for view {view}")
        return self.row_of[token] + view

    def _fetch(self, token: str, view: int, names: Sequence[str]) -> dict[str, np.ndarray]:
        """The stored arrays of one row, as stored, fetched concurrently in one pass of Zarr's event loop."""
        r = self.row(token, view)

        async def fetch() -> list:
            return await asyncio.gather(*[self.arrays[n].async_array.getitem(r) for n in names])

        return {n: np.asarray(a) for n, a in zip(names, zarr_sync(fetch()))}

    def _check_dense(self) -> None:
        if self.storage == "keypoints":
            raise CacheError(f"cache {self.uri} stores the teacher at its GT keypoints and response cells only "
                             f"(--storage keypoints), not whole maps: read it with read_keypoints")

    def read(self, token: str, view: int = 0, names: Sequence[str] = MAP_NAMES) -> dict[str, np.ndarray]:
        """The stored maps of one view as float32 numpy arrays ([C, H, W] each) plus its BDA [4, 4]."""
        self._check_dense()
        raw = self._fetch(token, view, [*names, "bda"])
        out = {name: store.decode_maps(raw[name], self.dtype) for name in names}
        out["bda"] = raw["bda"].astype(np.float64)
        return out

    def read_tensors(self, token: str, view: int = 0, names: Sequence[str] = MAP_NAMES) -> dict[str, torch.Tensor]:
        """The stored maps of one view as torch tensors in the stored precision ([C, H, W] float16,
        bfloat16 or float32, no copy) plus its BDA [4, 4] as a float64 numpy array.

        What a DataLoader worker reads: numpy's float16 -> float32 conversion costs more than the
        read itself (~3.5 ms for a tiny-preset sample), torch's on a whole batch next to the loss
        little, and half-precision batches are half the bytes to pass between processes.
        """
        self._check_dense()
        raw = self._fetch(token, view, [*names, "bda"])
        out: dict[str, Any] = {name: store.stored_tensor(raw[name], self.dtype) for name in names}
        out["bda"] = raw["bda"].astype(np.float64)
        return out

    def read_keypoints(self, token: str, view: int = 0) -> dict[str, Any]:
        """One row of a keypoint cache, as stored: boxes [M_cap, 9] float32 and counts [2] (boxes,
        cells) numpy arrays; keypoint_low [M_cap, 9, C_low], relations [M_cap, 9, 9] and cell_values
        [N_cap, 67] torch tensors of the cache's precision; cells [N_cap] int32; bda [4, 4] float64.
        Rows are padded: only the first counts[0] boxes and counts[1] cells are real."""
        if self.storage != "keypoints":
            raise CacheError(f"cache {self.uri} has {self.storage} storage, not keypoints: read it with read_tensors")
        raw = self._fetch(token, view, list(self.arrays))
        out: dict[str, Any] = {k: raw[k] for k in ("boxes", "counts", "cells")}
        for k in ("keypoint_low", "relations", "cell_values"):
            out[k] = store.stored_tensor(raw[k], self.dtype)
        out["bda"] = raw["bda"].astype(np.float64)
        return out

    def bda(self, token: str, view: int) -> np.ndarray:
        """The BDA [4, 4] of a stored view (to replay it on the student's input)."""
        return np.asarray(self.arrays["bda"][self.row(token, view)], dtype=np.float64)
