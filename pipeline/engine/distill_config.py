"""The `distill` config section: defaults, the paper's per-path settings (spec §2.6-2.7), their
resolution against a teacher/student pair, and the loss module it describes."""
from __future__ import annotations

import copy
from typing import Any, Mapping

from models.bev_grid import BEVGrid
from models.distill import UniDistillLoss
from pipeline.config import ConfigError, merge

# --- config --------------------------------------------------------------------------------------
# The `distill` config section. null weights, teacher_eps and adaptation.enabled take the paper's
# per-path defaults (resolve_distill_config); channels are filled from the two detectors.
DEFAULT_DISTILL_CONFIG: dict[str, Any] = {
    "feature": {"enabled": True, "weight": None},
    "relation": {"enabled": True, "weight": None},
    "response": {"enabled": True, "weight": None, "temperature": 2.0, "teacher_eps": None, "min_overlap": 0.7},
    "keypoint_transpose": False,
    "adaptation": {"enabled": None, "kernel_size": 1},
    "channels": {"student_low": None, "student_high": None, "teacher_low": None, "teacher_high": None},
}

# (teacher modality, student modality) -> the released code's settings (spec §2.6, §2.7).
PATH_DEFAULTS: dict[tuple[str, str], dict[str, Any]] = {
    ("lidar", "camera"): {"feature": 100.0, "relation": 40.0, "response": 10.0, "teacher_eps": 1e-4,
                          "adaptation": False},
    ("fusion", "camera"): {"feature": 10.0, "relation": 5.0, "response": 10.0, "teacher_eps": 1e-3,
                           "adaptation": False},
    ("camera", "lidar"): {"feature": 10.0, "relation": 5.0, "response": 1.0, "teacher_eps": 1e-4,
                          "adaptation": True},
    ("fusion", "lidar"): {"feature": 10.0, "relation": 1.0, "response": 10.0, "teacher_eps": 1e-4,
                          "adaptation": False},
}
_GENERIC = {"teacher_eps": 1e-4, "adaptation": False}  # where no path is given


def path_defaults(teacher_modality: str, student_modality: str) -> dict[str, Any]:
    """The full distill config of a path with the paper's weights, teacher eps and adaptation."""
    key = (teacher_modality, student_modality)
    if key not in PATH_DEFAULTS:
        known = ", ".join(f"{t}->{s}" for t, s in PATH_DEFAULTS)
        raise ConfigError(f"distill: no per-path defaults for {teacher_modality}->{student_modality} "
                         f"(known paths: {known}); set distill.feature/relation/response.weight explicitly")
    d = PATH_DEFAULTS[key]
    cfg = copy.deepcopy(DEFAULT_DISTILL_CONFIG)
    for name in ("feature", "relation", "response"):
        cfg[name]["weight"] = d[name]
    cfg["response"]["teacher_eps"] = d["teacher_eps"]
    cfg["adaptation"]["enabled"] = d["adaptation"]
    return cfg


def resolve_distill_config(cfg: Mapping[str, Any], teacher_modality: str | None = None,
                           student_modality: str | None = None, *,
                           student_channels: tuple[int, int] | None = None,
                           teacher_channels: tuple[int, int] | None = None) -> dict[str, Any]:
    """A complete distill config: `cfg` over the defaults, nulls filled from the path's defaults.

    Explicit values in `cfg` win. Without a path (or for a path the paper has no settings for)
    every weight must be set; teacher_eps then defaults to 1e-4 and adaptation to off.
    student_channels / teacher_channels are (low, high) widths, e.g. from the detectors or the
    cache fingerprint, and fill `channels` (explicit config values win there too).
    """
    out = merge(DEFAULT_DISTILL_CONFIG, cfg, known_only="distill.")
    unset = [n for n in ("feature", "relation", "response") if out[n]["weight"] is None]
    if teacher_modality is not None and student_modality is not None and (
            unset or (teacher_modality, student_modality) in PATH_DEFAULTS):
        path = path_defaults(teacher_modality, student_modality)
    elif unset:
        raise ConfigError(f"distill config: {', '.join(f'distill.{n}.weight' for n in unset)} unset (null means "
                         f"the path's default) and no distillation path given: call "
                         f"resolve_distill_config(cfg, teacher_modality, student_modality) or set the weights")
    else:
        path = {"response": {"teacher_eps": _GENERIC["teacher_eps"]},
                "adaptation": {"enabled": _GENERIC["adaptation"]}}
    for name in unset:
        out[name]["weight"] = path[name]["weight"]
    if out["response"]["teacher_eps"] is None:
        out["response"]["teacher_eps"] = path["response"]["teacher_eps"]
    if out["adaptation"]["enabled"] is None:
        out["adaptation"]["enabled"] = path["adaptation"]["enabled"]
    ch = out["channels"]
    for prefix, widths in (("student", student_channels), ("teacher", teacher_channels)):
        if widths is not None:
            for level, n in zip(("low", "high"), widths):
                if ch[f"{prefix}_{level}"] is None:
                    ch[f"{prefix}_{level}"] = int(n)
    _validate(out)
    return out


def _validate(cfg: Mapping[str, Any]) -> None:
    for name in ("feature", "relation", "response"):
        w = cfg[name]["weight"]
        if not isinstance(w, (int, float)) or w < 0:
            raise ConfigError(f"distill.{name}.weight must be a number >= 0, got {w!r}")
    r = cfg["response"]
    if not r["temperature"] > 0:
        raise ConfigError(f"distill.response.temperature must be > 0, got {r['temperature']}")
    if not 0 <= r["teacher_eps"] < 0.5:
        raise ConfigError(f"distill.response.teacher_eps must be in [0, 0.5), got {r['teacher_eps']}")
    if not 0 < r["min_overlap"] < 1:
        raise ConfigError(f"distill.response.min_overlap must be in (0, 1), got {r['min_overlap']}")
    if cfg["adaptation"]["kernel_size"] not in (1, 3):
        raise ConfigError(f"distill.adaptation.kernel_size must be 1 or 3, got {cfg['adaptation']['kernel_size']}")


def build_distill_loss(grid: BEVGrid, cfg: Mapping[str, Any]) -> UniDistillLoss:
    """The UniDistillLoss a `distill` section describes. The section is resolved without a path, so
    per-path nulls must already be filled (resolve_distill_config with the two modalities)."""
    c = resolve_distill_config(cfg)
    weights = {name: float(c[name]["weight"]) if c[name]["enabled"] else 0.0 for name in ("feature", "relation", "response")}
    r = c["response"]
    return UniDistillLoss(grid, feature_weight=weights["feature"], relation_weight=weights["relation"],
                          response_weight=weights["response"], temperature=r["temperature"],
                          teacher_eps=r["teacher_eps"], min_overlap=r["min_overlap"],
                          keypoint_transpose=bool(c["keypoint_transpose"]), adaptation=bool(c["adaptation"]["enabled"]),
                          adaptation_kernel_size=c["adaptation"]["kernel_size"], channels=c["channels"])
