"""The sample index of a nuScenes split: everything needed to load a sample without the devkit.

Built once through the devkit and stored as Parquet (pyarrow), one row per key-frame sample in
scene order, then time order. Later runs read the Parquet file instead of opening the database
(opening v1.0-trainval takes ~30 s and walking its sweeps a few minutes). The file lives under
`<dataroot>/.index/<version>_<split>_sweeps<N>.parquet` by default, or under a user cache folder when the
dataroot is read-only; it is rebuilt when missing, when built with other settings, or when the
dataset's tables changed (size/mtime fingerprint in the file's metadata).

Columns (matrices flattened row-major; all poses as the devkit's `transform_matrix` builds them):

    token            str           sample token
    scene_name       str           e.g. 'scene-0061'
    timestamp        int64         key-frame time (µs)
    lidar_token      str           LIDAR_TOP sample_data token of the key frame
    lidar_path       str           key-frame point file, relative to the dataroot
    lidar2ego        16 x f64      LIDAR_TOP -> ego (key frame's calibrated_sensor)
    ego2global       16 x f64      ego -> global (key LIDAR_TOP ego_pose)
    sweep_paths      S x str       previous LIDAR_TOP sweeps, newest first (S <= max_sweeps)
    sweep_timestamps S x int64
    sweep2lidar      S*16 x f64    sweep LiDAR -> key-frame LiDAR, via both ego poses
    cam_names        C x str       camera channels of the sample (nuScenes order)
    cam_paths        C x str
    cam_intrinsics   C*9 x f64     K of each camera
    cam2lidar        C*16 x f64    camera -> key-frame LiDAR, via the camera's own ego pose
    gt_tokens        M x str       sample_annotation tokens (all annotations, none for test)
    gt_names         M x str|null  detection class name (category_to_detection_name), null if none
    gt_boxes         M*9 x f64     x, y, z, dx (length), dy (width), dz, yaw, vx, vy in the LiDAR frame
    num_lidar_pts    M x int32
    num_radar_pts    M x int32

`load_index` returns the rows as dicts with these arrays reshaped ([4, 4], [S, 4, 4], [C, 3, 3],
[C, 4, 4], [M, 9]).
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from filelock import FileLock
from nuscenes.eval.common.utils import quaternion_yaw
from nuscenes.eval.detection.utils import category_to_detection_name
from nuscenes.nuscenes import NuScenes
from nuscenes.utils.geometry_utils import transform_matrix
from pyquaternion import Quaternion

from pipeline.config import ConfigError
from pipeline.data import nusc_db

# 2: vertical velocity dropped before the rotation into the LiDAR frame; 3: yaw of the heading projected
# onto the ground plane (the devkit's quaternion_yaw, as its evaluation measures it)
INDEX_SCHEMA_VERSION = "3"
CAMERA_ORDER: tuple[str, ...] = (
    "CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_FRONT_LEFT", "CAM_BACK", "CAM_BACK_LEFT", "CAM_BACK_RIGHT",
)

_f64_list = pa.list_(pa.float64())
SCHEMA = pa.schema([
    ("token", pa.string()), ("scene_name", pa.string()), ("timestamp", pa.int64()),
    ("lidar_token", pa.string()), ("lidar_path", pa.string()),
    ("lidar2ego", _f64_list), ("ego2global", _f64_list),
    ("sweep_paths", pa.list_(pa.string())), ("sweep_timestamps", pa.list_(pa.int64())),
    ("sweep2lidar", _f64_list),
    ("cam_names", pa.list_(pa.string())), ("cam_paths", pa.list_(pa.string())),
    ("cam_intrinsics", _f64_list), ("cam2lidar", _f64_list),
    ("gt_tokens", pa.list_(pa.string())), ("gt_names", pa.list_(pa.string())),
    ("gt_boxes", _f64_list),
    ("num_lidar_pts", pa.list_(pa.int32())), ("num_radar_pts", pa.list_(pa.int32())),
])


# --- poses -------------------------------------------------------------------------------------
def _pose(record: dict[str, Any]) -> np.ndarray:
    """4x4 of a calibrated_sensor or ego_pose record (child frame -> parent frame)."""
    return transform_matrix(record["translation"], Quaternion(record["rotation"]))


def _sensor_poses(nusc: NuScenes, sd: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(sensor2ego, ego2global) of one sample_data record."""
    return (_pose(nusc.get("calibrated_sensor", sd["calibrated_sensor_token"])),
            _pose(nusc.get("ego_pose", sd["ego_pose_token"])))


