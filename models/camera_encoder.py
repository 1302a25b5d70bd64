"""Camera encoder: ResNet -> SECOND-FPN neck -> Lift-Splat-Shoot view transform -> BEV features.

BEVDepth-style LSS without depth supervision (spec §3.3): a 1x1 depth net predicts, per feature
pixel, a softmax over D depth bins and C context channels; their outer product is "lifted" onto a
frustum of 3D points, which are taken to the (BEV-augmented) LiDAR frame through the sample's
matrices (pipeline/data/sample.py) and sum-pooled onto the BEVGrid's x/y cells with one z bin.

Mixed precision: the backbone, neck and depth net run under the caller's autocast; the frustum
geometry (ray matmuls and matrix inverses: in half precision a frustum point 50 m out moves by
centimetres in float16, up to a metre in bfloat16) and the voxel pooling run in float32 with
autocast disabled, on float32 depth probabilities and context, so the BEV map leaves the encoder in
float32 whatever the autocast dtype.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.bev_grid import BEVGrid
from models.errors import UserError
from models.resnet import ResNet, load_pretrained


class SECONDFPN(nn.Module):
    """Brings multi-scale features to one resolution and concatenates them (mmdet3d SECONDFPN).

    Args:
        in_channels: channels of each input level (e.g. ResNet-50: 256, 512, 1024, 2048).
        out_channels: channels each level is mapped to (an int for all levels).
        upsample_strides: per level; s >= 1 is a transposed conv with kernel = stride = s, s < 1 a
            conv with kernel = stride = 1/s. The paper's [0.25, 0.5, 1, 2] brings strides
            4/8/16/32 to 16.

    Returns (forward): [B, sum(out_channels), h, w], the size of the level with upsample stride 1
    (other levels are cropped or zero-padded at the bottom/right to it when image sizes are not
    multiples of 32, e.g. 176 px wide: stride 32 gives 6 columns, stride 16 gives 11).
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int | Sequence[int] = 128,
                 upsample_strides: Sequence[float] = (0.25, 0.5, 1, 2)) -> None:
        super().__init__()
        if isinstance(out_channels, int):
            out_channels = [out_channels] * len(in_channels)
        if not (len(in_channels) == len(out_channels) == len(upsample_strides)):
            raise UserError(f"SECONDFPN: in_channels {list(in_channels)}, out_channels {list(out_channels)} and "
                             f"upsample_strides {list(upsample_strides)} must have one entry per level")
        if 1 not in [float(s) for s in upsample_strides]:
            raise UserError(f"SECONDFPN: upsample_strides {list(upsample_strides)} need a level with stride 1 "
                             "(it defines the output size)")
        self.ref_level = [float(s) for s in upsample_strides].index(1.0)
        self.out_channels = int(sum(out_channels))
        self.deblocks = nn.ModuleList()
        for c_in, c_out, s in zip(in_channels, out_channels, upsample_strides):
            if s >= 1:
                k = int(round(s))
                conv: nn.Module = nn.ConvTranspose2d(c_in, c_out, k, stride=k, bias=False)
            else:
                k = int(round(1 / s))
                conv = nn.Conv2d(c_in, c_out, k, stride=k, bias=False)
            self.deblocks.append(nn.Sequential(conv, nn.BatchNorm2d(c_out, eps=1e-3, momentum=0.01),
                                               nn.ReLU(inplace=True)))

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        outs = [block(f) for block, f in zip(self.deblocks, feats)]
        h, w = outs[self.ref_level].shape[-2:]
        outs = [F.pad(o, (0, w - o.shape[-1], 0, h - o.shape[-2])) if o.shape[-2:] != (h, w) else o
                for o in outs]  # negative padding crops
        return torch.cat(outs, dim=1)  # [B, sum(out_channels), h, w]


