"""Sample index, sample loading and the Dataset, checked against the devkit on the generated dataset."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from nuscenes.eval.detection.utils import category_to_detection_name
from nuscenes.utils.data_classes import Box
from nuscenes.utils.geometry_utils import BoxVisibility, points_in_box, transform_matrix, view_points
from nuscenes.utils.splits import create_splits_scenes
from pyquaternion import Quaternion

from models.classes import CLASS_INDEX, NUM_CLASSES
from pipeline.config import load_config
from pipeline.data import nusc_db
from pipeline.data.collate import collate
from pipeline.data.dataset import DetectionDataset, boxes_in_range, cbgs_indices
from pipeline.data.index import build_index, index_path, load_index, read_index_metadata
from pipeline.data.loading import load_sample
from pipeline.data.sample import SAMPLE_KEYS

VERSION = "v1.0-mini"


# --- helpers and fixtures ----------------------------------------------------------------------
def devkit_box(b: np.ndarray, grow: float = 0.0) -> Box:
    """Devkit Box of an index box (x, y, z, dx, dy, dz, yaw, ...), each size grown by `grow` m;
    devkit size order is (w, l, h)."""
    return Box(center=b[:3], size=[b[4] + grow, b[3] + grow, b[5] + grow],
               orientation=Quaternion(axis=[0, 0, 1], radians=float(b[6])))


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Cache folder for indices (the shared dataroot stays untouched)."""
    return tmp_path_factory.mktemp("index")


@pytest.fixture(scope="module")
def val_rows(nusc_root: Path, index_dir: Path) -> list[dict]:
    return load_index(nusc_root, VERSION, "mini_val", cache_dir=index_dir)


@pytest.fixture(scope="module")
def train_rows(nusc_root: Path, index_dir: Path) -> list[dict]:
    return load_index(nusc_root, VERSION, "mini_train", cache_dir=index_dir)


@pytest.fixture(scope="module")
def data_cfg() -> dict:
    return load_config("nuscenes")["data"]


@pytest.fixture
def dataset_copy(nusc_root: Path, tmp_path: Path) -> Path:
    """A private copy of the generated dataset that a test may damage."""
    dst = tmp_path / "nuscenes"
    shutil.copytree(nusc_root, dst, ignore=shutil.ignore_patterns(".index"))
    return dst


# --- index -------------------------------------------------------------------------------------
def test_index_is_built_once_then_read_from_parquet(nusc_root, tmp_path, monkeypatch):
    first = build_index(nusc_root, VERSION, "mini_val", cache_dir=tmp_path)
    path = index_path(nusc_root, VERSION, "mini_val", cache_dir=tmp_path)
    assert path.is_file() and read_index_metadata(path)["split"] == "mini_val"
    mtime = path.stat().st_mtime_ns

    def no_devkit(*args, **kwargs):
        raise AssertionError("the devkit was opened although a current index exists")

    monkeypatch.setattr(nusc_db, "open_nuscenes", no_devkit)
    second = build_index(nusc_root, VERSION, "mini_val", cache_dir=tmp_path)
    assert second.equals(first)
    assert path.stat().st_mtime_ns == mtime
    # Other settings are not served from the stale file: they need the devkit again ...
    with pytest.raises(AssertionError, match="devkit was opened"):
        build_index(nusc_root, VERSION, "mini_val", cache_dir=tmp_path, max_sweeps=2)
    # ... and get a file of their own: runs with different sweeps never overwrite each other's index.
    monkeypatch.undo()
    two = build_index(nusc_root, VERSION, "mini_val", cache_dir=tmp_path, max_sweeps=2)
    other = index_path(nusc_root, VERSION, "mini_val", cache_dir=tmp_path, max_sweeps=2)
    assert other != path and other.is_file() and read_index_metadata(other)["max_sweeps"] == "2"
    assert path.stat().st_mtime_ns == mtime and not two.equals(first)


# A spy on the devkit's opening (the real one runs, 2 s late, as v1.0-trainval takes ~30 s); each
# process waits for the `go` file so that both look for the index at once.
_BUILDER = """
import pathlib, sys, time
from pipeline.data import nusc_db
from pipeline.data.index import build_index
real = nusc_db.open_nuscenes
def spy(*args, **kwargs):
    with open(sys.argv[3], "a") as f:
        f.write("open\\n")
    time.sleep(2)
    return real(*args, **kwargs)
nusc_db.open_nuscenes = spy
go = pathlib.Path(sys.argv[4])
while not go.exists():
    time.sleep(0.01)
print(build_index(sys.argv[1], "v1.0-mini", "mini_val", cache_dir=sys.argv[2]).num_rows)
"""


