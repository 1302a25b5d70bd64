"""The cache on storage: the Zarr group and its arrays, per-shard completion markers with
checksums, and the Parquet manifest. Local paths and fsspec URLs (s3://, gs://, memory://) alike.

A shard is *durable* once its marker `shards/NNNNNN.json` exists: the writer writes the marker
only after every array's shard object is stored, and records the SHA-256 of each object in it.
A re-run skips shards with markers; `verify` re-hashes the objects against the markers.
"""
from __future__ import annotations

import hashlib
import io
import json
from typing import Any, Iterable, Mapping

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import zarr
from zarr.codecs import BloscCodec, ZstdCodec

from pipeline.cache.schema import (DTYPES, MANIFEST_FILE, MAP_NAMES, MARKER_DIR, SCHEMA_VERSION, CacheError, CacheLayout,
                                   fingerprint_hash, storage_arrays, storage_of)

COMPRESSORS = ("zstd", "blosc-zstd", "blosc-lz4", "none")
# Measured (tests/bench/bench_cache.py): zstd level 3 compresses teacher maps as well as Blosc-zstd
# with bit shuffle (7.3x vs 7.4x on float16) and writes them ~9x faster.
DEFAULT_COMPRESSOR = "zstd"


def limit_codec_threads(threads: int) -> None:
    """Cap this process's Zarr compression/decompression threads at `threads` (at least 1). Call it
    before the process's first Zarr read or write (the pool is made then): Zarr's default pool uses
    every core, which in a writer actor or a DataLoader worker competes with the model's own core."""
    zarr.config.set({"threading.max_workers": max(1, int(threads))})


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(fsspec filesystem, root path in it) of a cache URI or local path."""
    fs, root = fsspec.core.url_to_fs(str(uri))
    return fs, root.rstrip("/")


def compressor(name: str) -> Any:
    """The Zarr codec of a compressor name (see COMPRESSORS; choice measured in tests/bench/bench_cache.py)."""
    if name == "blosc-zstd":
        return BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")
    if name == "blosc-lz4":
        return BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle")
    if name == "zstd":
        return ZstdCodec(level=3)
    if name == "none":
        return None
    raise CacheError(f"compressor {name!r} is not one of {COMPRESSORS}")


def group_exists(uri: str) -> bool:
    fs, root = filesystem(uri)
    return fs.exists(f"{root}/zarr.json")


def open_cache_group(uri: str, mode: str = "r") -> zarr.Group:
    """Open an existing cache group ('r' read-only, 'r+' read-write)."""
    if not group_exists(uri):
        raise CacheError(f"cache {uri}: no Zarr group there (build one with stages/cache_teacher.py)")
    return zarr.open_group(str(uri), mode=mode, zarr_format=3)


def storage_dtype(dtype: str) -> str:
    """The Zarr dtype that stores maps of `dtype`: bfloat16 (unknown to Zarr and numpy) is kept
    as its raw 16 bits in uint16."""
    if dtype not in DTYPES:
        raise CacheError(f"cache dtype {dtype!r} is not one of {DTYPES}")
    return "uint16" if dtype == "bfloat16" else dtype


def encode_maps(maps: torch.Tensor, dtype: str) -> np.ndarray:
    """Teacher maps (any float tensor) -> the array stored for `dtype`."""
    if dtype == "bfloat16":
        return maps.detach().to(torch.bfloat16).cpu().view(torch.int16).numpy().view(np.uint16)
    return maps.detach().to(getattr(torch, dtype)).cpu().numpy()


def decode_maps(stored: np.ndarray, dtype: str) -> np.ndarray:
    """A stored array -> float32 values."""
    if dtype == "bfloat16":
        return (stored.astype(np.uint32) << 16).view(np.float32)
    return stored.astype(np.float32, copy=False)


def stored_tensor(stored: np.ndarray, dtype: str) -> torch.Tensor:
    """A stored array -> a torch tensor of the cache's precision, sharing its memory (bfloat16 is
    stored as its raw 16 bits)."""
    t = torch.from_numpy(np.ascontiguousarray(stored))
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t


def create_cache_group(uri: str, layout: CacheLayout, fingerprint: Mapping[str, Any], dtype: str,
                       compressor_name: str) -> zarr.Group:
    """Create the group and every array (on the driver, before any writer starts; DESIGN §3.4)."""
    group = zarr.open_group(str(uri), mode="w", zarr_format=3)
    codec = compressor(compressor_name)
    spk = layout.shard_samples * layout.views  # rows per shard
    if storage_of(fingerprint) == "keypoints":
        _create_keypoint_arrays(group, layout, spk, dtype, codec)
    else:
        th, tw = min(layout.tile, layout.height), min(layout.tile, layout.width)
        # a shard spans the whole map rounded up to whole tiles (Zarr needs shards made of whole
        # chunks; the edge tiles are partial): 32-cell tiles on the paper's 180-cell map
        sh, sw = -(-layout.height // th) * th, -(-layout.width // tw) * tw
        for name in MAP_NAMES:
            c = layout.channels[name]
            group.create_array(name, shape=(layout.rows, c, layout.height, layout.width), chunks=(1, c, th, tw),
                               shards=(spk, c, sh, sw), dtype=storage_dtype(dtype), fill_value=0,
                               compressors=codec, config={"write_empty_chunks": False})
    group.create_array("bda", shape=(layout.rows, 4, 4), chunks=(spk, 4, 4), dtype="float32", fill_value=0,
                       compressors=None)
    group.attrs.update({"schema_version": SCHEMA_VERSION, "fingerprint": dict(fingerprint),
                        "fingerprint_hash": fingerprint_hash(fingerprint), "layout": layout.to_dict(),
                        "dtype": dtype, "compressor": compressor_name, "complete": False})
    return group


def _create_keypoint_arrays(group: zarr.Group, layout: CacheLayout, spk: int, dtype: str, codec: Any) -> None:
    """The padded per-row arrays of a keypoint cache (schema.py): one chunk per row and array, so
    that a student's read of a row is one small chunk per array; shards of `spk` rows as for dense caches."""
    m, n = max(1, layout.max_boxes), max(1, layout.max_cells)
    specs = {"boxes": ((m, 9), "float32"), "counts": ((2,), "int32"), "keypoint_low": ((m, 9, layout.channels["low"]), None),
             "relations": ((m, 9, 9), None), "cells": ((n,), "int32"),
             "cell_values": ((n, 1 + layout.channels["regression"]), None)}
    for name, (shape, kind) in specs.items():
        group.create_array(name, shape=(layout.rows, *shape), chunks=(1, *shape), shards=(spk, *shape),
                           dtype=kind or storage_dtype(dtype), fill_value=0, compressors=codec,
                           config={"write_empty_chunks": False})


