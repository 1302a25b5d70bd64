"""The generated nuScenes-format dataset (pipeline.synthetic): loaded by the devkit unmodified,
consistent across tables, files and sensors, deterministic for a seed."""
from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from nuscenes.eval.detection.utils import category_to_detection_name
from nuscenes.utils.geometry_utils import view_points
from nuscenes.utils.splits import create_splits_scenes
from PIL import Image

from pipeline.classes import CLASS_NAMES
from pipeline.synthetic import camera as synth_camera
from pipeline.synthetic import generate
from pipeline.synthetic.rig import CAMERAS
from pipeline.synthetic.tokens import make_rng
from pipeline.synthetic.world import SCENES, build_world

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
    assert {s["channel"] for s in nusc.sensor} == {*CAMERAS, "LIDAR_TOP"}


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
    """Every detection class occurs, attributes fit the class, instances keep their size and move smoothly."""
    seen = set()
    visibility = {v["token"] for v in nusc.visibility}
    for ann in nusc.sample_annotation:
        name = category_to_detection_name(ann["category_name"])
        assert name in CLASS_NAMES, ann["category_name"]
        seen.add(name)
        assert ann["visibility_token"] in visibility
        attrs = [nusc.get("attribute", t)["name"] for t in ann["attribute_tokens"]]
        prefix = ATTRIBUTE_PREFIX[name]
        if prefix is None:
            assert attrs == []
        else:
            assert len(attrs) == 1 and attrs[0].startswith(prefix), (name, attrs)
    assert seen == set(CLASS_NAMES)

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
    t = (sample["timestamp"] - world.start_us) * 1e-6
    hits = occluded = 0
    for channel in CAMERAS:
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
