"""Run configuration: YAML presets under stages/configs/, `key.path=value` overrides, and the
resolved config saved next to every run's outputs.

A preset may start with `_base_: other.yaml` (path relative to itself); its mapping is merged
over the base recursively. Overrides may only set keys that exist in the resolved preset, so a
typo fails fast instead of being silently ignored.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from models.errors import UserError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "stages" / "configs"


class ConfigError(UserError):
    """A config file or override is malformed; the message names the file or key."""


def merge(base: Mapping[str, Any], over: Mapping[str, Any], known_only: str | None = None) -> dict[str, Any]:
    """`over` merged recursively onto a copy of `base`.

    With `known_only` (the section's dotted prefix, e.g. "distill."), a key `base` lacks, or a
    scalar given for a mapping, is a ConfigError naming its path (typos fail fast).
    """
    out = copy.deepcopy(dict(base))
    for k, v in over.items():
        if known_only is not None and k not in out:
            raise ConfigError(f"config: unknown key {known_only}{k} (known: {sorted(out)})")
        if isinstance(out.get(k), dict):
            if isinstance(v, Mapping):
                out[k] = merge(out[k], v, None if known_only is None else f"{known_only}{k}.")
                continue
            if known_only is not None:
                raise ConfigError(f"config: {known_only}{k} must be a mapping, got {v!r}")
        out[k] = copy.deepcopy(v)
    return out


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A path as given if it exists, else a preset name under stages/configs/ ('tiny_lidar')."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    for cand in (CONFIG_DIR / p, CONFIG_DIR / f"{p}.yaml"):
        if cand.is_file():
            return cand
    presets = sorted(q.stem for q in CONFIG_DIR.glob("*.yaml"))
    raise ConfigError(f"config {name_or_path!s}: no such file, and not a preset name (presets: {presets})")


def load_config(name_or_path: str | Path, overrides: Iterable[str] = ()) -> dict[str, Any]:
    """Load a preset (following `_base_`), then apply `a.b.c=value` overrides (value parsed as YAML)."""
    path = resolve_config_path(name_or_path)
    cfg = _load_with_bases(path, seen=())
    return apply_overrides(cfg, overrides)


def _load_with_bases(path: Path, seen: tuple[Path, ...]) -> dict[str, Any]:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"config {path}: `_base_` cycle through {[str(s) for s in seen]}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"config {path}: not valid YAML: {e}") from e
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config {path}: top level must be a mapping, got {type(data).__name__}")
    base_name = data.pop("_base_", None)
    if base_name is None:
        return data
    base = _load_with_bases((path.parent / base_name), seen + (path,))
    return merge(base, data)


def apply_overrides(cfg: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Return a copy of `cfg` with each 'a.b=value' applied; unknown keys raise ConfigError."""
    out = copy.deepcopy(dict(cfg))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key.path=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node: Any = out
        for i, part in enumerate(parts):
            if not isinstance(node, dict) or part not in node:
                where = ".".join(parts[:i]) or "<top level>"
                known = sorted(node) if isinstance(node, dict) else []
                raise ConfigError(f"override {key!r}: unknown key {part!r} under {where} (known: {known})")
            if i == len(parts) - 1:
                try:
                    node[part] = yaml.safe_load(raw)
                except yaml.YAMLError as e:
                    raise ConfigError(f"override {key!r}: value {raw!r} is not valid YAML: {e}") from e
            else:
                node = node[part]
    return out


def save_config(cfg: Mapping[str, Any], path: str | Path) -> Path:
    """Write the resolved config as YAML (creating parent folders) and return its path."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(yaml.safe_dump(dict(cfg), sort_keys=False))
    return p


def diff_keys(a: Any, b: Any, under: Iterable[str] | None = None, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested mappings (two resolved configs, two
    cache fingerprints), only those at or below the dotted keys `under` when given."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        out = []
        for key in sorted(set(a) | set(b), key=str):
            out += diff_keys(a.get(key), b.get(key), None, f"{prefix}{key}.")
    else:
        out = [] if a == b else [prefix.rstrip(".")]
    if under is not None:
        keys = tuple(under)
        out = [f for f in out if any(f == k or f.startswith(k + ".") for k in keys)]
    return out