def test_concurrent_builders_wait_for_one_build(nusc_root, tmp_path):
    import subprocess
    import sys
    import time

    from tests.conftest import REPO

    opens, go = tmp_path / "opens.txt", tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", _BUILDER, str(nusc_root), str(tmp_path / "idx"), str(opens),
                               str(go)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    time.sleep(8)  # both processes have imported and are waiting
    go.touch()
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    rows = {out.strip().splitlines()[-1] for out, _ in outs}
    assert len(rows) == 1 and int(rows.pop()) > 0
    assert opens.read_text().splitlines() == ["open"], "one process built the index, the other waited and read it"


def test_a_dataset_given_the_shared_index_never_opens_the_devkit(nusc_root, dataset_copy, data_cfg):
    table = build_index(nusc_root, VERSION, "mini_val", cache_dir=dataset_copy / "idx")
    for name in nusc_db.TABLES:  # the worker's dataroot has the sensor files but no database
        (dataset_copy / VERSION / f"{name}.json").unlink()
    cfg = {**load_config("tiny_lidar"), "data": dict(load_config("tiny_lidar")["data"])}
    ds = DetectionDataset(dataset_copy, VERSION, "mini_val", cfg, train=False, with_images=False, index=table)
    assert len(ds) == table.num_rows and ds.get(0)["points"].shape[1] == 5
    with pytest.raises(FileNotFoundError, match="table .*category.json. is missing"):
        DetectionDataset(dataset_copy, VERSION, "mini_val", cfg, train=False, with_images=False)


def test_index_default_location_and_fallback(dataset_copy, tmp_path, monkeypatch):
    assert index_path(dataset_copy, VERSION, "mini_val") == dataset_copy / ".index" / "v1.0-mini_mini_val_sweeps10.parquet"
    # A dataroot where .index cannot be made (here: a file of that name) falls back to the user cache.
    (dataset_copy / ".index").rmdir()  # index_path made it, empty
    (dataset_copy / ".index").write_text("not a folder")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    path = index_path(dataset_copy, VERSION, "mini_val")
    assert path.is_relative_to(tmp_path / "xdg")
    build_index(dataset_copy, VERSION, "mini_val")
    assert path.is_file()


def test_rows_follow_devkit_split_logic(nusc, val_rows, train_rows):
    splits = create_splits_scenes()
    for split, rows in (("mini_val", val_rows), ("mini_train", train_rows)):
        expected = [s["token"] for s in nusc.sample
                    if nusc.get("scene", s["scene_token"])["name"] in splits[split]]
        assert len(rows) == len(expected) > 0
        assert {r["token"] for r in rows} == set(expected)
        # Scene order of the split list, then time order within a scene.
        order = [splits[split].index(r["scene_name"]) for r in rows]
        assert order == sorted(order)
        for a, b in zip(rows, rows[1:]):
            if a["scene_name"] == b["scene_name"]:
                assert a["timestamp"] < b["timestamp"]


def test_index_gt_matches_devkit_annotations(nusc, val_rows):
    for row in val_rows:
        sample = nusc.get("sample", row["token"])
        assert row["gt_tokens"] == sample["anns"]
        _, boxes_dev, _ = nusc.get_sample_data(row["lidar_token"])  # LiDAR frame, same order
        for b, box, name in zip(row["gt_boxes"], boxes_dev, row["gt_names"]):
            np.testing.assert_allclose(b[:3], box.center, atol=1e-6)
            np.testing.assert_allclose(b[3:6], [box.wlh[1], box.wlh[0], box.wlh[2]], atol=1e-6)
            heading = box.orientation.rotate([1.0, 0.0, 0.0])[:2]  # tilted with the ego: project it
            heading /= np.linalg.norm(heading)
            assert abs(np.cos(b[6]) - heading[0]) < 1e-9 and abs(np.sin(b[6]) - heading[1]) < 1e-9
            assert name == category_to_detection_name(box.name)


