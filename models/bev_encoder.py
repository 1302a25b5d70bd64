"""BEV encoder (spec §3.5): a SECOND-style 2D backbone that turns the low-level BEV map into the
high-level one at the same resolution.

Each level starts with a (possibly strided) 3x3 conv after a 1-cell zero pad, then `layer_nums`
3x3 convs; each level's output goes through a transposed-conv "deblock" back to the input
resolution, and the deblock outputs are concatenated. Every conv is followed by BN (eps 1e-3,
momentum 0.01) and ReLU.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from models.errors import UserError
from models.layers import conv_bn_relu

BN_EPS = 1e-3
BN_MOMENTUM = 0.01


class BEVEncoder(nn.Module):
    """Multi-level 2D BEV backbone with deblocks, concatenated at full resolution.

    Args:
        c_in: channels of the low-level BEV map (C_low).
        layer_nums: extra 3x3 convs per level after its first conv (paper 5, 5).
        layer_strides: stride of each level's first conv, relative to the previous level (paper 1, 2).
        num_filters: channels of each level (paper 128, 256).
        num_upsample_filters: output channels of each level's deblock (paper 256, 256).
    The deblock of level k up-samples by the product of the strides so far (k and s of a
    ConvTranspose2d), so H and W must be divisible by that product.
    forward(low [B, c_in, H, W]) -> high [B, sum(num_upsample_filters), H, W].
    Attribute: out_channels (C_high).
    """

    def __init__(self, c_in: int, layer_nums: Sequence[int] = (5, 5), layer_strides: Sequence[int] = (1, 2),
                 num_filters: Sequence[int] = (128, 256), num_upsample_filters: Sequence[int] = (256, 256)):
        super().__init__()
        n = len(layer_nums)
        if not (n == len(layer_strides) == len(num_filters) == len(num_upsample_filters)) or n == 0:
            raise UserError("BEVEncoder: layer_nums, layer_strides, num_filters and num_upsample_filters must "
                             f"have the same non-zero length, got {list(layer_nums)}, {list(layer_strides)}, "
                             f"{list(num_filters)}, {list(num_upsample_filters)}")
        if any(int(s) < 1 for s in layer_strides):
            raise UserError(f"BEVEncoder: layer_strides must be >= 1, got {list(layer_strides)}")
        self.blocks = nn.ModuleList()
        self.deblocks = nn.ModuleList()
        self.upsample_strides: list[int] = []
        c_prev, total_stride = c_in, 1
        for num, stride, c, c_up in zip(layer_nums, layer_strides, num_filters, num_upsample_filters):
            total_stride *= int(stride)
            layers = conv_bn_relu(c_prev, c, int(stride), BN_EPS, BN_MOMENTUM)
            for _ in range(num):
                layers += conv_bn_relu(c, c, 1, BN_EPS, BN_MOMENTUM)
            self.blocks.append(nn.Sequential(*layers))
            self.deblocks.append(nn.Sequential(
                nn.ConvTranspose2d(c, c_up, total_stride, stride=total_stride, bias=False),
                nn.BatchNorm2d(c_up, eps=BN_EPS, momentum=BN_MOMENTUM), nn.ReLU()))
            self.upsample_strides.append(total_stride)
            c_prev = c
        self.out_channels = int(sum(num_upsample_filters))

    def forward(self, low: torch.Tensor) -> torch.Tensor:
        h, w = low.shape[-2:]
        if low.dim() != 4 or h % self.upsample_strides[-1] or w % self.upsample_strides[-1]:
            raise ValueError(f"BEVEncoder: input shape {tuple(low.shape)}: expected [B, C, H, W] with H and W "
                             f"divisible by {self.upsample_strides[-1]}")
        ups = []
        x = low
        for block, deblock in zip(self.blocks, self.deblocks):
            x = block(x)  # [B, c_k, H / s_k, W / s_k]
            ups.append(deblock(x))  # [B, c_up_k, H, W]
        return torch.cat(ups, dim=1)  # [B, C_high, H, W]
