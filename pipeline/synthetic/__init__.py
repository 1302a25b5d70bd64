"""A generated dataset in exact nuScenes format (v1.0-mini, or v1.0-trainval of any size): the
embedded stand-in for real nuScenes in the demo and the tests, loaded by the same devkit code as
the real thing.

    generate(out_dir, samples_per_scene=10, seed=0, image_size=(800, 450), version="v1.0-mini",
             scenes=None, val_scenes=None) -> summary dict
    summarize(dataroot, version="v1.0-mini") -> summary dict
    python -m pipeline.synthetic OUT_DIR [--samples-per-scene N] [--seed S] [--image-size WxH]
    python -m pipeline.synthetic OUT_DIR --version v1.0-trainval --scenes N [--val-scenes M] ...

Modules: scenes (which scenes a version holds, their locations and ego profiles), world (road,
ego, objects, clutter in time), placement (building a world), lidar and camera (ray casting), rig
(sensor calibration), catalog (classes, shapes, colours), road (street and ground), scene_writer
(files and records of one scene), dataset (the whole dataset), summary.
"""
from pipeline.synthetic.dataset import DEFAULT_IMAGE_SIZE, META_FILE, generate
from pipeline.synthetic.summary import format_summary, summarize

__all__ = ["DEFAULT_IMAGE_SIZE", "META_FILE", "generate", "summarize", "format_summary"]
