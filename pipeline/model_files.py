"""Model files at local paths or object-store URLs (s3://, gs://, ...).

models/ reads local files only (models.checkpoint, models.detector); the stages take teachers and
models from wherever runs are stored, so the URL-aware readers live here, on pipeline.storage.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from models.bev_grid import BEVGrid
from models.checkpoint import CheckpointError, parse_model_file
from models.checkpoint import read_model_file as read_local_model_file
from models.detector import BEVDetector, detector_from_payload
from pipeline import storage


def read_model_file(path: str | Path) -> dict[str, Any]:
    """The checked payload of a model file (models.checkpoint.save_model's format), local or at a URL."""
    p = str(path)
    if not storage.is_url(p):
        return read_local_model_file(p)
    if not storage.exists(p):
        raise CheckpointError(f"model file {p}: not found")
    return parse_model_file(storage.read_bytes(p), p)


def load_detector(path: str | Path, device: torch.device | str | None = None,
                  expect_grid: BEVGrid | None = None) -> tuple[BEVDetector, dict[str, Any]]:
    """Rebuild a detector from a model file, local or at a URL, and load its weights strictly."""
    return detector_from_payload(read_model_file(path), str(path), device, expect_grid)


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file, local or at a URL (the teacher's identity in cache fingerprints)."""
    return storage.sha256(path)
