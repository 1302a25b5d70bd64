"""Data augmentation as matrices: image-space (IDA) per camera and BEV-space (BDA) per sample.

Every augmentation is a matrix, applied to the data here and carried in the sample (`ida`, `bda`;
pipeline/data/sample.py) so that the camera encoder's frustum and the teacher-target cache can replay
it exactly. Sampling follows the BEVDepth recipe of the original code (spec §5.5).

Pixel convention: (u, v) = (column, row) with pixel centres at integer coordinates, the
convention of cv2.warpAffine, so `warp_image` moves the content at source pixel p to `mat @ p`.
"""
from __future__ import annotations

from typing import Any, Mapping

import cv2
import numpy as np

from pipeline.config import ConfigError

IDA_KEYS = ("resize_lim", "bot_pct_lim", "rot_lim", "flip")
BDA_KEYS = ("rot_lim", "scale_lim", "trans_std", "flip_x_prob", "flip_y_prob")


def _require(cfg: Mapping[str, Any], keys: tuple[str, ...], section: str) -> None:
    missing = [k for k in keys if k not in cfg]
    if missing:
        raise ConfigError(f"{section} config: missing keys {missing} (expected {list(keys)})")


def _affine2d(linear: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """[3, 3] homogeneous matrix of x -> linear @ x + shift."""
    m = np.eye(3)
    m[:2, :2] = linear
    m[:2, 2] = shift
    return m


# --- image augmentation ------------------------------------------------------------------------
def image_aug_matrix(rng: np.random.Generator | None, src_hw: tuple[int, int], out_hw: tuple[int, int],
                     ida_cfg: Mapping[str, Any]) -> np.ndarray:
    """[3, 3] matrix mapping a source pixel (u, v, 1) to the network-input pixel.

    Training (rng given): resize by (out_w / src_w) * U(resize_lim), crop an out_hw window whose
    bottom sits U(bot_pct_lim) of the resized height above the image bottom and whose left edge is
    U(0, resized_w - out_w), mirror horizontally with p = 0.5 if `flip`, then rotate by
    U(rot_lim) degrees about the output image centre.
    Evaluation (rng None): the fit-width resize, bottom-anchored and horizontally centred crop.
    """
    _require(ida_cfg, IDA_KEYS, "ida")
    src_h, src_w = (int(x) for x in src_hw)
    out_h, out_w = (int(x) for x in out_hw)
    if min(src_h, src_w, out_h, out_w) <= 0:
        raise ValueError(f"image_aug_matrix: sizes must be positive, got src_hw={src_hw}, out_hw={out_hw}")
    fit = out_w / src_w
    if rng is None:
        resize = fit
        bot_pct = float(np.mean(ida_cfg["bot_pct_lim"]))
    else:
        resize = fit * rng.uniform(*ida_cfg["resize_lim"])
        bot_pct = rng.uniform(*ida_cfg["bot_pct_lim"])
    new_w, new_h = int(src_w * resize), int(src_h * resize)
    crop_top = int((1.0 - bot_pct) * new_h) - out_h
    if rng is None:
        crop_left = int(max(0, new_w - out_w) / 2)
        flip, angle = False, 0.0
    else:
        crop_left = int(rng.uniform(0, max(0, new_w - out_w)))
        flip = bool(ida_cfg["flip"]) and bool(rng.random() < 0.5)
        angle = np.deg2rad(rng.uniform(*ida_cfg["rot_lim"]))

    mat = _affine2d(np.eye(2) * resize, -np.array([crop_left, crop_top], dtype=float))
    if flip:  # u -> (out_w - 1) - u maps the crop window onto itself
        mat = _affine2d(np.diag([-1.0, 1.0]), np.array([out_w - 1.0, 0.0])) @ mat
    if angle != 0.0:
        c, s = np.cos(angle), np.sin(angle)
        rot = np.array([[c, -s], [s, c]])
        centre = np.array([(out_w - 1) / 2.0, (out_h - 1) / 2.0])
        mat = _affine2d(rot, centre - rot @ centre) @ mat
    return mat


def warp_image(img: np.ndarray, mat: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """Apply an image-augmentation matrix: uint8 [H, W, 3] -> [h, w, 3], bilinear, black border."""
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"warp_image: expected an [H, W, 3] image, got shape {img.shape}")
    mat = np.asarray(mat, dtype=np.float64)
    if mat.shape != (3, 3) or not np.allclose(mat[2], [0.0, 0.0, 1.0]):
        raise ValueError(f"warp_image: expected a [3, 3] affine matrix with last row (0, 0, 1), got {mat}")
    out_h, out_w = (int(x) for x in out_hw)
    return cv2.warpAffine(img, mat[:2], (out_w, out_h), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))


