"""Benchmark: sample loading throughput on one CPU core.

Loads samples as the `nuscenes` preset asks (key frame + 10 LiDAR sweeps + 6 camera images) from a
generated dataset with the generator's default (nuScenes-size) images, and reports samples/s for
`load_sample` alone, for its parts (points, images) and for a full training item of
`DetectionDataset` (load + IDA warp + normalisation + BDA). Prints human lines, then one JSON line.

    python tests/bench/bench_loading.py [--dataroot DIR] [--seconds 10]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pipeline.config import load_config  # noqa: E402
from pipeline.data.dataset import DetectionDataset  # noqa: E402
from pipeline.data.index import load_index  # noqa: E402
from pipeline.data.loading import camera_slots, load_images, load_points, load_sample  # noqa: E402

VERSION, SPLIT = "v1.0-mini", "mini_train"


def rate(fn: Callable[[int], object], n_items: int, seconds: float) -> float:
    """Calls per second of fn(i) cycling over items, after one warm-up pass over a few items."""
    for i in range(min(3, n_items)):
        fn(i)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn(count % n_items)
        count += 1
    return count / (time.perf_counter() - start)


def jpeg_decode_ms(path: Path, repeats: int = 20) -> dict[str, float]:
    """Per-image decode time of one JPEG with OpenCV and with PIL (both to RGB uint8)."""
    from PIL import Image

    def with_pil() -> np.ndarray:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))

    def with_cv2() -> np.ndarray:
        return cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)

    out = {}
    for name, fn in (("cv2", with_cv2), ("pil", with_pil)):
        fn()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        out[name] = (time.perf_counter() - start) / repeats * 1e3
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataroot", type=Path, default=None,
                        help="an existing v1.0-mini dataroot (default: generate one in a temp folder)")
    parser.add_argument("--samples-per-scene", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=10.0, help="timing window per measurement")
    args = parser.parse_args()

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    tmp = tempfile.TemporaryDirectory(prefix="bench_loading_")
    root = args.dataroot
    if root is None:
        from pipeline.synthetic import generate

        root = Path(tmp.name) / "nuscenes"
        t0 = time.perf_counter()
        generate(root, samples_per_scene=args.samples_per_scene, seed=0)
        print(f"generated dataset in {time.perf_counter() - t0:.1f} s at {root}")
    cache = Path(tmp.name) / "index"
    t0 = time.perf_counter()
    rows = load_index(root, VERSION, SPLIT, cache_dir=cache)
    t_build = time.perf_counter() - t0
    t0 = time.perf_counter()
    rows = load_index(root, VERSION, SPLIT, cache_dir=cache)
    t_read = time.perf_counter() - t0
    print(f"index of {len(rows)} samples: built in {t_build:.2f} s, re-read from Parquet in {t_read:.3f} s")

    cfg = load_config("nuscenes")
    data = cfg["data"]
    first = load_sample(rows[0], root, data)
    n_points = len(first["points"])
    img_hw = list(first["images"].shape[1:3])
    sweeps = min(int(data["lidar_sweeps"]), len(rows[0]["sweep_paths"]))
    print(f"sample: {n_points} points (key frame + {sweeps} sweeps), {len(first['images'])} images of {img_hw}")

    slots = [camera_slots(r, data["cameras"]) for r in rows]
    r_sample = rate(lambda i: load_sample(rows[i], root, data), len(rows), args.seconds)
    r_points = rate(lambda i: load_points(rows[i], root, int(data["lidar_sweeps"])), len(rows), args.seconds)
    r_images = rate(lambda i: load_images(rows[i], root, slots[i]), len(rows), args.seconds)
    decode = jpeg_decode_ms(root / rows[0]["cam_paths"][0])
    ds = DetectionDataset(root, VERSION, SPLIT, cfg, train=True, seed=0, cache_dir=cache)
    r_item = rate(lambda i: ds[i], len(ds), args.seconds)

    print(f"load_sample:              {r_sample:7.2f} samples/s ({1e3 / r_sample:6.1f} ms)")
    print(f"  points (11 frames):     {r_points:7.2f} /s ({1e3 / r_points:6.1f} ms)")
    print(f"  images (6 JPEG):        {r_images:7.2f} /s ({1e3 / r_images:6.1f} ms)")
    print(f"  one JPEG decode:        cv2 {decode['cv2']:.1f} ms, PIL {decode['pil']:.1f} ms")
    print(f"dataset train item:       {r_item:7.2f} items/s ({1e3 / r_item:6.1f} ms; + IDA warp, "
          f"normalise to {data['image_size']}, BDA)")
    print(json.dumps({
        "bench": "loading", "cores": 1, "samples_per_s": round(r_sample, 3),
        "points_per_s": round(r_points, 3), "images_per_s": round(r_images, 3),
        "dataset_train_items_per_s": round(r_item, 3), "jpeg_decode_ms": {k: round(v, 2) for k, v in decode.items()},
        "points_per_sample": n_points, "sweeps": sweeps, "image_hw": img_hw, "index_samples": len(rows),
        "index_build_s": round(t_build, 3), "index_read_s": round(t_read, 4),
    }))
    tmp.cleanup()


if __name__ == "__main__":
    main()
