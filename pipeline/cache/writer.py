"""Build a teacher-target cache with Ray Data (the body of stages/cache_teacher.py).

Every row of the Ray Data pipeline is one whole shard, so no shard is ever split between tasks:

    shard descriptors --ShardLoader (actor pool)--> the shard's un-augmented samples
                      --TeacherRunner (actor pool, GPU when asked)--> its encoded maps, all views
                      --ShardWriter (actor pool)--> Zarr shard objects, then the shard's marker

The arrays are created once on the driver before anything runs (zarr-python cannot create
concurrently or write part of a shard safely). Loading, teacher compute and writing run in
different processes, so Ray Data's streaming executor overlaps them; two shards wait at each
teacher so it never idles between them.

Loaders and writers are long-lived actors, not tasks: a task's worker process is reaped when idle
and whenever two tasks are ready at once Ray starts a fresh one, which pays seconds of imports and
rebuilds the split's index (on nuScenes trainval, the devkit tables) before its first shard; on 2
cores that stalled the teacher for ~5 s every few shards (bench_cache.py: 0.23x of the teacher
alone with tasks). Their pools have a fixed size and reserve no CPUs by default (like a plain Ray
actor's running default), so that they can always be restarted: with any reservation, a cluster
whose CPUs are all reserved has no room to restart the loaders lost with a node, and the job
waits forever (measured with 0.25 and 0.5 CPUs per helper). Teacher actors hold the real
reservations (CPUs, GPUs); size the helper pools with --loaders / --writers.

A retried task rewrites the same shard with the same bytes. Markers make the job resumable: a re-run
skips durable shards.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import math
import os
import pickle
import re
import socket
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch

from models.bev_grid import BEVGrid
from models.classes import CLASS_NAMES
from pipeline.cache import store
from pipeline.cache.schema import (DTYPES, SCHEMA_VERSION, STORAGE_MODES, CacheError, CacheLayout,
                                   CacheMismatchError, channel_layout, map_channels)
from pipeline.cache.views import foreground_tiles, tile_mask, view_matrices
from pipeline.config import diff_keys
from pipeline.data import nusc_db
from pipeline.data.collate import collate
from pipeline.data.dataset import DetectionDataset, augment_bev, index_sweeps
from pipeline.data.index import build_index, share_index
from pipeline.data.loading import sweep_padding
from pipeline.data.sample import Sample
from pipeline.engine.train_loop import to_device
from pipeline.evaluation.inference import eval_dataset
from pipeline.model_files import file_sha256, load_detector, read_model_file
from pipeline.ray_env import ray_session
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
    if storage == "dense":
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
    }


# --- Ray Data stages ---------------------------------------------------------------------------------
@functools.lru_cache(maxsize=2)
def _inputs_dataset(teacher_path: str, dataroot: str, version: str, split: str, index: Any) -> DetectionDataset:
    """The teacher's un-augmented input samples of a split, built once per worker process."""
    cfg = read_model_file(teacher_path)["config"]
    return eval_dataset(cfg, dataroot, version, split, cfg["model"]["modality"], index)


def load_shards(batch: Mapping[str, np.ndarray], job: CacheJob) -> dict[str, np.ndarray]:
    """Ray Data task: shard descriptors -> each shard's un-augmented teacher inputs (pickled samples)."""
    dataset = _inputs_dataset(job.teacher_path, job.dataroot, job.version, job.split, job.index)
    shards = [int(s) for s in batch["shard"]]
    payloads = []
    for shard in shards:
        samples = [dataset.get(i, bda=np.eye(4)) for i in job.cache_layout.shard_samples_range(shard)]
        payloads.append(pickle.dumps(samples, protocol=pickle.HIGHEST_PROTOCOL))
    return {"shard": np.asarray(shards), "payload": np.asarray(payloads, dtype=object)}


class ShardLoader:
    """Ray Data actor: `load_shards` in a long-lived process (the split's index is built once)."""

    def __init__(self, job: CacheJob) -> None:
        self.job = job
        _inputs_dataset(job.teacher_path, job.dataroot, job.version, job.split, job.index)

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return load_shards(batch, self.job)


