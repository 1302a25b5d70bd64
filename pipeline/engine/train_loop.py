"""The per-worker training loop that Ray Train runs (TorchTrainer's `train_loop_per_worker`).

It is shared by every training stage: a *task* (built inside the worker by the factory named in
the loop config) says what is trained and how its loss is computed; the loop does the rest:
data-parallel loading, AdamW + schedule, AMP on GPU, gradient clipping, metrics, one checkpoint
per epoch through `ray.train.report`, and resuming from the run's latest checkpoint.

Loop config keys: cfg (resolved run config), dataroot, version, split, index (the split's index
in Ray's object store, pipeline.data.index.share_index), log_dir (local
folder for metrics on rank 0, or None), log_url (where to copy them after each epoch, or None),
build_task (callable(loop_config, device) -> TrainTask).
"""
from __future__ import annotations

import math
import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from pipeline import storage
from pipeline.data.collate import collate
from pipeline.data.nusc_db import DatasetError
from pipeline.engine.optim import build_optimizer, build_scheduler, clip_gradients, describe_lr, scaled_lr
from pipeline.engine.precise_bn import recompute_bn_stats
from pipeline.engine.run_log import METRICS_FILE, TENSORBOARD_DIR, MetricsLog

CHECKPOINT_STATE = "state.pt"
LossFn = Callable[[nn.Module, nn.ModuleDict, dict], dict]


@dataclass
class TrainTask:
    """What one training run optimises.

    Args:
        model: the detector being trained (exported at the end).
        dataset: training samples; must have `set_epoch(epoch)`.
        losses: (model, extra, batch) -> named scalar losses with the total under 'loss'; `model`
            may be wrapped in DistributedDataParallel (call it for the forward pass).
        extra: trainable modules used only by the losses (e.g. distillation adaptation layers):
            checkpointed for resume, never exported; their gradients are averaged over workers.
        collate_fn: batches the dataset's samples (default pipeline.data.collate.collate).
        worker_init_fn: run once in each DataLoader worker process (e.g. to cap a reader's threads).
    """

    model: nn.Module
    dataset: Dataset
    losses: LossFn
    extra: nn.ModuleDict = field(default_factory=nn.ModuleDict)
    collate_fn: Callable[[list], dict] = collate
    worker_init_fn: Callable[[int], None] | None = None


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; the message names the step and the components."""


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the module itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """Move a collated batch's tensors (also inside lists and nested dicts) to `device`."""
    out: dict[str, Any] = {}
    non_blocking = device.type == "cuda"
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            out[key] = value.to(device, non_blocking=non_blocking)
        elif isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
            out[key] = [v.to(device, non_blocking=non_blocking) for v in value]
        elif isinstance(value, Mapping):
            out[key] = to_device(value, device)
        else:
            out[key] = value
    return out


def average_gradients(module: nn.Module, world: int) -> None:
    """All-reduce (mean) the gradients of a module that DDP does not wrap."""
    if world <= 1:
        return
    import torch.distributed as dist

    for p in module.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad /= world


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _check_finite(losses: Mapping[str, torch.Tensor], epoch: int, step: int) -> None:
    total = losses["loss"]
    if torch.isfinite(total).all():
        return
    parts = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in losses.items())
    raise NonFiniteLossError(f"non-finite training loss at epoch {epoch + 1}, step {step}: {parts}. "
                             "Checkpoints of earlier epochs are kept; lower train.lr or check the input data.")


def _save_checkpoint(folder: Path, model: nn.Module, extra: nn.ModuleDict, optimizer: torch.optim.Optimizer,
                     scheduler: Any, scaler: torch.amp.GradScaler, epoch: int, step: int,
                     cfg: Mapping[str, Any]) -> None:
    torch.save({"model": unwrap(model).state_dict(), "extra": extra.state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(), "epoch": epoch, "step": step, "config": dict(cfg)},
               folder / CHECKPOINT_STATE)


def read_checkpoint_state(folder: str | Path) -> dict[str, Any]:
    """The state a training checkpoint folder holds (see `_save_checkpoint`)."""
    return torch.load(Path(folder) / CHECKPOINT_STATE, map_location="cpu", weights_only=False)


