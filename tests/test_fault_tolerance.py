"""Scale-out and faults, rehearsed on a local two-node Ray cluster (both nodes on 127.0.0.1):
caching spread over nodes, one devkit open for a whole cache job and training run on read-only
data, a node killed mid-job, a training worker killed mid-run, full or unwritable storage."""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from pipeline.cache import inspection
from pipeline.cache import store
from pipeline.cache.build import build_cache
from pipeline.cache.plan import CacheRequest
from pipeline.cache.reader import CacheReader
from pipeline.cache.schema import CacheError
from pipeline.data.nusc_db import OPEN_LOG_PREFIX

from tests.conftest import REPO, committed_checkpoints, local_cluster

VERSION, SPLIT = "v1.0-mini", "mini_val"


@pytest.fixture(scope="module")
def two_nodes():
    """A head node and one worker node, 2 CPUs each (cluster/local_cluster.sh)."""
    with local_cluster("--cpus", "2", "--workers", "1", "--worker-cpus", "2") as cluster:
        yield cluster


def raylet_pids(address: str) -> list[int]:
    """Raylet pids of the live nodes of a cluster, oldest (the head's) first."""
    # `import pipeline` first: it keeps Ray on loopback (a bare ray.init would rewrite 127.0.0.1).
    code = ("import json, pipeline, ray; ray.init(address='%s', log_to_driver=False); "
            "print(json.dumps([n['RayletSocketName'] for n in ray.nodes() if n['Alive']]))" % address)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    import json

    sockets = json.loads(out.stdout.strip().splitlines()[-1])
    pids = []
    for sock in sockets:
        found = subprocess.run(["pgrep", "-f", f"raylet --raylet_socket_name={sock}( |$)"],
                               capture_output=True, text=True).stdout.split()
        assert found, f"no raylet process for {sock}"
        pids.append(int(found[0]))
    return sorted(pids)


def train_worker_pids(address: str) -> list[int]:
    """Pids of the live Ray Train workers of a cluster, from Ray's state API."""
    code = ("import json, pipeline, ray; from ray.util.state import list_actors; "
            "ray.init(address='%s', log_to_driver=False); "
            "print(json.dumps([a.pid for a in list_actors(filters=[('class_name', '=', 'RayTrainWorker'), "
            "('state', '=', 'ALIVE')])]))" % address)
    # RAY_ADDRESS too: the state API finds its cluster there, not through ray.init (and the test session's own
    # cluster is in this process's RAY_ADDRESS).
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO,
                         env=dict(os.environ, RAY_ADDRESS=address))
    assert out.returncode == 0, out.stderr[-2000:]
    import json

    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_caching_spreads_over_two_nodes_and_matches_a_single_node_cache(two_nodes, caches, tiny_teacher, nusc_root,
                                                                        tmp_path):
    uri = tmp_path / "cache"
    # 1.5 CPUs per teacher actor: two actors cannot share a 2-CPU node, so each node runs one. Ray Data hands a
    # shard to the least busy actor and breaks ties in favour of the one that finished last, so the teachers
    # must be the bottleneck for both to get work: one loader per shard (all three load at once) and two views
    # per sample (twice the teacher work). The tiny teacher otherwise finishes a shard before the next arrives.
    summary = build_cache(CacheRequest(str(tiny_teacher), str(nusc_root), VERSION, SPLIT, str(uri), shard_samples=2, views=2,
                          actors=2, loaders=3, cpus_per_actor=1.5, address=two_nodes["address"]))
    markers = store.read_markers(str(uri))
    assert len({m["teacher_node"] for m in markers.values()}) == 2, "teacher actors ran on both nodes"
    assert len(summary.nodes) >= 1
    single = store.read_markers(str(caches["dense2"][0]))
    for shard, rec in markers.items():  # same bytes as the single-node cache, shard by shard
        assert rec["checksums"] == single[shard]["checksums"], shard
    assert CacheReader(str(uri)).fingerprint == CacheReader(str(caches["dense2"][0])).fingerprint