def encode_shard_maps(outputs: list[dict[str, torch.Tensor]], boxes: list[np.ndarray], job: CacheJob,
                      grid: BEVGrid) -> dict[str, np.ndarray]:
    """Teacher outputs of a shard's rows -> stored arrays (foreground tiles only when asked)."""
    layout = job.cache_layout
    encoded = {}
    for name in ("low", "high", "heatmap", "regression"):
        maps = torch.cat([o[name] for o in outputs]).float()  # [R, C, H, W]
        if job.storage == "foreground":
            keep = np.stack([tile_mask(foreground_tiles(b, grid, layout.tile), grid, layout.tile) for b in boxes])
            maps = maps * torch.from_numpy(keep)[:, None].to(maps.dtype)
        encoded[name] = store.encode_maps(maps, job.dtype)
    return encoded


class TeacherRunner:
    """Shard inputs -> the teacher's encoded maps for every view of every sample (frozen teacher)."""

    def __init__(self, job: CacheJob) -> None:
        self.job = job
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.model, self.cfg = load_detector(job.teacher_path, device=device)
        self.model.eval()
        self.grid = BEVGrid.from_config(self.cfg["grid"])
        self.bda_cfg = self.cfg["data"]["bda"]

    @torch.no_grad()
    def run_views(self, samples: list[Sample]) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Encoded maps [R, C, H, W] and BDA matrices [R, 4, 4] of all views, rows sample-major."""
        views = self.job.cache_layout.views
        mats = [view_matrices(s["token"], views, self.bda_cfg, self.job.view_seed) for s in samples]
        inputs = []
        for s, m in zip(samples, mats):
            for k in range(views):
                view = {key: (v.copy() if isinstance(v, np.ndarray) else v) for key, v in s.items()}
                inputs.append(augment_bev(view, m[k], self.grid))
        outputs, boxes = [], []
        for i in range(0, len(inputs), self.job.teacher_batch):
            chunk = inputs[i:i + self.job.teacher_batch]
            out = self.model(to_device(collate(chunk), self.device))
            outputs.append({k: v.detach().cpu() for k, v in out.items()})
            boxes += [c["gt_boxes"] for c in chunk]
        return encode_shard_maps(outputs, boxes, self.job, self.grid), np.concatenate(mats).astype(np.float32)

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        payloads = []
        for shard, payload in zip(batch["shard"], batch["payload"]):
            samples = pickle.loads(payload)
            t0 = time.perf_counter()
            maps, bda = self.run_views(samples)
            payloads.append(pickle.dumps({"maps": maps, "bda": bda, "tokens": [s["token"] for s in samples],
                                          "teacher": {"pid": os.getpid(), "node": _node_id(),
                                                      "seconds": time.perf_counter() - t0}},
                                         protocol=pickle.HIGHEST_PROTOCOL))
        return {"shard": np.asarray(batch["shard"]), "payload": np.asarray(payloads, dtype=object)}


def write_one_shard(job: CacheJob, shard: int, maps: Mapping[str, np.ndarray], bda: np.ndarray,
                    tokens: list[str], teacher: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Store one whole shard, then record it as durable. Returns its marker record."""
    layout = job.cache_layout
    rows = layout.shard_rows(shard)
    samples = list(layout.shard_samples_range(shard))
    for name, arr in (*maps.items(), ("bda", bda)):
        if arr.shape[0] != len(rows):  # a task writes a whole shard or nothing (DESIGN §3.4)
            raise CacheError(f"shard {shard}: {name} has {arr.shape[0]} rows, the shard has {len(rows)}")
    if [job.tokens[i] for i in samples] != list(tokens):
        raise CacheError(f"shard {shard}: samples arrived out of order")
    t0 = time.perf_counter()
    group = store.open_cache_group(job.uri, mode="r+")
    for name, arr in (*maps.items(), ("bda", bda)):
        group[name][rows.start:rows.stop] = arr
    record = {"shard": shard, "samples": samples, "tokens": list(tokens), "rows": [rows.start, rows.stop],
              "checksums": store.shard_checksums(job.uri, shard), "bytes": store.shard_bytes(job.uri, shard),
              "node": _node_id(), "host": socket.gethostname(), "pid": os.getpid(),
              "teacher_pid": (teacher or {}).get("pid"), "teacher_node": (teacher or {}).get("node"),
              "teacher_seconds": (teacher or {}).get("seconds"), "write_seconds": time.perf_counter() - t0,
              "time": time.time()}
    store.write_marker(job.uri, shard, record)
    return record