def _sensor_to_key_lidar(nusc: NuScenes, sd: dict[str, Any], global2lidar: np.ndarray) -> np.ndarray:
    """sensor -> ego (at its own time) -> global -> key ego -> key LiDAR, as BEVDepth/BEVFusion infos do."""
    s2e, e2g = _sensor_poses(nusc, sd)
    return global2lidar @ e2g @ s2e


# --- rows --------------------------------------------------------------------------------------
def _sweeps(nusc: NuScenes, lidar_sd: dict[str, Any], global2lidar: np.ndarray,
            max_sweeps: int) -> tuple[list[str], list[int], list[float]]:
    """Up to `max_sweeps` previous LIDAR_TOP sample_data, newest first (fewer at a scene start)."""
    paths, stamps, mats = [], [], []
    sd = lidar_sd
    while len(paths) < max_sweeps and sd["prev"]:
        sd = nusc.get("sample_data", sd["prev"])
        paths.append(sd["filename"])
        stamps.append(int(sd["timestamp"]))
        mats.extend(_sensor_to_key_lidar(nusc, sd, global2lidar).ravel().tolist())
    return paths, stamps, mats


def _annotations(nusc: NuScenes, sample: dict[str, Any], lidar2ego: np.ndarray,
                 ego2global: np.ndarray) -> dict[str, list]:
    """GT boxes of a key frame in its LIDAR_TOP frame, in `sample['anns']` order."""
    global2lidar_rot = np.linalg.inv(ego2global @ lidar2ego)[:3, :3]
    e2g_q = Quaternion(matrix=ego2global[:3, :3])
    l2e_q = Quaternion(matrix=lidar2ego[:3, :3])
    out: dict[str, list] = {k: [] for k in ("gt_tokens", "gt_names", "gt_boxes", "num_lidar_pts",
                                            "num_radar_pts")}
    for ann_token in sample["anns"]:
        ann = nusc.get("sample_annotation", ann_token)
        box = nusc.get_box(ann_token)  # global frame
        # Same steps as NuScenes.get_sample_data: global -> ego -> sensor.
        box.translate(-ego2global[:3, 3])
        box.rotate(e2g_q.inverse)
        box.translate(-lidar2ego[:3, 3])
        box.rotate(l2e_q.inverse)
        vel = np.nan_to_num(nusc.box_velocity(ann_token), nan=0.0)  # global, m/s
        vel[2] = 0.0  # ground-plane velocity only (as mmdetection3d): an ego pitch or roll must not turn vz into vx, vy
        vel = global2lidar_rot @ vel
        w, l, h = box.wlh
        yaw = quaternion_yaw(box.orientation)  # boxes tilt with the ego's pitch and roll: project the heading
        out["gt_tokens"].append(ann_token)
        out["gt_names"].append(category_to_detection_name(ann["category_name"]))
        out["gt_boxes"].extend([*box.center.tolist(), l, w, h, yaw, vel[0], vel[1]])
        out["num_lidar_pts"].append(int(ann["num_lidar_pts"]))
        out["num_radar_pts"].append(int(ann["num_radar_pts"]))
    return out


