"""LiDAR encoder (spec §3.2): points -> voxels -> mean voxel features -> sparse 3D ResNet with 8x
down-sampling -> height compression -> the low-level BEV map `[B, C_low, H, W]` (rows = y, cols = x).

Geometry comes from the BEVGrid only. The sparse grid is the grid's voxel grid with one extra z
layer (40 + 1 = 41 in the paper) so that the z dimension collapses to a known depth D_out
(41 -> 21 -> 11 -> 5 -> 2); the BEV channel count is C_low = C_out * D_out.

Sparse convolutions run on the CPU only with `ConvAlgo.Native` (DESIGN §5); the algorithm is fixed
when the model is built, from the device it will run on. All algorithms store weights in the same
layout, so a state dict trained on CUDA loads into a CPU-built encoder and vice versa.

Receptive-field note for head/target code: every strided sparse conv here (kernel 3, stride 2,
padding 1) centres output index o on input index 2o, so BEV cell (i, j) is centred on the fine
voxel (8i, 8j), i.e. near the cell's lower corner rather than its centre; a point anywhere in
BEVGrid cell (i, j) activates cells within rows {i, i+1} x cols {j, j+1}, always including (i, j).
"""
from __future__ import annotations

import warnings
from typing import Sequence

# spconv 2.3.6 decorates its functions with torch.cuda.amp's deprecated custom_fwd/custom_bwd at
# import time; the FutureWarnings say nothing about this project's code.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"spconv\.")
    import spconv.pytorch as spconv
import torch
from spconv.pytorch import ConvAlgo
from spconv.pytorch.utils import PointToVoxel
from torch import nn

from models.bev_grid import BEVGrid
from models.errors import UserError

BN_EPS = 1e-3
BN_MOMENTUM = 0.01
DOWNSAMPLE = 8  # three stride-2 sparse convs in x and y


