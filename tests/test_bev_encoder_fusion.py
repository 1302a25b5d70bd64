"""BEV encoder (SECOND-style levels + deblocks) and fusion: shapes, gradient flow, alignment of the
up-sampled level with the full-resolution one, and clear errors on bad input."""
from __future__ import annotations

import pytest
import torch

from models.bev_encoder import BEVEncoder
from models.fusion import FusionEncoder

SMALL = dict(layer_nums=(2, 2), layer_strides=(1, 2), num_filters=(8, 16), num_upsample_filters=(12, 12))


@pytest.mark.parametrize("kwargs, c_in, c_high", [
    (SMALL, 16, 24),
    ({}, 256, 512),  # the paper's widths (spec §3.5) on a small map
])
def test_bev_encoder_shape_and_gradients(kwargs: dict, c_in: int, c_high: int) -> None:
    torch.manual_seed(0)
    enc = BEVEncoder(c_in, **kwargs).train()
    assert enc.out_channels == c_high
    low = torch.randn(2, c_in, 12, 20, requires_grad=True)  # H != W
    high = enc(low)
    assert high.shape == (2, c_high, 12, 20)
    high.square().mean().backward()
    assert low.grad is not None and low.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in enc.parameters())


def test_bev_encoder_output_stays_where_its_input_was() -> None:
    """Deblocks put each level back over its input: an impulse at (row 10, col 33) only changes
    outputs within the receptive field around it, and shifting the input by a multiple of
    the level-2 stride (2 cells) shifts the output by the same amount."""
    torch.manual_seed(1)
    enc = BEVEncoder(6, **SMALL).eval()  # eval: no batch statistics, zero input -> zero output
    low = torch.zeros(1, 6, 48, 48)
    low[..., 10, 33] = torch.randn(6).abs() + 0.5
    with torch.no_grad():
        out = enc(low)
        shifted = enc(torch.roll(low, shifts=(4, -2), dims=(2, 3)))
    rows, cols = out.abs().sum((0, 1)).nonzero().T
    assert len(rows) > 0
    # receptive-field radius in cells: level-1 convs, then level 2 (stride-2 conv + convs at half resolution), deblock
    reach = (1 + SMALL["layer_nums"][0]) + 2 * (1 + SMALL["layer_nums"][1]) + 1
    assert (rows - 10).abs().max() <= reach and (cols - 33).abs().max() <= reach
    torch.testing.assert_close(shifted, torch.roll(out, shifts=(4, -2), dims=(2, 3)), rtol=1e-5, atol=1e-5)


def test_bev_encoder_rejects_bad_config_and_input() -> None:
    with pytest.raises(ValueError, match="same non-zero length"):
        BEVEncoder(8, layer_nums=(1, 1), layer_strides=(1,), num_filters=(8, 8), num_upsample_filters=(8, 8))
    enc = BEVEncoder(8, **SMALL)
    with pytest.raises(ValueError, match="divisible by 2"):
        enc(torch.zeros(1, 8, 15, 16))


def test_fusion_shape_attention_and_gradients() -> None:
    torch.manual_seed(0)
    fuse = FusionEncoder(c_lidar=6, c_camera=10, c_out=8).train()
    assert fuse.out_channels == 8
    lidar = torch.randn(2, 6, 9, 13, requires_grad=True)
    camera = torch.randn(2, 10, 9, 13, requires_grad=True)
    out = fuse(lidar, camera)
    assert out.shape == (2, 8, 9, 13)
    weights = fuse.attention(torch.cat([lidar, camera], 1))
    assert weights.shape == (2, 16, 1, 1) and ((weights > 0) & (weights < 1)).all()
    out.square().mean().backward()
    assert lidar.grad.abs().sum() > 0 and camera.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in fuse.parameters())


def test_fusion_rejects_mismatched_maps() -> None:
    fuse = FusionEncoder(4, 4, 4)
    with pytest.raises(ValueError, match="same B, H, W"):
        fuse(torch.zeros(1, 4, 8, 8), torch.zeros(1, 4, 8, 9))
    with pytest.raises(ValueError, match=r"\[B, 4, H, W\]"):
        fuse(torch.zeros(1, 5, 8, 8), torch.zeros(1, 4, 8, 8))
