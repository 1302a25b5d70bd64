"""Inputs shared by the benchmarks: a generated dataset and a tiny LiDAR teacher, unless given."""
from __future__ import annotations

from pathlib import Path

import torch


def dataset_and_teacher(tmp: Path, dataroot: Path | None, teacher: Path | None,
                        samples_per_scene: int) -> tuple[Path, Path]:
    """(dataroot, teacher model file): the given ones, or generated under `tmp` (small images; a
    teacher of the tiny_lidar preset with seeded random weights)."""
    from models.detector import build_detector, save_detector
    from pipeline.config import load_config

    root = dataroot
    if root is None:
        from pipeline.synthetic import generate

        root = tmp / "nuscenes"
        generate(root, samples_per_scene=samples_per_scene, seed=0, image_size=(400, 225))
    if teacher is None:
        torch.manual_seed(0)
        cfg = load_config("tiny_lidar")
        teacher = tmp / "teacher.pt"
        save_detector(teacher, build_detector(cfg).eval(), cfg)
    return root, teacher
