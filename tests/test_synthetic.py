"""The generated nuScenes-format dataset (pipeline.synthetic): loaded by the devkit unmodified,
consistent across tables, files and sensors, deterministic for a seed."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from nuscenes.eval.detection.utils import category_to_detection_name
from nuscenes.utils.data_classes import RadarPointCloud
from nuscenes.utils.geometry_utils import points_in_box, view_points
from nuscenes.utils.splits import create_splits_scenes
from PIL import Image
from scipy.spatial.transform import Rotation

from models.classes import CLASS_NAMES
from pipeline.data.index import load_index
from pipeline.data.nusc_db import open_nuscenes
from pipeline.evaluation.devkit_metrics import evaluate_results
from pipeline.evaluation.results import lidar_boxes_to_results, write_results_json
from pipeline.synthetic import camera as synth_camera
from pipeline.synthetic import format_summary, generate, summarize
from pipeline.synthetic.__main__ import main as synthetic_main
from pipeline.synthetic.catalog import OTHER_CLASSES
from pipeline.synthetic.placement import build_world
from pipeline.synthetic.radar import RADARS, TRIGGER_JITTER_US
from pipeline.synthetic.rig import CAMERAS
from pipeline.synthetic.scenes import LOCATIONS, PROFILES, check_scene_counts, trainval_scenes
from pipeline.synthetic.scenes import SCENES
from pipeline.synthetic.tokens import make_rng

from tests.conftest import SMALL_DATASET

ROOT = Path(__file__).resolve().parents[1]
# Attribute families the devkit's DetectionEval accepts per class (detection_cvpr_2019 attr names).
ATTRIBUTE_PREFIX = {
    "car": "vehicle.", "truck": "vehicle.", "construction_vehicle": "vehicle.", "bus": "vehicle.",
    "trailer": "vehicle.", "motorcycle": "cycle.", "bicycle": "cycle.", "pedestrian": "pedestrian.",
    "barrier": None, "traffic_cone": None,
}


def test_devkit_loads_every_table_and_the_mini_splits(nusc):
    """All 13 tables are present and the scenes carry the devkit's mini split names."""
    for table in ("category", "attribute", "visibility", "instance", "sensor", "calibrated_sensor",
                  "ego_pose", "log", "scene", "sample", "sample_data", "sample_annotation", "map"):
        assert len(getattr(nusc, table)) > 0, table
    names = {s["name"] for s in nusc.scene}
    splits = create_splits_scenes()
    assert names == set(splits["mini_train"]) | set(splits["mini_val"])
    assert len(nusc.scene) == 10
    for rec in nusc.map:
        assert (Path(nusc.dataroot) / rec["filename"]).is_file()
        assert rec["log_tokens"], "every map lists the logs recorded on it"
    assert {s["channel"]: s["modality"] for s in nusc.sensor} == {
        **{c: "camera" for c in CAMERAS}, "LIDAR_TOP": "lidar", **{r: "radar" for r in RADARS}}


def test_key_frames_sweeps_and_links(nusc):
    """Key frames at 2 Hz, nine LiDAR sweeps between key frames, prev/next chains that close."""
    scene = nusc.scene[0]
    sample = nusc.get("sample", scene["first_sample_token"])
    stamps = [sample["timestamp"]]
    while sample["next"]:
        sample = nusc.get("sample", sample["next"])
        stamps.append(sample["timestamp"])
    assert len(stamps) == SMALL_DATASET["samples_per_scene"] == scene["nbr_samples"]
    assert np.allclose(np.diff(stamps), 500_000)
    assert sample["token"] == scene["last_sample_token"]

    sd = nusc.get("sample_data", sample["data"]["LIDAR_TOP"])
    sweeps = 0
    while sd["prev"]:
        prev = nusc.get("sample_data", sd["prev"])
        assert prev["next"] == sd["token"] and prev["timestamp"] < sd["timestamp"]
        sweeps += not prev["is_key_frame"]
        sd = prev
    assert sweeps == 9 * (len(stamps) - 1)
    path = Path(nusc.dataroot) / sd["filename"]
    raw = np.fromfile(path, dtype=np.float32)
    assert raw.size % 5 == 0 and raw.size > 5 * 1000, "a sweep holds x, y, z, intensity, ring per point"
    for cam in CAMERAS:
        cam_sd = nusc.get("sample_data", sample["data"][cam])
        assert cam_sd["fileformat"] == "jpg" and cam_sd["is_key_frame"]
        with Image.open(Path(nusc.dataroot) / cam_sd["filename"]) as img:
            assert img.size == SMALL_DATASET["image_size"] == (cam_sd["width"], cam_sd["height"])
        intrinsic = np.array(nusc.get("calibrated_sensor", cam_sd["calibrated_sensor_token"])["camera_intrinsic"])
        assert intrinsic.shape == (3, 3) and intrinsic[0, 0] > 0