def _sample_row(nusc: NuScenes, sample: dict[str, Any], scene_name: str, max_sweeps: int,
                with_gt: bool) -> dict[str, Any]:
    """One index row (see module docstring) for a key-frame sample."""
    lidar_sd = nusc.get("sample_data", sample["data"]["LIDAR_TOP"])
    lidar2ego, ego2global = _sensor_poses(nusc, lidar_sd)
    global2lidar = np.linalg.inv(ego2global @ lidar2ego)
    sweep_paths, sweep_stamps, sweep_mats = _sweeps(nusc, lidar_sd, global2lidar, max_sweeps)

    cams = [c for c in CAMERA_ORDER if c in sample["data"]]
    cams += sorted(c for c in sample["data"] if c.startswith("CAM_") and c not in cams)
    cam_paths, intrinsics, cam2lidar = [], [], []
    for cam in cams:
        sd = nusc.get("sample_data", sample["data"][cam])
        cs = nusc.get("calibrated_sensor", sd["calibrated_sensor_token"])
        cam_paths.append(sd["filename"])
        intrinsics.extend(np.asarray(cs["camera_intrinsic"], dtype=np.float64).ravel().tolist())
        cam2lidar.extend(_sensor_to_key_lidar(nusc, sd, global2lidar).ravel().tolist())

    row: dict[str, Any] = {
        "token": sample["token"], "scene_name": scene_name, "timestamp": int(sample["timestamp"]),
        "lidar_token": lidar_sd["token"], "lidar_path": lidar_sd["filename"],
        "lidar2ego": lidar2ego.ravel().tolist(), "ego2global": ego2global.ravel().tolist(),
        "sweep_paths": sweep_paths, "sweep_timestamps": sweep_stamps, "sweep2lidar": sweep_mats,
        "cam_names": cams, "cam_paths": cam_paths, "cam_intrinsics": intrinsics, "cam2lidar": cam2lidar,
    }
    if with_gt:
        row.update(_annotations(nusc, sample, lidar2ego, ego2global))
    else:
        row.update({k: [] for k in ("gt_tokens", "gt_names", "gt_boxes", "num_lidar_pts",
                                    "num_radar_pts")})
    return row


def index_table_from_nuscenes(nusc: NuScenes, split: str, max_sweeps: int = 10) -> pa.Table:
    """Build the index table of `split` through the devkit (scene order as in the split list, then time)."""
    scene_names = nusc_db.split_scenes(nusc.version, split)
    scenes = {s["name"]: s for s in nusc.scene}
    rows = []
    for name in scene_names:
        scene = scenes.get(name)
        if scene is None:  # real mini/trainval hold every scene of their splits; tolerate partial sets
            continue
        token = scene["first_sample_token"]
        while token:
            sample = nusc.get("sample", token)
            rows.append(_sample_row(nusc, sample, name, max_sweeps, with_gt=split != "test"))
            token = sample["next"]
    return pa.Table.from_pylist(rows, schema=SCHEMA)