def _node_id() -> str:
    try:
        import ray

        return ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - outside Ray (direct use, tests)
        return "local"


def write_shards(batch: Mapping[str, np.ndarray], job: CacheJob) -> dict[str, np.ndarray]:
    """Ray Data task: write each shard of the batch whole; return one small row per shard."""
    out: dict[str, list] = {"shard": [], "bytes": [], "node": []}
    for shard, payload in zip(batch["shard"], batch["payload"]):
        data = pickle.loads(payload)
        rec = write_one_shard(job, int(shard), data["maps"], data["bda"], data["tokens"], data.get("teacher"))
        out["shard"].append(rec["shard"])
        out["bytes"].append(rec["bytes"])
        out["node"].append(rec["node"])
    return {k: np.asarray(v, dtype=object if k == "node" else None) for k, v in out.items()}


class ShardWriter:
    """Ray Data actor: `write_shards` in a long-lived process, compressing on as many threads as
    the CPUs it reserved (Zarr's default pool would use every core and slow the teacher down)."""

    def __init__(self, job: CacheJob, threads: int = 1) -> None:
        self.job = job
        store.limit_codec_threads(threads)

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return write_shards(batch, self.job)


# --- driver --------------------------------------------------------------------------------------
@dataclass
class CacheSummary:
    uri: str
    samples: int
    views: int
    shards: int
    shards_written: int
    shards_skipped: int
    bytes: int
    seconds: float
    nodes: list[str]

    @property
    def bytes_per_sample(self) -> float:
        return self.bytes / max(1, self.samples)

    def format(self) -> str:
        rate = self.samples * (self.shards_written / max(1, self.shards)) / max(self.seconds, 1e-9)
        return (f"cache {self.uri}: {self.samples} samples x {self.views} views in {self.shards} shards "
                f"({self.shards_written} written, {self.shards_skipped} already complete); "
                f"{self.bytes / 2**20:.1f} MiB, {self.bytes_per_sample / 2**20:.2f} MiB/sample; "
                f"{rate:.2f} samples/s written")


def plan_cache(teacher_path: str, dataroot: str, version: str, split: str, uri: str, views: int, storage: str,
               dtype: str, shard_samples: int, tile: int | None = None,
               view_seed: int = DEFAULT_VIEW_SEED) -> tuple[CacheJob, dict[str, Any]]:
    """Check the inputs and work out the cache's layout and fingerprint (nothing is written).

    Without `tile`, a cache already at `uri` that differs only in its tile keeps it: the default
    changed between versions (dense: 32 cells -> the whole map), and a finished cache must not
    look foreign for a layout choice that does not change what it holds.
    """
    if storage not in STORAGE_MODES:
        raise ValueError(f"--storage {storage!r} is not one of {STORAGE_MODES}")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r} is not one of {DTYPES}")
    if views < 1 or shard_samples < 1 or (tile is not None and tile < 1):
        raise ValueError(f"views, shard samples and tile must be >= 1, got {views}, {shard_samples}, {tile}")
    nusc_db.check_dataroot(dataroot, version)
    nusc_db.check_split(version, split)
    model, cfg = load_detector(teacher_path)  # strict: a teacher with missing or unexpected keys is refused
    index = build_index(dataroot, version, split, max_sweeps=index_sweeps(cfg))
    tokens = index.column("token").to_pylist()
    if not tokens:
        raise CacheError(f"split {split} of {dataroot} has no samples")
    grid = model.grid
    layout = CacheLayout(num_samples=len(tokens), views=views, shard_samples=shard_samples,
                         tile=default_tile(grid, storage) if tile is None else int(tile), height=grid.H, width=grid.W,
                         channels=map_channels(channel_layout(model.low_channels, model.high_channels)))
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


