"""Training tasks for pipeline.engine.train_loop: what a run trains and which loss it minimises.

`detection_task` trains any modality's detector on its detection loss alone: teachers and the
no-distillation student baselines. The distillation task lives in pipeline/engine/distill_task.py.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from models.detector import build_detector
from pipeline.data.dataset import DetectionDataset
from pipeline.engine.comm import mean_over_workers
from pipeline.engine.train_loop import TrainTask, unwrap


def training_dataset(loop_config: Mapping[str, Any], modality: str) -> DetectionDataset:
    """The augmented training split of a run (images only when the modality uses them)."""
    cfg = loop_config["cfg"]
    return DetectionDataset(loop_config["dataroot"], loop_config["version"], loop_config["split"], cfg,
                            train=True, seed=int(cfg["train"]["seed"]),
                            with_images=modality != "lidar", index=loop_config.get("index"))


def detection_losses(model: nn.Module, extra: nn.ModuleDict, batch: dict) -> dict[str, torch.Tensor]:
    """The detector's own loss; the forward runs through `model` so DDP synchronises gradients."""
    out = model(batch)
    return unwrap(model).loss(batch, out, reduce_count=mean_over_workers)


def detection_task(loop_config: Mapping[str, Any], device: torch.device) -> TrainTask:
    """Train the config's detector on its detection loss."""
    cfg = loop_config["cfg"]
    model = build_detector(cfg, device)
    return TrainTask(model=model, dataset=training_dataset(loop_config, model.modality), losses=detection_losses)
