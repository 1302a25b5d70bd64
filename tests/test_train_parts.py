"""Parts of the training machinery that need no Ray: schedule, LR scaling, clipping, precise BN,
the metrics log, storage paths, config comparison."""
from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from pipeline import storage
from pipeline.config import diff_keys, load_config
from pipeline.optim import build_optimizer, build_scheduler, clip_gradients, scaled_lr
from pipeline.precise_bn import recompute_bn_stats
from pipeline.run_log import MetricsLog, read_metrics


def test_lr_scaling_and_one_cycle_schedule():
    tr = load_config("nuscenes_lidar")["train"]  # linear scaling (the tiny presets' lr is used unscaled)
    assert tr["lr_scaling"] == "linear" and load_config("tiny_lidar")["train"]["lr_scaling"] == "none"
    assert scaled_lr(tr, 4) == pytest.approx(tr["lr"])
    assert scaled_lr(tr, 8) == pytest.approx(2 * tr["lr"])
    assert scaled_lr(dict(tr, lr_scaling="none"), 8) == pytest.approx(tr["lr"])
    model = nn.Linear(2, 2)
    lr = 1e-3
    opt = build_optimizer(model.parameters(), dict(tr, epochs=10), lr)
    sched = build_scheduler(opt, dict(tr, epochs=10), lr, steps_per_epoch=10)
    lrs, betas = [], []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        betas.append(opt.param_groups[0]["betas"][0])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(lr / tr["div_factor"])  # warm-up from lr / 10
    assert max(lrs) == pytest.approx(lr, rel=1e-3) and lrs.index(max(lrs)) == 39  # peak at 40 % of the run
    assert lrs[-1] < lr / tr["div_factor"] / 100  # annealed towards lr / 10 / 1e4
    assert betas[0] == pytest.approx(0.95) and min(betas) == pytest.approx(0.85, abs=1e-3)  # beta1 cycles
    step_cfg = dict(tr, schedule="step", epochs=20, step_epochs=[10, 15], step_gamma=0.1)
    opt = build_optimizer(model.parameters(), step_cfg, lr)
    sched = build_scheduler(opt, step_cfg, lr, steps_per_epoch=3)
    seen = []
    for _ in range(60):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen[29] == pytest.approx(lr) and seen[30] == pytest.approx(lr * 0.1) and seen[45] == pytest.approx(lr * 0.01)
    with pytest.raises(ValueError, match="train.schedule"):
        build_scheduler(opt, dict(tr, schedule="cosine"), lr, 3)


def test_clip_gradients_returns_the_norm_before_clipping():
    a, b = nn.Linear(3, 1, bias=False), nn.Linear(4, 1, bias=False)
    for m, v in ((a, 3.0), (b, 4.0)):
        m.weight.grad = torch.zeros_like(m.weight)
        m.weight.grad.view(-1)[0] = v
    assert clip_gradients([a, b], 0.5) == pytest.approx(5.0)
    total = math.sqrt(float(a.weight.grad.norm()) ** 2 + float(b.weight.grad.norm()) ** 2)
    assert total == pytest.approx(0.5, rel=1e-4)


def test_precise_bn_replaces_stale_running_statistics():
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3, momentum=0.01))
    model[1].running_mean.fill_(50.0)  # the stale statistics of a short run
    batches = [torch.randn(16, 3) + 2.0 for _ in range(6)]
    used = recompute_bn_stats(model, batches, lambda m, b: m(b), num_batches=4)
    assert used == 4 and model[1].momentum == 0.01
    want = torch.stack([model[0](b).mean(0) for b in batches[:4]]).mean(0)
    torch.testing.assert_close(model[1].running_mean, want.detach(), rtol=1e-5, atol=1e-5)


def test_metrics_log_truncates_steps_after_a_resume(tmp_path):
    log = MetricsLog(tmp_path, print_every=1000)
    for step in range(1, 11):
        log.log(step, {"epoch": 1 + (step - 1) // 5, "loss": 1.0 / step})
    log.close()
    log = MetricsLog(tmp_path, resume_step=5, print_every=1000)  # the run restarts from its step-5 checkpoint
    log.log(6, {"epoch": 2, "loss": 0.5})
    log.close()
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
    assert (tmp_path / "tensorboard").is_dir()


def test_storage_paths_for_local_folders_and_urls(tmp_path):
    assert storage.parent_and_name(tmp_path / "runs" / "a") == (str(tmp_path / "runs"), "a")
    assert storage.parent_and_name("s3://bucket/runs/a?endpoint_override=x") == ("s3://bucket/runs?endpoint_override=x", "a")
    assert storage.join("s3://b/runs?scheme=http", "a", "model.pt") == "s3://b/runs/a/model.pt?scheme=http"
    with pytest.raises(ValueError, match="needs a bucket and a folder"):
        storage.parent_and_name("s3://bucket")
    storage.write_bytes(tmp_path / "x" / "f.json", json.dumps({"a": 1}).encode())
    assert storage.exists(tmp_path / "x" / "f.json") and json.loads(storage.read_bytes(tmp_path / "x" / "f.json")) == {"a": 1}
    blob = np.random.default_rng(0).bytes(10_000)  # hashed in blocks smaller than the file, and a partial last one
    storage.write_bytes(tmp_path / "blob", blob)
    assert storage.sha256(tmp_path / "blob", block=4096) == hashlib.sha256(blob).hexdigest()


def test_diff_keys_names_nested_differences():
    a = load_config("tiny_lidar")
    b = load_config("tiny_lidar", ["train.lr=0.5", "grid.voxel_size=[0.1, 0.1, 0.2]"])
    assert diff_keys(a, b) == ["grid.voxel_size", "train.lr"]
