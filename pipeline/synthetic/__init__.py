"""A generated dataset in exact nuScenes v1.0-mini format: the embedded stand-in for real nuScenes
in the demo and the tests, loaded by the same devkit code as the real thing.

    generate(out_dir, samples_per_scene=10, seed=0, image_size=(800, 450)) -> summary dict
    summarize(dataroot, version="v1.0-mini") -> summary dict
    python -m pipeline.synthetic OUT_DIR [--samples-per-scene N] [--seed S] [--image-size WxH]

Modules: world (road, ego, objects, clutter in time), lidar and camera (ray casting), rig
(sensor calibration), catalog (classes, shapes, colours), road (street and ground), scene_writer
(files and records of one scene), dataset (the whole dataset), summary.
"""
from pipeline.synthetic.dataset import DEFAULT_IMAGE_SIZE, META_FILE, generate
from pipeline.synthetic.summary import format_summary, summarize

__all__ = ["DEFAULT_IMAGE_SIZE", "META_FILE", "generate", "summarize", "format_summary"]