# --- BEV augmentation --------------------------------------------------------------------------
def bev_aug_matrix(rng: np.random.Generator | None, bda_cfg: Mapping[str, Any]) -> np.ndarray:
    """[4, 4] BEV augmentation Flip @ Trans @ Scale @ Rot, mapping LiDAR frame -> augmented frame.

    Rot: about z by U(rot_lim) degrees; Scale: isotropic U(scale_lim); Trans: N(0, trans_std) per
    axis; Flip: x -> -x with flip_x_prob (a heading yaw becomes pi - yaw) and y -> -y with
    flip_y_prob (yaw becomes -yaw). rng None gives the identity (evaluation).
    """
    _require(bda_cfg, BDA_KEYS, "bda")
    if rng is None:
        return np.eye(4)
    angle = np.deg2rad(rng.uniform(*bda_cfg["rot_lim"]))
    scale = rng.uniform(*bda_cfg["scale_lim"])
    trans = rng.normal(0.0, np.asarray(bda_cfg["trans_std"], dtype=float))
    flip_x = rng.random() < float(bda_cfg["flip_x_prob"])
    flip_y = rng.random() < float(bda_cfg["flip_y_prob"])

    c, s = np.cos(angle), np.sin(angle)
    rot = np.eye(4)
    rot[:2, :2] = [[c, -s], [s, c]]
    scl = np.diag([scale, scale, scale, 1.0])
    trn = np.eye(4)
    trn[:3, 3] = trans
    flp = np.diag([-1.0 if flip_x else 1.0, -1.0 if flip_y else 1.0, 1.0, 1.0])
    return flp @ trn @ scl @ rot


def _check_mat4(mat: np.ndarray, where: str) -> np.ndarray:
    mat = np.asarray(mat, dtype=np.float64)
    if mat.shape != (4, 4):
        raise ValueError(f"{where}: expected a [4, 4] matrix, got shape {mat.shape}")
    return mat


def transform_points(points: np.ndarray, mat: np.ndarray) -> np.ndarray:
    """Points [N, >=3] with x, y, z mapped by the [4, 4] matrix; other columns kept. Same dtype."""
    mat = _check_mat4(mat, "transform_points")
    if points.ndim != 2 or points.shape[1] < 3:
        raise ValueError(f"transform_points: expected points [N, >=3], got shape {points.shape}")
    out = points.copy()
    out[:, :3] = points[:, :3].astype(np.float64) @ mat[:3, :3].T + mat[:3, 3]
    return out


def transform_boxes(boxes: np.ndarray, mat: np.ndarray) -> np.ndarray:
    """Boxes [M, 9] (x, y, z, dx, dy, dz, yaw, vx, vy) under a BEV augmentation matrix. Same dtype.

    The matrix must act on x/y only by rotation, isotropic scale and mirrors (as `bev_aug_matrix`
    makes). Centres are transformed; dims are multiplied by the scale |det|^(1/3); the heading
    vector (cos yaw, sin yaw) is transformed and yaw is its new angle, so mirrors and any
    composition are handled by the matrix itself; velocity is multiplied by the 2x2 xy block.
    """
    mat = _check_mat4(mat, "transform_boxes")
    if boxes.ndim != 2 or boxes.shape[1] != 9:
        raise ValueError(f"transform_boxes: expected boxes [M, 9], got shape {boxes.shape}")
    lin = mat[:3, :3]
    if not (np.allclose(lin[2, :2], 0.0) and np.allclose(lin[:2, 2], 0.0)):
        raise ValueError(f"transform_boxes: matrix must not mix z with x/y (boxes rotate about z only), got {mat}")
    scale = abs(np.linalg.det(lin)) ** (1.0 / 3.0)
    b = boxes.astype(np.float64)
    out = np.empty_like(b)
    out[:, :3] = b[:, :3] @ lin.T + mat[:3, 3]
    out[:, 3:6] = b[:, 3:6] * scale
    heading = np.stack([np.cos(b[:, 6]), np.sin(b[:, 6])], axis=1) @ lin[:2, :2].T  # [M, 2]
    out[:, 6] = np.arctan2(heading[:, 1], heading[:, 0])
    out[:, 7:9] = b[:, 7:9] @ lin[:2, :2].T
    return out.astype(boxes.dtype)
