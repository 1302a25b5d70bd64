"""Camera encoder: torchvision-compatible ResNet weights, LSS geometry against LiDAR geometry, pooling."""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from models.camera_encoder import CameraEncoder, LSSViewTransform, voxel_pool
from models.resnet import ResNet, load_pretrained
from pipeline.augment import bev_aug_matrix, image_aug_matrix, transform_points
from pipeline.config import load_config
from pipeline.grid import BEVGrid

TINY = load_config("tiny")
NUSC = load_config("nuscenes")
TINY_GRID = BEVGrid.from_config(TINY["grid"])


# --- ResNet and pretrained weights -------------------------------------------------------------
def torchvision_resnet_keys(depth: int) -> list[str]:
    """The state-dict keys of torchvision's resnet18 / resnet50, from the published architecture."""
    bn = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    blocks = {18: [2, 2, 2, 2], 50: [3, 4, 6, 3]}[depth]
    convs_per_block = {18: 2, 50: 3}[depth]
    keys = ["conv1.weight"] + [f"bn1.{s}" for s in bn]
    for layer, n_blocks in enumerate(blocks, start=1):
        for block in range(n_blocks):
            p = f"layer{layer}.{block}"
            for c in range(1, convs_per_block + 1):
                keys += [f"{p}.conv{c}.weight"] + [f"{p}.bn{c}.{s}" for s in bn]
            if block == 0 and (layer > 1 or depth == 50):  # stride 2, or 64 -> 256 channels
                keys += [f"{p}.downsample.0.weight"] + [f"{p}.downsample.1.{s}" for s in bn]
    return keys + ["fc.weight", "fc.bias"]


@pytest.mark.parametrize("depth,n_keys", [(18, 122), (50, 320)])
def test_resnet_has_torchvision_state_dict_keys(depth: int, n_keys: int):
    expected = torchvision_resnet_keys(depth)
    assert len(expected) == n_keys
    sd = ResNet(depth, num_classes=1000).state_dict()
    assert list(sd) == expected
    known_shapes = {18: {"conv1.weight": (64, 3, 7, 7), "layer2.0.downsample.0.weight": (128, 64, 1, 1),
                         "layer4.1.conv2.weight": (512, 512, 3, 3), "fc.weight": (1000, 512)},
                    50: {"layer1.0.conv1.weight": (64, 64, 1, 1), "layer1.0.downsample.0.weight": (256, 64, 1, 1),
                         "layer3.0.conv2.weight": (256, 256, 3, 3), "layer4.2.conv3.weight": (2048, 512, 1, 1),
                         "fc.weight": (1000, 2048)}}[depth]
    for k, shape in known_shapes.items():
        assert tuple(sd[k].shape) == shape, k
    assert "fc.weight" not in ResNet(depth).state_dict()


def test_resnet_feature_strides_and_channels():
    feats = ResNet(50, base_width=8)(torch.zeros(1, 3, 64, 128))
    assert [tuple(f.shape[1:]) for f in feats] == [(32, 16, 32), (64, 8, 16), (128, 4, 8), (256, 2, 4)]


def test_load_pretrained_copies_weights_and_ignores_fc(tmp_path: Path):
    torch.manual_seed(1)
    src = ResNet(18, num_classes=1000)
    for p in src.parameters():
        p.data.normal_()
    path = tmp_path / "resnet18.pth"
    torch.save(src.state_dict(), path)
    dst = load_pretrained(ResNet(18), path)
    for k, v in dst.state_dict().items():
        torch.testing.assert_close(v, src.state_dict()[k], rtol=0, atol=0, msg=k)
    enc = CameraEncoder(TINY_GRID, resnet_depth=18, pretrained=path, neck_channels=8, d_bound=(2, 58, 8),
                        out_channels=4)
    torch.testing.assert_close(enc.backbone.layer3[1].conv2.weight, src.layer3[1].conv2.weight)