def delete_cache(uri: str) -> None:
    """Remove a cache (group, arrays, markers, manifest) entirely."""
    fs, root = filesystem(uri)
    if fs.exists(root):
        fs.rm(root, recursive=True)


# --- shard objects and checksums -----------------------------------------------------------------
def shard_object_key(name: str, shard: int, storage: str = "dense") -> str:
    """Store key of one array's shard object (default chunk-key encoding, shards along rows only)."""
    ndim = storage_arrays(storage)[name]
    return f"{name}/c/{shard}" + "/0" * (ndim - 1)


def shard_checksums(uri: str, shard: int, storage: str = "dense") -> dict[str, str | None]:
    """SHA-256 of each array's stored shard object (None when the object is absent)."""
    fs, root = filesystem(uri)
    out: dict[str, str | None] = {}
    for name in storage_arrays(storage):
        path = f"{root}/{shard_object_key(name, shard, storage)}"
        try:
            out[name] = hashlib.sha256(fs.cat_file(path)).hexdigest()
        except FileNotFoundError:
            out[name] = None  # every chunk of the shard was empty (all zeros): nothing stored
    return out


def shard_bytes(uri: str, shard: int, storage: str = "dense") -> int:
    """Bytes stored for one shard over all arrays."""
    fs, root = filesystem(uri)
    total = 0
    for name in storage_arrays(storage):
        path = f"{root}/{shard_object_key(name, shard, storage)}"
        if fs.exists(path):
            total += int(fs.size(path))
    return total


# --- markers --------------------------------------------------------------------------------------
def marker_path(root: str, shard: int) -> str:
    return f"{root}/{MARKER_DIR}/{shard:06d}.json"


def write_marker(uri: str, shard: int, record: Mapping[str, Any]) -> None:
    """Record a shard as durable (called after its objects are stored)."""
    fs, root = filesystem(uri)
    fs.makedirs(f"{root}/{MARKER_DIR}", exist_ok=True)
    path = marker_path(root, shard)
    tmp = f"{path}.tmp"
    fs.pipe_file(tmp, json.dumps(dict(record)).encode())
    fs.mv(tmp, path)


def read_markers(uri: str) -> dict[int, dict[str, Any]]:
    """{shard: marker record} of every durable shard."""
    fs, root = filesystem(uri)
    folder = f"{root}/{MARKER_DIR}"
    if not fs.exists(folder):
        return {}
    out = {}
    for path in fs.ls(folder, detail=False):
        name = str(path).rsplit("/", 1)[-1]
        if not name.endswith(".json"):
            continue
        try:
            rec = json.loads(fs.cat_file(path))
        except (json.JSONDecodeError, FileNotFoundError):
            continue  # an unreadable marker: the shard is redone
        out[int(rec["shard"])] = rec
    return out


def remove_marker(uri: str, shard: int) -> None:
    fs, root = filesystem(uri)
    path = marker_path(root, shard)
    if fs.exists(path):
        fs.rm(path)


# --- manifest --------------------------------------------------------------------------------------
MANIFEST_SCHEMA = pa.schema([("token", pa.string()), ("sample", pa.int64()), ("row", pa.int64()),
                             ("views", pa.int32()), ("shard", pa.int32()), ("checksum", pa.string())])


def combined_checksum(checksums: Mapping[str, str | None]) -> str:
    """One SHA-256 over a shard's per-array checksums."""
    return hashlib.sha256(json.dumps(dict(checksums), sort_keys=True).encode()).hexdigest()


def manifest_table(markers: Iterable[Mapping[str, Any]], views: int) -> pa.Table:
    """One manifest row per sample: token -> first row, views, shard, the shard's checksum."""
    rows = []
    for rec in sorted(markers, key=lambda r: r["shard"]):
        check = combined_checksum(rec["checksums"])
        for sample, token in zip(rec["samples"], rec["tokens"]):
            rows.append({"token": token, "sample": sample, "row": sample * views, "views": views,
                         "shard": rec["shard"], "checksum": check})
    return pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)


def write_manifest(uri: str, table: pa.Table) -> None:
    fs, root = filesystem(uri)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    fs.pipe_file(f"{root}/{MANIFEST_FILE}", buf.getvalue())


def read_manifest(uri: str) -> pa.Table:
    fs, root = filesystem(uri)
    path = f"{root}/{MANIFEST_FILE}"
    if not fs.exists(path):
        raise CacheError(f"cache {uri}: no manifest ({MANIFEST_FILE}); the cache was never completed")
    return pq.read_table(io.BytesIO(fs.cat_file(path)))

