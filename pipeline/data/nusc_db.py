"""Open a nuScenes dataroot with the devkit, with errors that say what is wrong, and resolve splits.

The devkit fails on a bad dataroot with bare asserts or a FileNotFoundError deep inside its
loader; `open_nuscenes` checks the layout first and names the missing folder or file. Opened
databases are kept per (dataroot, version) for the life of the process, because opening the real
v1.0-trainval takes about 30 s and several parts of a run (index, results, evaluation) need it.
"""
from __future__ import annotations

import json
import os
import socket
import threading
from pathlib import Path

from nuscenes.nuscenes import NuScenes
from nuscenes.utils.splits import create_splits_scenes

from models.errors import UserError

OPEN_LOG_PREFIX = "[nusc] opening"  # the line open_nuscenes prints when it opens a database


class DatasetError(UserError):
    """A dataroot, nuScenes table, version, split or sensor file is missing, malformed or does not
    fit the job; the message names it and what was expected."""


VERSIONS: tuple[str, ...] = ("v1.0-mini", "v1.0-trainval", "v1.0-test")
# The tables NuScenes(...) loads unconditionally, as <dataroot>/<version>/<name>.json.
TABLES: tuple[str, ...] = (
    "category", "attribute", "visibility", "instance", "sensor", "calibrated_sensor", "ego_pose",
    "log", "scene", "sample", "sample_data", "sample_annotation", "map",
)
# Which detection splits each version holds (DetectionEval asserts the same pairing).
SPLITS_OF_VERSION: dict[str, tuple[str, ...]] = {
    "v1.0-mini": ("mini_train", "mini_val"),
    "v1.0-trainval": ("train", "val"),
    "v1.0-test": ("test",),
}

_CACHE: dict[tuple[str, str], NuScenes] = {}
_LOCK = threading.Lock()


def check_version(version: str) -> str:
    """Return `version` if it is a known nuScenes version, else raise DatasetError naming the allowed ones."""
    if version not in VERSIONS:
        raise DatasetError(f"nuScenes version {version!r} is unknown; expected one of {list(VERSIONS)}")
    return version


def table_path(dataroot: str | Path, version: str, table: str) -> Path:
    """Path of one JSON table of a version."""
    return Path(dataroot) / version / f"{table}.json"


def check_dataroot(dataroot: str | Path, version: str) -> Path:
    """Check that `dataroot` holds `version` with all 13 tables and the map files; return it resolved.

    Raises FileNotFoundError naming the missing folder or file, ValueError for an unknown version.
    """
    check_version(version)
    root = Path(dataroot).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"nuScenes dataroot {str(root)!r} does not exist or is not a folder")
    vdir = root / version
    if not vdir.is_dir():
        present = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith("v1.0"))
        raise FileNotFoundError(f"nuScenes dataroot {str(root)!r} has no {version!r} folder "
                                f"(version folders present: {present})")
    for name in TABLES:
        path = table_path(root, version, name)
        if not path.is_file():
            raise FileNotFoundError(f"nuScenes {version} table {str(path)!r} is missing "
                                    f"(a dataroot needs all of {list(TABLES)})")
    return root.resolve()


def _check_maps(nusc_root: Path, version: str) -> None:
    """The devkit asserts that every map PNG named in map.json exists; name the missing one instead."""
    path = table_path(nusc_root, version, "map")
    records = _read_table(path)
    if not records:
        raise DatasetError(f"nuScenes table {str(path)!r} is empty; the devkit needs at least one map record")
    for rec in records:
        png = nusc_root / rec.get("filename", "")
        if not png.is_file():
            raise FileNotFoundError(f"map file {str(png)!r} named in {str(path)!r} is missing")


# Add-ons whose table the devkit loads whenever <version>/<name>.json exists, with their label files
# under <dataroot>/<name>/<version>/.
LIDAR_ADDONS: tuple[str, ...] = ("lidarseg", "panoptic")


