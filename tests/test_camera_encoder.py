"""Camera encoder: torchvision-compatible ResNet weights, LSS geometry against LiDAR geometry, pooling."""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from models.bev_grid import BEVGrid
from models.camera_encoder import CameraEncoder, LSSViewTransform, voxel_pool
from models.resnet import ResNet, load_pretrained
from pipeline.config import load_config
from pipeline.data.augment import bev_aug_matrix, image_aug_matrix, transform_points

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


# --- mixed precision ---------------------------------------------------------------------------
# CPU autocast is no stand-in for CUDA's (on the CPU the softmax stays bfloat16), so these tests
# feed the dtypes CUDA autocast produces explicitly: float32 depth probabilities (softmax runs in
# float32 there) with a float16 or bfloat16 context (the depth net's conv output).
HALF = [torch.float16, torch.bfloat16]
HALF_TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}  # ~4 ulp of the context's relative precision


def pool_inputs(seed: int = 0) -> tuple[BEVGrid, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A small grid and (geom, depth probabilities, context) with many points per cell."""
    grid = BEVGrid((-4.0, -3.0, -1.0, 4.0, 3.0, 1.0), (0.5, 0.5, 2.0), 2)  # 6 x 8 cells of 1 m
    g = torch.Generator().manual_seed(seed)
    b, n, d, h, w, c = 2, 3, 6, 4, 5, 8
    geom = torch.rand(b, n, d, h, w, 3, generator=g) * torch.tensor([10.0, 8.0, 3.0]) - torch.tensor([5.0, 4.0, 1.5])
    depth = torch.randn(b, n, d, h, w, generator=g).softmax(dim=2)
    context = torch.randn(b, n, h, w, c, generator=g)
    return grid, geom, depth, context


def assert_close_rel(got: torch.Tensor, want: torch.Tensor, rel: float, what: str) -> None:
    """|got - want| <= rel * max|want| everywhere (sums of many terms: a per-element rtol is too strict near 0)."""
    err = float((got.detach().double() - want.detach().double()).abs().max())
    assert err <= rel * float(want.abs().max()), f"{what}: max error {err:.3g} vs scale {float(want.abs().max()):.3g}"


@pytest.mark.parametrize("half", HALF)
def test_voxel_pool_pools_a_half_precision_context_in_float32(half: torch.dtype):
    """float32 depth x half context -> the float32 result (within the context's rounding), and
    gradients of both inputs in their own dtypes. Before the fix: 'index_add_(): self (BFloat16)
    and source (Float) must have the same scalar type'."""
    grid, geom, depth, context = pool_inputs()
    weight = torch.randn(2, 8, grid.H, grid.W, generator=torch.Generator().manual_seed(1))
    ref_depth, ref_context = depth.clone().requires_grad_(), context.clone().requires_grad_()
    ref = voxel_pool(grid, geom, ref_depth, ref_context)
    (ref * weight).sum().backward()

    d32, ctx = depth.clone().requires_grad_(), context.to(half).requires_grad_()
    out = voxel_pool(grid, geom, d32, ctx)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert_close_rel(out, ref.detach(), HALF_TOL[half], "forward")
    (out * weight).sum().backward()
    assert d32.grad.dtype == torch.float32 and ctx.grad.dtype == half
    assert_close_rel(d32.grad, ref_depth.grad, HALF_TOL[half], "depth gradient")
    assert_close_rel(ctx.grad.float(), ref_context.grad, HALF_TOL[half], "context gradient")
    # Under autocast too (the pooling disables it), and with half depth probabilities as well.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        both_half = voxel_pool(grid, geom, depth.to(half), context.to(half))
    assert both_half.dtype == torch.float32
    assert_close_rel(both_half, ref.detach(), 2 * HALF_TOL[half], "half depth and context")


class _CastTo(torch.nn.Module):
    """Casts its input to a dtype: a depth net whose output has CUDA autocast's conv dtype."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.dtype)


@pytest.mark.parametrize("half", HALF)
def test_lss_view_transform_with_a_half_precision_depth_net(half: torch.dtype):
    """The view transform whose depth net returns float16/bfloat16 (as under CUDA autocast) gives
    the float32 BEV map and float32 gradients of the float32 run, within half-precision tolerance."""
    out_hw, feat_hw = (64, 176), (4, 11)
    intr, c2l, ida = camera_inputs(1, 3, out_hw, [None, 1, 2])
    cams = t32(intr, c2l, ida, np.eye(4)[None])
    torch.manual_seed(0)
    view = LSSViewTransform(TINY_GRID, in_channels=8, out_channels=6, d_bound=(2.0, 58.0, 2.0))
    feats = torch.randn(3, 8, *feat_hw)
    weight = torch.randn(1, 6, TINY_GRID.H, TINY_GRID.W)

    ref = view(feats, *cams, out_hw)
    (ref * weight).sum().backward()
    ref_grad = view.depth_net.weight.grad.clone()
    view.zero_grad()

    conv = view.depth_net
    view.depth_net = torch.nn.Sequential(conv, _CastTo(half))
    out = view(feats, *cams, out_hw)
    assert out.dtype == torch.float32
    assert (ref.abs().sum(dim=1) > 0).sum() > 20  # the frustum lands on the grid
    assert_close_rel(out, ref.detach(), HALF_TOL[half], "BEV map")
    (out * weight).sum().backward()
    assert conv.weight.grad.dtype == torch.float32
    assert_close_rel(conv.weight.grad, ref_grad, 2 * HALF_TOL[half], "depth net gradient")


def test_lss_geometry_ignores_autocast():
    """The frustum geometry runs in float32 under autocast (which would run its matmuls in bfloat16)."""
    intr, c2l, ida = camera_inputs(2, 3, (64, 176), [None, 1, 2])
    bda = np.stack([bev_aug_matrix(np.random.default_rng(s), TINY["data"]["bda"]) for s in range(2)])
    view = LSSViewTransform(TINY_GRID, in_channels=8, out_channels=4, d_bound=(2.0, 58.0, 0.5))
    args = (*t32(intr, c2l, ida, bda), (4, 11), (64, 176))
    plain = view.geometry(*args)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16  # autocast is on here
        under = view.geometry(*args)
    assert under.dtype == torch.float32
    torch.testing.assert_close(under, plain, rtol=0, atol=0)


def test_tiny_encoder_trains_under_autocast():
    """The whole encoder under (CPU, bfloat16) autocast: backbone in bfloat16, BEV map in float32,
    finite gradients everywhere."""
    torch.manual_seed(0)
    enc = CameraEncoder(TINY_GRID, resnet_depth=18, resnet_width=16, neck_channels=16, d_bound=(2.0, 58.0, 2.0),
                        out_channels=32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bev = enc(*encoder_inputs(1, 6, tuple(TINY["data"]["image_size"])))
    assert bev.dtype == torch.float32 and torch.isfinite(bev).all()
    bev.square().mean().backward()
    for p in (enc.backbone.conv1.weight, enc.view_transform.depth_net.weight):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


# --- frozen stem and the paper's ImageNet ResNet-50 --------------------------------------------
def test_frozen_stem_gets_no_gradient_and_keeps_bn1_statistics():
    torch.manual_seed(0)
    net = ResNet(18, base_width=8, frozen_stem=True).train()
    assert not net.bn1.training and net.layer1[0].bn1.training  # train() keeps the stem's BN in eval
    for p in net.bn1.parameters():
        p.data.uniform_(0.5, 1.5)
    net.bn1.running_mean.fill_(0.3)
    net.bn1.running_var.fill_(2.0)
    stem_before = {k: v.clone() for k, v in net.state_dict().items() if k.startswith(("conv1.", "bn1."))}
    layer1_mean = net.layer1[0].bn1.running_mean.clone()
    opt = torch.optim.AdamW(net.parameters(), lr=0.1, weight_decay=0.01)
    for _ in range(2):
        opt.zero_grad()
        sum(f.square().mean() for f in net(torch.randn(2, 3, 32, 32))).backward()
        opt.step()
    assert net.conv1.weight.grad is None and net.bn1.weight.grad is None and net.bn1.bias.grad is None
    assert net.layer1[0].conv1.weight.grad is not None
    for k, v in net.state_dict().items():
        if k in stem_before:
            torch.testing.assert_close(v, stem_before[k], rtol=0, atol=0, msg=k)
    assert not torch.equal(net.layer1[0].bn1.running_mean, layer1_mean)  # the rest trains
    assert ResNet(18, base_width=8).train().bn1.training  # the option is off by default (tiny presets)


def test_presets_freeze_the_stem_of_the_paper_backbone_only():
    for preset in ("nuscenes_camera", "nuscenes_fusion", "nuscenes_lidar_to_camera", "nuscenes_fusion_to_camera"):
        assert load_config(preset)["model"]["camera_encoder"]["frozen_stem"] is True, preset
    for preset in ("tiny_camera", "tiny_fusion", "tiny_lidar_to_camera"):  # random init: nothing to keep
        assert not load_config(preset)["model"]["camera_encoder"].get("frozen_stem", False), preset
    enc = CameraEncoder(TINY_GRID, resnet_depth=18, resnet_width=8, neck_channels=4, d_bound=(2, 58, 8),
                        out_channels=4, frozen_stem=True).train()
    assert not enc.backbone.bn1.training and not enc.backbone.conv1.weight.requires_grad


def torchvision_resnet50_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict with torchvision resnet50's key names and shapes (worked out from the published
    architecture, not from models/resnet.py) and random values, as resnet50-0676ba61.pth holds."""
    g = torch.Generator().manual_seed(seed)
    shapes: dict[str, tuple[int, ...]] = {"conv1.weight": (64, 3, 7, 7), "bn1": (64,)}
    c_in = 64
    for layer, n_blocks in enumerate((3, 4, 6, 3), start=1):
        planes = 64 * 2 ** (layer - 1)
        for block in range(n_blocks):
            p = f"layer{layer}.{block}"
            shapes.update({f"{p}.conv1.weight": (planes, c_in, 1, 1), f"{p}.bn1": (planes,),
                           f"{p}.conv2.weight": (planes, planes, 3, 3), f"{p}.bn2": (planes,),
                           f"{p}.conv3.weight": (planes * 4, planes, 1, 1), f"{p}.bn3": (planes * 4,)})
            if block == 0:
                shapes.update({f"{p}.downsample.0.weight": (planes * 4, c_in, 1, 1), f"{p}.downsample.1": (planes * 4,)})
            c_in = planes * 4
    shapes.update({"fc.weight": (1000, 2048), "fc.bias": (1000,)})
    state: dict[str, torch.Tensor] = {}
    for key, shape in shapes.items():
        if key.endswith(".weight") or key == "fc.bias":
            state[key] = torch.randn(shape, generator=g) * 0.05
        else:  # a BatchNorm: weight, bias, running statistics, batch counter
            state.update({f"{key}.weight": torch.rand(shape, generator=g) + 0.5, f"{key}.bias": torch.randn(shape, generator=g),
                          f"{key}.running_mean": torch.randn(shape, generator=g),
                          f"{key}.running_var": torch.rand(shape, generator=g) + 0.5,
                          f"{key}.num_batches_tracked": torch.tensor(12345)})
    assert sorted(state) == sorted(torchvision_resnet_keys(50))
    return state


def test_camera_encoder_loads_a_torchvision_resnet50_file_from_a_path_or_url(tmp_path: Path):
    """CameraEncoder(pretrained=...) with a torchvision-format ResNet-50 ImageNet file: every
    backbone tensor (running statistics included) comes from it, `fc.*` is ignored; a file:// or
    other fsspec URL works like a path."""
    import fsspec

    state = torchvision_resnet50_state_dict()
    path = tmp_path / "resnet50-0676ba61.pth"
    torch.save(state, path)
    with fsspec.open("memory://weights/resnet50-0676ba61.pth", "wb") as f:
        f.write(path.read_bytes())
    small = dict(neck_channels=4, d_bound=(2, 58, 8), out_channels=4)
    enc = CameraEncoder(TINY_GRID, resnet_depth=50, resnet_width=64, pretrained=path, frozen_stem=True, **small)
    for source in (None, str(path), f"file://{path}", "memory://weights/resnet50-0676ba61.pth"):
        if source is not None:  # the same loader, from a URL (one ResNet-50 built: they are slow to build)
            for v in enc.backbone.state_dict().values():
                v.zero_()
            load_pretrained(enc.backbone, source)
        got = enc.backbone.state_dict()
        assert set(got) == set(state) - {"fc.weight", "fc.bias"}
        for k in ("conv1.weight", "bn1.running_var", "layer1.0.downsample.0.weight", "layer3.5.conv2.weight",
                  "layer4.2.bn3.bias", "layer4.2.bn3.num_batches_tracked"):
            torch.testing.assert_close(got[k], state[k], rtol=0, atol=0, msg=f"{source}: {k}")
        assert all(torch.equal(v, state[k]) for k, v in got.items()), source
    with pytest.raises(FileNotFoundError, match="memory://weights/nope.pth"):
        CameraEncoder(TINY_GRID, resnet_depth=50, pretrained="memory://weights/nope.pth", **small)
    with pytest.raises(ValueError, match="ResNet-18"):  # strict: a ResNet-50 file does not fit a ResNet-18
        CameraEncoder(TINY_GRID, resnet_depth=18, pretrained=path, **small)


def test_model_file_loads_without_the_backbone_weights_file_it_was_trained_from(tmp_path: Path):
    """A model trained from an ImageNet file records its path; loading the model file elsewhere
    (evaluation, caching, an online teacher) takes every weight from the model file and never
    opens that path."""
    from models.detector import build_detector, load_detector, save_detector

    cfg = load_config("tiny_camera")
    torch.manual_seed(0)
    model = build_detector(cfg).eval()
    cfg["model"]["camera_encoder"]["pretrained"] = str(tmp_path / "gone" / "resnet18-f37072fd.pth")
    save_detector(tmp_path / "model.pt", model, cfg)
    loaded, saved_cfg = load_detector(tmp_path / "model.pt")
    assert saved_cfg["model"]["camera_encoder"]["pretrained"].endswith("resnet18-f37072fd.pth")
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
