"""Write a whole generated dataset: v1.0-mini (the 10 mini scenes), v1.0-trainval (any number
of scenes from the devkit's train and val lists) or v1.0-test (scenes of its test list, without
annotations), see scenes.py; the tables that do not depend on
a scene (category, attribute, visibility, sensor, map), the map masks, and a small
`synthetic.json` that records how the dataset was made.
"""
from __future__ import annotations

import json
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import cv2

from pipeline.synthetic import catalog
from pipeline.synthetic.radar import RADARS
from pipeline.synthetic.rig import CAMERA_TRIGGERS, CAMERAS, LIDAR
from pipeline.synthetic.road import draw_map_mask
from pipeline.synthetic.scene_writer import SceneResult, write_scene
from pipeline.synthetic.scenes import (MINI, TEST, VERSIONS, check_scene_counts, mini_scenes, testset_scenes,
                                      trainval_scenes)
from pipeline.synthetic.summary import summarize
from pipeline.synthetic.tokens import make_token

VERSION = MINI  # the default version
DEFAULT_IMAGE_SIZE = (800, 450)  # (W, H): half the nuScenes resolution
DEFAULT_CAMERA_TRIGGER = "sweep"
GENERATOR_VERSION = 2  # 2: ego pitch and roll, radar key frames, annotated objects outside the 10 classes
META_FILE = "synthetic.json"
TABLES = ("category", "attribute", "visibility", "instance", "sensor", "calibrated_sensor", "ego_pose", "log",
          "scene", "sample", "sample_data", "sample_annotation", "map")
_OUTPUTS = ("samples", "sweeps", "maps", *VERSIONS, META_FILE)  # what generate may write under out_dir


def check_image_size(image_size: tuple[int, int]) -> tuple[int, int]:
    """(W, H) as ints, or ValueError naming the problem."""
    try:
        w, h = (int(v) for v in image_size)
    except (TypeError, ValueError):
        raise ValueError(f"image_size must be two integers (W, H), got {image_size!r}") from None
    if not (16 <= w <= 4096 and 16 <= h <= 4096) or (w, h) != tuple(image_size):
        raise ValueError(f"image_size must be integers in 16..4096 (W, H), got {image_size!r}")
    return w, h