def test_annotations_classes_attributes_instances(nusc):
    """Every detection class occurs, and annotated objects of categories outside them (animals,
    debris, strollers, ...); attributes fit the class, instances keep their size and move smoothly."""
    seen, others = set(), set()
    visibility = {v["token"] for v in nusc.visibility}
    other_categories = {name for cls in OTHER_CLASSES.values() for name, _ in cls.categories}
    for ann in nusc.sample_annotation:
        name = category_to_detection_name(ann["category_name"])
        assert ann["visibility_token"] in visibility
        attrs = [nusc.get("attribute", t)["name"] for t in ann["attribute_tokens"]]
        if name is None:
            assert ann["category_name"] in other_categories
            others.add(ann["category_name"])
            assert attrs in ([], ["pedestrian.moving"]), (ann["category_name"], attrs)
            continue
        assert name in CLASS_NAMES, ann["category_name"]
        seen.add(name)
        prefix = ATTRIBUTE_PREFIX[name]
        if prefix is None:
            assert attrs == []
        else:
            assert len(attrs) == 1 and attrs[0].startswith(prefix), (name, attrs)
    assert seen == set(CLASS_NAMES)
    assert len(others) >= 4, others

    speeds = []
    for inst in nusc.instance:
        ann = nusc.get("sample_annotation", inst["first_annotation_token"])
        count = 1
        while ann["next"]:
            nxt = nusc.get("sample_annotation", ann["next"])
            assert nxt["size"] == ann["size"] and nxt["instance_token"] == inst["token"]
            ann = nxt
            count += 1
        assert count == inst["nbr_annotations"]
        if count > 1:
            speeds.append(np.linalg.norm(nusc.box_velocity(inst["first_annotation_token"])[:2]))
    speeds = np.asarray(speeds)
    assert (speeds < 0.05).any() and (speeds > 2.0).any(), "parked and moving objects both occur"
    assert (speeds < 25.0).all(), "no object moves faster than a car on a street"


def test_radar_key_frames_and_their_point_counts(nusc):
    """Every sample has the five radars' key frames, each at its own time near the LiDAR's and read
    by the devkit's RadarPointCloud; an annotation's num_radar_pts is what the devkit's own boxes of
    each radar's sample_data count (points_in_box), and only objects the LiDAR saw have radar points."""
    counted = np.zeros(len(nusc.sample_annotation), dtype=np.int64)
    index = {ann["token"]: i for i, ann in enumerate(nusc.sample_annotation)}
    offsets, points = [], 0
    for sample in nusc.sample:
        for channel in RADARS:
            sd = nusc.get("sample_data", sample["data"][channel])
            assert sd["is_key_frame"] and sd["fileformat"] == "pcd" and sd["sensor_modality"] == "radar"
            offsets.append(sd["timestamp"] - sample["timestamp"])
            path, boxes, _ = nusc.get_sample_data(sd["token"])
            pc = RadarPointCloud.from_file(path)
            assert pc.points.shape[0] == 18
            points += pc.points.shape[1]
            for box in boxes:
                counted[index[box.token]] += int(points_in_box(box, pc.points[:3]).sum())
    assert max(abs(o) for o in offsets) <= TRIGGER_JITTER_US and len(set(offsets)) > 10
    stored = np.array([ann["num_radar_pts"] for ann in nusc.sample_annotation])
    lidar = np.array([ann["num_lidar_pts"] for ann in nusc.sample_annotation])
    assert points > 100 and (stored > 0).sum() > 50
    assert (stored == counted).all(), np.flatnonzero(stored != counted)[:10]
    assert not ((stored > 0) & (lidar == 0)).any(), "radar returns come from objects in the LiDAR's sight"


