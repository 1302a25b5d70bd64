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

import errno
import os
import re
import time
from dataclasses import dataclass, replace

from pipeline.cache import store
from pipeline.cache.plan import CacheJob, CacheRequest, plan_cache, prepare_store
from pipeline.cache.ray_stages import run_pipeline
from pipeline.cache.schema import CacheError
from pipeline.data.index import share_index
from pipeline.ray_env import ray_session

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


def build_cache(request: CacheRequest) -> CacheSummary:
    """Run the teacher over a split once and store its targets (see the module docstring)."""
    r = request
    start = time.perf_counter()
    job, fingerprint = plan_cache(r.teacher_path, r.dataroot, r.version, r.split, r.uri, r.views, r.storage, r.dtype,
                                  r.shard_samples, r.tile, r.view_seed)
    job = replace(job, teacher_batch=int(r.teacher_batch))
    try:
        done = prepare_store(job, fingerprint, r.compressor_name, r.overwrite)
    except OSError as e:
        raise CacheError(f"cache {r.uri}: cannot be created or opened for writing ({e})") from e
    layout = job.cache_layout
    todo = [s for s in range(layout.num_shards) if s not in done]
    if done:
        print(f"[cache] {len(done)} of {layout.num_shards} shards are already complete: skipping them", flush=True)
    if todo:
        print(f"[cache] writing {len(todo)} shards of {layout.shard_samples} samples x {layout.views} views "
              f"({r.storage}, {r.dtype}) to {r.uri}", flush=True)
        with ray_session(r.address):
            job = replace(job, index=share_index(job.index))
            try:
                run_pipeline(job, todo, actors=r.actors, gpus_per_actor=1.0 if r.use_gpu else 0.0,
                             cpus_per_actor=r.cpus_per_actor, loaders=r.loaders, writers=r.writers,
                             cpus_per_loader=r.cpus_per_loader, cpus_per_writer=r.cpus_per_writer)
            except Exception as e:  # noqa: BLE001 - Ray wraps worker errors; name the storage ones
                clear = storage_error(job, e)
                if clear is None:
                    raise
                raise clear from e
    total_bytes, nodes = finalize(job)
    summary = CacheSummary(uri=str(r.uri), samples=layout.num_samples, views=layout.views, shards=layout.num_shards,
                           shards_written=len(todo), shards_skipped=len(done), bytes=total_bytes,
                           seconds=time.perf_counter() - start, nodes=nodes)
    print("[cache] " + summary.format(), flush=True)
    return summary