def generate(out_dir: Path, samples_per_scene: int = 10, seed: int = 0,
             image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE, workers: int = 1, overwrite: bool = False, *,
             version: str = VERSION, scenes: int | None = None, val_scenes: int | None = None,
             camera_trigger: str = DEFAULT_CAMERA_TRIGGER) -> dict:
    """Write the generated dataset under `out_dir` and return its summary (see `summarize`) with
    the generation time in seconds.

    version "v1.0-mini" writes the 10 mini scenes (scenes / val_scenes must be None);
    "v1.0-trainval" writes `scenes` scenes, `val_scenes` of them (default a fifth, at least 1)
    from the devkit's val list and the rest from its train list; "v1.0-test" the first `scenes`
    of its test list, with empty sample_annotation and instance tables. camera_trigger "sweep" (the
    default) fires each camera as the LiDAR sweeps past it, 3-45 ms after the key frame at its own
    ego pose, as on the nuScenes car (a loader that projected with the LiDAR's ego pose would be off
    by up to ~0.5 m at 10 m/s); "keyframe" (generator version 1's only behaviour) renders every
    camera at the LiDAR key frame's timestamp and ego pose. workers > 1 generates scenes in
    that many processes (same bytes as with one). An out_dir that already holds a generated
    dataset is refused unless `overwrite`, which replaces only what generate writes (samples/,
    sweeps/, maps/, v1.0-mini/, v1.0-trainval/, synthetic.json).
    """
    start = time.perf_counter()
    out_dir = Path(out_dir)
    image_size = check_image_size(image_size)
    if isinstance(samples_per_scene, bool) or not isinstance(samples_per_scene, int) or samples_per_scene < 2:
        raise ValueError(f"samples_per_scene must be an integer >= 2, got {samples_per_scene!r}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if camera_trigger not in CAMERA_TRIGGERS:
        raise ValueError(f"camera_trigger must be one of {list(CAMERA_TRIGGERS)}, got {camera_trigger!r}")
    counts = check_scene_counts(version, scenes, val_scenes)  # (scenes, val_scenes) for trainval
    if counts is None:
        specs = mini_scenes(seed)
    else:
        specs = testset_scenes(seed, counts[0]) if version == TEST else trainval_scenes(seed, *counts)
    existing = [name for name in _OUTPUTS if (out_dir / name).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{out_dir} already holds {', '.join(existing)}; pass overwrite=True "
                              f"(--overwrite) to replace them")
    for name in existing:
        path = out_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)

    jobs = [(seed, spec, samples_per_scene, image_size, out_dir, camera_trigger) for spec in specs]
    if workers == 1:
        results = [write_scene(*job) for job in jobs]
    else:
        with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=get_context("spawn")) as pool:
            results = list(pool.map(write_scene, *zip(*jobs)))

    tables = _static_tables(seed)
    tables["map"] = _write_maps(seed, results, out_dir)
    for result in results:
        for name, records in result.tables.items():
            tables.setdefault(name, []).extend(records)
    if version == TEST:  # the test set's boxes are withheld (num_lidar_pts etc. with them)
        tables["sample_annotation"], tables["instance"] = [], []
    table_dir = out_dir / version
    table_dir.mkdir()
    for name in TABLES:  # one record per line: readable, and fast to write
        lines = ",\n".join(json.dumps(record) for record in tables[name])
        (table_dir / f"{name}.json").write_text(f"[\n{lines}\n]\n")
    meta = {"generator": "pipeline.synthetic", "generator_version": GENERATOR_VERSION, "version": version,
            "seed": seed, "samples_per_scene": samples_per_scene, "image_size": list(image_size)}
    meta["camera_trigger"] = camera_trigger
    if counts is not None:  # trainval or test; mini's scenes are fixed (and its file stays as it always was)
        meta["scenes"] = [spec.name for spec in specs]
        if version != TEST:
            meta["val_scenes"] = [spec.name for spec in specs[counts[0] - counts[1]:]]
    (out_dir / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")

    summary = summarize(out_dir, version)
    summary["seconds"] = round(time.perf_counter() - start, 2)
    return summary


def _static_tables(seed: int) -> dict[str, list[dict]]:
    """category, attribute, visibility and sensor tables."""
    return {
        "category": [{"token": make_token(seed, "category", name), "name": name, "description": desc}
                     for name, desc in catalog.CATEGORIES],
        "attribute": [{"token": make_token(seed, "attribute", name), "name": name, "description": desc}
                      for name, desc in catalog.ATTRIBUTES],
        "visibility": [{"description": desc, "token": token, "level": level}
                       for token, level, desc in catalog.VISIBILITY],
        "sensor": [{"token": make_token(seed, "sensor", ch), "channel": ch,
                    "modality": "lidar" if ch == LIDAR else "camera" if ch in CAMERAS else "radar"}
                   for ch in (*CAMERAS, LIDAR, *RADARS)],
    }


def _write_maps(seed: int, results: list[SceneResult], out_dir: Path) -> list[dict]:
    """One drivable-area map mask PNG per location, and the map records listing its logs."""
    records = []
    for location in sorted({r.location for r in results}):
        at = [r for r in results if r.location == location]
        token = make_token(seed, "map", location)
        filename = f"maps/{token}.png"
        (out_dir / "maps").mkdir(exist_ok=True)
        mask = draw_map_mask([r.road for r in at], [r.s_range for r in at])
        if not cv2.imwrite(str(out_dir / filename), mask, [cv2.IMWRITE_PNG_COMPRESSION, 1]):
            raise OSError(f"could not write map mask {out_dir / filename}")
        records.append({"category": "semantic_prior", "token": token, "filename": filename,
                        "log_tokens": [r.log_token for r in at]})
    return records
