"""Augmentation matrices (IDA, BDA), their application to images, points and boxes, and collation."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from nuscenes.utils.data_classes import Box
from nuscenes.utils.geometry_utils import points_in_box
from pyquaternion import Quaternion

from pipeline.config import ConfigError, load_config
from pipeline.data.augment import (bev_aug_matrix, image_aug_matrix, transform_boxes, transform_points,
                              warp_image)
from pipeline.data.collate import collate

IDA = load_config("nuscenes")["data"]["ida"]
BDA = load_config("nuscenes")["data"]["bda"]


# --- helpers -----------------------------------------------------------------------------------
def devkit_box(b: np.ndarray) -> Box:
    """A devkit Box from (x, y, z, dx, dy, dz, yaw, ...): devkit size order is (w, l, h) = (dy, dx, dz)."""
    return Box(center=b[:3], size=[b[4], b[3], b[5]], orientation=Quaternion(axis=[0, 0, 1], angle=float(b[6])))


def random_boxes(rng: np.random.Generator, m: int) -> np.ndarray:
    boxes = np.zeros((m, 9))
    boxes[:, :2] = rng.uniform(-40, 40, (m, 2))
    boxes[:, 2] = rng.uniform(-2, 1, m)
    boxes[:, 3:6] = rng.uniform(0.5, 8.0, (m, 3))
    boxes[:, 6] = rng.uniform(-np.pi, np.pi, m)
    boxes[:, 7:9] = rng.normal(0, 5, (m, 2))
    return boxes


def local_to_world(box: np.ndarray, local: np.ndarray) -> np.ndarray:
    """Box-frame points [N, 3] (x along the heading) -> LiDAR frame."""
    c, s = np.cos(box[6]), np.sin(box[6])
    rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    return local @ rot.T + box[:3]


def bda_matrices() -> dict[str, np.ndarray]:
    """Identity, each flip alone, both, a full random draw and a composition of two draws."""
    rng = np.random.default_rng(7)
    only = dict(BDA, rot_lim=[0, 0], scale_lim=[1, 1], trans_std=[0, 0, 0])
    mats = {
        "identity": bev_aug_matrix(None, BDA),
        "flip_x": bev_aug_matrix(rng, dict(only, flip_x_prob=1.0, flip_y_prob=0.0)),
        "flip_y": bev_aug_matrix(rng, dict(only, flip_x_prob=0.0, flip_y_prob=1.0)),
        "flip_xy": bev_aug_matrix(rng, dict(only, flip_x_prob=1.0, flip_y_prob=1.0)),
        "random_flip_x": bev_aug_matrix(rng, dict(BDA, flip_x_prob=1.0, flip_y_prob=0.0)),
        "random_flip_y": bev_aug_matrix(rng, dict(BDA, flip_x_prob=0.0, flip_y_prob=1.0)),
    }
    mats["composed"] = bev_aug_matrix(rng, BDA) @ mats["random_flip_x"]
    return mats


# --- BEV augmentation --------------------------------------------------------------------------
def test_bev_flip_matrices_mirror_the_axes():
    m = bda_matrices()
    np.testing.assert_allclose(m["identity"], np.eye(4))
    np.testing.assert_allclose(m["flip_x"], np.diag([-1.0, 1, 1, 1]))
    np.testing.assert_allclose(m["flip_y"], np.diag([1.0, -1, 1, 1]))
    # Spec §5.5: flip in x gives yaw -> pi - yaw, flip in y gives yaw -> -yaw.
    yaw = np.array([0.3, -2.0, 3.0])
    boxes = np.zeros((3, 9))
    boxes[:, 3:6], boxes[:, 6] = 1.0, yaw
    wrap = lambda a: np.angle(np.exp(1j * a))  # noqa: E731
    np.testing.assert_allclose(wrap(transform_boxes(boxes, m["flip_x"])[:, 6] - (np.pi - yaw)), 0, atol=1e-9)
    np.testing.assert_allclose(wrap(transform_boxes(boxes, m["flip_y"])[:, 6] + yaw), 0, atol=1e-9)


@pytest.mark.parametrize("name", list(bda_matrices()))
def test_points_stay_inside_their_transformed_boxes(name: str):
    mat = bda_matrices()[name]
    rng = np.random.default_rng(1)
    boxes = random_boxes(rng, 8)
    for box in boxes:
        inside = local_to_world(box, rng.uniform(-0.45, 0.45, (50, 3)) * box[3:6])
        # Just outside along each box axis: must stay outside.
        outside = local_to_world(box, np.array([[0.6, 0, 0], [-0.6, 0, 0], [0, 0.6, 0], [0, -0.6, 0],
                                                [0, 0, 0.6], [0, 0, -0.6]]) * box[3:6])
        pts = np.concatenate([inside, outside])
        pts5 = np.concatenate([pts, rng.normal(size=(len(pts), 2))], axis=1)
        new_pts = transform_points(pts5, mat)
        np.testing.assert_array_equal(new_pts[:, 3:], pts5[:, 3:])
        new_box = transform_boxes(box[None], mat)[0]
        flags = points_in_box(devkit_box(new_box), new_pts[:, :3].T)
        assert flags[:50].all() and not flags[50:].any(), name


@pytest.mark.parametrize("name", list(bda_matrices()))
def test_box_geometry_follows_the_matrix(name: str):
    """Corners, heading (the box 'nose'), dims and velocity of the new box equal the transformed ones."""
    mat = bda_matrices()[name]
    boxes = random_boxes(np.random.default_rng(2), 6)
    new = transform_boxes(boxes, mat)
    scale = abs(np.linalg.det(mat[:3, :3])) ** (1 / 3)
    np.testing.assert_allclose(new[:, 3:6], boxes[:, 3:6] * scale, rtol=1e-12)
    dt = 0.5
    for b, nb in zip(boxes, new):
        corners = transform_points(devkit_box(b).corners().T, mat)  # [8, 3]
        new_corners = devkit_box(nb).corners().T
        dist = np.linalg.norm(corners[:, None] - new_corners[None], axis=-1)
        assert dist.min(axis=1).max() < 1e-9  # same corner set (order may change under a mirror)
        nose = transform_points(local_to_world(b, np.array([[b[3] / 2, 0, 0]])), mat)[0]
        np.testing.assert_allclose(local_to_world(nb, np.array([[nb[3] / 2, 0, 0]]))[0], nose, atol=1e-9)
        # Velocity transforms like the displacement of the centre over dt.
        moved = b[:3] + dt * np.array([b[7], b[8], 0.0])
        disp = (transform_points(moved[None], mat) - transform_points(b[None, :3], mat))[0] / dt
        np.testing.assert_allclose(nb[7:9], disp[:2], atol=1e-9)


def test_bev_matrix_ranges_and_seeding():
    mats = [bev_aug_matrix(np.random.default_rng(s), BDA) for s in range(200)]
    again = [bev_aug_matrix(np.random.default_rng(s), BDA) for s in range(3)]
    for a, b in zip(mats, again):
        np.testing.assert_array_equal(a, b)
    assert not np.allclose(mats[0], mats[1])
    scales = np.array([abs(np.linalg.det(m[:3, :3])) ** (1 / 3) for m in mats])
    assert scales.min() >= 0.9 - 1e-9 and scales.max() <= 1.1 + 1e-9
    dets = np.array([np.linalg.det(m[:2, :2]) for m in mats])
    assert (dets < 0).any() and (dets > 0).any()  # one flip mirrors, none or both do not
    z = np.array([m[2, 2] for m in mats])
    np.testing.assert_allclose(z, scales)  # rotation about z only
    with pytest.raises(ConfigError, match="scale_lim"):
        bev_aug_matrix(None, {k: v for k, v in BDA.items() if k != "scale_lim"})


# --- image augmentation ------------------------------------------------------------------------
SRC_HW, OUT_HW = (360, 640), (128, 352)
K = np.array([[300.0, 0, 320.0], [0, 300.0, 180.0], [0, 0, 1]])


def blob_image(uv: np.ndarray, sigma: float = 4.0) -> np.ndarray:
    """Black source image with a Gaussian blob centred on the (sub-)pixel uv."""
    v, u = np.mgrid[:SRC_HW[0], :SRC_HW[1]]
    g = np.exp(-((u - uv[0]) ** 2 + (v - uv[1]) ** 2) / (2 * sigma ** 2))
    return np.repeat((255 * g).round().astype(np.uint8)[..., None], 3, axis=2)


def centroid(img: np.ndarray) -> np.ndarray:
    w = img[..., 0].astype(np.float64)
    v, u = np.mgrid[:img.shape[0], :img.shape[1]]
    return np.array([(w * u).sum(), (w * v).sum()]) / w.sum()


def test_projected_point_lands_on_warped_pattern():
    point_cam = np.array([1.5, 1.2, 12.0])  # lower right of the image centre, 12 m ahead
    src = K @ point_cam / point_cam[2]
    img = blob_image(src[:2])
    hits, flips = 0, 0
    for seed in [None, *range(12)]:
        rng = None if seed is None else np.random.default_rng(seed)
        mat = image_aug_matrix(rng, SRC_HW, OUT_HW, IDA)
        target = (mat @ src)[:2]
        flips += np.linalg.det(mat[:2, :2]) < 0
        if not (12 <= target[0] < OUT_HW[1] - 12 and 12 <= target[1] < OUT_HW[0] - 12):
            continue  # the crop cut the point off
        hits += 1
        out = warp_image(img, mat, OUT_HW)
        assert out.shape == (*OUT_HW, 3) and out.dtype == np.uint8
        np.testing.assert_allclose(centroid(out), target, atol=0.3)
    assert hits >= 8 and flips >= 1


def test_eval_ida_is_fit_width_bottom_crop_and_deterministic():
    a = image_aug_matrix(None, SRC_HW, OUT_HW, IDA)
    np.testing.assert_array_equal(a, image_aug_matrix(None, SRC_HW, OUT_HW, IDA))
    fit = OUT_HW[1] / SRC_HW[1]
    np.testing.assert_allclose(a[:2, :2], np.eye(2) * fit)
    # The source's bottom edge maps to the output's bottom edge (within the int() rounding of the
    # resized size), the full width maps onto the full width.
    bottom_left = a @ np.array([0.0, SRC_HW[0], 1])
    bottom_right = a @ np.array([SRC_HW[1], SRC_HW[0], 1])
    assert abs(bottom_left[1] - OUT_HW[0]) <= fit + 1e-9
    np.testing.assert_allclose([bottom_left[0], bottom_right[0]], [0.0, OUT_HW[1]])


def test_train_ida_ranges_and_seeding():
    mats = [image_aug_matrix(np.random.default_rng(s), SRC_HW, OUT_HW, IDA) for s in range(100)]
    np.testing.assert_array_equal(mats[3], image_aug_matrix(np.random.default_rng(3), SRC_HW, OUT_HW, IDA))
    fit = OUT_HW[1] / SRC_HW[1]
    scale = np.array([np.sqrt(abs(np.linalg.det(m[:2, :2]))) for m in mats]) / fit
    assert scale.min() >= IDA["resize_lim"][0] - 1e-9 and scale.max() <= IDA["resize_lim"][1] + 1e-9
    angles = np.degrees(np.arctan2(np.abs(np.array([m[1, 0] for m in mats])),
                                   np.abs(np.array([m[0, 0] for m in mats]))))
    assert angles.max() <= IDA["rot_lim"][1] + 1e-9 and angles.max() > 1.0
    # Flip and rotation act about the output centre, so the output centre shows the centre of an
    # integer crop window of the resized image, anchored at its bottom (bot_pct_lim = 0).
    centre = np.array([(OUT_HW[1] - 1) / 2, (OUT_HW[0] - 1) / 2, 1.0])
    for m, s in zip(mats, scale * fit):
        crop = s * (np.linalg.inv(m) @ centre)[:2] - centre[:2]
        new_w, new_h = int(SRC_HW[1] * s), int(SRC_HW[0] * s)
        np.testing.assert_allclose(crop, np.round(crop), atol=1e-6)
        assert -1e-6 <= crop[0] <= max(0, new_w - OUT_HW[1]) + 1e-6
        np.testing.assert_allclose(crop[1], new_h - OUT_HW[0], atol=1e-6)
    no_flip = dict(IDA, flip=False, rot_lim=[0, 0])
    assert all(np.linalg.det(image_aug_matrix(np.random.default_rng(s), SRC_HW, OUT_HW, no_flip)[:2, :2]) > 0
               for s in range(20))


# --- collation ---------------------------------------------------------------------------------
def make_sample(token: str, n_pts: int, n_boxes: int, rng: np.random.Generator) -> dict:
    return {
        "token": token,
        "points": rng.normal(size=(n_pts, 5)).astype(np.float32),
        "images": rng.normal(size=(6, 3, 8, 16)).astype(np.float32),
        "intrinsics": np.tile(K.astype(np.float32), (6, 1, 1)),
        "cam2lidar": np.tile(np.eye(4, dtype=np.float32), (6, 1, 1)),
        "ida": np.tile(np.eye(3, dtype=np.float32), (6, 1, 1)),
        "bda": np.eye(4, dtype=np.float32),
        "gt_boxes": random_boxes(rng, n_boxes).astype(np.float32),
        "gt_labels": rng.integers(0, 10, n_boxes),
    }


def test_collate_pads_boxes_and_stacks_arrays():
    rng = np.random.default_rng(0)
    samples = [make_sample("a", 10, 3, rng), make_sample("b", 4, 0, rng), make_sample("c", 7, 1, rng)]
    batch = collate(samples)
    assert batch["token"] == ["a", "b", "c"]
    assert [p.shape[0] for p in batch["points"]] == [10, 4, 7]
    assert all(p.dtype == torch.float32 for p in batch["points"])
    assert batch["images"].shape == (3, 6, 3, 8, 16) and batch["bda"].shape == (3, 4, 4)
    assert batch["gt_boxes"].shape == (3, 3, 9) and batch["gt_labels"].dtype == torch.int64
    assert batch["gt_mask"].tolist() == [[True] * 3, [False] * 3, [True, False, False]]
    np.testing.assert_array_equal(batch["gt_boxes"][0].numpy(), samples[0]["gt_boxes"])
    np.testing.assert_array_equal(batch["gt_boxes"][2, 0].numpy(), samples[2]["gt_boxes"][0])
    assert (batch["gt_boxes"][~batch["gt_mask"]] == 0).all()
    assert (batch["gt_labels"][~batch["gt_mask"]] == -1).all()
    assert batch["gt_labels"][0].tolist() == samples[0]["gt_labels"].tolist()


def test_collate_without_boxes_and_bad_input():
    rng = np.random.default_rng(0)
    batch = collate([make_sample("a", 3, 0, rng), make_sample("b", 0, 0, rng)])
    assert batch["gt_boxes"].shape == (2, 0, 9) and batch["gt_labels"].shape == (2, 0)
    assert batch["gt_mask"].shape == (2, 0) and batch["points"][1].shape == (0, 5)
    partial = make_sample("c", 3, 1, rng)
    del partial["images"]
    with pytest.raises(KeyError, match="images"):
        collate([make_sample("d", 3, 1, rng), partial])
    bad = make_sample("e", 3, 2, rng)
    bad["gt_labels"] = bad["gt_labels"][:1]
    with pytest.raises(ValueError, match="gt_labels"):
        collate([bad])
