"""ResNet-18/50 image backbones with torchvision's parameter names.

There is no CPU torchvision build for this project's torch (DESIGN §5), so the network is written
here; its state-dict keys are exactly torchvision's (conv1, bn1, layer1..layer4 with
conv/bn/downsample.0/downsample.1, optional fc), so a standard torchvision ImageNet checkpoint file
loads with `load_pretrained`.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from models.errors import UserError


def _conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)


def _conv1x1(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (ResNet-18/34)."""

    expansion = 1

    def __init__(self, c_in: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = _conv3x3(c_in, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride, as torchvision's "ResNet v1.5"), 1x1 expand x4 (ResNet-50)."""

    expansion = 4

    def __init__(self, c_in: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = _conv1x1(c_in, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


ARCHS: dict[int, tuple[type[BasicBlock] | type[Bottleneck], tuple[int, int, int, int]]] = {
    18: (BasicBlock, (2, 2, 2, 2)),
    50: (Bottleneck, (3, 4, 6, 3)),
}


class ResNet(nn.Module):
    """ResNet returning the outputs of layer1..layer4 (strides 4, 8, 16, 32).

    Args:
        depth: 18 (BasicBlock) or 50 (Bottleneck).
        base_width: channels of the stem and layer1 (64 in torchvision); smaller values give the
            same architecture at reduced width (pretrained weights need 64).
        num_classes: if given, adds torchvision's avgpool + `fc` classifier (not used by `forward`),
            so that a state dict with `fc.*` round-trips.
        frozen_stem: freeze the stem as the original does (mmdet `frozen_stages=0`): conv1 and bn1
            get no gradients and bn1 stays in eval mode (running statistics kept) even when the
            network is put in train mode. Meant for ImageNet-initialised backbones.

    Returns (forward): list of 4 tensors [B, c_k, h / s_k, w / s_k], c_k = base_width * 2^k * expansion.
    """

    def __init__(self, depth: int = 50, base_width: int = 64, num_classes: int | None = None,
                 frozen_stem: bool = False) -> None:
        super().__init__()
        if depth not in ARCHS:
            raise UserError(f"ResNet: depth must be one of {sorted(ARCHS)}, got {depth}")
        block, layers = ARCHS[depth]
        self.depth, self.base_width = depth, base_width
        self._c = base_width
        self.conv1 = nn.Conv2d(3, base_width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(base_width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, base_width, layers[0], 1)
        self.layer2 = self._make_layer(block, base_width * 2, layers[1], 2)
        self.layer3 = self._make_layer(block, base_width * 4, layers[2], 2)
        self.layer4 = self._make_layer(block, base_width * 8, layers[3], 2)
        self.out_channels: tuple[int, ...] = tuple(base_width * 2 ** k * block.expansion for k in range(4))
        if num_classes is not None:
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(self.out_channels[-1], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        self.frozen_stem = bool(frozen_stem)
        if self.frozen_stem:
            for p in (*self.conv1.parameters(), *self.bn1.parameters()):
                p.requires_grad_(False)
            self.bn1.eval()

    def train(self, mode: bool = True) -> "ResNet":
        """Set train/eval mode; a frozen stem's bn1 stays in eval mode."""
        super().train(mode)
        if self.frozen_stem:
            self.bn1.eval()
        return self

    def _make_layer(self, block: type[BasicBlock] | type[Bottleneck], planes: int, blocks: int,
                    stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self._c != planes * block.expansion:
            downsample = nn.Sequential(_conv1x1(self._c, planes * block.expansion, stride),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self._c, planes, stride, downsample)]
        self._c = planes * block.expansion
        layers += [block(self._c, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # [B, c, h/4, w/4]
        feats = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            feats.append(x)
        return feats


def read_weights_file(path: str | Path) -> Any:
    """torch.load a weights file from a local path or an fsspec URL (s3://, gs://, https://, file://).

    Loaded with weights_only=True (tensors and containers, no pickled code) onto the CPU.
    """
    text = str(path)
    if "://" not in text:
        local = Path(text).expanduser()
        if not local.is_file():
            raise FileNotFoundError(f"pretrained ResNet weights {text}: no such file")
        return torch.load(local, map_location="cpu", weights_only=True)
    import fsspec

    try:
        with fsspec.open(text, "rb") as f:
            data = f.read()
    except FileNotFoundError as e:
        raise FileNotFoundError(f"pretrained ResNet weights {text}: no such file") from e
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def load_pretrained(model: ResNet, path: str | Path) -> ResNet:
    """Load a torchvision-format ResNet state-dict file (local path or fsspec URL) into `model`,
    ignoring `fc.*`.

    Raises ValueError naming the file and the missing, unexpected or mis-shaped keys; nothing is
    loaded unless every non-fc parameter and buffer matches.
    """
    state = read_weights_file(path)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"pretrained ResNet weights {path}: expected a state dict of tensors "
                         f"(torchvision format), got {type(state).__name__}")
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    own = {k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mis_shaped = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or mis_shaped:
        parts = []
        for name, keys in (("missing", missing), ("unexpected", unexpected)):
            if keys:
                parts.append(f"{len(keys)} {name} keys {_preview(keys)}")
        if mis_shaped:
            parts.append("shape mismatches " + _preview(
                [f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in mis_shaped]))
        raise UserError(f"pretrained ResNet weights {path} do not fit ResNet-{model.depth} "
                         f"(base width {model.base_width}): " + "; ".join(parts))
    model.load_state_dict(state, strict=False)
    return model


def _preview(keys: Sequence[str], n: int = 8) -> str:
    shown = ", ".join(keys[:n])
    return f"[{shown}{', ...' if len(keys) > n else ''}]"
