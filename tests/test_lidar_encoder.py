"""LiDAR encoder: voxelisation follows the BEVGrid, the sparse backbone matches dense conv3d on
the CPU, BEV orientation (rows = y, cols = x), output shapes, and Native <-> default-algo weights."""
from __future__ import annotations

import numpy as np
import pytest
import spconv.pytorch as spconv
import torch
import torch.nn.functional as F
from spconv.pytorch import ConvAlgo
from spconv.pytorch.conv import SparseConvolution

from models.bev_grid import BEVGrid
from models.lidar_encoder import LidarEncoder, conv_algo_for, height_compression
from pipeline.config import load_config

TINY_KWARGS = dict(widths=(4, 8, 8, 8), out_channels=8)


@pytest.fixture(scope="module")
def tiny_grid() -> BEVGrid:
    return BEVGrid.from_config(load_config("tiny")["grid"])


def _encoder(grid: BEVGrid, seed: int = 0, **kw) -> LidarEncoder:
    torch.manual_seed(seed)
    return LidarEncoder(grid, device="cpu", **{**TINY_KWARGS, **kw})


def _points(xyz: np.ndarray, intensity: float = 1.0) -> torch.Tensor:
    """[N, 3] metric positions -> [N, 5] points (x, y, z, intensity, time lag 0)."""
    n = len(xyz)
    return torch.from_numpy(np.concatenate([xyz, np.full((n, 1), intensity), np.zeros((n, 1))], 1).astype(np.float32))