def test_ego_pitch_and_roll_reach_the_points(nusc_root):
    """Ego poses pitch and roll a little (as on the nuScenes car); the index's full poses put the
    key frame's ground points on the flat ground (z = 0), a yaw-only ego pose would not."""
    rows = load_index(nusc_root, "v1.0-mini", "mini_train")
    tilts = []
    for row in rows:
        _, pitch, roll = Rotation.from_matrix(row["ego2global"][:3, :3]).as_euler("ZYX", degrees=True)
        tilts.append(max(abs(pitch), abs(roll)))
    assert 0.05 < np.median(tilts) and max(tilts) <= 0.61, tilts
    row = rows[int(np.argmax(tilts))]
    pts = np.fromfile(nusc_root / row["lidar_path"], dtype=np.float32).reshape(-1, 5)[:, :3]
    far = np.hypot(pts[:, 0], pts[:, 1])
    ground = pts[(far > 12) & (far < 40) & (pts[:, 2] < -1.2)]          # LiDAR frame: the ground is ~1.8 m down
    homog = np.c_[ground, np.ones(len(ground))].T                       # [4, N]
    yaw_only = row["ego2global"].copy()
    yaw = np.arctan2(yaw_only[1, 0], yaw_only[0, 0])
    yaw_only[:3, :3] = Rotation.from_euler("z", yaw).as_matrix()
    z_full = np.abs((row["ego2global"] @ row["lidar2ego"] @ homog)[2])
    z_flat = np.abs((yaw_only @ row["lidar2ego"] @ homog)[2])
    assert len(ground) > 1000
    assert np.median(z_full) < 0.03, np.median(z_full)
    assert np.median(z_flat) > 2 * np.median(z_full) + 0.02, (np.median(z_flat), np.median(z_full))


def _sample_of_scene(nusc, scene_name: str, k: int) -> dict:
    scene = next(s for s in nusc.scene if s["name"] == scene_name)
    sample = nusc.get("sample", scene["first_sample_token"])
    for _ in range(k):
        sample = nusc.get("sample", sample["next"])
    return sample


def test_box_centres_project_onto_pixels_of_their_object(nusc):
    """Each annotated box centre that a camera sees projects onto pixels rendered for that object.

    The camera frames are rendered again from the generator's world to read which solid each pixel
    shows; the JPEG on disk must be that render, and the devkit's box + calibration must project the
    box centre onto the object itself, or onto something nearer that hides it.
    """
    scene_index = 1  # scene-0103 (mini_val)
    k = 1
    scene_name = SCENES[scene_index][0]
    world = build_world(SMALL_DATASET["seed"], scene_index, SMALL_DATASET["samples_per_scene"])
    sample = _sample_of_scene(nusc, scene_name, k)
    object_of_instance = {obj.instance_token: obj.index for obj in world.objects}
    hits = occluded = 0
    for channel in CAMERAS:
        t = (nusc.get("sample_data", sample["data"][channel])["timestamp"] - world.start_us) * 1e-6  # its own time
        frame = synth_camera.render(world, t, channel, SMALL_DATASET["image_size"],
                                    make_rng(SMALL_DATASET["seed"], "camera", scene_name, channel, k))
        data_path, boxes, intrinsic = nusc.get_sample_data(sample["data"][channel])
        on_disk = np.asarray(Image.open(data_path).convert("RGB"), dtype=np.float32)
        assert np.abs(on_disk - frame.rgb).mean() < 4.0, "the JPEG on disk is the rendered frame"
        h, w = frame.owner.shape
        for box in boxes:  # camera frame
            if box.center[2] <= 1.0:
                continue
            u, v = view_points(box.center[:, None], np.asarray(intrinsic), normalize=True)[:2, 0]
            col, row = int(np.floor(u)), int(np.floor(v))
            if not (0 <= col < w and 0 <= row < h):
                continue
            ann = nusc.get("sample_annotation", box.token)
            obj = object_of_instance[ann["instance_token"]]
            if frame.owner[row, col] == obj:
                hits += 1
            else:  # something in front hides the centre: it must be nearer than the box
                assert frame.depth[row, col] < box.center[2], (channel, box.name, frame.owner[row, col], obj)
                occluded += 1
    assert hits >= 10, (hits, occluded)  # streets are crowded: many centres are hidden, never wrongly


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "synthetic.json"}


def test_generation_is_deterministic_and_seed_dependent(tmp_path):
    """One seed gives the same bytes (also with worker processes); another seed gives other data."""
    small = dict(samples_per_scene=2, image_size=(48, 32))
    a = tmp_path / "a"
    b = tmp_path / "b"
    c = tmp_path / "c"
    generate(a, seed=3, **small)
    generate(b, seed=3, workers=2, **small)
    generate(c, seed=4, **small)
    da, db, dc = _tree_digest(a), _tree_digest(b), _tree_digest(c)
    assert da == db
    assert set(da) != set(dc) or da != dc
    shared = set(da) & set(dc)
    assert not any(name.startswith("samples/") for name in shared), "timestamps (file names) depend on the seed"


