"""Optimiser and learning-rate schedule of the training recipe (spec §4, config section `train`).

AdamW with decoupled weight decay (applied to every parameter, BN included, as the v1.0 engine
did), and either the v1.0 per-iteration one-cycle schedule (cosine warm-up from lr/div_factor to
lr over pct_start of the run with beta1 going 0.95 -> 0.85, then cosine down to
lr/div_factor/final_div_factor with beta1 back to 0.95) or the Lightning port's step schedule.
Both schedules step once per iteration so that resuming mid-run restores them exactly.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn

from pipeline.config import ConfigError

SCHEDULES = ("onecycle", "step")
LR_SCALING = ("linear", "none")


def scaled_lr(train_cfg: Mapping[str, Any], global_batch: int) -> float:
    """The peak learning rate for `global_batch` samples per step under the config's scaling rule."""
    rule = train_cfg["lr_scaling"]
    if rule not in LR_SCALING:
        raise ConfigError(f"train.lr_scaling: {rule!r} is not one of {LR_SCALING}")
    lr = float(train_cfg["lr"])
    if rule == "linear":
        lr *= global_batch / float(train_cfg["lr_reference_batch"])
    return lr


def describe_lr(train_cfg: Mapping[str, Any], global_batch: int) -> str:
    """One line saying the peak lr a run uses and where it comes from, e.g.
    'lr 2.00e-04 for a global batch of 4 (given 2.00e-04 at batch 4, linear scaling)'."""
    lr = scaled_lr(train_cfg, global_batch)
    given = float(train_cfg["lr"])
    if train_cfg["lr_scaling"] == "linear":
        how = f"given {given:.2e} at batch {int(train_cfg['lr_reference_batch'])}, linear scaling"
    else:
        how = "train.lr as given, lr_scaling none"
    return f"lr {lr:.2e} for a global batch of {global_batch} ({how})"


def build_optimizer(params: Any, train_cfg: Mapping[str, Any], lr: float) -> torch.optim.Optimizer:
    """AdamW over `params` (an iterable of parameters or of parameter groups)."""
    betas = tuple(float(b) for b in train_cfg["betas"])
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=float(train_cfg["weight_decay"]))


def build_scheduler(optimizer: torch.optim.Optimizer, train_cfg: Mapping[str, Any], lr: float,
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.LRScheduler:
    """The per-iteration schedule of `train.schedule` over `train.epochs` epochs of `steps_per_epoch`."""
    kind = train_cfg["schedule"]
    epochs = int(train_cfg["epochs"])
    if kind not in SCHEDULES:
        raise ConfigError(f"train.schedule: {kind!r} is not one of {SCHEDULES}")
    if steps_per_epoch < 1 or epochs < 1:
        raise ConfigError(f"training needs at least one step and one epoch, got {steps_per_epoch} steps "
                         f"per epoch and {epochs} epochs")
    total = steps_per_epoch * epochs
    if kind == "onecycle":
        betas = train_cfg["betas"]
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=lr, total_steps=total, pct_start=float(train_cfg["pct_start"]),
            anneal_strategy="cos", div_factor=float(train_cfg["div_factor"]),
            final_div_factor=float(train_cfg["final_div_factor"]), cycle_momentum=True,
            base_momentum=0.85, max_momentum=float(betas[0]))
    milestones = [int(e) * steps_per_epoch for e in train_cfg["step_epochs"]]
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=float(train_cfg["step_gamma"]))


def clip_gradients(modules: Sequence[nn.Module], max_norm: float) -> float:
    """Clip the global gradient norm of the modules' parameters to `max_norm` (0 disables); return
    the norm before clipping."""
    params = [p for m in modules for p in m.parameters() if p.grad is not None]
    if not params:
        return 0.0
    if max_norm and max_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    return float(torch.norm(torch.stack([p.grad.detach().norm() for p in params])))