def conv_algo_for(device: str | torch.device | None) -> ConvAlgo | None:
    """The sparse-conv algorithm for a device: Native on CPU, None (spconv's choice) on CUDA.

    `None` means CUDA if one is available, else CPU.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return ConvAlgo.Native if torch.device(device).type == "cpu" else None


def _resolve_algo(algo: str | ConvAlgo | None, device: str | torch.device | None) -> ConvAlgo | None:
    if isinstance(algo, ConvAlgo) or algo is None:
        return algo
    choices = {"auto": conv_algo_for(device), "native": ConvAlgo.Native, "default": None,
               "implicit_gemm": ConvAlgo.MaskImplicitGemm}
    if algo not in choices:
        raise UserError(f"LidarEncoder: algo {algo!r} is not one of {sorted(choices)} or a ConvAlgo")
    return choices[algo]


def _conv_out_size(n: int, kernel: int, stride: int, padding: int) -> int:
    return (n + 2 * padding - kernel) // stride + 1


class Voxelizer:
    """Points -> voxels with spconv's PointToVoxel, one sample at a time.

    Points outside the grid's range are dropped, at most `max_points_per_voxel` points are kept per
    voxel and at most `max_voxels` voxels per sample (first come, first kept). Keeps one
    PointToVoxel (with its pre-allocated buffers) per device; not thread-safe.

    Returns from `__call__(points)`:
        voxels [V, P, F] (zero-padded), coords [V, 4] int32 (batch, z, y, x), num_points [V] int32.
    """

    def __init__(self, grid: BEVGrid, num_point_features: int, max_points_per_voxel: int, max_voxels: int):
        self.grid = grid
        self.num_point_features = num_point_features
        self.max_points_per_voxel = max_points_per_voxel
        self.max_voxels = max_voxels
        self._generators: dict[torch.device, PointToVoxel] = {}

    def __getstate__(self) -> dict:
        # PointToVoxel buffers (a dense hash grid: 330 MB on the nuscenes grid) are rebuilt on demand,
        # never pickled or deep-copied with the model.
        return {**self.__dict__, "_generators": {}}

    def _generator(self, device: torch.device) -> PointToVoxel:
        if device not in self._generators:
            kwargs = dict(vsize_xyz=list(self.grid.voxel_size), coors_range_xyz=list(self.grid.point_cloud_range),
                          num_point_features=self.num_point_features, max_num_voxels=self.max_voxels,
                          max_num_points_per_voxel=self.max_points_per_voxel, device=device)
            if device.type == "cuda":  # PointToVoxel must be built with its device current
                with torch.cuda.device(device):
                    self._generators[device] = PointToVoxel(**kwargs)
            else:
                self._generators[device] = PointToVoxel(**kwargs)
        return self._generators[device]

    def __call__(self, points: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        voxels, coords, counts = [], [], []
        for b, pts in enumerate(points):
            if pts.dim() != 2 or pts.shape[1] != self.num_point_features:
                raise ValueError(f"LidarEncoder: points[{b}] has shape {tuple(pts.shape)}, expected "
                                 f"[N, {self.num_point_features}] (x, y, z, intensity, time lag)")
            v, c, n = self._generator(pts.device)(pts.float().contiguous())
            voxels.append(v)
            coords.append(torch.cat([c.new_full((c.shape[0], 1), b), c], dim=1))  # [V_b, 4] b, z, y, x
            counts.append(n)
        return torch.cat(voxels), torch.cat(coords), torch.cat(counts)


def mean_voxel_features(voxels: torch.Tensor, num_points: torch.Tensor) -> torch.Tensor:
    """MeanVFE: the mean of the (zero-padded) point features of each voxel. [V, P, F] -> [V, F]."""
    return voxels.sum(dim=1) / num_points.clamp(min=1).unsqueeze(1).to(voxels.dtype)


def _bn(channels: int) -> nn.BatchNorm1d:
    return nn.BatchNorm1d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class SparseBasicBlock(spconv.SparseModule):
    """Residual block of two 3x3x3 submanifold convs (conv-BN-ReLU-conv-BN, + input, ReLU).

    Args:
        channels: input = output channels.
        indice_key: shared by the submanifold convs of one resolution (reuses their index pairs).
        algo: spconv algorithm.
    Returns a SparseConvTensor with the same active sites.
    """

    def __init__(self, channels: int, indice_key: str, algo: ConvAlgo | None):
        super().__init__()
        self.conv1 = spconv.SubMConv3d(channels, channels, 3, padding=1, bias=False, indice_key=indice_key, algo=algo)
        self.bn1 = _bn(channels)
        self.conv2 = spconv.SubMConv3d(channels, channels, 3, padding=1, bias=False, indice_key=indice_key, algo=algo)
        self.bn2 = _bn(channels)
        self.relu = nn.ReLU()

    def forward(self, x: spconv.SparseConvTensor) -> spconv.SparseConvTensor:
        identity = x.features
        out = self.conv1(x)
        out = out.replace_feature(self.relu(self.bn1(out.features)))
        out = self.conv2(out)
        return out.replace_feature(self.relu(self.bn2(out.features) + identity))


class VoxelResBackBone8x(nn.Module):
    """Sparse 3D ResNet with 8x down-sampling in x and y (spec §3.2).

    stem SubM(in -> w0); stage k: [strided SparseConv3d w_{k-1} -> w_k (k > 0)] + `blocks` residual
    blocks; conv_out SparseConv3d w3 -> out_channels, kernel (3, 1, 1), stride (2, 1, 1), no padding.
    Every conv is followed by BN (eps 1e-3, momentum 0.01) and ReLU.

    Args:
        in_channels: voxel feature size (5).
        widths: channels of the 4 stages (paper 16, 32, 64, 128).
        out_channels: channels after conv_out (paper 128).
        blocks: residual blocks per stage (paper 2).
        algo: spconv algorithm of every sparse conv.
    forward(SparseConvTensor [sparse shape (Z, Y, X)]) -> SparseConvTensor of `out_channels` on
    (output_shape(Z, Y, X)).
    """

    # (kernel, stride, padding) of the down-sampling convs as (z, y, x) per stage 2, 3, 4 and conv_out
    DOWN = (((3, 3, 3), (2, 2, 2), (1, 1, 1)),
            ((3, 3, 3), (2, 2, 2), (1, 1, 1)),
            ((3, 3, 3), (2, 2, 2), (0, 1, 1)))
    OUT = ((3, 1, 1), (2, 1, 1), (0, 0, 0))

    def __init__(self, in_channels: int = 5, widths: Sequence[int] = (16, 32, 64, 128), out_channels: int = 128,
                 blocks: int = 2, algo: ConvAlgo | None = ConvAlgo.Native):
        super().__init__()
        if len(widths) != 4:
            raise UserError(f"VoxelResBackBone8x: widths must have 4 entries, got {list(widths)}")
        self.out_channels = out_channels
        self.stem = spconv.SparseSequential(
            spconv.SubMConv3d(in_channels, widths[0], 3, padding=1, bias=False, indice_key="subm1", algo=algo),
            _bn(widths[0]), nn.ReLU())
        stages = []
        for k, width in enumerate(widths):
            layers: list[nn.Module] = []
            if k > 0:
                kernel, stride, padding = self.DOWN[k - 1]
                layers += [spconv.SparseConv3d(widths[k - 1], width, kernel, stride=stride, padding=padding,
                                               bias=False, indice_key=f"spconv{k + 1}", algo=algo),
                           _bn(width), nn.ReLU()]
            layers += [SparseBasicBlock(width, indice_key=f"subm{k + 1}", algo=algo) for _ in range(blocks)]
            stages.append(spconv.SparseSequential(*layers))
        self.stages = nn.ModuleList(stages)
        kernel, stride, padding = self.OUT
        self.conv_out = spconv.SparseSequential(
            spconv.SparseConv3d(widths[-1], out_channels, kernel, stride=stride, padding=padding, bias=False,
                                indice_key="spconv_down2", algo=algo),
            _bn(out_channels), nn.ReLU())

    @classmethod
    def output_shape(cls, sparse_shape: Sequence[int]) -> tuple[int, int, int]:
        """(Z, Y, X) of the output for an input sparse shape (Z, Y, X)."""
        shape = list(sparse_shape)
        for kernel, stride, padding in (*cls.DOWN, cls.OUT):
            shape = [_conv_out_size(n, k, s, p) for n, k, s, p in zip(shape, kernel, stride, padding)]
        return tuple(shape)  # type: ignore[return-value]

    def forward(self, x: spconv.SparseConvTensor) -> spconv.SparseConvTensor:
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return self.conv_out(x)


def height_compression(x: spconv.SparseConvTensor) -> torch.Tensor:
    """Sparse [B, C, D, H, W] -> dense BEV [B, C * D, H, W]; channel c * D + d holds (c, depth d)."""
    dense = x.dense()  # [B, C, D, H, W], spatial order (z, y, x): rows = y, cols = x
    b, c, d, h, w = dense.shape
    return dense.reshape(b, c * d, h, w)


class LidarEncoder(nn.Module):
    """LiDAR points -> low-level BEV features.

    Args:
        grid: the BEVGrid (range, voxel size; out_size_factor must be 8).
        in_channels: point features (x, y, z, intensity, time lag) = 5.
        widths: sparse backbone stage widths (paper 16, 32, 64, 128).
        out_channels: channels of the backbone's last conv (paper 128); C_low = out_channels * D_out.
        blocks: residual blocks per stage (paper 2).
        max_points_per_voxel: points kept per voxel (paper 10).
        max_voxels: voxels kept per sample (paper 120000).
        device: where the encoder will run; chooses the sparse-conv algorithm when algo is "auto"
            (None: CUDA if available, else CPU).
        algo: "auto" (from device), "native", "default" (spconv's choice, CUDA only),
            "implicit_gemm", or a ConvAlgo.
    forward(points: list of [N_i, in_channels] tensors, one per sample) -> [B, C_low, grid.H, grid.W];
    the parts: voxelize(points) -> SparseConvTensor of mean voxel features, backbone(sparse) ->
    SparseConvTensor [B, out_channels, D_out, H, W], height_compression(sparse) -> the BEV map.
    Attributes: sparse_shape (Z, Y, X), out_depth (D_out), out_channels (C_low), algo.

    The algorithm is fixed at construction: an encoder built for the CPU and then moved to CUDA runs
    Native there (correct, slower); build for the device you run on and load the state dict.
    """

    def __init__(self, grid: BEVGrid, in_channels: int = 5, widths: Sequence[int] = (16, 32, 64, 128),
                 out_channels: int = 128, blocks: int = 2, max_points_per_voxel: int = 10,
                 max_voxels: int = 120000, device: str | torch.device | None = None,
                 algo: str | ConvAlgo | None = "auto"):
        super().__init__()
        if grid.out_size_factor != DOWNSAMPLE:
            raise UserError(f"LidarEncoder: grid.out_size_factor is {grid.out_size_factor}, but the sparse "
                             f"backbone down-samples x and y by {DOWNSAMPLE}")
        self.grid = grid
        self.algo = _resolve_algo(algo, device)
        nx, ny, nz = grid.voxel_grid_size
        self.sparse_shape = (nz + 1, ny, nx)  # (Z, Y, X); the extra z layer as in the paper (41 = 40 + 1)
        out_z, out_y, out_x = VoxelResBackBone8x.output_shape(self.sparse_shape)
        if (out_y, out_x) != (grid.H, grid.W) or out_z < 1:
            raise UserError(f"LidarEncoder: sparse shape {self.sparse_shape} gives output (D, H, W) = "
                             f"{(out_z, out_y, out_x)}, expected (>=1, {grid.H}, {grid.W}) from the grid")
        self.out_depth = out_z
        self.out_channels = out_channels * out_z
        self.voxelizer = Voxelizer(grid, in_channels, max_points_per_voxel, max_voxels)
        self.backbone = VoxelResBackBone8x(in_channels, widths, out_channels, blocks, self.algo)

    def voxelize(self, points: Sequence[torch.Tensor]) -> spconv.SparseConvTensor:
        """Mean voxel features as a SparseConvTensor [B, F, Z, Y, X] (indices: batch, z, y, x)."""
        if len(points) == 0:
            raise ValueError("LidarEncoder: got an empty batch (no point clouds)")
        if points[0].device.type == "cpu" and self.algo != ConvAlgo.Native:
            raise RuntimeError(f"LidarEncoder: built with sparse-conv algo {self.algo} (for CUDA) but given CPU "
                               "points; spconv runs on the CPU only with ConvAlgo.Native: build it with "
                               "device='cpu' (or algo='native') and load the state dict")
        voxels, coords, num_points = self.voxelizer(points)  # [V, P, F], [V, 4], [V]
        features = mean_voxel_features(voxels, num_points)  # [V, F]
        return spconv.SparseConvTensor(features, coords, list(self.sparse_shape), batch_size=len(points))

    def forward(self, points: Sequence[torch.Tensor]) -> torch.Tensor:
        x = self.voxelize(points)
        if x.indices.shape[0] == 0:
            # spconv cannot convolve an empty voxel set: the BEV map is all zeros. The zero-valued
            # parameter term keeps every weight in the autograd graph (DDP expects gradients for all).
            anchor = sum(p.sum() for p in self.parameters()) * 0.0
            return anchor + x.features.new_zeros(len(points), self.out_channels, self.grid.H, self.grid.W)
        return height_compression(self.backbone(x))  # [B, C_out * D_out, H, W]