def lidar_addon_problem(dataroot: str | Path, version: str) -> str | None:
    """What is wrong with a partly installed nuScenes-lidarseg or -panoptic add-on, or None.

    The devkit opens such an add-on whenever its table exists and then fails with a bare
    AssertionError (label files missing or miscounted, or the old category.json without 'index').
    The detection stages need neither add-on, so removing its table is a fix too.
    """
    root = Path(dataroot)
    for name in LIDAR_ADDONS:
        table = table_path(root, version, name)
        if not table.is_file():
            continue
        remedy = (f"install nuScenes-{name} completely (extract its whole archive into {str(root)!r}) "
                  f"or move {str(table)!r} away: detection does not need it")
        labels = root / name / version
        if not labels.is_dir():
            return f"nuScenes-{name} is half installed: {str(table)!r} exists but its label folder " \
                   f"{str(labels)!r} does not; {remedy}"
        records = len(_read_table(table))
        files = sum(1 for f in labels.iterdir() if f.suffix in (".bin", ".npz"))
        if files != records:
            return f"nuScenes-{name} is half installed: {str(table)!r} lists {records} label files but " \
                   f"{str(labels)!r} holds {files}; {remedy}"
        categories = _read_table(table_path(root, version, "category"))
        if any("index" not in c for c in categories):
            return f"nuScenes-{name} is half installed: {str(table_path(root, version, 'category'))!r} is " \
                   f"the detection release's, without the 'index' field {name} needs; {remedy}"
    return None


def _read_table(path: Path) -> list:
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DatasetError(f"nuScenes table {str(path)!r} is not valid JSON: {e}") from e


def open_nuscenes(dataroot: str | Path, version: str, verbose: bool = False) -> NuScenes:
    """The devkit's NuScenes for (dataroot, version), opened once per process and then reused.

    Raises FileNotFoundError (dataroot, version folder, table or map file missing) or ValueError
    (unknown version, table not valid JSON, a half-installed lidarseg/panoptic add-on) with the
    offending path in the message.
    """
    root = check_dataroot(dataroot, version)
    key = (str(root), version)
    with _LOCK:
        nusc = _CACHE.get(key)
        if nusc is None:
            _check_maps(root, version)
            # One line per real open (~30 s and GBs for v1.0-trainval): on a cluster, where only the
            # driver should open it, these lines (Ray forwards them) count the processes that did.
            print(f"{OPEN_LOG_PREFIX} {version} at {root} (pid {os.getpid()} on {socket.gethostname()})",
                  flush=True)
            try:
                nusc = NuScenes(version=version, dataroot=str(root), verbose=verbose)
            except json.JSONDecodeError:
                for name in TABLES:  # find and name the broken table (error path only)
                    _read_table(table_path(root, version, name))
                raise
            except (AssertionError, FileNotFoundError) as e:
                problem = lidar_addon_problem(root, version)  # error path only: name what is half there
                if problem:
                    raise DatasetError(problem) from e
                raise
            _CACHE[key] = nusc
    return nusc


def forget_nuscenes(dataroot: str | Path | None = None) -> None:
    """Drop cached NuScenes objects (all, or those of one dataroot), e.g. after the files changed."""
    with _LOCK:
        if dataroot is None:
            _CACHE.clear()
            return
        root = str(Path(dataroot).expanduser().resolve())
        for key in [k for k in _CACHE if k[0] == root]:
            del _CACHE[key]


def check_split(version: str, split: str) -> str:
    """Return `split` if it is a detection split of `version`, else raise DatasetError naming the valid ones."""
    valid = SPLITS_OF_VERSION[check_version(version)]
    if split not in valid:
        raise DatasetError(f"split {split!r} is not valid for nuScenes {version}; valid splits: {list(valid)}")
    return split


def split_scenes(version: str, split: str) -> list[str]:
    """Scene names of a split (devkit's fixed lists), after checking the split belongs to the version."""
    check_split(version, split)
    return list(create_splits_scenes()[split])


def default_split(version: str, purpose: str = "train") -> str:
    """The split a job uses when none is given: a version's training split ('mini_train',
    'train') for training and caching, its last split ('mini_val', 'val', 'test') for evaluation."""
    splits = SPLITS_OF_VERSION[check_version(version)]
    if purpose == "eval":
        return splits[-1]
    if purpose != "train":
        raise ValueError(f"default_split: purpose must be 'train' or 'eval', got {purpose!r}")
    if len(splits) < 2:
        raise DatasetError(f"nuScenes {version} has no annotated training split (splits: {list(splits)})")
    return splits[0]
