"""Model files: weights saved together with the config that builds them, loaded strictly.

The original release loaded teachers with `strict=False` after dropping mismatched keys, so a
wrongly prefixed checkpoint silently gave a random teacher (spec §2.7). Here every load names
the missing, unexpected and mis-shaped keys and refuses.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from models.errors import UserError

FORMAT = "unidistill-ray/model"
FORMAT_VERSION = 1


class CheckpointError(UserError):
    """A model file is missing, malformed, or does not fit the model it is loaded into."""


def save_model(path: str | Path, model: nn.Module, cfg: Mapping[str, Any], extra: Mapping[str, Any] | None = None) -> Path:
    """Write `model`'s weights with its config (and optional metadata) to `path` atomically."""
    return save_state_dict(path, model.state_dict(), cfg, extra)


def save_state_dict(path: str | Path, state_dict: Mapping[str, torch.Tensor], cfg: Mapping[str, Any],
                    extra: Mapping[str, Any] | None = None) -> Path:
    """Write a model file from a state dict (e.g. taken from a training checkpoint) atomically."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": dict(cfg),
               "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()},
               "extra": dict(extra or {})}
    tmp = p.with_suffix(p.suffix + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(p)
    return p


def read_model_file(path: str | Path) -> dict[str, Any]:
    """The payload of a local model file written by save_model, with clear errors otherwise.
    (pipeline.model_files reads the same files from object-store URLs.)"""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"model file {p}: not found")
    return parse_model_file(p.read_bytes(), str(p))


def parse_model_file(data: bytes, source: str) -> dict[str, Any]:
    """Check and return the payload of a model file's bytes; `source` names it in errors."""
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - torch raises many types for corrupt files
        raise CheckpointError(f"model file {source}: cannot be read as a torch file ({e})") from e
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"model file {source}: not a {FORMAT} file (expected a dict with format={FORMAT!r}; "
                              "export one with stages/train_teacher.py)")
    for key in ("config", "state_dict"):
        if key not in payload:
            raise CheckpointError(f"model file {source}: missing field {key!r}")
    return payload


def load_state_dict_strict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Load every key or raise CheckpointError naming missing, unexpected and mis-shaped keys."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shape = sorted(f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
                   for k in set(own) & set(state_dict) if tuple(own[k].shape) != tuple(state_dict[k].shape))
    if missing or unexpected or shape:
        def head(xs: list[str]) -> str:
            return ", ".join(xs[:8]) + (f", ... ({len(xs)} in all)" if len(xs) > 8 else "")
        parts = [f"{name} keys: {head(xs)}" for name, xs in
                 (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shape)) if xs]
        raise CheckpointError(f"{source}: weights do not fit the model; " + "; ".join(parts))
    model.load_state_dict(state_dict, strict=True)