def depth_bins(d_bound: Sequence[float]) -> torch.Tensor:
    """Depth of each bin [D] from (start, stop, step): start, start + step, ... < stop (metres)."""
    start, stop, step = (float(x) for x in d_bound)
    if not (0 < start < stop and step > 0):
        raise UserError(f"d_bound {list(d_bound)}: expected (start, stop, step) with 0 < start < stop, step > 0")
    n = int(round((stop - start) / step))
    return start + step * torch.arange(n, dtype=torch.float32)


def voxel_pool(grid: BEVGrid, geom: torch.Tensor, depth: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """Sum-pool lifted features onto the grid's x/y cells, one z bin over the grid's z range.

    Args:
        geom: [B, N, D, h, w, 3] points (x, y, z) in the augmented LiDAR frame.
        depth: [B, N, D, h, w] depth probabilities.
        context: [B, N, h, w, C] context features of each pixel.
    The feature of point (b, n, d, i, j) is depth[b, n, d, i, j] * context[b, n, i, j]; points
    outside the grid's x, y or z range are dropped. Half-precision depth or context (autocast) is
    pooled in float32: sums of thousands of frustum points per cell lose digits in float16/bfloat16.

    Returns: [B, C, H, W] in float32 (float64 if an input is float64), rows = y, cols = x.
    """
    b, n, d, h, w, _ = geom.shape
    c = context.shape[-1]
    if depth.shape != geom.shape[:-1] or context.shape != (b, n, h, w, c):
        raise ValueError(f"voxel_pool: geom {tuple(geom.shape)}, depth {tuple(depth.shape)} and context "
                         f"{tuple(context.shape)} do not match [B, N, D, h, w, 3] / [B, N, D, h, w] / [B, N, h, w, C]")
    dtype = torch.promote_types(torch.promote_types(depth.dtype, context.dtype), torch.float32)
    with torch.autocast(device_type=geom.device.type, enabled=False):
        depth, context = depth.to(dtype), context.to(dtype)
        z_min, z_max = grid.point_cloud_range[2], grid.point_cloud_range[5]
        cell = torch.floor(grid.metric_to_cell(geom[..., :2])).long()  # [B, N, D, h, w, 2] (col, row)
        z = geom[..., 2]
        keep = ((cell[..., 0] >= 0) & (cell[..., 0] < grid.W) & (cell[..., 1] >= 0) & (cell[..., 1] < grid.H)
                & (z >= z_min) & (z < z_max))  # [B, N, D, h, w]
        batch_idx = torch.arange(b, device=geom.device).view(b, 1, 1, 1, 1).expand_as(keep)
        pixel_idx = torch.arange(b * n * h * w, device=geom.device).view(b, n, 1, h, w).expand_as(keep)
        cell_id = (batch_idx * grid.H + cell[..., 1]) * grid.W + cell[..., 0]  # [B, N, D, h, w]
        feats = depth[keep].unsqueeze(1) * context.reshape(-1, c)[pixel_idx[keep]]  # [K, C]
        out = feats.new_zeros(b * grid.H * grid.W, c).index_add_(0, cell_id[keep], feats)  # typed from the features
        return out.view(b, grid.H, grid.W, c).permute(0, 3, 1, 2).contiguous()


class LSSViewTransform(nn.Module):
    """Lift image features to a depth frustum and splat them onto the BEV grid.

    Args:
        grid: the detector's BEVGrid (output cells and z range).
        in_channels: channels of the image feature map.
        out_channels: C, the BEV feature channels.
        d_bound: (start, stop, step) of the depth bins in metres.

    Returns (forward): [B, out_channels, H, W].
    """

    def __init__(self, grid: BEVGrid, in_channels: int, out_channels: int,
                 d_bound: Sequence[float] = (2.0, 58.0, 0.5)) -> None:
        super().__init__()
        self.grid = grid
        self.out_channels = out_channels
        self.register_buffer("depths", depth_bins(d_bound), persistent=False)  # [D]
        self.depth_net = nn.Conv2d(in_channels, len(self.depths) + out_channels, 1)

    @property
    def num_depth_bins(self) -> int:
        return len(self.depths)

    def frustum(self, feat_hw: tuple[int, int], image_hw: tuple[int, int]) -> torch.Tensor:
        """[D, h, w, 3] frustum points (u, v, d): feature-pixel centres in network-input pixels.

        Feature pixel (i, j) covers image pixels [j * s, (j + 1) * s) with s = image_w / w, so its
        centre is at u = (j + 0.5) * s - 0.5 in the integer-pixel-centre convention of
        pipeline/data/augment.py (likewise v with rows).
        """
        (h, w), (img_h, img_w) = feat_hw, image_hw
        dev = self.depths.device
        u = (torch.arange(w, device=dev, dtype=torch.float32) + 0.5) * (img_w / w) - 0.5
        v = (torch.arange(h, device=dev, dtype=torch.float32) + 0.5) * (img_h / h) - 0.5
        d = self.depths
        dd, vv, uu = torch.meshgrid(d, v, u, indexing="ij")
        return torch.stack([uu, vv, dd], dim=-1)

    def geometry(self, intrinsics: torch.Tensor, cam2lidar: torch.Tensor, ida: torch.Tensor, bda: torch.Tensor,
                 feat_hw: tuple[int, int], image_hw: tuple[int, int]) -> torch.Tensor:
        """[B, N, D, h, w, 3] frustum points in the augmented LiDAR frame.

        p_src = ida^-1 [u, v, 1];  p_cam = d K^-1 p_src;  p = bda cam2lidar [p_cam, 1]
        (intrinsics, ida [B, N, 3, 3]; cam2lidar [B, N, 4, 4]; bda [B, 4, 4]).
        Computed in float32 (float64 for float64 matrices) with autocast disabled: under autocast
        the matmuls would run in float16 (centimetres off at 50 m) or bfloat16 (up to ~1 m).
        """
        b, n = intrinsics.shape[:2]
        for name, t, shape in (("intrinsics", intrinsics, (b, n, 3, 3)), ("ida", ida, (b, n, 3, 3)),
                               ("cam2lidar", cam2lidar, (b, n, 4, 4)), ("bda", bda, (b, 4, 4))):
            if tuple(t.shape) != shape:
                raise ValueError(f"camera geometry: {name} has shape {tuple(t.shape)}, expected {shape}")
        dtype = torch.promote_types(intrinsics.dtype, torch.float32)
        with torch.autocast(device_type=intrinsics.device.type, enabled=False):
            intrinsics, cam2lidar, ida, bda = (t.to(dtype) for t in (intrinsics, cam2lidar, ida, bda))
            frustum = self.frustum(feat_hw, image_hw).to(dtype)  # [D, h, w, 3]
            pix = torch.cat([frustum[0, ..., :2], torch.ones_like(frustum[0, ..., :1])], dim=-1)  # [h, w, 3]
            to_aug = bda.unsqueeze(1) @ cam2lidar  # [B, N, 4, 4]
            ray_mat = to_aug[..., :3, :3] @ torch.linalg.inv(intrinsics) @ torch.linalg.inv(ida)  # [B, N, 3, 3]
            rays = torch.einsum("bnij,hwj->bnhwi", ray_mat, pix)  # [B, N, h, w, 3], camera z = 1
            origin = to_aug[..., :3, 3].view(b, n, 1, 1, 1, 3)
            return self.depths.to(dtype).view(1, 1, -1, 1, 1, 1) * rays.unsqueeze(2) + origin  # [B, N, D, h, w, 3]

    def forward(self, feats: torch.Tensor, intrinsics: torch.Tensor, cam2lidar: torch.Tensor, ida: torch.Tensor,
                bda: torch.Tensor, image_hw: tuple[int, int],
                return_depth: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """feats [B * N, C_in, h, w] (cameras of a sample consecutive) -> BEV [B, C, H, W] in float32,
        and with `return_depth` also the depth probabilities [B, N, D, h, w] (for depth supervision).

        The depth net runs under the caller's autocast; the depth softmax, geometry and pooling in
        float32 (the depth logits and context are cast up first), with autocast disabled.
        """
        b, n = intrinsics.shape[:2]
        h, w = feats.shape[-2:]
        x = self.depth_net(feats)  # [B * N, D + C, h, w], half precision under autocast
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.to(torch.promote_types(x.dtype, torch.float32))
            depth = x[:, :self.num_depth_bins].softmax(dim=1).view(b, n, -1, h, w)  # [B, N, D, h, w]
            context = x[:, self.num_depth_bins:].view(b, n, self.out_channels, h, w).permute(0, 1, 3, 4, 2)
            geom = self.geometry(intrinsics, cam2lidar, ida, bda, (h, w), image_hw)  # [B, N, D, h, w, 3]
            bev = voxel_pool(self.grid, geom, depth, context)  # [B, C, H, W]
        return (bev, depth) if return_depth else bev


def lidar_depth_targets(points: Sequence[torch.Tensor], intrinsics: torch.Tensor, cam2lidar: torch.Tensor,
                        ida: torch.Tensor, bda: torch.Tensor, feat_hw: tuple[int, int],
                        image_hw: tuple[int, int]) -> torch.Tensor:
    """Depth (m, camera z) of the nearest key-frame LiDAR point that each feature pixel sees, 0 where
    none: the supervision of a BEVDepth-style depth net. [B, N, h, w]

    points: per sample [P, 5] (x, y, z, intensity, time lag) in the augmented LiDAR frame; only the
    key frame (lag 0) is used, since sweeps see moving objects elsewhere. A point maps to the
    network-input pixel ida K p_cam / z and to the feature pixel that covers it.
    """
    b, n = intrinsics.shape[:2]
    h, w = feat_hw
    sy, sx = image_hw[0] / h, image_hw[1] / w
    out = torch.zeros(b, n * h * w, dtype=torch.float32, device=intrinsics.device)
    with torch.no_grad(), torch.autocast(device_type=intrinsics.device.type, enabled=False):
        for i, pts in enumerate(points):
            pts = pts[pts[:, 4] == 0, :3].to(torch.float64)  # [P, 3]
            to_cam = torch.linalg.inv(bda[i].to(torch.float64) @ cam2lidar[i].to(torch.float64))  # [N, 4, 4]
            p_cam = to_cam[:, :3, :3] @ pts.T + to_cam[:, :3, 3:]  # [N, 3, P]
            z = p_cam[:, 2]  # [N, P]
            pix = (ida[i].to(torch.float64) @ intrinsics[i].to(torch.float64)) @ (p_cam / z.clamp(min=1e-3).unsqueeze(1))
            col, row = torch.floor(pix[:, 0] / sx).long(), torch.floor(pix[:, 1] / sy).long()  # [N, P]
            ok = (z > 0.1) & (col >= 0) & (col < w) & (row >= 0) & (row < h)
            cam = torch.arange(n, device=pts.device).view(n, 1).expand_as(ok)
            flat = (cam * h + row) * w + col
            big = torch.full((n * h * w,), float("inf"), dtype=torch.float64, device=pts.device)
            big = big.scatter_reduce(0, flat[ok], z[ok], reduce="amin")
            out[i] = torch.where(torch.isfinite(big), big, torch.zeros_like(big)).float()
    return out.view(b, n, h, w)


def depth_loss(depth: torch.Tensor, target: torch.Tensor, depths: torch.Tensor) -> torch.Tensor:
    """BEVDepth's depth loss: binary cross-entropy of the depth probabilities [B, N, D, h, w] against
    the one-hot bin of the LiDAR depth target [B, N, h, w] (0 = no point), summed over bins and
    averaged over the supervised pixels (pixels without a point, or beyond the bins, add nothing)."""
    step = float(depths[1] - depths[0]) if len(depths) > 1 else 1.0
    idx = torch.round((target - float(depths[0])) / step).long()  # [B, N, h, w]
    valid = (target > 0) & (idx >= 0) & (idx < len(depths))
    prob = depth.float().permute(0, 1, 3, 4, 2)[valid].clamp(1e-6, 1 - 1e-6)  # [K, D]
    onehot = F.one_hot(idx[valid], len(depths)).float()  # [K, D]
    bce = F.binary_cross_entropy(prob, onehot, reduction="sum")
    return bce / valid.sum().clamp(min=1)


class CameraEncoder(nn.Module):
    """Multi-camera images -> BEV features `F_low` (spec §3.3).

    Args:
        grid: the detector's BEVGrid.
        resnet_depth: 18 or 50 (paper: 50).
        resnet_width: ResNet base width (64 = torchvision; smaller for the tiny preset).
        pretrained: a torchvision ImageNet ResNet state-dict file (local path or fsspec URL), or
            None (random init). Training the nuscenes camera/fusion presets requires it
            (pipeline.engine.trainer.check_pretrained_backbone).
        frozen_stem: freeze the ResNet stem (conv1 + bn1, bn1 in eval mode) as the original does.
        neck_channels: SECOND-FPN channels per level (paper: 128, concatenated to 512).
        neck_strides: SECOND-FPN upsample stride per ResNet level (paper: 0.25, 0.5, 1, 2).
        d_bound: depth bins (start, stop, step) in metres (paper: 2, 58, 0.5 -> 112 bins).
        out_channels: C_low, BEV feature channels (paper: 256).
        depth_loss_weight: weight of a BEVDepth-style depth loss against key-frame LiDAR depth
            (`lidar_depth_targets`, `depth_loss`); 0 (the paper's detector, spec §3.3) learns depth
            from the detection loss alone.

    Returns (forward): [B, out_channels, H, W], rows = y, cols = x of the augmented LiDAR frame,
    and with `return_depth` also the depth probabilities [B, N, D, h/s, w/s].
    """

    def __init__(self, grid: BEVGrid, resnet_depth: int = 50, resnet_width: int = 64,
                 pretrained: str | Path | None = None, neck_channels: int = 128,
                 neck_strides: Sequence[float] = (0.25, 0.5, 1, 2),
                 d_bound: Sequence[float] = (2.0, 58.0, 0.5), out_channels: int = 256,
                 frozen_stem: bool = False, depth_loss_weight: float = 0.0) -> None:
        super().__init__()
        self.grid = grid
        self.out_channels = out_channels
        self.depth_loss_weight = float(depth_loss_weight)
        self.backbone = ResNet(resnet_depth, resnet_width, frozen_stem=frozen_stem)
        if pretrained is not None:
            load_pretrained(self.backbone, pretrained)
        self.neck = SECONDFPN(self.backbone.out_channels, neck_channels, neck_strides)
        self.view_transform = LSSViewTransform(grid, self.neck.out_channels, out_channels, d_bound)

    def forward(self, images: torch.Tensor, intrinsics: torch.Tensor, cam2lidar: torch.Tensor, ida: torch.Tensor,
                bda: torch.Tensor, return_depth: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """images [B, N, 3, h, w] normalised; intrinsics, ida [B, N, 3, 3]; cam2lidar [B, N, 4, 4];
        bda [B, 4, 4] -> [B, out_channels, H, W] (and the depth probabilities with `return_depth`)."""
        if images.dim() != 5 or images.shape[2] != 3:
            raise ValueError(f"CameraEncoder: images must be [B, N_cam, 3, h, w], got {tuple(images.shape)}")
        b, n, _, h, w = images.shape
        feats = self.neck(self.backbone(images.flatten(0, 1)))  # [B * N, C_neck, h / s, w / s]
        return self.view_transform(feats, intrinsics, cam2lidar, ida, bda, (h, w), return_depth=return_depth)

    def depth_loss(self, depth: torch.Tensor, batch: Mapping[str, Any]) -> torch.Tensor:
        """Weighted depth loss of depth probabilities [B, N, D, h, w] against the batch's LiDAR points."""
        target = lidar_depth_targets(batch["points"], batch["intrinsics"], batch["cam2lidar"], batch["ida"],
                                     batch["bda"], tuple(depth.shape[-2:]), tuple(batch["images"].shape[-2:]))
        return self.depth_loss_weight * depth_loss(depth, target, self.view_transform.depths)
