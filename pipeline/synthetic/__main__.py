"""CLI: python -m pipeline.synthetic OUT_DIR [--version v1.0-mini|v1.0-trainval|v1.0-test] [--scenes N] [--val-scenes M]
[--samples-per-scene K] [--seed S] [--image-size WxH] [--camera-trigger keyframe|sweep] [--workers W] [--overwrite]"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.synthetic.dataset import DEFAULT_IMAGE_SIZE, check_image_size, generate
from pipeline.synthetic.scenes import MINI, TEST, TRAINVAL, VERSIONS
from pipeline.synthetic.summary import format_summary


def _image_size(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT such as 800x450, got {text!r}")
    try:
        return check_image_size((int(parts[0]), int(parts[1])))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _positive(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    return parse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.synthetic",
                                     description="Generate a nuScenes-format dataset: v1.0-mini (its 10 scenes), "
                                                 "v1.0-trainval (any number of the devkit's train/val scenes) or "
                                                 "v1.0-test (its test scenes, without annotations).")
    parser.add_argument("out_dir", type=Path, help="dataroot to write (samples/, sweeps/, maps/, VERSION/)")
    parser.add_argument("--version", choices=VERSIONS, default=MINI, help=f"dataset version (default {MINI})")
    parser.add_argument("--scenes", type=_positive(1), default=None,
                        help=f"{TRAINVAL} and {TEST}: number of scenes, the first of the devkit's train and val "
                             f"lists (>= 2) or of its test list")
    parser.add_argument("--val-scenes", type=_positive(1), default=None,
                        help=f"{TRAINVAL} only: how many of the scenes are val scenes (default a fifth, at least 1)")
    parser.add_argument("--samples-per-scene", type=_positive(2), default=10, help="key frames per scene (>= 2)")
    parser.add_argument("--seed", type=_positive(0), default=0)
    parser.add_argument("--image-size", type=_image_size, default=DEFAULT_IMAGE_SIZE, metavar="WxH",
                        help=f"camera image size (default {DEFAULT_IMAGE_SIZE[0]}x{DEFAULT_IMAGE_SIZE[1]})")
    parser.add_argument("--camera-trigger", choices=("keyframe", "sweep"), default="sweep",
                        help="sweep: each camera fires as the LiDAR sweeps past it (3-45 ms after the key frame, "
                             "at its own ego pose), as in nuScenes (default); keyframe: cameras at the LiDAR key "
                             "frame's time and ego pose (generator version 1)")
    parser.add_argument("--workers", type=_positive(1), default=1, help="processes generating scenes")
    parser.add_argument("--overwrite", action="store_true", help="replace a dataset already in OUT_DIR")
    args = parser.parse_args(argv)
    try:
        summary = generate(args.out_dir, samples_per_scene=args.samples_per_scene, seed=args.seed,
                           image_size=args.image_size, workers=args.workers, overwrite=args.overwrite,
                           version=args.version, scenes=args.scenes, val_scenes=args.val_scenes,
                           camera_trigger=args.camera_trigger)
    except (FileExistsError, ValueError) as e:
        parser.error(str(e))
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