def test_key_frame_points_in_each_box_match_num_lidar_pts(nusc, val_rows, nusc_root, data_cfg):
    """Exact with the devkit's own box; between the counts of the index's yaw-only box shrunk and
    grown by the tilt it drops.

    The ego pitches and rolls (up to ~0.6 degrees) and the LIDAR_TOP calibration is slightly tilted
    (as on the real car), so in the LiDAR frame an annotation box has a small pitch/roll that
    [x, y, z, dx, dy, dz, yaw] drops: its faces move by up to half its diagonal times the tilt's sine
    (~5 cm at a trailer's ends), and points near a face, mostly ground points at the bottom, can change sides.
    """
    cfg = dict(data_cfg, lidar_sweeps=0)
    checked = 0
    for row in val_rows:
        pts = load_sample(row, nusc_root, cfg, with_images=False)["points"]
        assert np.all(pts[:, 4] == 0.0)
        xyz = pts[:, :3].T.astype(np.float64)
        _, boxes_dev, _ = nusc.get_sample_data(row["lidar_token"])
        for b, box_dev, n in zip(row["gt_boxes"], boxes_dev, row["num_lidar_pts"]):
            assert points_in_box(box_dev, xyz).sum() == n
            tilt = np.arccos(np.clip(box_dev.rotation_matrix[2, 2], -1.0, 1.0))
            margin = 2 * (0.5 * np.linalg.norm(box_dev.wlh) * np.sin(tilt) + 0.002)
            inner = int(points_in_box(devkit_box(b, -margin), xyz).sum())
            outer = int(points_in_box(devkit_box(b, margin), xyz).sum())
            assert inner <= n <= outer, (inner, n, outer)
            checked += n > 0
    assert checked > 0


def _lifted_box(b: np.ndarray, grow: float) -> Box:
    """Box b raised 0.2 m off the ground (no ground points) and grown `grow` m on each side in x/y."""
    return Box([b[0], b[1], b[2] + 0.1], [b[4] + 2 * grow, b[3] + 2 * grow, b[5] - 0.2],
               Quaternion(axis=[0, 0, 1], radians=float(b[6])))


def test_sweeps_have_increasing_lag_and_static_objects_stay_in_their_box(val_rows, nusc_root, data_cfg):
    """Sweep points of static objects land inside the key-frame box, not in a 0.5 m ring around it.

    Meaningful because the ego moves by metres over the sweeps of these scenes: untransformed
    sweeps put a quarter or more of those points into the ring.
    """
    inside, ring, ego_travel = 0, 0, 0.0
    for row in val_rows:
        n_sweeps = len(row["sweep_paths"])
        pts = load_sample(row, nusc_root, dict(data_cfg, lidar_sweeps=10), with_images=False)["points"]
        lags = np.unique(pts[:, 4])
        assert len(lags) == 1 + n_sweeps and lags[0] == 0.0  # one distinct lag per frame, key first
        np.testing.assert_allclose(lags[1:], np.sort((row["timestamp"] - row["sweep_timestamps"]) * 1e-6),
                                   rtol=1e-5)
        assert np.all(np.diff(row["sweep_timestamps"]) < 0)  # newest sweep first: lag grows
        if n_sweeps:
            ego_travel = max(ego_travel, float(np.linalg.norm(row["sweep2lidar"][-1][:2, 3])))
        sweep_pts = pts[pts[:, 4] > 0, :3].T.astype(np.float64)
        for b, n in zip(row["gt_boxes"], row["num_lidar_pts"]):
            if n < 10 or np.hypot(b[7], b[8]) > 0.05 or sweep_pts.shape[1] == 0:
                continue  # only static objects stay put across sweeps
            n_in = int(points_in_box(_lifted_box(b, 0.0), sweep_pts).sum())
            inside += n_in
            ring += int(points_in_box(_lifted_box(b, 0.5), sweep_pts).sum()) - n_in
    assert ego_travel > 1.0
    assert inside > 1000
    assert ring <= 0.03 * inside