@pytest.mark.slow
def test_a_training_worker_killed_mid_run_resumes_from_its_checkpoint(two_nodes, caches, nusc_root, tmp_path):
    run = tmp_path / "student"
    epochs = 20
    args = [sys.executable, "stages/train_student.py", "--config", "tiny_lidar_to_camera", "--cache",
            str(caches["dense2"][0]), "--dataroot", str(nusc_root), "--split", SPLIT, "--output", str(run),
            "--set", f"train.epochs={epochs}", "--set", "train.batch_size=2", "--set", "runtime.loader_workers=0",
            "--set", "runtime.max_failures=2", "--address", two_nodes["address"]]
    log = tmp_path / "train.log"  # a file, not a pipe: nobody reads a pipe while the test polls
    proc = subprocess.Popen(args, cwd=REPO, env=two_nodes["env"], stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    workers = []  # this cluster's training workers (others may be training too), known before the first epoch ends
    while time.time() < deadline and not workers and proc.poll() is None:
        workers = train_worker_pids(two_nodes["address"])
    assert workers, "a training worker is running"
    # A checkpoint counts once Ray Train has committed it (its snapshot lists it), not when its folder appears.
    while time.time() < deadline and "epoch_0001" not in committed_checkpoints(run) and proc.poll() is None:
        time.sleep(0.05)
    if "epoch_0001" not in committed_checkpoints(run):
        proc.kill()
        pytest.fail(f"no checkpoint committed within 300 s (exit {proc.poll()}); the run's log ends:\n"
                    + log.read_text()[-6000:])
    for pid in workers:
        os.kill(int(pid), signal.SIGKILL)
    try:
        proc.wait(timeout=600)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the run did not finish within 600 s of its worker's death; its log ends:\n"
                    + log.read_text()[-6000:])
    out = log.read_text()
    assert proc.returncode == 0, out[-4000:]
    # Ray Train's helper actors found their own cluster among the several on this machine (RAY_ADDRESS in the
    # job's runtime_env, pipeline/ray_env.job_runtime_env).
    assert "Found multiple active Ray instances" not in out, out[-4000:]
    resumed = re.search(r"resuming from epoch (\d+)", out)
    assert resumed and int(resumed.group(1)) < epochs, \
        "the restarted worker group continued from a checkpoint:\n" + "\n".join(
            line for line in out.splitlines() if "[train]" in line or "rror" in line)[-6000:]
    from pipeline.engine.run_log import read_metrics

    steps = [r["step"] for r in read_metrics(run / "metrics.jsonl")]
    assert steps == list(range(1, epochs * 3 + 1)), "no step lost or repeated in the log"
    import torch

    assert torch.load(run / "model.pt", weights_only=False)["extra"]["epoch"] == epochs


