"""Batching of samples (pipeline/data/sample.py) into the tensors the detectors consume."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from pipeline.data.sample import BOX_DIM, POINT_DIM, Sample

# Fixed-size arrays stacked with a leading B, and their dtypes. The camera arrays may be absent
# from every sample (a LiDAR-only loader need not read images), but not from only some.
STACKED: dict[str, torch.dtype] = {
    "images": torch.float32,
    "intrinsics": torch.float32,
    "cam2lidar": torch.float32,
    "ida": torch.float32,
    "bda": torch.float32,
}
REQUIRED = ("token", "points", "gt_boxes", "gt_labels")


def collate(samples: Sequence[Sample]) -> dict[str, Any]:
    """Collate samples into a batch dict.

    Returns: token list[str]; points list of float32 [N_i, 5] tensors; each STACKED key present as
    a tensor [B, ...]; gt_boxes float32 [B, M_max, 9] (zero padding), gt_labels int64 [B, M_max]
    (-1 padding), gt_mask bool [B, M_max]. Keys outside the sample contract are passed on as
    lists. M_max may be 0.
    """
    if len(samples) == 0:
        raise ValueError("collate: got an empty list of samples")
    for i, s in enumerate(samples):
        missing = [k for k in REQUIRED if k not in s]
        if missing:
            raise KeyError(f"collate: sample {i} ({s.get('token', '?')}) lacks keys {missing}")

    batch: dict[str, Any] = {"token": [s["token"] for s in samples]}
    points = []
    for s in samples:
        p = np.asarray(s["points"], dtype=np.float32)
        if p.ndim != 2 or p.shape[1] != POINT_DIM:
            raise ValueError(f"collate: sample {s['token']} points has shape {p.shape}, expected [N, {POINT_DIM}]")
        points.append(torch.from_numpy(p))
    batch["points"] = points

    for key, dtype in STACKED.items():
        present = [key in s for s in samples]
        if not any(present):
            continue
        if not all(present):
            raise KeyError(f"collate: key {key!r} is in some samples but not in "
                           f"{[s['token'] for s, p in zip(samples, present) if not p]}")
        arrays = [np.asarray(s[key]) for s in samples]
        shapes = {a.shape for a in arrays}
        if len(shapes) != 1:
            raise ValueError(f"collate: {key!r} shapes differ across the batch: {sorted(shapes)}")
        batch[key] = torch.from_numpy(np.stack(arrays)).to(dtype)

    boxes, labels, mask = _pad_boxes(samples)
    batch["gt_boxes"], batch["gt_labels"], batch["gt_mask"] = boxes, labels, mask

    known = set(REQUIRED) | set(STACKED)
    for key in samples[0]:
        if key not in known:
            batch[key] = [s.get(key) for s in samples]
    return batch


def _pad_boxes(samples: Sequence[Sample]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """gt_boxes [B, M_max, 9] zeros, gt_labels [B, M_max] -1, gt_mask [B, M_max] for real boxes."""
    counts = []
    for s in samples:
        b, lab = np.asarray(s["gt_boxes"]), np.asarray(s["gt_labels"])
        if b.ndim != 2 or b.shape[1] != BOX_DIM or lab.shape != (b.shape[0],):
            raise ValueError(f"collate: sample {s['token']} has gt_boxes {b.shape} and gt_labels {lab.shape}, "
                             f"expected [M, {BOX_DIM}] and [M]")
        counts.append(b.shape[0])
    n, m_max = len(samples), max(counts)
    boxes = torch.zeros(n, m_max, BOX_DIM, dtype=torch.float32)
    labels = torch.full((n, m_max), -1, dtype=torch.int64)
    mask = torch.zeros(n, m_max, dtype=torch.bool)
    for i, (s, m) in enumerate(zip(samples, counts)):
        if m:
            boxes[i, :m] = torch.from_numpy(np.asarray(s["gt_boxes"], dtype=np.float32))
            labels[i, :m] = torch.from_numpy(np.asarray(s["gt_labels"], dtype=np.int64))
            mask[i, :m] = True
    return boxes, labels, mask