def _random_cloud(grid: BEVGrid, n: int, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    r = np.array(grid.point_cloud_range)
    xyz = rng.uniform(r[:3], r[3:], size=(n, 3))
    return _points(xyz, 0.5)


def test_voxel_indices_follow_the_grid(tiny_grid: BEVGrid) -> None:
    enc = _encoder(tiny_grid)
    rng = np.random.default_rng(1)
    r = np.array(tiny_grid.point_cloud_range)
    inside = rng.uniform(r[:3] + 0.01, r[3:] - 0.01, size=(200, 3))
    outside = np.array([[r[3] + 1.0, 0.0, 0.0], [0.0, r[1] - 1.0, 0.0], [0.0, 0.0, r[5] + 0.5]])
    x = enc.voxelize([_points(np.concatenate([inside, outside]))])
    b, z, y, xi = x.indices.long().T.numpy()
    assert len(b) == len(np.unique(np.floor((inside - r[:3]) / tiny_grid.voxel_size), axis=0))  # out-of-range dropped
    # each voxel's mean position lies in that voxel, and its x/y index // 8 is the BEVGrid cell
    mean_xyz = x.features[:, :3].double().numpy()
    voxel_of_mean = np.floor((mean_xyz - r[:3]) / tiny_grid.voxel_size).astype(int)  # (x, y, z)
    np.testing.assert_array_equal(voxel_of_mean, np.stack([xi, y, z], 1))
    cell = np.floor(tiny_grid.metric_to_cell(mean_xyz[:, :2])).astype(int)  # (col, row)
    np.testing.assert_array_equal(xi // tiny_grid.out_size_factor, cell[:, 0])
    np.testing.assert_array_equal(y // tiny_grid.out_size_factor, cell[:, 1])


def test_mean_voxel_features_and_point_cap(tiny_grid: BEVGrid) -> None:
    enc = _encoder(tiny_grid, max_points_per_voxel=4)
    a = np.array([[10.02, -3.02, 0.02], [10.08, -3.1, 0.1], [10.15, -3.15, 0.15]])  # 3 points, one voxel
    crowd = np.tile([[-20.1, 7.1, -1.1]], (9, 1))  # 9 points in another voxel, cap 4
    pts = _points(np.concatenate([a, crowd]))
    pts[:3, 3] = torch.tensor([1.0, 2.0, 6.0])
    x = enc.voxelize([pts])
    assert x.indices.shape[0] == 2
    row = int(torch.argmin((x.features[:, 0] - 10.0).abs()))
    np.testing.assert_allclose(x.features[row].numpy(), pts[:3].mean(0).numpy(), rtol=1e-6)
    assert enc.voxelizer([pts])[2].tolist() in ([3, 4], [4, 3])


def test_point_cluster_lands_in_its_grid_cell(tiny_grid: BEVGrid) -> None:
    """A cluster inside the first fine voxel of BEV cell (row i, col j) activates exactly that cell."""
    enc = _encoder(tiny_grid).eval()
    with torch.no_grad():  # weights that keep the signal: non-negative, blind to the signed x, y features
        for m in enc.modules():
            if isinstance(m, SparseConvolution):
                m.weight.abs_()
        enc.backbone.stem[0].weight[..., :2] = 0.0
    v = tiny_grid.voxel_size[0]
    cells = [(40, 9), (5, 27)]  # (row = y, col = x), asymmetric so a transposition shows
    clouds = []
    for i, j in cells:
        x0 = tiny_grid.x_min + j * tiny_grid.cell
        y0 = tiny_grid.y_min + i * tiny_grid.cell
        xyz = np.random.default_rng(i).uniform([x0, y0, 0.2], [x0 + v, y0 + v, 1.0], size=(30, 3))
        assert (np.floor(tiny_grid.metric_to_cell(xyz[:, :2])) == [j, i]).all()  # the grid's (col, row)
        clouds.append(_points(xyz, 0.8))
    with torch.no_grad():
        sparse = enc.backbone(enc.voxelize(clouds))
        bev = enc(clouds)
    active = {(int(b), int(r), int(c)) for b, _, r, c in sparse.indices.tolist()}
    assert active == {(0, 40, 9), (1, 5, 27)}
    assert bev.shape == (2, enc.out_channels, tiny_grid.H, tiny_grid.W)
    nonzero = {tuple(t) for t in bev.abs().sum(1).nonzero().tolist()}
    assert nonzero == active  # signal survives, and only there


def test_any_point_activates_its_cell_and_at_most_the_next(tiny_grid: BEVGrid) -> None:
    """Strided convs centre output o on input 2o: a point in cell (i, j) reaches rows i..i+1, cols j..j+1."""
    enc = _encoder(tiny_grid).eval()
    rng = np.random.default_rng(3)
    r = np.array(tiny_grid.point_cloud_range)
    xyz = rng.uniform(r[:3] + 2.0, r[3:] - 2.0, size=(12, 3))
    with torch.no_grad():
        sparse = enc.backbone(enc.voxelize([_points(p[None]) for p in xyz]))
    col, row = np.floor(tiny_grid.metric_to_cell(xyz[:, :2])).astype(int).T
    for b in range(len(xyz)):
        cells = {(rr, cc) for bb, _, rr, cc in sparse.indices.tolist() if bb == b}
        assert (row[b], col[b]) in cells
        assert cells <= {(row[b] + di, col[b] + dj) for di in (0, 1) for dj in (0, 1)}


def test_height_compression_layout() -> None:
    """Sparse (b, z, y, x) with channel c goes to BEV [b, c * D + z, y, x]."""
    d, h, w, c = 2, 5, 7, 3
    idx = torch.tensor([[0, 1, 4, 2], [1, 0, 1, 6]], dtype=torch.int32)  # y != x
    feats = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    bev = height_compression(spconv.SparseConvTensor(feats, idx, [d, h, w], batch_size=2))
    assert bev.shape == (2, c * d, h, w)
    expected = torch.zeros(2, c * d, h, w)
    for (b, z, y, x), f in zip(idx.tolist(), feats):
        for ch in range(c):
            expected[b, ch * d + z, y, x] = f[ch]
    torch.testing.assert_close(bev, expected)


def _sparse_input(shape: tuple[int, int, int], channels: int, n: int, seed: int) -> spconv.SparseConvTensor:
    g = torch.Generator().manual_seed(seed)
    flat = torch.randperm(int(np.prod(shape)), generator=g)[:n]
    zyx = torch.stack(torch.unravel_index(flat, shape), 1)
    idx = torch.cat([torch.zeros(n, 1, dtype=torch.long), zyx], 1).int()
    feats = torch.randn(n, channels, generator=g).requires_grad_(True)
    return spconv.SparseConvTensor(feats, idx, list(shape), batch_size=1)


@pytest.mark.parametrize("layer_name", ["stem", "down"])
def test_sparse_conv_matches_dense_conv3d(tiny_grid: BEVGrid, layer_name: str) -> None:
    """One Native sparse conv of the backbone (submanifold stem, strided down-sampling conv) equals
    F.conv3d on the densified input, forward and backward."""
    enc = _encoder(tiny_grid)
    conv = enc.backbone.stem[0] if layer_name == "stem" else enc.backbone.stages[1][0]
    assert conv.algo == ConvAlgo.Native
    x = _sparse_input((7, 9, 11), conv.in_channels, 60, seed=4)
    out = conv(x)
    weight = conv.weight.permute(0, 4, 1, 2, 3)  # KRSC [out, kz, ky, kx, in] -> [out, in, kz, ky, kx]
    dense_in = x.dense().detach().requires_grad_(True)
    ref = F.conv3d(dense_in, weight, stride=conv.stride, padding=conv.padding)
    if conv.subm:  # submanifold: outputs only at the input's active sites
        ref = ref * (dense_in.detach().abs().sum(1, keepdim=True) > 0)
    torch.testing.assert_close(out.dense(), ref, rtol=1e-4, atol=1e-5)
    probe = torch.randn(ref.shape, generator=torch.Generator().manual_seed(5))
    grad_w_sparse, grad_x_sparse = torch.autograd.grad((out.dense() * probe).sum(), [conv.weight, x.features])
    grad_w_dense, grad_x_dense = torch.autograd.grad((ref * probe).sum(), [conv.weight, dense_in])
    torch.testing.assert_close(grad_w_sparse, grad_w_dense, rtol=1e-4, atol=1e-4)
    b, z, y, xx = x.indices.long().T
    torch.testing.assert_close(grad_x_sparse, grad_x_dense[b, :, z, y, xx], rtol=1e-4, atol=1e-5)


def test_tiny_output_shape_and_gradients(tiny_grid: BEVGrid) -> None:
    enc = _encoder(tiny_grid).train()
    assert enc.sparse_shape == (41, 512, 512) and enc.out_depth == 2 and enc.out_channels == 16
    out = enc([_random_cloud(tiny_grid, 3000, 0), _random_cloud(tiny_grid, 500, 1)])
    assert out.shape == (2, 16, tiny_grid.H, tiny_grid.W)
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in enc.parameters())


@pytest.mark.slow
def test_nuscenes_grid_output_shape() -> None:
    grid = BEVGrid.from_config(load_config("nuscenes")["grid"])
    torch.manual_seed(0)
    enc = LidarEncoder(grid, device="cpu")  # paper widths 16/32/64/128, out 128
    assert enc.sparse_shape == (41, 1440, 1440) and enc.out_depth == 2 and enc.out_channels == 256
    with torch.no_grad():
        out = enc([_random_cloud(grid, 4000, 2)])
    assert out.shape == (1, 256, 180, 180) == (1, enc.out_channels, grid.H, grid.W)


def test_state_dict_is_shared_by_native_and_default_algo(tiny_grid: BEVGrid) -> None:
    assert conv_algo_for("cpu") == ConvAlgo.Native and conv_algo_for("cuda:0") is None
    native = _encoder(tiny_grid, seed=0).eval()
    gpu_style = _encoder(tiny_grid, seed=1, algo="default").eval()  # what a CUDA build uses
    assert {m.algo for m in native.modules() if isinstance(m, SparseConvolution)} == {ConvAlgo.Native}
    assert ConvAlgo.Native not in {m.algo for m in gpu_style.modules() if isinstance(m, SparseConvolution)}
    a, b = native.state_dict(), gpu_style.state_dict()
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    gpu_style.load_state_dict(a, strict=True)  # Native -> default
    back = _encoder(tiny_grid, seed=2).eval()
    back.load_state_dict(gpu_style.state_dict(), strict=True)  # default -> Native
    pts = [_random_cloud(tiny_grid, 2000, 7)]
    with torch.no_grad():
        torch.testing.assert_close(back(pts), native(pts))
    with pytest.raises(RuntimeError, match="Native"):
        gpu_style(pts)  # a CUDA-algo encoder refuses CPU points with a clear message


def test_empty_cloud_gives_zeros_and_keeps_parameters_in_graph(tiny_grid: BEVGrid) -> None:
    enc = _encoder(tiny_grid).train()
    far = _points(np.array([[500.0, 0.0, 0.0]]))
    out = enc([far, torch.zeros(0, 5)])
    assert out.shape == (2, enc.out_channels, tiny_grid.H, tiny_grid.W) and not out.any()
    out.sum().backward()
    assert all(p.grad is not None for p in enc.parameters())


def test_bad_input_is_rejected(tiny_grid: BEVGrid) -> None:
    enc = _encoder(tiny_grid)
    with pytest.raises(ValueError, match=r"points\[1\].*\[N, 5\]"):
        enc([_random_cloud(tiny_grid, 10, 0), torch.zeros(10, 4)])
    with pytest.raises(ValueError, match="out_size_factor"):
        LidarEncoder(BEVGrid((-51.2, -51.2, -5.0, 51.2, 51.2, 3.0), (0.2, 0.2, 0.2), 4), device="cpu")
    with pytest.raises(ValueError, match="algo"):
        LidarEncoder(BEVGrid((-51.2, -51.2, -5.0, 51.2, 51.2, 3.0), (0.2, 0.2, 0.2), 8), algo="fast")


def test_copies_do_not_carry_voxeliser_buffers(tiny_grid: BEVGrid) -> None:
    import copy
    import pickle

    enc = _encoder(tiny_grid)
    pts = [_random_cloud(tiny_grid, 100, 0)]
    enc.voxelize(pts)  # builds the CPU voxeliser and its hash grid
    assert len(pickle.dumps(enc)) < 5_000_000
    clone = copy.deepcopy(enc)
    torch.testing.assert_close(clone.voxelize(pts).features, enc.voxelize(pts).features)