def test_sweep_padding_at_a_scene_start_follows_the_original(val_rows, nusc_root, data_cfg):
    """`repeat` (the paper preset, as the original's info files) always loads `lidar_sweeps` sweeps:
    the last listed one repeated, or the key frame where the scene starts; `none` loads what exists."""
    assert data_cfg["lidar_sweep_padding"] == "repeat" and load_config("tiny")["data"]["lidar_sweep_padding"] == "none"
    start = next(r for r in val_rows if len(r["sweep_paths"]) == 0)
    key = load_sample(start, nusc_root, dict(data_cfg, lidar_sweep_padding="none"), with_images=False)["points"]
    padded = load_sample(start, nusc_root, dict(data_cfg, lidar_sweeps=3), with_images=False)["points"]
    np.testing.assert_array_equal(padded, np.concatenate([key] * 4))
    later = dict(next(r for r in val_rows if len(r["sweep_paths"]) >= 2))
    for k in ("sweep_paths", "sweep_timestamps", "sweep2lidar"):  # as if the scene had started one sweep ago
        later[k] = later[k][:1]
    cfg = dict(data_cfg, lidar_sweeps=3)
    lags = load_sample(later, nusc_root, cfg, with_images=False)["points"][:, 4]
    one = load_sample(later, nusc_root, dict(cfg, lidar_sweep_padding="none"), with_images=False)["points"]
    first_sweep = one[one[:, 4] > 0]
    assert len(lags) == len(one) + 2 * len(first_sweep) and np.unique(lags).size == 2
    with pytest.raises(ValueError, match="lidar_sweep_padding: 'last'"):
        load_sample(later, nusc_root, dict(cfg, lidar_sweep_padding="last"), with_images=False)


def project_like_the_devkit(nusc, rows, cameras) -> float:
    """Assert that the index's cam2lidar and intrinsics put every GT box centre where the devkit's
    get_sample_data puts it (which uses each camera's own ego pose); return the largest pixel
    offset that taking the LiDAR key frame's ego pose for the camera would cause instead."""
    projected, worst_wrong = 0, 0.0
    for row in rows:
        slots = [list(row["cam_names"]).index(c) for c in cameras]
        lidar = nusc.get("sample_data", nusc.get("sample", row["token"])["data"]["LIDAR_TOP"])
        lidar2ego = nusc.get("calibrated_sensor", lidar["calibrated_sensor_token"])
        for cam, slot in zip(cameras, slots):
            cam_token = nusc.get("sample", row["token"])["data"][cam]
            _, boxes_cam, k_dev = nusc.get_sample_data(cam_token, box_vis_level=BoxVisibility.NONE)
            by_token = {b.token: b for b in boxes_cam}
            lidar2cam = np.linalg.inv(row["cam2lidar"][slot])
            cam_calib = nusc.get("calibrated_sensor", nusc.get("sample_data", cam_token)["calibrated_sensor_token"])
            # lidar -> cam through one ego pose (the devkit's own matrix maker)
            wrong = np.linalg.inv(transform_matrix(cam_calib["translation"], Quaternion(cam_calib["rotation"]))) \
                @ transform_matrix(lidar2ego["translation"], Quaternion(lidar2ego["rotation"]))
            k = row["cam_intrinsics"][slot]
            np.testing.assert_allclose(k, k_dev)
            for ann_token, b in zip(row["gt_tokens"], row["gt_boxes"]):
                box_cam = by_token[ann_token]
                if box_cam.center[2] < 1.0:
                    continue
                expected = view_points(box_cam.center[:, None], k_dev, normalize=True)[:2, 0]
                p = lidar2cam @ np.append(b[:3], 1.0)
                ours = (k @ p[:3])[:2] / p[2]
                np.testing.assert_allclose(ours, expected, atol=1e-3)
                q = wrong @ np.append(b[:3], 1.0)
                if q[2] > 1.0:
                    worst_wrong = max(worst_wrong, float(np.abs((k @ q[:3])[:2] / q[2] - expected).max()))
                projected += 1
    assert projected > 0
    return worst_wrong


def test_cam2lidar_and_intrinsics_project_like_the_devkit(nusc, val_rows, data_cfg):
    """Cameras fire as the LiDAR sweeps past them (3-45 ms after the key frame, as in nuScenes, the
    generator's default): the index still projects like the devkit, and the data would catch a
    loader that used the LiDAR's ego pose for the cameras (it would miss by pixels)."""
    from pipeline.synthetic.rig import camera_trigger_offset_us

    for row in val_rows:
        sample = nusc.get("sample", row["token"])
        for cam in data_cfg["cameras"]:
            sd = nusc.get("sample_data", sample["data"][cam])
            assert sd["timestamp"] - sample["timestamp"] == camera_trigger_offset_us(cam) > 0
    worst = project_like_the_devkit(nusc, val_rows, data_cfg["cameras"])
    assert worst > 2.0, f"a LiDAR-ego-pose loader would be off by only {worst:.2f} px"


