"""train_teacher.py and evaluate.py as Ray jobs on a loopback cluster: train, export, evaluate,
resume, and bad input refused with clear messages."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.engine.run_log import read_metrics

from tests.conftest import REPO, committed_checkpoints

TRAIN = ["--config", "tiny_lidar", "--set", "train.batch_size=2", "--set", "runtime.loader_workers=1"]


def ray_job(cluster: dict, args: list[str], timeout: int = 600, wait: bool = True) -> subprocess.CompletedProcess:
    """`ray job submit` of `python ARGS` to the test cluster, under a timeout (DESIGN §5)."""
    ray = str(Path(sys.executable).parent / "ray")
    cmd = ["timeout", str(timeout), ray, "job", "submit", "--address", cluster["dashboard"], "--working-dir", str(REPO)]
    if not wait:
        cmd.append("--no-wait")
    cmd += ["--", "python", *args]
    return subprocess.run(cmd, cwd=REPO, env=cluster["env"], capture_output=True, text=True, timeout=timeout + 30)


def job_id(submit_output: str) -> str:
    for line in submit_output.splitlines():
        if "submitted successfully" in line and "'" in line:
            return line.split("'")[1]
    raise AssertionError(f"no job id in: {submit_output}")


@pytest.fixture(scope="module")
def trained(ray_cluster, nusc_root, tmp_path_factory):
    """A tiny LiDAR detector trained for one epoch by a `ray job submit`ted train_teacher.py."""
    run = tmp_path_factory.mktemp("runs") / "lidar"
    done = ray_job(ray_cluster, ["stages/train_teacher.py", *TRAIN, "--set", "train.epochs=1",
                                 "--dataroot", str(nusc_root), "--output", str(run)])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return run


@pytest.mark.slow
def test_job_trains_exports_and_evaluates(ray_cluster, trained, nusc_root, tmp_path):
    assert (trained / "model.pt").is_file() and (trained / "config.yaml").is_file()
    records = read_metrics(trained / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, len(records) + 1)) and len(records) == 12
    for key in ("loss", "loss/heatmap", "lr", "samples_per_s", "data_wait_frac", "grad_norm"):
        assert key in records[0], key
    assert (trained / "tensorboard").is_dir()
    out = tmp_path / "eval"
    done = ray_job(ray_cluster, ["stages/evaluate.py", "--checkpoint", str(trained / "model.pt"), "--dataroot",
                                 str(nusc_root), "--split", "mini_val", "--output", str(out)])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((out / "metrics_summary.json").read_text())
    assert {"mean_ap", "nd_score", "tp_errors", "mean_dist_aps"} <= set(summary)
    results = json.loads((out / "nuscenes_results.json").read_text())
    assert len(results["results"]) == 6 and results["meta"]["use_lidar"] and not results["meta"]["use_camera"]
    assert "mAP:" in (out / "metrics_table.txt").read_text()
    assert len(list((out / "bev").glob("*.png"))) == 4 and (out / "plots").is_dir()


@pytest.mark.slow
def test_evaluating_the_same_model_twice_gives_identical_metrics(ray_cluster, trained, nusc_root, tmp_path):
    from pipeline.evaluation.model_eval import evaluate_model

    a = evaluate_model(trained / "model.pt", nusc_root, "v1.0-mini", "mini_val", tmp_path / "a", render=False)
    b = evaluate_model(trained / "model.pt", nusc_root, "v1.0-mini", "mini_val", tmp_path / "b", render=False)
    for s in (a, b):
        s.pop("eval_time", None)
        s.pop("meta", None)
    assert a == b
    assert (tmp_path / "a" / "nuscenes_results.json").read_bytes() == (tmp_path / "b" / "nuscenes_results.json").read_bytes()


@pytest.mark.slow
def test_resubmitted_run_resumes_from_its_last_checkpoint(ray_cluster, nusc_root, tmp_path):
    run = tmp_path / "run"
    epochs = 5
    args = ["stages/train_teacher.py", *TRAIN, "--set", f"train.epochs={epochs}", "--dataroot", str(nusc_root),
            "--output", str(run)]
    first = ray_job(ray_cluster, args, wait=False)
    assert first.returncode == 0, first.stdout + first.stderr
    deadline = time.time() + 300
    while time.time() < deadline and not committed_checkpoints(run):  # committed, not merely a folder
        time.sleep(0.5)
    ray = str(Path(sys.executable).parent / "ray")
    stop = subprocess.run([ray, "job", "stop", "--address", ray_cluster["dashboard"], job_id(first.stdout)],
                          env=ray_cluster["env"], capture_output=True, text=True, timeout=120)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    stopped_at = int(committed_checkpoints(run)[-1].split("_")[1])  # what a re-submitted run resumes from
    assert stopped_at < epochs, "the first job was stopped part-way"
    steps_done = 12 * stopped_at

    second = ray_job(ray_cluster, args)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert f"resuming from epoch {stopped_at} (step {steps_done})" in second.stdout + second.stderr
    steps = [r["step"] for r in read_metrics(run / "metrics.jsonl")]
    assert steps == list(range(1, epochs * 12 + 1)), "the log reads as one run, no step lost or repeated"
    import torch

    state = torch.load(run / "model.pt", weights_only=False)
    assert state["extra"]["epoch"] == epochs and state["extra"]["step"] == epochs * 12


def run_stage(module: str, args: list[str]) -> tuple[int, str]:
    """Run a stage's main in this process: (exit status, error output)."""
    import contextlib
    import importlib
    import io

    from stages._cli import run_main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = run_main(importlib.import_module(f"stages.{module}").main, args)
    return code, err.getvalue()