@dataclass
class _Run:
    """What one worker's loop holds between its steps."""

    model: nn.Module
    extra: nn.ModuleDict
    task: TrainTask
    sampler: DistributedSampler
    loader: DataLoader
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    device: torch.device
    use_amp: bool
    world: int
    batch_size: int
    step: int = 0
    start_epoch: int = 0


def _make_loader(task: TrainTask, config: Mapping[str, Any], world: int, rank: int,
                 device: torch.device) -> tuple[DistributedSampler, DataLoader]:
    """This worker's shard of the split (DistributedSampler) behind a DataLoader."""
    tr, rt = config["cfg"]["train"], config["cfg"]["runtime"]
    batch_size = int(tr["batch_size"])
    sampler = DistributedSampler(task.dataset, num_replicas=world, rank=rank, shuffle=True,
                                 seed=int(tr["seed"]), drop_last=True)
    loader_workers = int(rt["loader_workers"])
    loader = DataLoader(task.dataset, batch_size=batch_size, sampler=sampler, collate_fn=task.collate_fn,
                        num_workers=loader_workers, pin_memory=device.type == "cuda", drop_last=True,
                        prefetch_factor=2 if loader_workers else None, persistent_workers=False,
                        worker_init_fn=task.worker_init_fn)
    if len(loader) == 0:
        raise DatasetError(f"split {config['split']!r} has {len(task.dataset)} samples: too few for "
                           f"{world} workers x batch {batch_size}")
    return sampler, loader