def test_cameras_at_the_key_frame_share_the_lidar_ego_pose(tmp_path_factory, data_cfg):
    """camera_trigger="keyframe" (generator version 1's only behaviour) stamps every camera at the
    LiDAR key frame: the index projects like the devkit, and there the LiDAR's ego pose is the
    cameras' own, so the wrong loader above would agree (what the default's timing catches)."""
    from nuscenes.nuscenes import NuScenes

    from pipeline.synthetic import generate

    root = tmp_path_factory.mktemp("keyframe")
    generate(root, samples_per_scene=2, image_size=(160, 90), camera_trigger="keyframe")
    nusc = NuScenes(version=VERSION, dataroot=str(root), verbose=False)
    rows = load_index(root, VERSION, "mini_val", cache_dir=root / "idx")
    for row in rows:
        sample = nusc.get("sample", row["token"])
        assert all(nusc.get("sample_data", sample["data"][cam])["timestamp"] == sample["timestamp"]
                   for cam in data_cfg["cameras"])
    assert project_like_the_devkit(nusc, rows, data_cfg["cameras"]) < 1e-3


def test_load_sample_contract_and_gt_filter(nusc, val_rows, nusc_root, data_cfg):
    # the fullest sample among those with annotations outside the 10 classes (the filter must drop them)
    row = max(val_rows, key=lambda r: (None in r["gt_names"], len(r["gt_tokens"])))
    assert None in row["gt_names"], "the stand-in annotates objects of other categories"
    s = load_sample(row, nusc_root, dict(data_cfg, lidar_sweep_padding="none"))  # lag 0 = the key frame only
    assert s["token"] == row["token"]
    assert s["points"].dtype == np.float32 and s["points"].shape[1] == 5
    key_pts = np.fromfile(nusc_root / row["lidar_path"], dtype=np.float32).reshape(-1, 5)
    assert (s["points"][:, 4] == 0).sum() == len(key_pts)
    np.testing.assert_array_equal(s["points"][: len(key_pts), :4], key_pts[:, :4])
    n_cam = len(data_cfg["cameras"])
    assert s["images"].dtype == np.uint8 and s["images"].ndim == 4 and s["images"].shape[::3] == (n_cam, 3)
    assert s["intrinsics"].shape == (n_cam, 3, 3) and s["cam2lidar"].shape == (n_cam, 4, 4)
    # The front camera's image is the file of the sample's CAM_FRONT sample_data.
    front = nusc.get("sample_data", nusc.get("sample", row["token"])["data"]["CAM_FRONT"])
    assert row["cam_paths"][list(row["cam_names"]).index("CAM_FRONT")] == front["filename"]
    # GT: annotations of the 10 classes with enough points, in annotation order.
    min_pts = data_cfg["min_points_in_box"]
    expected = []
    for ann_token in nusc.get("sample", row["token"])["anns"]:
        ann = nusc.get("sample_annotation", ann_token)
        name = category_to_detection_name(ann["category_name"])
        if name is not None and ann["num_lidar_pts"] + ann["num_radar_pts"] >= min_pts:
            expected.append(CLASS_INDEX[name])
    assert s["gt_labels"].dtype == np.int64 and s["gt_labels"].tolist() == expected
    assert s["gt_boxes"].shape == (len(expected), 9) and s["gt_boxes"].dtype == np.float32


# --- dataset -----------------------------------------------------------------------------------
def _check_contract(s: dict, cfg: dict) -> None:
    n_cam = len(cfg["data"]["cameras"])
    h, w = cfg["data"]["image_size"]
    assert set(SAMPLE_KEYS) <= set(s)
    assert s["images"].shape == (n_cam, 3, h, w) and s["images"].dtype == np.float32
    assert s["ida"].shape == (n_cam, 3, 3) and s["bda"].shape == (4, 4)
    assert s["points"].ndim == 2 and s["points"].shape[1] == 5 and s["points"].dtype == np.float32
    assert s["gt_boxes"].shape == (len(s["gt_labels"]), 9) and s["gt_labels"].dtype == np.int64
    assert np.all((s["gt_labels"] >= 0) & (s["gt_labels"] < NUM_CLASSES))
    assert boxes_in_range(s["gt_boxes"], cfg["grid"]["point_cloud_range"]).all()


