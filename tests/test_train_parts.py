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
from pipeline.engine.optim import build_optimizer, build_scheduler, clip_gradients, describe_lr, scaled_lr
from pipeline.engine.precise_bn import recompute_bn_stats
from pipeline.engine.run_log import MetricsLog, read_metrics


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


# Spec §4: the paper's lr at its global batch of 4 (4 GPUs x 1 sample): 2e-4 for camera detectors
# and camera students, 1e-3 for LiDAR and fusion detectors and LiDAR students.
PAPER_LR = {"nuscenes_lidar": 1e-3, "nuscenes_camera": 2e-4, "nuscenes_fusion": 1e-3,
            "nuscenes_lidar_to_camera": 2e-4, "nuscenes_fusion_to_camera": 2e-4,
            "nuscenes_camera_to_lidar": 1e-3, "nuscenes_fusion_to_lidar": 1e-3}


@pytest.mark.parametrize("preset", sorted(PAPER_LR))
def test_nuscenes_presets_give_the_papers_lr_at_its_global_batch(preset: str):
    tr = load_config(preset)["train"]
    assert tr["lr_scaling"] == "linear" and tr["lr_reference_batch"] == 4
    assert scaled_lr(tr, 4) == pytest.approx(PAPER_LR[preset])
    assert scaled_lr(tr, 1) == pytest.approx(PAPER_LR[preset] / 4)  # the default runtime: 1 worker x 1 sample
    assert scaled_lr(tr, 16) == pytest.approx(PAPER_LR[preset] * 4)


def test_describe_lr_states_the_scaled_lr_and_its_origin():
    tr = load_config("nuscenes_camera")["train"]
    assert describe_lr(tr, 4) == "lr 2.00e-04 for a global batch of 4 (given 2.00e-04 at batch 4, linear scaling)"
    assert describe_lr(tr, 8) == "lr 4.00e-04 for a global batch of 8 (given 2.00e-04 at batch 4, linear scaling)"
    tiny = load_config("tiny_camera")["train"]
    assert describe_lr(dict(tiny, lr=1e-2), 2) == "lr 1.00e-02 for a global batch of 2 (train.lr as given, lr_scaling none)"


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


def test_precise_bn_leaves_a_frozen_stem_alone():
    """A frozen ResNet stem's bn1 stays in eval mode, so its (ImageNet) statistics are kept, not reset."""
    from models.resnet import ResNet

    net = ResNet(18, base_width=8, frozen_stem=True)
    net.bn1.running_mean.fill_(0.3)
    net.bn1.running_var.fill_(2.0)
    layer1_mean = net.layer1[0].bn1.running_mean.clone()
    used = recompute_bn_stats(net.eval(), [torch.randn(2, 3, 32, 32) for _ in range(2)], lambda m, b: m(b), 2)
    assert used == 2 and not net.training
    assert torch.all(net.bn1.running_mean == 0.3) and torch.all(net.bn1.running_var == 2.0)
    assert net.bn1.momentum == 0.1 and not torch.equal(net.layer1[0].bn1.running_mean, layer1_mean)


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


# --- the ImageNet backbone the nuscenes camera and fusion presets require ------------------------
REQUIRE_IMAGENET = ("nuscenes_camera", "nuscenes_fusion", "nuscenes_lidar_to_camera", "nuscenes_fusion_to_camera")
TRAIN_FROM_SCRATCH = ("nuscenes_lidar", "nuscenes_camera_to_lidar", "nuscenes_fusion_to_lidar", "tiny_camera",
                      "tiny_fusion", "tiny_lidar_to_camera", "tiny_fusion_to_camera", "tiny_lidar")


def test_training_without_imagenet_weights_is_refused_where_the_preset_requires_them():
    from pipeline.config import ConfigError
    from pipeline.engine.trainer import check_pretrained_backbone

    for preset in REQUIRE_IMAGENET:
        with pytest.raises(ConfigError, match=r"model\.camera_encoder\.pretrained is not set.*"
                           r"--set model\.camera_encoder\.pretrained=PATH.*resnet50-0676ba61\.pth.*"
                           r"--set train\.require_pretrained_backbone=false"):
            check_pretrained_backbone(load_config(preset))
        check_pretrained_backbone(load_config(preset, ["model.camera_encoder.pretrained=/w/resnet50-0676ba61.pth"]))
        check_pretrained_backbone(load_config(preset, ["model.camera_encoder.pretrained=s3://b/resnet50.pth"]))
        check_pretrained_backbone(load_config(preset, ["train.require_pretrained_backbone=false"]))
    for preset in TRAIN_FROM_SCRATCH:  # LiDAR students, and the tiny presets (random init, as before)
        check_pretrained_backbone(load_config(preset))


def test_train_teacher_stage_refuses_before_anything_starts(tmp_path):
    """The refusal comes from pipeline.engine.trainer.fit before the dataset is read or Ray is started."""
    import contextlib
    import io

    from stages import train_teacher
    from stages._cli import run_main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = run_main(train_teacher.main, ["--config", "nuscenes_camera", "--dataroot", str(tmp_path / "no_data"),
                                             "--output", str(tmp_path / "run")])
    assert code == 2 and "--set model.camera_encoder.pretrained=PATH" in err.getvalue(), err.getvalue()
    assert not (tmp_path / "run").exists()


def test_stage_errors_bad_input_in_one_line_and_bugs_with_their_traceback(capsys):
    from models.checkpoint import CheckpointError
    from models.errors import UserError
    from pipeline.cache.schema import CacheError
    from pipeline.config import ConfigError
    from pipeline.data.nusc_db import DatasetError
    from stages._cli import run_main

    for error in (ConfigError, DatasetError, CacheError, CheckpointError, UserError, FileNotFoundError):
        def main(argv, error=error):
            raise error(f"bad {error.__name__}")
        assert run_main(main, []) == 2
        assert capsys.readouterr().err == f"error: bad {error.__name__}\n"
    for bug in (KeyError, ValueError, TypeError):  # a bug keeps its traceback, even a ValueError
        def main(argv, bug=bug):
            raise bug("a bug")
        with pytest.raises(bug):
            run_main(main, [])