def test_load_pretrained_rejects_bad_files(tmp_path: Path):
    good = ResNet(18, num_classes=1000).state_dict()

    def save(sd: dict, name: str) -> Path:
        torch.save(sd, tmp_path / name)
        return tmp_path / name

    missing = {k: v for k, v in good.items() if k != "layer3.1.bn2.running_var"}
    with pytest.raises(ValueError, match=r"1 missing keys \[layer3\.1\.bn2\.running_var\]"):
        load_pretrained(ResNet(18), save(missing, "missing.pth"))
    extra = dict(good, **{"layer5.0.conv1.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"unexpected keys \[layer5\.0\.conv1\.weight\]"):
        load_pretrained(ResNet(18), save(extra, "extra.pth"))
    prefixed = {f"module.{k}": v for k, v in good.items()}
    with pytest.raises(ValueError, match=r"120 missing keys.*module\.bn1\.bias"):
        load_pretrained(ResNet(18), save(prefixed, "prefixed.pth"))
    with pytest.raises(ValueError, match=r"conv1\.weight \(64, 3, 7, 7\) vs model \(16, 3, 7, 7\)"):
        load_pretrained(ResNet(18, base_width=16), save(good, "good.pth"))
    with pytest.raises(ValueError, match="ResNet-50"):
        load_pretrained(ResNet(50), tmp_path / "good.pth")
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_pretrained(ResNet(18), tmp_path / "nope.pth")
    with pytest.raises(ValueError, match="state dict of tensors"):
        load_pretrained(ResNet(18), save({"epoch": 3, "state_dict": good}, "checkpoint.pth"))


# --- geometry ----------------------------------------------------------------------------------
SRC_HW = (360, 640)
K = np.array([[300.0, 0, 320], [0, 300.0, 180], [0, 0, 1]])


def camera_to_lidar(yaw: float, pos: tuple[float, float, float] = (1.0, 0.2, 1.6)) -> np.ndarray:
    """A level camera looking along LiDAR heading `yaw`: camera x right, y down, z forward."""
    fwd = np.array([math.cos(yaw), math.sin(yaw), 0.0])
    right = np.array([math.sin(yaw), -math.cos(yaw), 0.0])
    down = np.array([0.0, 0.0, -1.0])
    m = np.eye(4)
    m[:3, :3] = np.stack([right, down, fwd], axis=1)
    m[:3, 3] = pos
    return m


def camera_inputs(b: int, n: int, out_hw: tuple[int, int], ida_seeds: list[int | None]):
    """intrinsics, cam2lidar, ida [B, N, ...] (float64 numpy) for N cameras spread around the car."""
    ida_cfg = TINY["data"]["ida"]
    intr = np.tile(K, (b, n, 1, 1))
    c2l = np.stack([np.stack([camera_to_lidar(2 * math.pi * c / n + 0.3 * s) for c in range(n)])
                    for s in range(b)])
    ida = np.stack([np.stack([image_aug_matrix(None if ida_seeds[c] is None else np.random.default_rng(ida_seeds[c]),
                                               SRC_HW, out_hw, ida_cfg) for c in range(n)]) for _ in range(b)])
    return intr, c2l, ida


def flipping_seed() -> int:
    """A seed whose training IDA mirrors the image."""
    return next(s for s in range(100)
                if np.linalg.det(image_aug_matrix(np.random.default_rng(s), SRC_HW, (64, 176),
                                                  TINY["data"]["ida"])[:2, :2]) < 0)


def t32(*arrays: np.ndarray) -> list[torch.Tensor]:
    return [torch.as_tensor(a, dtype=torch.float32) for a in arrays]


@pytest.mark.parametrize("image_aug,bev_aug", [(False, False), (True, False), (False, True), (True, True)])
def test_frustum_point_and_lidar_point_share_a_bev_cell(image_aug: bool, bev_aug: bool):
    """A 3D point on the ray of a frustum pixel, at a bin depth, lands in the same BEV cell as
    the LiDAR point there (transformed by the BEV augmentation) - through geometry and pooling."""
    out_hw, feat_hw, stride = (64, 176), (4, 11), 16
    seeds = [flipping_seed(), 5] if image_aug else [None, None]
    intr, c2l, ida = camera_inputs(1, 2, out_hw, seeds)
    bda_cfg = dict(TINY["data"]["bda"], flip_x_prob=1.0)
    bda = bev_aug_matrix(np.random.default_rng(3), bda_cfg) if bev_aug else np.eye(4)
    view = LSSViewTransform(TINY_GRID, in_channels=8, out_channels=1, d_bound=(2.0, 58.0, 0.5))
    geom = view.geometry(*t32(intr, c2l, ida, bda[None]), feat_hw, out_hw)  # [1, 2, D, 4, 11, 3]
    assert geom.shape == (1, 2, 112, 4, 11, 3)

    checked = 0
    for cam in range(2):
        for i, j, depth in [(1, 2, 10.0), (2, 7, 12.5), (1, 9, 40.0), (3, 0, 6.0), (0, 5, 57.5), (1, 6, 30.0)]:
            k = int(round((depth - 2.0) / 0.5))
            uv = np.array([(j + 0.5) * stride - 0.5, (i + 0.5) * stride - 0.5])  # feature-pixel centre
            # The 3D point at `depth` on that pixel's ray, and a check that it projects back onto it.
            p_cam = depth * np.linalg.inv(K) @ np.linalg.inv(ida[0, cam]) @ np.append(uv, 1.0)
            proj = ida[0, cam] @ (K @ p_cam / p_cam[2])
            np.testing.assert_allclose(proj[:2], uv, atol=1e-9)
            lidar_pt = transform_points((c2l[0, cam] @ np.append(p_cam, 1.0))[None, :3], bda)[0]
            np.testing.assert_allclose(geom[0, cam, k, i, j].numpy(), lidar_pt, atol=2e-3)
            col, row = np.floor(TINY_GRID.metric_to_cell(lidar_pt[:2])).astype(int)
            z_lo, z_hi = TINY_GRID.point_cloud_range[2], TINY_GRID.point_cloud_range[5]
            inside = 0 <= col < TINY_GRID.W and 0 <= row < TINY_GRID.H and z_lo <= lidar_pt[2] < z_hi
            # Pool a one-hot depth at that pixel: only the LiDAR point's cell may light up.
            depth_prob = torch.zeros(geom.shape[:-1])
            depth_prob[0, cam, k, i, j] = 1.0
            bev = voxel_pool(TINY_GRID, geom, depth_prob, torch.ones(1, 2, 4, 11, 1))[0, 0]  # [H, W]
            expected = torch.zeros(TINY_GRID.H, TINY_GRID.W)
            if inside:
                expected[row, col] = 1.0
                checked += 1
            torch.testing.assert_close(bev, expected)
    assert checked >= 6


def naive_pool(grid: BEVGrid, geom: np.ndarray, depth: np.ndarray, context: np.ndarray) -> np.ndarray:
    b, n, d, h, w, _ = geom.shape
    x0, y0, z0, x1, y1, z1 = grid.point_cloud_range
    out = np.zeros((b, context.shape[-1], grid.H, grid.W))
    for ib, ic, idd, ih, iw in np.ndindex(b, n, d, h, w):
        x, y, z = geom[ib, ic, idd, ih, iw]
        col, row = math.floor((x - x0) / grid.cell), math.floor((y - y0) / grid.cell)
        if 0 <= col < grid.W and 0 <= row < grid.H and z0 <= z < z1:
            out[ib, :, row, col] += depth[ib, ic, idd, ih, iw] * context[ib, ic, ih, iw]
    return out


def test_voxel_pool_equals_naive_loop():
    grid = BEVGrid((-4.0, -3.0, -1.0, 4.0, 3.0, 1.0), (0.5, 0.5, 2.0), 2)  # 6 x 8 cells of 1 m
    rng = np.random.default_rng(0)
    b, n, d, h, w, c = 2, 3, 4, 2, 3, 5
    geom = rng.uniform([-5, -4, -1.5], [5, 4, 1.5], (b, n, d, h, w, 3))  # some outside x, y or z
    geom[0, 0, 0, 0, :2, :2] = [[-4.0, -3.0], [3.999, 2.999]]  # cell edges
    depth = rng.random((b, n, d, h, w))
    context = rng.normal(size=(b, n, h, w, c))
    got = voxel_pool(grid, *t32(geom, depth, context))
    assert got.shape == (b, c, grid.H, grid.W)
    expected = naive_pool(grid, geom.astype(np.float32), depth, context)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-5)
    assert np.count_nonzero(expected[:, 0]) > 10


# --- the whole encoder -------------------------------------------------------------------------
def encoder_inputs(b: int, n: int, out_hw: tuple[int, int]) -> list[torch.Tensor]:
    intr, c2l, ida = camera_inputs(b, n, out_hw, list(range(n)))
    images = torch.randn(b, n, 3, *out_hw)
    bda = np.stack([bev_aug_matrix(np.random.default_rng(s), TINY["data"]["bda"]) for s in range(b)])
    return [images, *t32(intr, c2l, ida, bda)]


def test_tiny_encoder_shape_and_gradients():
    torch.manual_seed(0)
    enc = CameraEncoder(TINY_GRID, resnet_depth=18, resnet_width=16, neck_channels=16, d_bound=(2.0, 58.0, 2.0),
                        out_channels=32)
    inputs = encoder_inputs(2, 6, tuple(TINY["data"]["image_size"]))
    bev = enc(*inputs)
    assert bev.shape == (2, 32, TINY_GRID.H, TINY_GRID.W) == (2, 32, 64, 64)
    assert torch.isfinite(bev).all()
    occupied = bev.abs().sum(dim=1) > 0  # [B, H, W]
    assert 50 < occupied[0].sum() < TINY_GRID.H * TINY_GRID.W
    bev.square().mean().backward()
    for p in (enc.backbone.conv1.weight, enc.neck.deblocks[3][0].weight, enc.view_transform.depth_net.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0


@pytest.mark.slow
def test_nuscenes_size_encoder_shape():
    """The paper's configuration at batch 1: 6 x 256 x 704 images -> [1, 256, 180, 180]."""
    grid = BEVGrid.from_config(NUSC["grid"])
    torch.manual_seed(0)
    enc = CameraEncoder(grid).eval()  # the defaults are the paper's widths
    assert enc.view_transform.num_depth_bins == 112 and enc.neck.out_channels == 512
    t0 = time.perf_counter()
    with torch.no_grad():
        bev = enc(*encoder_inputs(1, 6, tuple(NUSC["data"]["image_size"])))
    print(f"nuscenes-size camera encoder forward (batch 1, CPU): {time.perf_counter() - t0:.1f} s")
    assert bev.shape == (1, 256, 180, 180)
    assert torch.isfinite(bev).all() and (bev.abs().sum(dim=1) > 0).sum() > 1000