def test_dataset_eval_and_train_samples(nusc_root, index_dir):
    cfg = load_config("tiny")
    ev = DetectionDataset(nusc_root, VERSION, "mini_val", cfg, train=False, seed=0, cache_dir=index_dir)
    tr = DetectionDataset(nusc_root, VERSION, "mini_train", cfg, train=True, seed=3, cache_dir=index_dir)
    s_ev, s_tr = ev[0], tr[1]
    _check_contract(s_ev, cfg)
    _check_contract(s_tr, cfg)
    np.testing.assert_array_equal(s_ev["bda"], np.eye(4))
    # Eval images: normalised with the config's mean/std, so roughly zero-centred and not all equal.
    assert abs(float(s_ev["images"].mean())) < 3.0 and float(s_ev["images"].std()) > 0.05
    # Training views are a function of (seed, epoch, item).
    again = tr.get(1)
    for key in ("points", "images", "ida", "bda", "gt_boxes"):
        np.testing.assert_array_equal(again[key], s_tr[key])
    np.testing.assert_array_equal(s_tr["bda"], tr.bev_aug_matrix_of(1).astype(np.float32))
    tr.set_epoch(1)
    assert not np.allclose(tr[1]["bda"], s_tr["bda"])
    batch = collate([s_ev, s_tr])
    assert batch["images"].shape[:2] == (2, len(cfg["data"]["cameras"]))


def test_dataset_bda_moves_points_and_boxes_together(nusc_root, index_dir):
    cfg = load_config("tiny")
    cfg["data"]["bda"]["trans_std"] = [0.0, 0.0, 0.0]  # keep every box in range: counts must match
    tr = DetectionDataset(nusc_root, VERSION, "mini_val", cfg, train=True, seed=5, cache_dir=index_dir,
                          with_images=False)
    item = max(range(len(tr)), key=lambda i: len(tr.row(i)["gt_tokens"]))
    plain = tr.get(item, bda=np.eye(4))
    aug = tr.get(item)
    assert not np.allclose(aug["bda"], np.eye(4))
    assert len(plain["gt_boxes"]) == len(aug["gt_boxes"]) > 0
    for b0, b1 in zip(plain["gt_boxes"], aug["gt_boxes"]):
        n0 = points_in_box(devkit_box(b0), plain["points"][:, :3].T.astype(np.float64)).sum()
        n1 = points_in_box(devkit_box(b1), aug["points"][:, :3].T.astype(np.float64)).sum()
        assert abs(int(n0) - int(n1)) <= max(1, 0.02 * n0)  # float round-off at box faces only


def test_cbgs_balances_classes_reproducibly(train_rows):
    idx = cbgs_indices(train_rows, 1, seed=0)
    np.testing.assert_array_equal(idx, cbgs_indices(train_rows, 1, seed=0))
    frames = {}
    for i, row in enumerate(train_rows):
        for name in set(n for n, a, b in zip(row["gt_names"], row["num_lidar_pts"], row["num_radar_pts"])
                        if n in CLASS_INDEX and a + b >= 1):
            frames.setdefault(name, set()).add(i)
    total = sum(len(v) for v in frames.values())
    # Each class present gets about total / 10 draws, all from frames containing it.
    start = 0
    for name in sorted(frames, key=CLASS_INDEX.get):
        n = int(len(frames[name]) * 0.1 / (len(frames[name]) / total))
        drawn = idx[start:start + n]
        assert set(drawn.tolist()) <= frames[name]
        start += n
    assert start == len(idx)


def test_boxes_in_range_uses_any_corner():
    rng = [-10.0, -10.0, -5.0, 10.0, 10.0, 3.0]
    boxes = np.array([
        [0, 0, 0, 2, 1, 1, 0, 0, 0],  # well inside
        [10.8, 0, 0, 2, 1, 1, 0, 0, 0],  # centre outside, back corners inside (x from 9.8)
        [11.2, 0, 0, 2, 1, 1, 0, 0, 0],  # all corners outside
        [10.8, 0, 0, 2, 1, 1, np.pi / 2, 0, 0],  # rotated: x extent only +-0.5, outside
    ], dtype=np.float32)
    assert boxes_in_range(boxes, rng).tolist() == [True, True, False, False]