ACTOR_START_TIMEOUT_S = 600  # how long the job waits for its actor pools to start


@contextlib.contextmanager
def _shard_scheduling(ctx: Any) -> Iterator[None]:
    """Ray Data settings of a caching job, restored afterwards; the Dataset must be created inside
    (it copies the context when created).

    Every teacher actor is up before the first shard is handed out, and shards go to the least busy
    one rather than the one next to the shard's inputs: a shard is a big unit of compute and a small
    transfer, and on short jobs the first actor up (or the local one) would get all of them.
    """
    def set_locality(value: bool) -> None:
        with warnings.catch_warnings():  # deprecated, still honoured by the pinned Ray
            warnings.simplefilter("ignore", DeprecationWarning)
            ctx.execution_options.actor_locality_enabled = value

    saved = ctx.wait_for_min_actors_s, ctx.execution_options.actor_locality_enabled
    ctx.wait_for_min_actors_s = ACTOR_START_TIMEOUT_S
    set_locality(False)
    try:
        yield
    finally:
        ctx.wait_for_min_actors_s = saved[0]
        set_locality(saved[1])


def run_pipeline(job: CacheJob, shards: list[int], actors: int, gpus_per_actor: float, cpus_per_actor: float,
                 loaders: int | None = None, writers: int | None = None, cpus_per_loader: float = 0.0,
                 cpus_per_writer: float = 0.0) -> list[dict]:
    """Ray Data: load, run the teacher and write `shards`; returns one row per written shard.

    `loaders` and `writers` (default: one of each per teacher actor) size the fixed helper pools.
    Raises CacheError if a shard came back twice or not at all (each shard has one writer).
    """
    import ray.data

    loaders = actors if loaders is None else int(loaders)
    writers = actors if writers is None else int(writers)
    if min(actors, loaders, writers) < 1:
        raise ValueError(f"actors, loaders and writers must be >= 1, got {actors}, {loaders}, {writers}")
    try:
        with _shard_scheduling(ray.data.DataContext.get_current()):
            ds = ray.data.from_items([{"shard": s} for s in shards], override_num_blocks=max(1, len(shards)))
            ds = ds.map_batches(ShardLoader, fn_constructor_kwargs={"job": job}, batch_size=1,
                                compute=ray.data.ActorPoolStrategy(size=loaders), num_cpus=cpus_per_loader)
            ds = ds.map_batches(TeacherRunner, fn_constructor_kwargs={"job": job}, batch_size=1,
                                # two shards per teacher: the next one is there when the current one is
                                # done, and a few large units still spread over all teacher actors
                                compute=ray.data.ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=2),
                                num_cpus=cpus_per_actor,
                                num_gpus=gpus_per_actor)
            ds = ds.map_batches(ShardWriter, fn_constructor_kwargs={"job": job, "threads": math.ceil(cpus_per_writer)},
                                batch_size=1,
                                compute=ray.data.ActorPoolStrategy(size=writers), num_cpus=cpus_per_writer)
            rows = list(ds.iter_rows())
    except ray.exceptions.GetTimeoutError as e:
        raise CacheError(f"cache {job.uri}: the cluster could not start {actors} teacher actors "
                         f"({cpus_per_actor} CPUs, {gpus_per_actor} GPUs each), {loaders} loaders and {writers} "
                         f"writers within {ACTOR_START_TIMEOUT_S} s; ask for fewer (--actors, --loaders, "
                         f"--writers) or smaller reservations") from e
    written = sorted(int(r["shard"]) for r in rows)
    if written != sorted(shards):
        raise CacheError(f"cache {job.uri}: the job wrote shards {written}, expected each of {sorted(shards)} once")
    return rows