@contextlib.contextmanager
def tmpfs(path: Path, size: str, purpose: str) -> Iterator[Path]:
    """A tmpfs of `size` mounted at `path` for the block (root only: the test is skipped where
    mounting is not allowed)."""
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs {purpose} here ({done.stderr.strip()}); needs root")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.fixture
def read_only_dataroot(nusc_root, tmp_path):
    """A copy of the generated dataroot on a tmpfs remounted read-only, as a cluster's shared dataset
    storage often is (root bypasses file modes, not a read-only mount)."""
    with tmpfs(tmp_path / "ro_nuscenes", "1g", "for a read-only dataroot") as mount:
        shutil.copytree(nusc_root, mount, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".index"))
        done = subprocess.run(["mount", "-o", "remount,ro", str(mount)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        yield mount


@pytest.mark.slow
def test_a_cache_job_and_a_two_worker_training_open_the_devkit_once_in_all(two_nodes, tiny_teacher,
                                                                          read_only_dataroot, tmp_path):
    """The issue-14 rehearsal: on a read-only dataroot, a caching job with three loaders and two
    teacher actors, then a training run of two workers (one per node), open the devkit exactly once
    in all: the first job's driver builds the index into its own cache folder and hands it to every
    actor, loader and worker; the second job's driver finds it there. Counted by the line every
    real open prints, which Ray forwards from every process of a job to its driver (dedup off)."""
    env = dict(two_nodes["env"], XDG_CACHE_HOME=str(tmp_path / "driver_cache"), RAY_DEDUP_LOGS="0")
    root = str(read_only_dataroot)
    jobs = {
        "cache": [sys.executable, "stages/cache_teacher.py", "--teacher", str(tiny_teacher), "--dataroot", root,
                  "--split", SPLIT, "--cache", str(tmp_path / "cache"), "--shard-samples", "2", "--loaders", "3",
                  "--actors", "2", "--cpus-per-actor", "1", "--views", "1", "--address", two_nodes["address"]],
        "train": [sys.executable, "stages/train_teacher.py", "--config", "tiny_lidar", "--dataroot", root,
                  "--split", SPLIT, "--output", str(tmp_path / "run"), "--set", "train.epochs=1",
                  "--set", "runtime.num_workers=2", "--set", "runtime.cpus_per_worker=2",
                  "--set", "runtime.loader_workers=1", "--address", two_nodes["address"]],
    }
    opens = []
    for name, args in jobs.items():
        done = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
        out = done.stdout + done.stderr
        assert done.returncode == 0, f"{name}: {out[-4000:]}"
        opens += [f"{name}: {line}" for line in out.splitlines() if OPEN_LOG_PREFIX in line]
        if name == "train":  # the workers' lines do reach this log (what makes the count complete)
            assert len(set(re.findall(r"RayTrainWorker pid=(\d+)", out))) == 2, out[-4000:]
    assert len(opens) == 1 and opens[0].startswith("cache: "), opens
    assert [p.name for p in (tmp_path / "driver_cache").rglob("*.parquet")] == [f"{VERSION}_{SPLIT}_sweeps10.parquet"]


@pytest.mark.slow
def test_a_node_killed_mid_job_and_the_job_completes(two_nodes, tiny_teacher, nusc_root, tmp_path):
    # The last test on `two_nodes`: it leaves the cluster with its worker node dead.
    uri = tmp_path / "cache"
    args = [sys.executable, "stages/cache_teacher.py", "--teacher", str(tiny_teacher), "--dataroot", str(nusc_root),
            "--split", SPLIT, "--cache", str(uri), "--shard-samples", "1", "--views", "3", "--teacher-batch", "1",
            "--actors", "2", "--cpus-per-actor", "1.5", "--address", two_nodes["address"]]
    raylets = raylet_pids(two_nodes["address"])
    assert len(raylets) == 2
    log = tmp_path / "cache.log"  # a file, not a pipe: nobody reads a pipe while the test polls
    proc = subprocess.Popen(args, cwd=REPO, env=two_nodes["env"], stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (uri / "zarr.json").exists() and store.read_markers(str(uri)):
            break
        time.sleep(0.2)
    os.kill(raylets[-1], signal.SIGKILL)  # the worker node dies with its teacher actor and tasks
    proc.wait(timeout=600)
    first_out = log.read_text()
    done_first = store.read_markers(str(uri))
    assert done_first, first_out[-3000:]
    if proc.returncode != 0:  # Ray did not recover the job by itself: the re-submitted one completes it
        again = subprocess.run([a for a in args if a not in ("--actors", "2")] + ["--actors", "1"], cwd=REPO,
                               env=two_nodes["env"], capture_output=True, text=True, timeout=600)
        assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
        assert f"{len(done_first)} of 6 shards are already complete" in again.stdout + again.stderr
        after = store.read_markers(str(uri))
        for shard, rec in done_first.items():
            assert after[shard]["time"] == rec["time"], "finished shards are not rewritten"
    report = inspection.verify(str(uri))
    assert report["ok"] == list(range(6)) and not report["bad"] and not report["missing"]


def test_an_unwritable_cache_location_is_a_clear_error(tiny_teacher, nusc_root, tmp_path):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the cache folder should go")
    with pytest.raises(CacheError, match="cannot be created or opened for writing"):
        build_cache(CacheRequest(str(tiny_teacher), str(nusc_root), VERSION, SPLIT, str(blocker / "cache")))


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MiB tmpfs to fill up."""
    with tmpfs(tmp_path / "small_disk", "3m", "to fill up") as mount:
        yield mount


@pytest.mark.slow
def test_a_full_disk_is_a_clear_error_and_finished_shards_stay_intact(small_disk, ray_cluster, tiny_teacher, nusc_root):
    uri = small_disk / "cache"
    with pytest.raises(CacheError, match=r"No space left on device\) with \d+ of 6 shards complete"):
        build_cache(CacheRequest(str(tiny_teacher), str(nusc_root), VERSION, SPLIT, str(uri), shard_samples=1, views=2,
                    cpus_per_actor=0.5))
    report = inspection.verify(str(uri))
    assert report["ok"] and not report["bad"], report
    assert report["missing"], "the job stopped part-way"
