"""Re-estimate BatchNorm running statistics after training ("precise BN", as detectron2 does).

The detectors follow the original's BatchNorm momentum of 0.01, so the running averages forget
the large activations of the first steps only slowly: after a short run (the tiny preset, a few
hundred steps) eval mode still normalises with them and a model that fits its training data in
train mode detects nothing in eval mode. Averaging the statistics over a few hundred training
samples with the final weights fixes that at the cost of a few forward passes.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers of a model that keep running statistics."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def recompute_bn_stats(model: nn.Module, batches: Iterable, forward: Callable[[nn.Module, object], object],
                       num_batches: int) -> int:
    """Replace every BatchNorm's running mean and variance by their plain average over `num_batches`
    training batches (train-mode forwards with the final weights). Returns the batches used.

    Layers that stay in eval mode when the model is put in train mode (a frozen ResNet stem's bn1)
    keep their statistics: their forwards would not re-estimate them."""
    was_training = model.training
    model.train()
    layers = [bn for bn in batchnorm_layers(model) if bn.training]
    if not layers or num_batches <= 0:
        model.train(was_training)
        return 0
    momenta = [bn.momentum for bn in layers]
    for bn in layers:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the batches seen
    used = 0
    try:
        for batch in batches:
            forward(model, batch)
            used += 1
            if used >= num_batches:
                break
    finally:
        for bn, m in zip(layers, momenta):
            bn.momentum = m
        model.train(was_training)
    return used