def finalize(job: CacheJob) -> tuple[int, list[str]]:
    """Write the manifest from the markers and mark the cache complete; return (bytes, writer nodes)."""
    markers = store.read_markers(job.uri)
    layout = job.cache_layout
    missing = sorted(set(range(layout.num_shards)) - set(markers))
    if missing:
        raise CacheError(f"cache {job.uri}: {len(missing)} shards are still missing (e.g. {missing[:5]})")
    store.write_manifest(job.uri, store.manifest_table(markers.values(), layout.views))
    group = store.open_cache_group(job.uri, mode="r+")
    group.attrs["complete"] = True
    return sum(int(m["bytes"]) for m in markers.values()), sorted({m["node"] for m in markers.values()})


def storage_error(job: CacheJob, error: BaseException) -> CacheError | None:
    """A clear CacheError for a job that failed on storage (full, read-only, missing), else None."""
    storage_errnos = (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT)
    code, seen, cause = None, set(), error
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, OSError) and cause.errno in storage_errnos:
            code = cause.errno
            break
        cause = cause.__cause__ or cause.__context__ or getattr(cause, "cause", None)
    if code is None:
        # An error raised in an actor reaches the driver with its chain only as the remote traceback text.
        found = [int(n) for n in re.findall(r"OSError: \[Errno (\d+)\]", str(error))]
        code = next((n for n in found if n in storage_errnos), None)
    if code is None:
        return None
    done = len(store.read_markers(job.uri))
    return CacheError(f"cache {job.uri}: writing failed ({os.strerror(code)}) with {done} of "
                      f"{job.cache_layout.num_shards} shards complete; the complete shards are intact "
                      f"(--verify checks them): fix the storage and re-run the same command to finish")


def build_cache(teacher_path: str, dataroot: str, version: str, split: str, uri: str, views: int = 1,
                storage: str = "dense", dtype: str = "float16", shard_samples: int = 8, tile: int | None = None,
                compressor_name: str = store.DEFAULT_COMPRESSOR, overwrite: bool = False, actors: int = 1,
                use_gpu: bool = False, cpus_per_actor: float = 1.0, teacher_batch: int = 2,
                address: str | None = None, view_seed: int = DEFAULT_VIEW_SEED, loaders: int | None = None,
                writers: int | None = None, cpus_per_loader: float = 0.0,
                cpus_per_writer: float = 0.0) -> CacheSummary:
    """Run the teacher over a split once and store its targets (see the module docstring)."""
    start = time.perf_counter()
    job, fingerprint = plan_cache(teacher_path, dataroot, version, split, uri, views, storage, dtype,
                                  shard_samples, tile, view_seed)
    job = replace(job, teacher_batch=int(teacher_batch))
    try:
        done = prepare_store(job, fingerprint, compressor_name, overwrite)
    except OSError as e:
        raise CacheError(f"cache {uri}: cannot be created or opened for writing ({e})") from e
    layout = job.cache_layout
    todo = [s for s in range(layout.num_shards) if s not in done]
    if done:
        print(f"[cache] {len(done)} of {layout.num_shards} shards are already complete: skipping them", flush=True)
    if todo:
        print(f"[cache] writing {len(todo)} shards of {layout.shard_samples} samples x {layout.views} views "
              f"({storage}, {dtype}) to {uri}", flush=True)
        with ray_session(address):
            job = replace(job, index=share_index(job.index))
            try:
                run_pipeline(job, todo, actors=actors, gpus_per_actor=1.0 if use_gpu else 0.0,
                             cpus_per_actor=cpus_per_actor, loaders=loaders, writers=writers,
                             cpus_per_loader=cpus_per_loader, cpus_per_writer=cpus_per_writer)
            except Exception as e:  # noqa: BLE001 - Ray wraps worker errors; name the storage ones
                clear = storage_error(job, e)
                if clear is None:
                    raise
                raise clear from e
    total_bytes, nodes = finalize(job)
    summary = CacheSummary(uri=str(uri), samples=layout.num_samples, views=layout.views, shards=layout.num_shards,
                           shards_written=len(todo), shards_skipped=len(done), bytes=total_bytes,
                           seconds=time.perf_counter() - start, nodes=nodes)
    print("[cache] " + summary.format(), flush=True)
    return summary
