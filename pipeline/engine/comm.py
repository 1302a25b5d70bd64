"""Reductions across the Ray Train workers of one run (torch.distributed), for the few numbers
every worker must agree on."""
from __future__ import annotations

import torch.distributed as dist
from torch import Tensor


def mean_over_workers(count: Tensor) -> Tensor:
    """The mean of `count` over torch.distributed workers (itself when not distributed).

    Passed as `reduce_count` to the detectors' and the distillation losses so that every worker
    divides by the same positive count (spec §3.6: counts averaged across GPUs).
    """
    if dist.is_available() and dist.is_initialized():
        count = count.clone()
        dist.all_reduce(count, op=dist.ReduceOp.SUM)
        count = count / dist.get_world_size()
    return count
