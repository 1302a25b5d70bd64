"""The Ray Data stages of a caching job and the pipeline that chains them (see pipeline/cache/build.py):

    shard descriptors --ShardLoader (actor pool)--> the shard's un-augmented samples
                      --TeacherRunner (actor pool, GPU when asked)--> its encoded maps, all views
                      --ShardWriter (actor pool)--> Zarr shard objects, then the shard's marker
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
import pickle
import socket
import time
import warnings
from typing import Any, Iterator, Mapping

import numpy as np
import torch

from models.bev_grid import BEVGrid
from pipeline.cache import store
from pipeline.cache.keypoints import encode_keypoint_rows
from pipeline.cache.plan import CacheJob
from pipeline.cache.schema import CacheError
from pipeline.cache.views import foreground_tiles, tile_mask, view_matrices
from pipeline.config import ConfigError
from pipeline.data.collate import collate
from pipeline.data.dataset import DetectionDataset, augment_bev
from pipeline.data.loading import filter_gt
from pipeline.data.sample import Sample
from pipeline.engine.train_loop import to_device
from pipeline.evaluation.inference import eval_dataset
from pipeline.model_files import load_detector, read_model_file

@functools.lru_cache(maxsize=2)
def _inputs_dataset(teacher_path: str, dataroot: str, version: str, split: str, index: Any) -> DetectionDataset:
    """The teacher's un-augmented input samples of a split, built once per worker process."""
    cfg = read_model_file(teacher_path)["config"]
    return eval_dataset(cfg, dataroot, version, split, cfg["model"]["modality"], index)


def canonical_inputs(dataset: DetectionDataset, item: int) -> Sample:
    """The teacher's un-augmented input sample `item`, with every GT box its filter keeps, in range
    or not: each view then keeps the boxes inside the grid in *its* frame, as the student's own
    augmentation of the same sample does (a box just outside the range that a view turns inside
    is the student's GT in that view, so its keypoints and mask cells must be cached)."""
    sample = dataset.get(item, bda=np.eye(4))
    sample["gt_boxes"], sample["gt_labels"] = filter_gt(dataset.row(item), int(dataset.data_cfg["min_points_in_box"]))
    return sample


def load_shards(batch: Mapping[str, np.ndarray], job: CacheJob) -> dict[str, np.ndarray]:
    """Ray Data task: shard descriptors -> each shard's un-augmented teacher inputs (pickled samples)."""
    dataset = _inputs_dataset(job.teacher_path, job.dataroot, job.version, job.split, job.index)
    shards = [int(s) for s in batch["shard"]]
    payloads = []
    for shard in shards:
        samples = [canonical_inputs(dataset, i) for i in job.cache_layout.shard_samples_range(shard)]
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
    """Teacher outputs of a shard's rows -> stored arrays (foreground tiles only, or the keypoint
    rows, when asked)."""
    layout = job.cache_layout
    if job.storage == "keypoints":
        maps = {name: torch.cat([o[name] for o in outputs]) for name in ("low", "high", "heatmap", "regression")}
        return encode_keypoint_rows(maps, boxes, layout, grid, job.dtype)
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
              "checksums": store.shard_checksums(job.uri, shard, job.storage),
              "bytes": store.shard_bytes(job.uri, shard, job.storage),
              "node": _node_id(), "host": socket.gethostname(), "pid": os.getpid(),
              "teacher_pid": (teacher or {}).get("pid"), "teacher_node": (teacher or {}).get("node"),
              "teacher_seconds": (teacher or {}).get("seconds"), "write_seconds": time.perf_counter() - t0,
              "time": time.time()}
    store.write_marker(job.uri, shard, record)
    return record


def _node_id() -> str:
    """This process's Ray node, or "local" outside Ray (asking the runtime context of a process
    that is not connected would start a Ray instance of its own)."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"
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
        raise ConfigError(f"actors, loaders and writers must be >= 1, got {actors}, {loaders}, {writers}")
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
