"""The BEV detector shared by every modality, teacher or student (DESIGN §3.2, spec §3).

    points ──LidarEncoder──┐
                           ├─(FusionEncoder)─> low ──BEVEncoder──> high ──CenterHead──> heatmap, regression
    images ─CameraEncoder──┘

`forward` returns the four maps that detection losses, decoding and distillation consume.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from models.bev_encoder import BEVEncoder
from models.bev_grid import BEVGrid
from models.camera_encoder import CameraEncoder
from models.center_head import CenterHead
from models.checkpoint import CheckpointError, load_state_dict_strict, read_model_file, save_model
from models.errors import UserError
from models.fusion import FusionEncoder
from models.lidar_encoder import LidarEncoder

MODALITIES = ("lidar", "camera", "fusion")
DetectorOutput = dict[str, torch.Tensor]  # low, high, heatmap, regression


class BEVDetector(nn.Module):
    """A LiDAR, camera or fusion BEV detector with a CenterHead.

    Args:
        grid: the BEV grid every part works on.
        bev_encoder: low-level BEV map -> high-level BEV map.
        head: high-level BEV map -> heat-map logits and regression maps.
        lidar_encoder: points -> BEV map (lidar and fusion).
        camera_encoder: images -> BEV map (camera and fusion).
        fusion: merges the two BEV maps (fusion only).

    forward(batch) returns {low [B, C_low, H, W], high [B, C_high, H, W],
    heatmap [B, 10, H, W] (logits), regression [B, 66, H, W]}; batch as pipeline/data/sample.py.
    """

    def __init__(self, grid: BEVGrid, bev_encoder: nn.Module, head: CenterHead,
                 lidar_encoder: nn.Module | None = None, camera_encoder: nn.Module | None = None,
                 fusion: nn.Module | None = None) -> None:
        super().__init__()
        if lidar_encoder is None and camera_encoder is None:
            raise ValueError("a detector needs a LiDAR encoder, a camera encoder, or both")
        if (lidar_encoder is not None and camera_encoder is not None) != (fusion is not None):
            raise ValueError("a fusion module is needed exactly when both encoders are present")
        self.grid = grid
        self.lidar_encoder = lidar_encoder
        self.camera_encoder = camera_encoder
        self.fusion = fusion
        self.bev_encoder = bev_encoder
        self.head = head

    @property
    def low_channels(self) -> int:
        """C_low: channels of the low-level BEV map."""
        return (self.fusion or self.lidar_encoder or self.camera_encoder).out_channels

    @property
    def high_channels(self) -> int:
        """C_high: channels of the high-level BEV map."""
        return self.bev_encoder.out_channels

    @property
    def modality(self) -> str:
        if self.fusion is not None:
            return "fusion"
        return "lidar" if self.lidar_encoder is not None else "camera"

    @property
    def supervises_depth(self) -> bool:
        """Whether training adds the camera encoder's depth loss (and forward returns `depth`)."""
        return self.camera_encoder is not None and self.camera_encoder.depth_loss_weight > 0

    def encode(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """Low-level BEV features [B, C_low, H, W] of the modalities this detector has."""
        return self._encode(batch, return_depth=False)[0]

    def _encode(self, batch: Mapping[str, Any], return_depth: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        lidar_bev = self.lidar_encoder(batch["points"]) if self.lidar_encoder is not None else None
        camera_bev = depth = None
        if self.camera_encoder is not None:
            camera_bev = self.camera_encoder(batch["images"], batch["intrinsics"], batch["cam2lidar"],
                                             batch["ida"], batch["bda"], return_depth=return_depth)
            if return_depth:
                camera_bev, depth = camera_bev
        if self.fusion is not None:
            return self.fusion(lidar_bev, camera_bev), depth
        return (lidar_bev if lidar_bev is not None else camera_bev), depth

    def forward(self, batch: Mapping[str, Any]) -> DetectorOutput:
        """The four maps; in training with depth supervision also `depth` [B, N, D, h, w]."""
        with_depth = self.training and self.supervises_depth
        low, depth = self._encode(batch, return_depth=with_depth)  # [B, C_low, H, W]
        high = self.bev_encoder(low)  # [B, C_high, H, W]
        heatmap, regression = self.head(high)  # [B, 10, H, W], [B, 66, H, W]
        out = {"low": low, "high": high, "heatmap": heatmap, "regression": regression}
        if depth is not None:
            out["depth"] = depth
        return out

    def loss(self, batch: Mapping[str, Any], out: DetectorOutput | None = None,
             reduce_count: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Named detection losses; 'loss' is their weighted total.

        `reduce_count` averages positive counts over data-parallel workers
        (pipeline.engine.comm.mean_over_workers in training) so every worker normalises alike.
        """
        out = self(batch) if out is None else out
        losses = self.head.compute_loss(out["heatmap"], out["regression"], batch["gt_boxes"],
                                        batch["gt_labels"], batch["gt_mask"], reduce_count=reduce_count)
        if "depth" in out:
            losses["depth"] = self.camera_encoder.depth_loss(out["depth"], batch)
            losses["loss"] = losses["loss"] + losses["depth"]
        return losses

    @torch.no_grad()
    def predict(self, batch: Mapping[str, Any], out: DetectorOutput | None = None) -> list[dict[str, torch.Tensor]]:
        """Per-sample boxes [K, 9] (LiDAR frame), scores [K], labels [K]."""
        out = self(batch) if out is None else out
        return self.head.decode(out["heatmap"], out["regression"])


def build_detector(cfg: Mapping[str, Any], device: torch.device | str | None = None) -> BEVDetector:
    """Build the detector a resolved config describes (`grid` and `model` sections)."""
    grid = BEVGrid.from_config(cfg["grid"])
    m = cfg["model"]
    modality = m["modality"]
    if modality not in MODALITIES:
        raise UserError(f"model.modality: {modality!r} is not one of {MODALITIES}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    lidar = camera = fusion = None
    if modality in ("lidar", "fusion"):
        lidar = LidarEncoder(grid, device=device, **m["lidar_encoder"])
    if modality in ("camera", "fusion"):
        camera = CameraEncoder(grid, **m["camera_encoder"])
    if modality == "fusion":
        fusion = FusionEncoder(lidar.out_channels, camera.out_channels, **m["fusion"])
    bev = BEVEncoder((fusion or lidar or camera).out_channels, **m["bev_encoder"])
    head = CenterHead(grid, bev.out_channels, **m["head"])
    return BEVDetector(grid, bev, head, lidar, camera, fusion).to(device)


def save_detector(path: str | Path, model: BEVDetector, cfg: Mapping[str, Any], **extra: Any) -> Path:
    """Export `model` with its config, the form every stage reads (`RUN_DIR/model.pt`)."""
    return save_model(path, model, cfg, extra)


def load_detector(path: str | Path, device: torch.device | str | None = None,
                  expect_grid: BEVGrid | None = None) -> tuple[BEVDetector, dict[str, Any]]:
    """Rebuild a detector from a local model file and load its weights strictly
    (pipeline.model_files.load_detector also takes object-store URLs)."""
    return detector_from_payload(read_model_file(path), str(path), device, expect_grid)


def detector_from_payload(payload: Mapping[str, Any], source: str, device: torch.device | str | None = None,
                          expect_grid: BEVGrid | None = None) -> tuple[BEVDetector, dict[str, Any]]:
    """Rebuild a detector from a model file's payload (read_model_file) and load its weights strictly."""
    cfg = payload["config"]
    if expect_grid is not None and BEVGrid.from_config(cfg["grid"]) != expect_grid:
        raise CheckpointError(f"model file {source}: built for grid {cfg['grid']}, expected {expect_grid.to_dict()}")
    # Built on the target device so that the sparse convs pick that device's algorithm; the
    # weights are layout-compatible between algorithms (DESIGN §5). The backbone's ImageNet file
    # (model.camera_encoder.pretrained) is not read again: the model file's weights replace it,
    # and that path need not exist where the model is used.
    build_cfg = dict(cfg)
    if (cfg["model"].get("camera_encoder") or {}).get("pretrained") is not None:
        build_cfg["model"] = {**cfg["model"], "camera_encoder": {**cfg["model"]["camera_encoder"], "pretrained": None}}
    model = build_detector(build_cfg, device=device or "cpu")
    load_state_dict_strict(model, payload["state_dict"], f"model file {source}")
    return model, cfg
