"""Planning a teacher-target cache: its layout, its fingerprint (what it holds, DESIGN §3.4) and
the job every caching actor receives; creating the Zarr group or checking an existing one.
Nothing here runs the teacher (pipeline/cache/build.py drives the job)."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

from models.bev_grid import BEVGrid
from models.classes import CLASS_NAMES
from pipeline.cache import store
from pipeline.cache.keypoints import KEYPOINT_MIN_OVERLAP, keypoint_capacity
from pipeline.cache.schema import (DTYPES, SCHEMA_VERSION, STORAGE_MODES, CacheError, CacheLayout,
                                   CacheMismatchError, channel_layout, map_channels)
from pipeline.config import ConfigError, diff_keys
from pipeline.data import nusc_db
from pipeline.data.dataset import index_sweeps
from pipeline.data.index import build_index
from pipeline.data.loading import sweep_padding
from pipeline.model_files import file_sha256, load_detector
from pipeline.storage import is_url

def default_tile(grid: BEVGrid, storage: str = "dense") -> int:
    """Chunk tile size (cells) of a storage mode.

    dense: the whole map, one chunk per map per row. Every chunk read costs Zarr a fixed overhead
    (~0.25-0.5 ms on one core) and a student always reads whole rows, so dense storage gains
    nothing from tiles: a tiny-preset sample reads in ~69 ms with 8-cell tiles, ~18 ms with 16, ~7
    with 32 and ~4.5 with whole maps (bench_cache.py).
    foreground: 32 cells, or half the map's shorter side when that is smaller (at least 8): only
    tiles that touch a box are stored, so tiles must be small enough to leave some out (the paper's
    180x180 map gets 6 x 6 tiles of 19.2 m, 35 % of them kept); pass --tile to trade reads for bytes.
    """
    if storage != "foreground":  # dense; keypoint storage has no tiles (it records the map's size)
        return int(max(grid.H, grid.W))
    return int(min(32, max(8, min(grid.H, grid.W) // 2)))


DEFAULT_VIEW_SEED = 0
# Inputs of the teacher's config that change its outputs (beyond the weights): the fingerprint keeps them.
INPUT_KEYS = ("cameras", "lidar_sweeps", "image_size", "image_mean", "image_std", "min_points_in_box")


def teacher_inputs(data: Mapping[str, Any]) -> dict[str, Any]:
    """The fingerprint's record of the teacher's input settings (INPUT_KEYS, and the sweep padding
    where it is on: caches made before that setting existed keep their fingerprint)."""
    inputs = {k: data[k] for k in INPUT_KEYS}
    if sweep_padding(data) != "none":
        inputs["lidar_sweep_padding"] = sweep_padding(data)
    return inputs


@dataclass(frozen=True)
class CacheRequest:
    """One caching job as asked for (the options of stages/cache_teacher.py; see build_cache).

    What is cached: the teacher's model file, the split, the cache URI, `views` per sample, the
    storage mode, dtype, shard size, tile (None: the mode's default, or an existing cache's),
    compressor and view seed; `overwrite` replaces a cache built with other settings. How it runs:
    `actors` teacher actors (`use_gpu`: one GPU each) of `cpus_per_actor`, `teacher_batch` samples
    per teacher call, `loaders` / `writers` helper actors (None: one per teacher actor) of
    `cpus_per_loader` / `cpus_per_writer`, on the Ray cluster at `address` (None: pipeline.ray_env's choice).
    """

    teacher_path: str
    dataroot: str
    version: str
    split: str
    uri: str
    views: int = 1
    storage: str = "dense"
    dtype: str = "float16"
    shard_samples: int = 8
    tile: int | None = None
    compressor_name: str = store.DEFAULT_COMPRESSOR
    overwrite: bool = False
    view_seed: int = DEFAULT_VIEW_SEED
    actors: int = 1
    use_gpu: bool = False
    cpus_per_actor: float = 1.0
    teacher_batch: int = 2
    loaders: int | None = None
    writers: int | None = None
    cpus_per_loader: float = 0.0
    cpus_per_writer: float = 0.0
    address: str | None = None


@dataclass(frozen=True)
class CacheJob:
    """Everything a caching task needs (plain data, shipped to every Ray worker)."""

    uri: str
    teacher_path: str
    dataroot: str
    version: str
    split: str
    layout: dict
    storage: str
    dtype: str
    view_seed: int
    teacher_batch: int = 2
    tokens: tuple[str, ...] = field(default=(), repr=False)
    # The split's index: its table as planned, then (in the driver's Ray session) its ObjectRef
    # (pipeline.data.index.share_index); the loaders read their rows from it instead of opening the devkit.
    index: Any = field(default=None, repr=False, compare=False)

    @property
    def cache_layout(self) -> CacheLayout:
        return CacheLayout.from_dict(self.layout)


def cache_fingerprint(teacher_path: str, teacher_cfg: Mapping[str, Any], low: int, high: int, version: str,
                      split: str, tokens: list[str], layout: CacheLayout, storage: str, dtype: str,
                      view_seed: int) -> dict[str, Any]:
    """Everything that changes what a cache holds (DESIGN §3.4)."""
    data = teacher_cfg["data"]
    views: dict[str, Any] = {"count": layout.views, "seed": view_seed}
    if layout.views > 1:
        views["bda"] = dict(data["bda"])
    return {
        "schema_version": SCHEMA_VERSION,
        "teacher": {"sha256": file_sha256(teacher_path), "modality": teacher_cfg["model"]["modality"],
                    "model": dict(teacher_cfg["model"])},
        "grid": BEVGrid.from_config(teacher_cfg["grid"]).to_dict(),
        "class_order": list(CLASS_NAMES),
        "channels": channel_layout(low, high),
        "inputs": teacher_inputs(data),
        "dataset": {"version": version, "split": split, "samples": len(tokens),
                    "tokens_sha256": store.combined_checksum({"tokens": ",".join(tokens)})},
        "views": views,
        "storage": storage,
        "dtype": dtype,
        "layout": {"shard_samples": layout.shard_samples, "tile": layout.tile},
        **({"keypoints": {"min_overlap": KEYPOINT_MIN_OVERLAP, "points_per_box": 9}} if storage == "keypoints" else {}),
    }


def plan_cache(teacher_path: str, dataroot: str, version: str, split: str, uri: str, views: int, storage: str,
               dtype: str, shard_samples: int, tile: int | None = None,
               view_seed: int = DEFAULT_VIEW_SEED) -> tuple[CacheJob, dict[str, Any]]:
    """Check the inputs and work out the cache's layout and fingerprint (nothing is written).

    Without `tile`, a cache already at `uri` that differs only in its tile keeps it: the default
    changed between versions (dense: 32 cells -> the whole map), and a finished cache must not
    look foreign for a layout choice that does not change what it holds.
    """
    if storage not in STORAGE_MODES:
        raise ConfigError(f"--storage {storage!r} is not one of {STORAGE_MODES}")
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r} is not one of {DTYPES}")
    if views < 1 or shard_samples < 1 or (tile is not None and tile < 1):
        raise ConfigError(f"views, shard samples and tile must be >= 1, got {views}, {shard_samples}, {tile}")
    nusc_db.check_dataroot(dataroot, version)
    nusc_db.check_split(version, split)
    model, cfg = load_detector(teacher_path)  # strict: a teacher with missing or unexpected keys is refused
    index = build_index(dataroot, version, split, max_sweeps=index_sweeps(cfg))
    tokens = index.column("token").to_pylist()
    if not tokens:
        raise CacheError(f"split {split} of {dataroot} has no samples")
    grid = model.grid
    max_boxes, max_cells = keypoint_capacity(index, grid, cfg["data"]["bda"]) if storage == "keypoints" else (0, 0)
    layout = CacheLayout(num_samples=len(tokens), views=views, shard_samples=shard_samples,
                         tile=default_tile(grid, storage) if tile is None else int(tile), height=grid.H, width=grid.W,
                         channels=map_channels(channel_layout(model.low_channels, model.high_channels)),
                         max_boxes=max_boxes, max_cells=max_cells)
    fingerprint = cache_fingerprint(teacher_path, cfg, model.low_channels, model.high_channels, version, split,
                                    tokens, layout, storage, dtype, view_seed)
    try:
        have = existing_fingerprint(uri) if tile is None else None
    except OSError:  # unreachable storage: prepare_store reports it
        have = None
    if have is not None and diff_keys(have, fingerprint) == ["layout.tile"]:
        layout = replace(layout, tile=int(have["layout"]["tile"]))
        fingerprint = {**fingerprint, "layout": {**fingerprint["layout"], "tile": layout.tile}}
    teacher_path = teacher_path if is_url(teacher_path) else str(Path(teacher_path).resolve())
    job = CacheJob(uri=str(uri), teacher_path=teacher_path,
                   dataroot=str(Path(dataroot).resolve()), version=version, split=split, layout=layout.to_dict(),
                   storage=storage, dtype=dtype, view_seed=view_seed, tokens=tuple(tokens),
                   index=index)
    return job, fingerprint


def existing_fingerprint(uri: str) -> dict[str, Any] | None:
    """The fingerprint of the cache group at `uri` ({} for a group without one), or None where there
    is no group."""
    if not store.group_exists(uri):
        return None
    return dict(store.open_cache_group(uri, mode="r").attrs.get("fingerprint", {}))


def prepare_store(job: CacheJob, fingerprint: Mapping[str, Any], compressor_name: str, overwrite: bool) -> set[int]:
    """Create the cache, or check an existing one; return the shards already durable."""
    have = existing_fingerprint(job.uri)
    if have is not None:
        differ = diff_keys(have, fingerprint)
        if not differ:
            return set(store.read_markers(job.uri))
        if not overwrite:
            raise CacheMismatchError(
                f"cache {job.uri} was built with other settings (differing: {', '.join(differ)}); "
                f"pass --overwrite to replace it or choose another --cache", differ)
        print(f"[cache] --overwrite: removing {job.uri} (differing: {', '.join(differ)})", flush=True)
        store.delete_cache(job.uri)
    store.create_cache_group(job.uri, job.cache_layout, fingerprint, job.dtype, compressor_name)
    return set()
