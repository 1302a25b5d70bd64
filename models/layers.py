"""Small building blocks shared by the detectors' 2D parts."""
from __future__ import annotations

from torch import nn


def conv_bn_relu(c_in: int, c_out: int, stride: int = 1, bn_eps: float = 1e-5, bn_momentum: float = 0.1,
                 inplace: bool = False) -> list[nn.Module]:
    """3x3 conv (no bias) -> BatchNorm -> ReLU, as a list so that callers keep their own Sequential
    (and with it the state-dict keys of saved models)."""
    return [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(c_out, eps=bn_eps, momentum=bn_momentum), nn.ReLU(inplace=inplace)]
