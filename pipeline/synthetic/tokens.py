"""Deterministic nuScenes-style tokens (32 hex digits) and random generators.

Tokens and random streams are derived from the seed and a readable key, so that one seed gives
the same dataset byte for byte, whatever the order or process the scenes are generated in, and
a dataset made with another seed has other tokens (a cache keyed by sample token cannot mistake
one for the other).
"""
from __future__ import annotations

import hashlib

import numpy as np


def make_token(seed: int, *key: object) -> str:
    """32-hex-digit token for `key` (e.g. ("sample", "scene-0061", 3)) under `seed`."""
    text = "/".join(str(k) for k in (seed, *key))
    return hashlib.md5(text.encode("utf-8")).hexdigest()


def make_rng(seed: int, *key: object) -> np.random.Generator:
    """Independent random generator for `key` under `seed`."""
    digest = hashlib.sha256("/".join(str(k) for k in ("rng", seed, *key)).encode("utf-8")).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))