def test_cli_summary_and_errors(tmp_path):
    """The CLI writes a dataset and prints its summary; bad arguments and an occupied folder are refused."""
    out = tmp_path / "ds"
    cmd = [sys.executable, "-m", "pipeline.synthetic", str(out), "--samples-per-scene", "2", "--image-size", "48x32"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "split mini_val" in done.stdout and "traffic_cone" in done.stdout
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode != 0 and "--overwrite" in again.stderr
    bad = subprocess.run([sys.executable, "-m", "pipeline.synthetic", str(tmp_path / "x"), "--image-size", "big"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "WIDTHxHEIGHT" in bad.stderr
    with pytest.raises(ValueError, match="samples_per_scene"):
        generate(tmp_path / "y", samples_per_scene=1)


# --- v1.0-trainval ---------------------------------------------------------------------------------

TRAINVAL = "v1.0-trainval"
# 2 train scenes and 1 val scene of 2 key frames, small images: a few seconds to generate.
SMALL_TRAINVAL = dict(version=TRAINVAL, scenes=3, val_scenes=1, samples_per_scene=2, seed=0, image_size=(160, 90))


@pytest.fixture(scope="module")
def trainval_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Dataroot of a small generated v1.0-trainval dataset (read-only for tests)."""
    root = tmp_path_factory.mktemp("trainval")
    generate(root, **SMALL_TRAINVAL)
    return root


def test_trainval_opens_with_the_devkit_and_splits_into_train_and_val(trainval_root):
    """The scenes are the first names of the devkit's train and val lists, and the devkit, the
    project's index and the summary all see train and val with the right scenes and samples."""
    splits = create_splits_scenes()
    train_names, val_names = splits["train"][:2], splits["val"][:1]
    nusc = open_nuscenes(trainval_root, TRAINVAL)
    assert [s["name"] for s in nusc.scene] == train_names + val_names
    assert {nusc.get("log", s["log_token"])["location"] for s in nusc.scene} <= set(LOCATIONS)
    assert len(nusc.map) == len({log["location"] for log in nusc.log})

    train = load_index(trainval_root, TRAINVAL, "train")
    val = load_index(trainval_root, TRAINVAL, "val")
    assert [r["scene_name"] for r in train] == [name for name in train_names for _ in range(2)]
    assert [r["scene_name"] for r in val] == val_names * 2
    assert all(len(r["gt_boxes"]) for r in train + val)
    assert [len(r["sweep_paths"]) for r in val] == [0, 10], "9 sweeps and the key frame before the second"

    meta = json.loads((trainval_root / "synthetic.json").read_text())
    assert meta["version"] == TRAINVAL and meta["scenes"] == train_names + val_names
    assert meta["val_scenes"] == val_names
    summary = summarize(trainval_root, TRAINVAL)
    assert summary["splits"] == {"train": {"scenes": 2, "samples": 4}, "val": {"scenes": 1, "samples": 2}}
    text = format_summary(summary)
    assert "split train" in text and "split val" in text and "train_detect" not in text


def test_trainval_val_ground_truth_as_predictions_scores_map_one(trainval_root, tmp_path):
    """The val split's own boxes (those with LiDAR points, as the devkit keeps GT) submitted as
    detections through results JSON and DetectionEval(eval_set='val') score mAP 1."""
    rows = load_index(trainval_root, TRAINVAL, "val")
    results = {}
    for row in rows:
        keep = [i for i, (name, n_lidar, n_radar) in enumerate(zip(row["gt_names"], row["num_lidar_pts"],
                                                                   row["num_radar_pts"]))
                if name is not None and n_lidar + n_radar > 0]
        labels = np.array([CLASS_NAMES.index(row["gt_names"][i]) for i in keep], dtype=np.int64)
        results[row["token"]] = lidar_boxes_to_results(row, row["gt_boxes"][keep], np.ones(len(keep)), labels)
    path = write_results_json(tmp_path / "results.json", results, [r["token"] for r in rows],
                              use_camera=False, use_lidar=True)
    summary = evaluate_results(trainval_root, TRAINVAL, "val", path, tmp_path / "metrics")
    assert summary["mean_ap"] > 0.99, summary["mean_dist_aps"]
    assert summary["tp_errors"]["trans_err"] < 1e-3 and summary["tp_errors"]["vel_err"] < 1e-3


def test_trainval_scene_is_deterministic_and_independent_of_the_others(trainval_root, tmp_path):
    """A trainval scene has the same files and records whatever else the dataset holds (worker
    processes are covered by the mini test above: the same per-scene jobs); overwrite replaces
    only what the generator writes."""
    out = tmp_path / "two"
    (out / "v1.0-mini").mkdir(parents=True)  # a stale dataset of the other version ...
    (out / "notes.txt").write_text("mine")  # ... and a file the generator never writes
    small = {**SMALL_TRAINVAL, "scenes": 2, "val_scenes": 1}  # scene-0001 (train), scene-0003 (val)
    with pytest.raises(FileExistsError, match="v1.0-mini"):
        generate(out, **small)
    generate(out, **small, overwrite=True)
    assert not (out / "v1.0-mini").exists() and (out / "notes.txt").read_text() == "mine"

    files = {name: digest for name, digest in _tree_digest(out).items() if name.startswith(("samples/", "sweeps/"))}
    assert files and files.items() <= _tree_digest(trainval_root).items()
    for table in ("scene", "log", "sample", "sample_data", "ego_pose", "calibrated_sensor", "sample_annotation",
                  "instance", "category", "attribute", "visibility", "sensor"):
        ours = json.loads((out / TRAINVAL / f"{table}.json").read_text())
        theirs = json.loads((trainval_root / TRAINVAL / f"{table}.json").read_text())
        assert ours and all(record in theirs for record in ours), table
    assert json.loads((out / "synthetic.json").read_text())["scenes"] == ["scene-0001", "scene-0003"]


def test_trainval_scene_counts_and_profiles():
    """The val share defaults to a fifth (at least 1, at most the devkit's 150); profiles and
    locations are drawn per scene with about a fifth of the scenes standing still."""
    assert check_scene_counts(TRAINVAL, 2, None) == (2, 1)
    assert check_scene_counts(TRAINVAL, 10, None) == (10, 2)
    assert check_scene_counts(TRAINVAL, 850, None) == (850, 150)
    assert check_scene_counts("v1.0-mini", None, None) is None
    specs = trainval_scenes(0, 850, 150)
    assert len({s.name for s in specs}) == 850 and {s.profile for s in specs} == set(PROFILES)
    stopped = sum(s.profile == "stopped" for s in specs) / len(specs)
    assert 0.15 < stopped < 0.25 and {s.location for s in specs} == set(LOCATIONS)
    assert trainval_scenes(0, 3, 1)[:2] == specs[:2], "a scene does not depend on the dataset's size"


@pytest.mark.parametrize("kwargs, match", [
    (dict(version="v1.0-tiny"), "version must be one of"),
    (dict(version="v1.0-test"), "v1.0-test needs the number of scenes"),
    (dict(version="v1.0-test", scenes=151), r"1\.\.150"),
    (dict(version="v1.0-test", scenes=2, val_scenes=1), "v1.0-test has no val scenes"),
    (dict(version=TRAINVAL), "needs the number of scenes"),
    (dict(version=TRAINVAL, scenes=1), "scenes .* >= 2"),
    (dict(version=TRAINVAL, scenes=3, val_scenes=3), r"val_scenes .* 1\.\.2"),
    (dict(version=TRAINVAL, scenes=3, val_scenes=0), r"val_scenes .* 1\.\.2"),
    (dict(version=TRAINVAL, scenes=400, val_scenes=200), "val split holds"),
    (dict(version=TRAINVAL, scenes=851), "train split holds"),
    (dict(scenes=3), "v1.0-mini always holds"),
    (dict(val_scenes=1), "v1.0-mini always holds"),
])
def test_generate_refuses_bad_versions_and_scene_counts(tmp_path, kwargs, match):
    """Bad version / scene counts are ValueErrors naming the value, raised before anything is written."""
    with pytest.raises(ValueError, match=match):
        generate(tmp_path / "ds", samples_per_scene=2, image_size=(48, 32), **kwargs)
    assert not (tmp_path / "ds").exists()


def test_cli_turns_bad_trainval_arguments_into_usage_errors(tmp_path, capsys):
    """The CLI reports bad --version / --scenes / --val-scenes as argparse errors (exit 2)."""
    cases = [([str(tmp_path / "a"), "--scenes", "3"], "--scenes"),
             ([str(tmp_path / "b"), "--version", TRAINVAL, "--scenes", "3", "--val-scenes", "5"], "--val-scenes"),
             ([str(tmp_path / "c"), "--version", "v1.0-tiny"], "invalid choice"),
             ([str(tmp_path / "d"), "--version", "v1.0-test"], "--scenes")]
    for argv, expected in cases:
        with pytest.raises(SystemExit) as exit_info:
            synthetic_main(argv)
        assert exit_info.value.code == 2
        assert expected in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