# --- cache -------------------------------------------------------------------------------------
def _tables_fingerprint(root: Path, version: str) -> str:
    """Cheap fingerprint of a version's tables (names, sizes, mtimes): changes when the dataset does."""
    h = hashlib.sha1()
    for name in nusc_db.TABLES:
        st = nusc_db.table_path(root, version, name).stat()
        h.update(f"{name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK)


def user_cache_dir() -> Path:
    """Fallback folder for indices of read-only dataroots ($XDG_CACHE_HOME or ~/.cache)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "unidistill" / "index"


def index_path(dataroot: str | Path, version: str, split: str, cache_dir: str | Path | None = None,
               max_sweeps: int = 10) -> Path:
    """Where the index of (version, split, max_sweeps) is (or will be) stored.

    `cache_dir` if given; else `<dataroot>/.index/` if it can be written; else a per-dataroot
    folder under `user_cache_dir()`. The name carries every setting that changes the content, so
    runs with different settings never overwrite each other's index.
    """
    name = f"{version}_{split}_sweeps{max_sweeps}.parquet"
    if cache_dir is not None:
        return Path(cache_dir) / name
    root = Path(dataroot).expanduser().resolve()
    local = root / ".index"
    if _writable(local):
        return local / name
    digest = hashlib.sha1(str(root).encode()).hexdigest()[:12]
    return user_cache_dir() / f"{root.name}-{digest}" / name


def _metadata(root: Path, version: str, split: str, max_sweeps: int) -> dict[str, str]:
    return {"index_schema": INDEX_SCHEMA_VERSION, "version": version, "split": split,
            "max_sweeps": str(max_sweeps), "tables": _tables_fingerprint(root, version)}


def _read_if_current(path: Path, expected: dict[str, str]) -> pa.Table | None:
    """The stored table if it exists and was built with `expected` settings, else None."""
    if not path.is_file():
        return None
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException):
        return None  # truncated or foreign file: rebuild
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    if any(meta.get(k) != v for k, v in expected.items()):
        return None
    return table


def build_index(dataroot: str | Path, version: str, split: str, cache_dir: str | Path | None = None,
                max_sweeps: int = 10, rebuild: bool = False) -> pa.Table:
    """The index table of a split: read from the cache when current, else built via the devkit and stored.

    Args:
        dataroot: nuScenes dataroot. version: 'v1.0-mini' | 'v1.0-trainval' | 'v1.0-test'.
        split: a detection split of that version (see nusc_db.SPLITS_OF_VERSION).
        cache_dir: folder for the Parquet file (default: see `index_path`).
        max_sweeps: previous LiDAR sweeps listed per sample (loading may use fewer).
        rebuild: build even if a current file exists.
    """
    root = nusc_db.check_dataroot(dataroot, version)
    nusc_db.check_split(version, split)
    if max_sweeps < 0:
        raise ConfigError(f"max_sweeps must be >= 0, got {max_sweeps}")
    path = index_path(root, version, split, cache_dir, max_sweeps)
    expected = _metadata(root, version, split, max_sweeps)
    if not rebuild:
        table = _read_if_current(path, expected)
        if table is not None:
            return table
    path.parent.mkdir(parents=True, exist_ok=True)
    # Concurrent builders on one machine (loader processes of a node) wait for one build: opening
    # v1.0-trainval takes ~30 s and several GB per process.
    with FileLock(str(path) + ".lock"):
        if not rebuild:
            table = _read_if_current(path, expected)  # built by another process while this one waited
            if table is not None:
                return table
        start = time.perf_counter()
        print(f"[index] building the {version} {split} index of {root} through the devkit (v1.0-trainval: "
              f"~30 s to open, minutes to walk the sweeps) into {path} ...", flush=True)
        nusc = nusc_db.open_nuscenes(root, version)
        table = index_table_from_nuscenes(nusc, split, max_sweeps)
        table = table.replace_schema_metadata(expected)
        # Write to a temp file and rename, so a reader never sees a half-written index.
        fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            pq.write_table(table, tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        print(f"[index] {table.num_rows} samples indexed in {time.perf_counter() - start:.1f} s", flush=True)
    return table


def share_index(table: pa.Table) -> Any:
    """Put a split's index table (from `build_index`, in the driver) in Ray's object store.

    Workers, inference actors and cache loaders get the returned ObjectRef and read their rows from
    it (`index_rows`), so they never open the devkit or need the driver's index file (on a
    read-only dataroot that file is in the driver's own ~/.cache).
    """
    import ray

    return ray.put(table)


def index_rows(index: Any) -> list[dict[str, Any]]:
    """Rows of a shared index: an ObjectRef from `share_index`, or the table itself."""
    if not isinstance(index, pa.Table):
        import ray

        index = ray.get(index)
    return table_to_rows(index)


_RESHAPE = {"lidar2ego": (4, 4), "ego2global": (4, 4), "sweep2lidar": (-1, 4, 4),
            "cam_intrinsics": (-1, 3, 3), "cam2lidar": (-1, 4, 4), "gt_boxes": (-1, 9)}
_INT_ARRAYS = ("sweep_timestamps", "num_lidar_pts", "num_radar_pts")


def table_to_rows(table: pa.Table) -> list[dict[str, Any]]:
    """Index rows as dicts, matrices as float64 arrays of the shapes in the module docstring."""
    rows = table.to_pylist()
    for row in rows:
        for key, shape in _RESHAPE.items():
            row[key] = np.asarray(row[key], dtype=np.float64).reshape(shape)
        for key in _INT_ARRAYS:
            row[key] = np.asarray(row[key], dtype=np.int64)
    return rows


def load_index(dataroot: str | Path, version: str, split: str, cache_dir: str | Path | None = None,
               max_sweeps: int = 10) -> list[dict[str, Any]]:
    """Rows of the split's index (built or read as `build_index`), see `table_to_rows`."""
    return table_to_rows(build_index(dataroot, version, split, cache_dir, max_sweeps))


def read_index_metadata(path: str | Path) -> dict[str, str]:
    """The settings an index file was built with (schema version, version, split, max_sweeps, tables)."""
    meta = pq.read_schema(path).metadata or {}
    return {k.decode(): v.decode() for k, v in meta.items()}