# --- bad input ---------------------------------------------------------------------------------
def test_errors_name_the_problem(nusc_root, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        nusc_db.open_nuscenes(tmp_path / "nowhere", VERSION)
    with pytest.raises(ValueError, match="v1.0-mini.*v1.0-trainval.*v1.0-test"):
        nusc_db.open_nuscenes(nusc_root, "v1.0-tiny")
    with pytest.raises(FileNotFoundError, match="v1.0-trainval"):
        nusc_db.open_nuscenes(nusc_root, "v1.0-trainval")
    with pytest.raises(ValueError, match="'val' is not valid for nuScenes v1.0-mini.*mini_train"):
        build_index(nusc_root, VERSION, "val", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="valid splits: \\['test'\\]"):
        nusc_db.split_scenes("v1.0-test", "train")
    assert len(nusc_db.split_scenes("v1.0-trainval", "val")) == 150


def test_missing_table_is_named(dataset_copy):
    (dataset_copy / VERSION / "sample_annotation.json").unlink()
    with pytest.raises(FileNotFoundError, match="sample_annotation.json"):
        nusc_db.open_nuscenes(dataset_copy, VERSION)


def test_half_installed_lidarseg_is_named(dataset_copy):
    """The devkit loads lidarseg whenever its table exists and then fails with a bare AssertionError."""
    import json

    (dataset_copy / VERSION / "lidarseg.json").write_text(json.dumps(
        [{"token": "a", "sample_data_token": "x", "filename": "lidarseg/v1.0-mini/a_lidarseg.bin"},
         {"token": "b", "sample_data_token": "y", "filename": "lidarseg/v1.0-mini/b_lidarseg.bin"}]))
    with pytest.raises(ValueError, match="nuScenes-lidarseg is half installed.*label folder.*lidarseg/v1.0-mini"):
        nusc_db.open_nuscenes(dataset_copy, VERSION)
    labels = dataset_copy / "lidarseg" / VERSION
    labels.mkdir(parents=True)
    (labels / "a_lidarseg.bin").write_bytes(b"\0" * 8)
    with pytest.raises(ValueError, match="lists 2 label files but .* holds 1; install nuScenes-lidarseg completely"):
        nusc_db.open_nuscenes(dataset_copy, VERSION)


def test_vertical_velocity_is_dropped_before_the_rotation_into_the_lidar_frame(dataset_copy, tmp_path):
    """With a pitched ego and objects that climb, the LiDAR-frame velocity is the rotated ground-plane one."""
    import json

    poses = json.loads((dataset_copy / VERSION / "ego_pose.json").read_text())
    pitch = Quaternion(axis=[0, 1, 0], degrees=8.0)
    for pose in poses:
        pose["rotation"] = list((Quaternion(pose["rotation"]) * pitch).elements)
    (dataset_copy / VERSION / "ego_pose.json").write_text(json.dumps(poses))
    anns = json.loads((dataset_copy / VERSION / "sample_annotation.json").read_text())
    stamps = {s["token"]: s["timestamp"] for s in json.loads((dataset_copy / VERSION / "sample.json").read_text())}
    for ann in anns:  # every object climbs at 3 m/s
        ann["translation"][2] += 3.0 * stamps[ann["sample_token"]] * 1e-6
    (dataset_copy / VERSION / "sample_annotation.json").write_text(json.dumps(anns))
    rows = load_index(dataset_copy, VERSION, "mini_val", cache_dir=tmp_path / "idx")
    nusc = nusc_db.open_nuscenes(dataset_copy, VERSION)
    checked = 0
    for row in rows[:3]:
        global2lidar = np.linalg.inv(np.asarray(row["ego2global"]).reshape(4, 4)
                                     @ np.asarray(row["lidar2ego"]).reshape(4, 4))[:3, :3]
        boxes = np.asarray(row["gt_boxes"]).reshape(-1, 9)
        for token, box in zip(row["gt_tokens"], boxes):
            vel = np.nan_to_num(nusc.box_velocity(token), nan=0.0)
            if not np.any(vel[:2]):
                continue
            assert abs(vel[2] - 3.0) < 1e-6  # the climb is in the global velocity ...
            ground = global2lidar @ np.array([vel[0], vel[1], 0.0])
            np.testing.assert_allclose(box[7:9], ground[:2], atol=1e-6)  # ... but not in the box's
            checked += 1
    assert checked > 10


def test_check_files_lists_missing_and_truncated_sensor_files(dataset_copy, tmp_path, capsys):
    from pipeline.data.file_check import check_split_files

    cfg = load_config("tiny_camera")
    checked = check_split_files(dataset_copy, VERSION, "mini_val", cfg)
    rows = load_index(dataset_copy, VERSION, "mini_val")
    assert checked == sum(1 + min(3, len(r["sweep_paths"])) + 6 for r in rows)
    assert "problems" in capsys.readouterr().out  # progress lines
    row = next(r for r in rows if len(r["sweep_paths"]) >= 3)
    key, sweep, cam, empty = (dataset_copy / row["lidar_path"], dataset_copy / row["sweep_paths"][1],
                              dataset_copy / row["cam_paths"][0], dataset_copy / row["cam_paths"][4])
    key.write_bytes(key.read_bytes()[:-3])  # a half-copied file
    sweep.unlink()
    cam.write_bytes(cam.read_bytes()[:-100])
    empty.write_bytes(b"")
    unused = dataset_copy / row["sweep_paths"][5]  # tiny loads 3 sweeps: the 6th is never read
    unused.unlink()
    with pytest.raises(ValueError, match="4 of the .* sensor files of v1.0-mini mini_val") as e:
        check_split_files(dataset_copy, VERSION, "mini_val", cfg)
    msg = str(e.value)
    assert f"{key}: " in msg and "point records (truncated?)" in msg
    assert f"{sweep}: missing" in msg and f"{empty}: empty" in msg
    assert f"{cam}: does not end with the JPG end marker" in msg and str(unused) not in msg
    # A LiDAR model reads no images: only the point files count, unless asked (an online camera teacher).
    with pytest.raises(ValueError, match="2 of the"):
        check_split_files(dataset_copy, VERSION, "mini_val", load_config("tiny_lidar"))
    with pytest.raises(ValueError, match="4 of the"):
        check_split_files(dataset_copy, VERSION, "mini_val", load_config("tiny_lidar"), images=True)
    # The evaluate and cache stages check for the model file's own config.
    from models.detector import build_detector, save_detector
    from pipeline.data.file_check import check_model_split_files

    lidar_cfg = load_config("tiny_lidar")
    model_file = save_detector(tmp_path / "model.pt", build_detector(lidar_cfg), lidar_cfg)
    with pytest.raises(ValueError, match="2 of the"):
        check_model_split_files(str(model_file), dataset_copy, VERSION, "mini_val")


def test_stage_with_check_files_stops_before_any_work(dataset_copy, tmp_path):
    import subprocess
    import sys

    from tests.conftest import REPO

    row = load_index(dataset_copy, VERSION, "mini_train")[0]
    (dataset_copy / row["lidar_path"]).unlink()
    run = tmp_path / "run"
    done = subprocess.run([sys.executable, "stages/train_teacher.py", "--config", "tiny_lidar", "--dataroot",
                           str(dataset_copy), "--output", str(run), "--check-files"], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "error: 1 of the" in done.stderr and f"{row['lidar_path']}: missing" in done.stderr
    assert not run.exists(), "nothing started"


def test_missing_sample_file_names_file_and_token(dataset_copy, data_cfg, tmp_path):
    rows = load_index(dataset_copy, VERSION, "mini_val", cache_dir=tmp_path / "idx")
    row = rows[0]
    cam_file = dataset_copy / row["cam_paths"][2]
    cam_file.unlink()
    with pytest.raises(FileNotFoundError, match=f"{row['token']}.*{cam_file.name}"):
        load_sample(row, dataset_copy, data_cfg)
    lidar_file = dataset_copy / row["lidar_path"]
    lidar_file.unlink()
    with pytest.raises(FileNotFoundError, match=f"{row['token']}.*{lidar_file.name}"):
        load_sample(row, dataset_copy, data_cfg, with_images=False)