def _restore(run: _Run, checkpoint: Any) -> None:
    """Continue from the run's latest checkpoint (weights, optimiser, schedule, scaler, epoch, step)."""
    with checkpoint.as_directory() as folder:
        state = read_checkpoint_state(folder)
    unwrap(run.model).load_state_dict(state["model"])
    run.extra.load_state_dict(state["extra"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.scaler.load_state_dict(state["scaler"])
    run.start_epoch, run.step = int(state["epoch"]), int(state["step"])


def _train_epoch(run: _Run, epoch: int, grad_clip: float, log: MetricsLog | None) -> dict[str, float]:
    """One pass over this worker's shard; returns the epoch's metrics (mean losses, throughput)."""
    run.sampler.set_epoch(epoch)
    run.task.dataset.set_epoch(epoch)
    run.model.train()
    sums: dict[str, float] = {}
    epoch_wait = epoch_time = 0.0
    n = 0
    samples = run.batch_size * run.world
    t_end = time.perf_counter()
    for batch in run.loader:
        t_data = time.perf_counter()
        batch = to_device(batch, run.device)
        with torch.autocast(run.device.type, enabled=run.use_amp):
            losses = run.task.losses(run.model, run.extra, batch)
        run.step += 1
        _check_finite(losses, epoch, run.step)
        run.optimizer.zero_grad(set_to_none=True)
        run.scaler.scale(losses["loss"]).backward()
        average_gradients(run.extra, run.world)
        run.scaler.unscale_(run.optimizer)
        grad_norm = clip_gradients([unwrap(run.model), run.extra], grad_clip)
        run.scaler.step(run.optimizer)
        run.scaler.update()
        run.scheduler.step()
        t_done = time.perf_counter()
        wait, total = t_data - t_end, t_done - t_end
        t_end = t_done
        epoch_wait += wait
        epoch_time += total
        n += 1
        values = {f"loss/{k}" if k != "loss" else "loss": float(v.detach()) for k, v in losses.items()}
        for k, v in values.items():
            sums[k] = sums.get(k, 0.0) + v
        if log is not None:
            log.log(run.step, {"epoch": epoch + 1, **values, "lr": run.optimizer.param_groups[0]["lr"],
                               "grad_norm": grad_norm, "samples_per_s": samples / total,
                               "data_wait_frac": wait / total})
    return {"epoch": epoch + 1, "step": run.step, **{k: v / max(n, 1) for k, v in sums.items()},
            "samples_per_s": n * samples / max(epoch_time, 1e-9),
            "data_wait_frac": epoch_wait / max(epoch_time, 1e-9)}


def _end_epoch(run: _Run, config: Mapping[str, Any], epoch: int, metrics: dict[str, float], rank: int,
               log: MetricsLog | None, log_dir: str | None) -> None:
    """Report an epoch: its log line and metrics upload, precise BN after the last one, and the
    checkpoint handed to Ray Train."""
    import ray.train

    cfg, tr = config["cfg"], config["cfg"]["train"]
    epochs = int(tr["epochs"])
    if log is not None:
        print(f"[train] epoch {epoch + 1}/{epochs} done: loss {metrics.get('loss', float('nan')):.4f}, "
              f"{metrics['samples_per_s']:.2f} samples/s, data wait {100 * metrics['data_wait_frac']:.0f}%",
              flush=True)
        if config.get("log_url"):
            storage.upload(Path(log_dir) / METRICS_FILE, storage.join(config["log_url"], METRICS_FILE))
            storage.upload(Path(log_dir) / TENSORBOARD_DIR, storage.join(config["log_url"], TENSORBOARD_DIR))
    if epoch + 1 == epochs and int(tr["precise_bn_batches"]) > 0:
        used = recompute_bn_stats(unwrap(run.model), (to_device(b, run.device) for b in run.loader),
                                  lambda m, b: m(b), int(tr["precise_bn_batches"]))
        if log is not None:
            print(f"[train] BatchNorm statistics re-estimated over {used} batches of the final weights",
                  flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = None
        if rank == 0:
            _save_checkpoint(Path(tmp), run.model, run.extra, run.optimizer, run.scheduler, run.scaler, epoch + 1,
                             run.step, cfg)
            ckpt = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=f"epoch_{epoch + 1:04d}")


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker entry point (see module docstring): build, restore, then train and report
    epoch by epoch."""
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    tr, rt = config["cfg"]["train"], config["cfg"]["runtime"]
    threads = int(rt["torch_threads"]) or max(1, int(math.ceil(float(rt["cpus_per_worker"]))))
    torch.set_num_threads(threads)
    seed_everything(int(tr["seed"]) + rank)
    device = ray.train.torch.get_device()

    task: TrainTask = config["build_task"](config, device)
    model = task.model.to(device)
    if world > 1 and device.type == "cuda" and tr["sync_bn"]:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = ray.train.torch.prepare_model(model, parallel_strategy="ddp")
    extra = task.extra.to(device)
    sampler, loader = _make_loader(task, config, world, rank, device)
    batch_size = int(tr["batch_size"])
    lr = scaled_lr(tr, batch_size * world)
    optimizer = build_optimizer(list(model.parameters()) + list(extra.parameters()), tr, lr)
    use_amp = bool(tr["amp"]) and device.type == "cuda"
    run = _Run(model, extra, task, sampler, loader, optimizer, build_scheduler(optimizer, tr, lr, len(loader)),
               torch.amp.GradScaler("cuda", enabled=use_amp), device, use_amp, world, batch_size)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        _restore(run, checkpoint)

    log = None
    log_dir = config.get("log_dir") or (tempfile.mkdtemp(prefix="run_log_") if config.get("log_url") else None)
    if rank == 0 and log_dir:
        log = MetricsLog(log_dir, resume_step=run.step, print_every=int(tr["log_every"]), prefix="[train] ")
        where = "resuming from epoch %d (step %d)" % (run.start_epoch, run.step) if checkpoint else "starting"
        print(f"[train] {where}: {world} worker(s) on {device}, {len(loader)} steps/epoch, "
              f"global batch {batch_size * world}", flush=True)
        print(f"[train] {describe_lr(tr, batch_size * world)}", flush=True)

    for epoch in range(run.start_epoch, int(tr["epochs"])):
        metrics = _train_epoch(run, epoch, float(tr["grad_clip"]), log)
        _end_epoch(run, config, epoch, metrics, rank, log, log_dir)
    if log is not None:
        log.close()