def test_bad_input_fails_fast_with_a_clear_message(nusc_root, tiny_teacher, tmp_path):
    common = ["--dataroot", str(nusc_root), "--output", str(tmp_path / "r")]
    code, err = run_stage("train_teacher", ["--config", "tiny_lidar", "--set", "train.epochz=3", *common])
    assert code == 2 and "unknown key 'epochz' under train" in err
    code, err = run_stage("train_teacher", ["--config", "tiny_lidar", "--split", "train", *common])
    assert code == 2 and "split 'train' is not valid for nuScenes v1.0-mini" in err
    code, err = run_stage("train_teacher", ["--config", "tiny_lidar", "--version", "v1.0-trainval", *common])
    assert code == 2 and "has no 'v1.0-trainval' folder" in err
    code, err = run_stage("evaluate", ["--checkpoint", str(tmp_path / "none.pt"), "--dataroot", str(nusc_root),
                                       "--output", str(tmp_path / "e")])
    assert code == 2 and "none.pt: not found" in err
    code, err = run_stage("evaluate", ["--checkpoint", str(tiny_teacher), "--config", "nuscenes_lidar",
                                       "--dataroot", str(nusc_root), "--output", str(tmp_path / "e")])
    assert code == 2 and "was not built with config 'nuscenes_lidar'" in err and "grid.voxel_size" in err
    assert not (tmp_path / "r").exists(), "nothing is written for refused input"


@pytest.mark.slow
def test_workers_and_loaders_read_the_drivers_index_and_never_build_one(ray_cluster, nusc_root, tiny_teacher,
                                                                         tmp_path, monkeypatch):
    """A dataroot the driver cannot write (as on a cluster's shared read-only storage): the driver
    builds the index into its own cache folder, and the cache job's loaders and the training
    workers take it from the object store. Were they to build it themselves, each would open the
    devkit and, finding this dataroot writable, leave an index under DATAROOT/.index."""
    import shutil

    from pipeline.data import index as index_mod
    from pipeline.cache.build import build_cache
    from pipeline.cache.plan import CacheRequest
    from pipeline.config import load_config
    from pipeline.engine.detection_task import detection_task
    from pipeline.engine.trainer import fit

    root = tmp_path / "nuscenes"
    shutil.copytree(nusc_root, root, ignore=shutil.ignore_patterns(".index"))
    driver_cache = tmp_path / "driver_cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(driver_cache))  # this process only: the workers run elsewhere
    monkeypatch.setattr(index_mod, "_writable", lambda folder: False)
    build_cache(CacheRequest(str(tiny_teacher), str(root), "v1.0-mini", "mini_val", str(tmp_path / "cache"), shard_samples=2,
                loaders=2))
    cfg = load_config("tiny_lidar", ["train.epochs=1", "train.batch_size=2", "runtime.loader_workers=1"])
    fit(cfg, str(root), "v1.0-mini", "mini_val", str(tmp_path / "run"), detection_task)
    assert not (root / ".index").exists(), "no worker, actor or loader built an index of its own"
    assert [p.name for p in driver_cache.rglob("*.parquet")] == ["v1.0-mini_mini_val_sweeps10.parquet"]


@pytest.fixture(scope="module")
def test_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated v1.0-test dataroot: 2 scenes of the devkit's test list, 2 key frames each, no annotations."""
    from pipeline.synthetic import generate

    root = tmp_path_factory.mktemp("v1.0-test")
    generate(root, samples_per_scene=2, image_size=(320, 180), version="v1.0-test", scenes=2)
    return root


@pytest.mark.slow
def test_the_test_split_gets_a_submission_file_and_no_training(ray_cluster, tiny_teacher, test_root, tmp_path):
    """v1.0-test (annotations withheld): evaluate writes the results JSON for every test sample and no
    metrics; training on it is refused before anything is written."""
    from pipeline.data.index import load_index

    from nuscenes.utils.splits import create_splits_scenes

    rows = load_index(test_root, "v1.0-test", "test")
    assert len(rows) == 4 and all(r["gt_boxes"].shape == (0, 9) for r in rows)
    assert sorted({r["scene_name"] for r in rows}) == sorted(create_splits_scenes()["test"][:2])
    out = tmp_path / "eval"
    code, err = run_stage("evaluate", ["--checkpoint", str(tiny_teacher), "--dataroot", str(test_root),
                                       "--version", "v1.0-test", "--output", str(out), "--no-render"])
    assert code == 0, err[-3000:]
    results = json.loads((out / "nuscenes_results.json").read_text())
    assert set(results["results"]) == {r["token"] for r in rows}
    assert results["meta"]["use_lidar"] and not (out / "metrics_summary.json").exists()
    code, err = run_stage("train_teacher", ["--config", "tiny_lidar", "--dataroot", str(test_root), "--version",
                                            "v1.0-test", "--output", str(tmp_path / "run")])
    assert code == 2 and "v1.0-test has no annotated training split" in err
    code, err = run_stage("train_teacher", ["--config", "tiny_lidar", "--dataroot", str(test_root), "--version",
                                            "v1.0-test", "--split", "test", "--output", str(tmp_path / "run")])
    assert code == 2 and "no annotations" in err
    assert not (tmp_path / "run").exists()
