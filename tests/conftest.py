"""Shared fixtures: a small generated nuScenes-format dataset, made once per test session."""
from __future__ import annotations

from pathlib import Path

import pytest

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
