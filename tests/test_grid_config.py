"""The BEV grid and the config loader: the single sources of geometry and settings."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.bev_grid import BEVGrid
from models.classes import CLASS_NAMES, NUM_REGRESSION, TASKS, regression_channel_names
from pipeline.config import ConfigError, apply_overrides, load_config, save_config


def test_presets_give_the_paper_and_tiny_grids():
    paper = BEVGrid.from_config(load_config("nuscenes")["grid"])
    assert (paper.H, paper.W) == (180, 180)
    assert paper.cell == pytest.approx(0.6)
    assert paper.voxel_grid_size == (1440, 1440, 40)
    tiny = BEVGrid.from_config(load_config("tiny")["grid"])
    assert (tiny.H, tiny.W) == (64, 64)
    assert tiny.cell == pytest.approx(1.6)


@pytest.mark.parametrize("name", ["small_lidar", "small_camera", "small_fusion", "small_lidar_to_camera",
                                  "small_fusion_to_camera", "small_camera_to_lidar", "small_fusion_to_lidar",
                                  "small_camera_depth"])
def test_small_presets_share_the_near_range_setting(name: str):
    """Every small config (the benchmark where detectors learn) is on the one near-range grid, with
    depth bins reaching its corners, the paper's implicit camera depth (small_camera_depth: LiDAR-
    supervised) and class ranges inside the grid."""
    cfg = load_config(name)
    grid = BEVGrid.from_config(cfg["grid"])
    assert (grid.H, grid.W) == (64, 64) and grid.cell == pytest.approx(0.8)
    d0, d1, _ = cfg["model"]["camera_encoder"]["d_bound"]
    assert d0 <= 1.0 and d1 >= float(np.hypot(grid.x_min, grid.y_min))
    assert (cfg["model"]["camera_encoder"]["depth_loss_weight"] > 0) == (name == "small_camera_depth")
    # image features at stride 8 of 128x352 images: 16x44 per camera (tiny: 4x11, too coarse to learn)
    assert cfg["data"]["image_size"] == [128, 352] and cfg["model"]["camera_encoder"]["neck_strides"][1] == 1
    assert cfg["eval"]["max_range"] <= -grid.x_min
    if "_to_" in name:  # (small_camera_depth is a camera detector, not a path)
        teacher, student = name.removeprefix("small_").split("_to_")
        assert cfg["distill"]["teacher_modality"] == teacher and cfg["model"]["modality"] == student


def test_cell_centres_follow_the_documented_formula():
    g = BEVGrid((-10.0, -6.0, -5.0, 10.0, 6.0, 3.0), (0.5, 0.5, 0.2), 2)  # W=20, H=12, cell 1 m
    assert (g.H, g.W) == (12, 20)
    xs, ys = g.cell_centers()
    assert xs[0] == pytest.approx(-9.5) and xs[-1] == pytest.approx(9.5)
    assert ys[0] == pytest.approx(-5.5) and ys[-1] == pytest.approx(5.5)
    # the continuous cell coordinate of a centre is (j + 0.5, i + 0.5)
    uv = g.metric_to_cell(np.array([[xs[3], ys[7]]]))
    assert np.allclose(uv, [[3.5, 7.5]])


def test_normalized_coordinates_sample_the_cell_under_a_metric_point():
    """A map whose value encodes (col, row) read by grid_sample at metric points (spec §9 a)."""
    g = BEVGrid((-10.0, -6.0, -5.0, 10.0, 6.0, 3.0), (0.5, 0.5, 0.2), 2)
    rows, cols = torch.meshgrid(torch.arange(g.H), torch.arange(g.W), indexing="ij")
    bev = (cols * 1000 + rows).float()[None, None]  # [1, 1, H, W]
    xs, ys = g.cell_centers()
    pts = torch.tensor([[xs[17], ys[2]], [xs[0], ys[11]], [xs[5], ys[5]]], dtype=torch.float32)
    grid = g.metric_to_normalized(pts)[None, None]  # [1, 1, P, 2]
    got = F.grid_sample(bev, grid, align_corners=False)[0, 0, 0]
    assert torch.allclose(got, torch.tensor([17 * 1000 + 2, 0 * 1000 + 11, 5 * 1000 + 5.0]), atol=1e-2)


def test_grid_rejects_inconsistent_geometry():
    with pytest.raises(ValueError, match="whole number"):
        BEVGrid((-10.0, -10.0, -5.0, 10.0, 10.0, 3.0), (0.3, 0.3, 0.2), 2)
    with pytest.raises(ValueError, match="divisible"):
        BEVGrid((-10.0, -10.0, -5.0, 10.0, 10.0, 3.0), (0.5, 0.5, 0.2), 3)


def test_class_order_and_channel_layout():
    assert len(CLASS_NAMES) == 10 and len(TASKS) == 6
    names = regression_channel_names()
    assert len(names) == NUM_REGRESSION == 66
    assert names[:3] == ["t0.reg.x", "t0.reg.y", "t0.height.z"] and names[-1] == "t5.iou.iou"


def test_overrides_set_known_keys_and_reject_unknown_ones():
    cfg = load_config("tiny", ["data.lidar_sweeps=5", "grid.voxel_size=[0.4, 0.4, 0.2]"])
    assert cfg["data"]["lidar_sweeps"] == 5
    assert cfg["grid"]["voxel_size"] == [0.4, 0.4, 0.2]
    # inherited from nuscenes.yaml through _base_
    assert cfg["data"]["image_mean"] == [123.675, 116.28, 103.53]
    with pytest.raises(ConfigError, match="unknown key 'lidar_sweep'"):
        apply_overrides(cfg, ["data.lidar_sweep=3"])
    with pytest.raises(ConfigError, match="expected key.path=value"):
        apply_overrides(cfg, ["data.lidar_sweeps"])
    with pytest.raises(ConfigError, match="not a preset name"):
        load_config("no_such_preset")


def test_saved_config_loads_back_identically(tmp_path):
    cfg = load_config("tiny", ["data.cbgs=true"])
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_config(path) == cfg


def test_base_cycle_and_bad_yaml_are_named(tmp_path):
    (tmp_path / "a.yaml").write_text("_base_: b.yaml\nx: 1\n")
    (tmp_path / "b.yaml").write_text("_base_: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("x: [1, 2\n")
    with pytest.raises(ConfigError, match="c.yaml: not valid YAML"):
        load_config(tmp_path / "c.yaml")
