"""The in-memory form of one loaded sample and of a collated batch: the contract between data
loading, augmentation, the detectors and the cache.

A sample is a plain dict of numpy arrays (cheap to pickle through Ray, easy to collate):

    token       str                      nuScenes sample token
    points      float32 [N, 5]           x, y, z, intensity, time lag (s, 0 for the key frame),
                                         key-frame LiDAR frame (after BEV augmentation)
    images      float32 [6, 3, H, W]     normalised network input, cameras in config order
    intrinsics  float32 [6, 3, 3]        camera matrix K of the *source* image
    cam2lidar   float32 [6, 4, 4]        camera frame -> key-frame LiDAR frame (before BEV aug)
    ida         float32 [6, 3, 3]        image augmentation: source pixel (u, v, 1) -> network-input pixel
    bda         float32 [4, 4]           BEV augmentation: LiDAR-frame point -> augmented frame
    gt_boxes    float32 [M, 9]           x, y, z (centre), dx, dy, dz (length, width, height), yaw, vx, vy
                                         in the augmented LiDAR frame; dx is along the heading
    gt_labels   int64 [M]                index into models.classes.CLASS_NAMES

A camera pixel (u, v) of the network input at depth d maps to the augmented LiDAR frame as
    p_src = ida^-1 @ [u, v, 1];  p_cam = d * K^-1 @ p_src;  p_aug = bda @ cam2lidar @ [p_cam, 1].

A batch (pipeline.data.collate.collate) stacks the fixed-size arrays with a leading B, keeps
`points` as a list of [N_i, 5] tensors, and pads boxes: gt_boxes [B, M_max, 9] (zeros),
gt_labels [B, M_max] (-1 for padding), gt_mask [B, M_max] bool.
"""
from __future__ import annotations

from typing import Any

Sample = dict[str, Any]

SAMPLE_KEYS: tuple[str, ...] = (
    "token", "points", "images", "intrinsics", "cam2lidar", "ida", "bda", "gt_boxes", "gt_labels",
)
BOX_DIM = 9  # x, y, z, dx, dy, dz, yaw, vx, vy
POINT_DIM = 5  # x, y, z, intensity, time lag
