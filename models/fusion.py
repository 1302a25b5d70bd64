"""Fusion of the LiDAR and camera BEV maps (spec §3.4): concatenate, re-weight the channels with a
global channel attention, and mix back down to the low-level width with a 3x3 conv.
"""
from __future__ import annotations

import torch
from torch import nn


class FusionEncoder(nn.Module):
    """concat -> x * sigmoid(conv1x1(global average pool(x))) -> conv3x3 (no bias) + BN + ReLU.

    Args:
        c_lidar: channels of the LiDAR BEV map.
        c_camera: channels of the camera BEV map.
        c_out: channels of the fused map (C_low; paper 256).
    forward(lidar_bev [B, c_lidar, H, W], camera_bev [B, c_camera, H, W]) -> [B, c_out, H, W].
    Attribute: out_channels.
    """

    def __init__(self, c_lidar: int, c_camera: int, c_out: int):
        super().__init__()
        c_cat = c_lidar + c_camera
        self.c_lidar, self.c_camera = c_lidar, c_camera
        self.out_channels = c_out
        self.attention = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(c_cat, c_cat, 1), nn.Sigmoid())
        self.reduce = nn.Sequential(nn.Conv2d(c_cat, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                                    nn.ReLU())

    def forward(self, lidar_bev: torch.Tensor, camera_bev: torch.Tensor) -> torch.Tensor:
        ok = lidar_bev.dim() == 4 and camera_bev.dim() == 4 and lidar_bev.shape[1] == self.c_lidar \
            and camera_bev.shape[1] == self.c_camera \
            and (lidar_bev.shape[0], *lidar_bev.shape[2:]) == (camera_bev.shape[0], *camera_bev.shape[2:])
        if not ok:
            raise ValueError(f"FusionEncoder: lidar_bev {tuple(lidar_bev.shape)} and camera_bev "
                             f"{tuple(camera_bev.shape)} must be [B, {self.c_lidar}, H, W] and "
                             f"[B, {self.c_camera}, H, W] with the same B, H, W")
        x = torch.cat([lidar_bev, camera_bev], dim=1)  # [B, c_lidar + c_camera, H, W]
        x = x * self.attention(x)  # channel weights [B, C, 1, 1]
        return self.reduce(x)  # [B, c_out, H, W]
