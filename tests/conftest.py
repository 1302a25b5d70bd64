"""Shared fixtures: a small generated nuScenes-format dataset, made once per test session."""
from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

# The tests' Ray clusters authenticate with a token of the test session's own (generated here,
# mode 0600), never the developer's ~/.ray/auth_token; subprocesses inherit the path.
if not os.environ.get("RAY_AUTH_TOKEN") and not os.environ.get("RAY_AUTH_TOKEN_PATH"):
    _auth_dir = tempfile.mkdtemp(prefix="unidistill-ray-auth-")
    atexit.register(shutil.rmtree, _auth_dir, ignore_errors=True)
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(Path(_auth_dir) / "auth_token")
    from pipeline.ray_env import ensure_auth_token

    ensure_auth_token()

# Small enough to generate in seconds, big enough for the devkit's mini splits and evaluation:
# all 10 mini scenes, 3 key frames each, small images.
SMALL_DATASET = dict(samples_per_scene=3, seed=0, image_size=(320, 180))


@pytest.fixture(scope="session")
def nusc_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Dataroot of a generated v1.0-mini dataset (read-only for tests: copy before changing it)."""
    from pipeline.synthetic import generate

    root = tmp_path_factory.mktemp("nuscenes")
    generate(root, **SMALL_DATASET)
    return root


@pytest.fixture(scope="session")
def nusc(nusc_root: Path):
    """The devkit's NuScenes object over the generated dataset."""
    from nuscenes.nuscenes import NuScenes

    return NuScenes(version="v1.0-mini", dataroot=str(nusc_root), verbose=False)


REPO = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def deterministic_torch(seed: int, threads: int = 2) -> Iterator[None]:
    """Torch seeded, on `threads` intra-op threads, with deterministic algorithms, for a test that
    trains; the thread count, the determinism setting and the global RNG state are restored afterwards.

    On one kind of CPU such a test then computes the same numbers run after run, whatever the
    machine's core count (a reduction's rounding depends on how it is split over threads). Across
    CPUs (AVX2 or AVX-512 kernels round differently) a few hundred steps still diverge, so a bound
    reached by training must also hold with margin over seeds and thread counts.
    """
    import torch

    threads_before = torch.get_num_threads()
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    warn_only_before = torch.is_deterministic_algorithms_warn_only_enabled()
    rng_before = torch.get_rng_state()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(deterministic_before, warn_only=warn_only_before)
        torch.set_num_threads(threads_before)
        torch.set_rng_state(rng_before)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def committed_checkpoints(run: Path) -> list[str]:
    """Checkpoint folders Ray Train has committed for a run (from its checkpoint-manager snapshot)."""
    import json

    try:
        snapshot = json.loads((run / "checkpoint_manager_snapshot.json").read_text())
    except (FileNotFoundError, ValueError):  # not written yet, or being written
        return []
    return sorted(c["checkpoint_dir_name"] for c in snapshot.get("checkpoint_results", []))


def cluster_env(port: int) -> dict[str, str]:
    """Environment for cluster/local_cluster.sh and its drivers: a cluster whose GCS is on `port`,
    free dashboard and client ports, this venv first on PATH, no RAY_ADDRESS of another cluster."""
    import sys

    env = dict(os.environ, RAY_PORT=str(port), RAY_DASHBOARD_PORT=str(free_port()),
               RAY_CLIENT_PORT=str(free_port()), PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    env.pop("RAY_ADDRESS", None)
    return env


@contextlib.contextmanager
def local_cluster(*start_args: str) -> Iterator[dict]:
    """A Ray cluster on 127.0.0.1 started and stopped with the project's own script
    (cluster/local_cluster.sh start START_ARGS ... / stop), on free ports. Yields its `address`,
    the `dashboard` URL for `ray job submit`, and the `env` (without RAY_ADDRESS) that reaches it."""
    import subprocess

    port = free_port()
    env = cluster_env(port)
    dash = env["RAY_DASHBOARD_PORT"]
    script = str(REPO / "cluster" / "local_cluster.sh")
    try:
        started = subprocess.run([script, "start", *start_args], env=env, capture_output=True, text=True,
                                 timeout=240)
        assert started.returncode == 0, started.stdout + started.stderr
        yield {"address": f"127.0.0.1:{port}", "dashboard": f"http://127.0.0.1:{dash}", "env": env}
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        subprocess.run([script, "stop"], env=env, capture_output=True, timeout=120)


@pytest.fixture(scope="session")
def ray_cluster():
    """A Ray cluster on 127.0.0.1 for the whole test session (`local_cluster`). Stages in this process
    and in subprocesses join it through RAY_ADDRESS."""
    with local_cluster("--cpus", "4") as cluster:
        old = os.environ.get("RAY_ADDRESS")
        os.environ["RAY_ADDRESS"] = cluster["address"]
        try:
            yield cluster
        finally:
            if old is None:
                os.environ.pop("RAY_ADDRESS", None)
            else:
                os.environ["RAY_ADDRESS"] = old


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model file of the tiny LiDAR preset with seeded random weights (a stand-in teacher)."""
    import torch

    from models.detector import build_detector, save_detector
    from pipeline.config import load_config

    torch.manual_seed(0)
    cfg = load_config("tiny_lidar")
    path = tmp_path_factory.mktemp("teacher") / "model.pt"
    save_detector(path, build_detector(cfg).eval(), cfg)
    return path


@pytest.fixture(scope="session")
def caches(ray_cluster, tiny_teacher, nusc_root, tmp_path_factory):
    """Caches of `tiny_teacher` over generated mini_val (6 samples, shards of 2), built once per session:
    dense with 1 and 2 views, foreground and keypoint storage with 2 views. Tests that damage a cache
    work on a copy."""
    from pipeline.cache.build import build_cache
    from pipeline.cache.plan import CacheRequest

    root = tmp_path_factory.mktemp("caches")
    out = {}
    # fg2 with 8-cell tiles (the foreground default on this 64x64 grid is 32): they show foreground storage's saving.
    for name, kw in (("dense1", {}), ("dense2", {"views": 2}),
                     ("fg2", {"views": 2, "storage": "foreground", "tile": 8}),
                     ("kp2", {"views": 2, "storage": "keypoints"})):
        out[name] = (root / name, build_cache(CacheRequest(str(tiny_teacher), str(nusc_root), "v1.0-mini", "mini_val",
                                              str(root / name), shard_samples=2, cpus_per_actor=0.5, **kw)))
    return out
