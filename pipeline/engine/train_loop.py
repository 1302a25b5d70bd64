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


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker entry point (see module docstring)."""
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg, tr, rt = config["cfg"], config["cfg"]["train"], config["cfg"]["runtime"]
    threads = int(rt["torch_threads"]) or max(1, int(math.ceil(float(rt["cpus_per_worker"]))))
    torch.set_num_threads(threads)
    seed_everything(int(tr["seed"]) + rank)
    device = ray.train.torch.get_device()
    use_amp = bool(tr["amp"]) and device.type == "cuda"

    task: TrainTask = config["build_task"](config, device)
    model = task.model.to(device)
    if world > 1 and device.type == "cuda" and tr["sync_bn"]:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = ray.train.torch.prepare_model(model, parallel_strategy="ddp")
    extra = task.extra.to(device)

    batch_size = int(tr["batch_size"])
    sampler = DistributedSampler(task.dataset, num_replicas=world, rank=rank, shuffle=True,
                                 seed=int(tr["seed"]), drop_last=True)
    loader_workers = int(rt["loader_workers"])
    loader = DataLoader(task.dataset, batch_size=batch_size, sampler=sampler, collate_fn=task.collate_fn,
                        num_workers=loader_workers, pin_memory=device.type == "cuda", drop_last=True,
                        prefetch_factor=2 if loader_workers else None, persistent_workers=False,
                        worker_init_fn=task.worker_init_fn)
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise DatasetError(f"split {config['split']!r} has {len(task.dataset)} samples: too few for "
                         f"{world} workers x batch {batch_size}")
    lr = scaled_lr(tr, batch_size * world)
    optimizer = build_optimizer(list(model.parameters()) + list(extra.parameters()), tr, lr)
    scheduler = build_scheduler(optimizer, tr, lr, steps_per_epoch)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    start_epoch, step = 0, 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = read_checkpoint_state(folder)
        unwrap(model).load_state_dict(state["model"])
        extra.load_state_dict(state["extra"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, step = int(state["epoch"]), int(state["step"])

    log = None
    log_dir = config.get("log_dir") or (tempfile.mkdtemp(prefix="run_log_") if config.get("log_url") else None)
    if rank == 0 and log_dir:
        log = MetricsLog(log_dir, resume_step=step, print_every=int(tr["log_every"]), prefix="[train] ")
        where = "resuming from epoch %d (step %d)" % (start_epoch, step) if checkpoint else "starting"
        print(f"[train] {where}: {world} worker(s) on {device}, {steps_per_epoch} steps/epoch, "
              f"global batch {batch_size * world}", flush=True)
        print(f"[train] {describe_lr(tr, batch_size * world)}", flush=True)

    epochs = int(tr["epochs"])
    for epoch in range(start_epoch, epochs):
        sampler.set_epoch(epoch)
        task.dataset.set_epoch(epoch)
        model.train()
        sums: dict[str, float] = {}
        epoch_wait = epoch_time = 0.0
        n = 0
        t_end = time.perf_counter()
        for batch in loader:
            t_data = time.perf_counter()
            batch = to_device(batch, device)
            with torch.autocast(device.type, enabled=use_amp):
                losses = task.losses(model, extra, batch)
            step += 1
            _check_finite(losses, epoch, step)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(losses["loss"]).backward()
            average_gradients(extra, world)
            scaler.unscale_(optimizer)
            grad_norm = clip_gradients([unwrap(model), extra], float(tr["grad_clip"]))
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
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
                log.log(step, {"epoch": epoch + 1, **values, "lr": optimizer.param_groups[0]["lr"],
                               "grad_norm": grad_norm, "samples_per_s": batch_size * world / total,
                               "data_wait_frac": wait / total})

        metrics = {"epoch": epoch + 1, "step": step, **{k: v / max(n, 1) for k, v in sums.items()},
                   "samples_per_s": n * batch_size * world / max(epoch_time, 1e-9),
                   "data_wait_frac": epoch_wait / max(epoch_time, 1e-9)}
        if log is not None:
            print(f"[train] epoch {epoch + 1}/{epochs} done: loss {metrics.get('loss', float('nan')):.4f}, "
                  f"{metrics['samples_per_s']:.2f} samples/s, data wait {100 * metrics['data_wait_frac']:.0f}%",
                  flush=True)
            if config.get("log_url"):
                storage.upload(Path(log_dir) / METRICS_FILE, storage.join(config["log_url"], METRICS_FILE))
                storage.upload(Path(log_dir) / TENSORBOARD_DIR, storage.join(config["log_url"], TENSORBOARD_DIR))
        if epoch + 1 == epochs and int(tr["precise_bn_batches"]) > 0:
            used = recompute_bn_stats(unwrap(model), (to_device(b, device) for b in loader),
                                      lambda m, b: m(b), int(tr["precise_bn_batches"]))
            if log is not None:
                print(f"[train] BatchNorm statistics re-estimated over {used} batches of the final weights",
                      flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                _save_checkpoint(Path(tmp), model, extra, optimizer, scheduler, scaler, epoch + 1, step, cfg)
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=f"epoch_{epoch + 1:04d}")
    if log is not None:
        log.close()
