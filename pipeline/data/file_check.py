"""`--check-files`: find missing or truncated sensor files of a split before a long job starts.

A job over v1.0-trainval that meets a missing sweep or a half-copied JPEG hours in fails there (or,
under Ray's retries, fails again and again). This pass reads no pixels and no points: it checks
that every file a run will load exists, is not empty, and ends as a whole file does: a point file
holds whole records of RAW_POINT_DIM float32s, a JPEG ends with its end-of-image marker, a PNG with
its IEND chunk.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from pipeline.data.index import load_index
from pipeline.data.loading import RAW_POINT_DIM, camera_slots
from pipeline.data.nusc_db import DatasetError

POINT_RECORD_BYTES = RAW_POINT_DIM * 4  # x, y, z, intensity, ring as float32
# How whole image files end (the last bytes of a file cut off mid-copy are something else).
IMAGE_ENDINGS = {".jpg": b"\xff\xd9", ".jpeg": b"\xff\xd9", ".png": b"IEND\xaeB`\x82"}
SHOWN = 20  # problems listed in the error; the count covers all


def file_problem(path: Path, kind: str) -> str | None:
    """What is wrong with one sensor file ('points' or 'image'), or None."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return f"{path}: missing"
    if size == 0:
        return f"{path}: empty"
    if kind == "points":
        if size % POINT_RECORD_BYTES:
            return f"{path}: {size} bytes, not a whole number of {POINT_RECORD_BYTES}-byte point records (truncated?)"
        return None
    ending = IMAGE_ENDINGS.get(path.suffix.lower())
    if ending is not None:
        with open(path, "rb") as f:
            f.seek(max(0, size - len(ending)))
            if f.read() != ending:
                return f"{path}: does not end with the {path.suffix.lower()[1:].upper()} end marker (truncated?)"
    return None


def split_files(rows: Sequence[Mapping[str, Any]], lidar_sweeps: int,
                cameras: Sequence[str] | None) -> list[tuple[str, str]]:
    """(relative path, kind) of every file a run loads: key-frame points, the first `lidar_sweeps`
    sweeps, and the images of `cameras` (None: no images, as for a LiDAR-only model)."""
    files = []
    for row in rows:
        files.append((row["lidar_path"], "points"))
        files += [(p, "points") for p in list(row["sweep_paths"])[:lidar_sweeps]]
        if cameras is not None:
            files += [(row["cam_paths"][i], "image") for i in camera_slots(row, cameras)]
    return files


def check_split_files(dataroot: str | Path, version: str, split: str, cfg: Mapping[str, Any],
                      images: bool = False, log: str = "[check-files]") -> int:
    """Check every sensor file a run of `cfg` reads from the split; return how many were checked.

    Images are checked for a model that reads them, and with `images` for one that does not (a
    LiDAR student whose online teacher sees the cameras).

    Raises ValueError listing the problems (the first SHOWN, and their count) and naming the split.
    Prints progress about every 10 % of the files.
    """
    from pipeline.data.dataset import index_sweeps

    root = Path(dataroot)
    rows = load_index(root, version, split, max_sweeps=index_sweeps(cfg))
    data = cfg["data"]
    with_images = images or cfg["model"]["modality"] != "lidar"
    files = split_files(rows, int(data["lidar_sweeps"]), list(data["cameras"]) if with_images else None)
    start, problems = time.perf_counter(), []
    step = max(1, len(files) // 10)
    for n, (rel, kind) in enumerate(files, 1):
        problem = file_problem(root / rel, kind)
        if problem:
            problems.append(problem)
        if n % step == 0 or n == len(files):
            print(f"{log} {n}/{len(files)} files of {version} {split} checked, {len(problems)} problems "
                  f"({time.perf_counter() - start:.1f} s)", flush=True)
    if problems:
        listed = "\n  ".join(problems[:SHOWN])
        more = f"\n  ... and {len(problems) - SHOWN} more" if len(problems) > SHOWN else ""
        raise DatasetError(f"{len(problems)} of the {len(files)} sensor files of {version} {split} under {root} are "
                         f"missing or truncated:\n  {listed}{more}")
    return len(files)


def check_model_split_files(model_path: str, dataroot: str | Path, version: str, split: str) -> int:
    """`check_split_files` for the model stored at `model_path` (a teacher to cache, a model to score)."""
    from pipeline.model_files import read_model_file

    return check_split_files(dataroot, version, split, read_model_file(model_path)["config"])
