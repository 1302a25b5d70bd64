"""The teacher-target cache: Ray Data really runs the teacher, Zarr really stores the shards."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from models.bev_grid import BEVGrid
from pipeline.cache import inspection
from pipeline.cache import store
from pipeline.cache.build import build_cache
from pipeline.cache.plan import CacheRequest
from pipeline.cache.ray_stages import write_one_shard
from pipeline.cache.reader import CacheReader
from pipeline.cache.schema import CacheError, CacheLayout, CacheMismatchError
from pipeline.cache.views import view_matrix
from pipeline.data.collate import collate
from pipeline.engine.distill_config import build_distill_loss, resolve_distill_config
from pipeline.evaluation.inference import eval_dataset
from pipeline.model_files import load_detector

from tests.conftest import REPO, free_port

VERSION, SPLIT = "v1.0-mini", "mini_val"  # 2 scenes x 3 key frames: 6 samples


def build(teacher, root, uri, **kw):
    kw.setdefault("shard_samples", 2)
    kw.setdefault("cpus_per_actor", 0.5)
    return build_cache(CacheRequest(str(teacher), str(root), VERSION, SPLIT, str(uri), **kw))


def teacher_outputs(teacher: Path, root: Path, item: int, bda: np.ndarray) -> dict[str, torch.Tensor]:
    """The teacher's maps for one dataset item under one BEV augmentation, computed directly."""
    model, cfg = load_detector(teacher)
    model.eval()
    sample = eval_dataset(cfg, root, VERSION, SPLIT, model.modality).get(item, bda=bda)
    with torch.no_grad():
        out = model(collate([sample]))
    return {k: v[0] for k, v in out.items()}, sample


def tiny_grid_and_loss(teacher: Path) -> tuple[BEVGrid, torch.nn.Module]:
    """The teacher's grid and the lidar -> camera UniDistill loss with equal widths (no adapters)."""
    _, cfg = load_detector(teacher)
    grid = BEVGrid.from_config(cfg["grid"])
    dcfg = resolve_distill_config({}, "lidar", "camera", student_channels=(64, 128), teacher_channels=(64, 128))
    return grid, build_distill_loss(grid, dcfg)


def copy_of(caches, name, tmp_path) -> Path:
    import shutil

    dst = tmp_path / name
    shutil.copytree(caches[name][0], dst)
    return dst


@pytest.mark.parametrize("dtype,rtol", [("float16", 1e-3), ("bfloat16", 8e-3), ("float32", 0.0)])
def test_stored_maps_come_back_as_tensors_of_the_cache_precision(dtype, rtol):
    maps = torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(0)) * 50
    stored = store.encode_maps(maps, dtype)
    tensor = store.stored_tensor(stored, dtype)
    assert tensor.dtype == getattr(torch, dtype) and tensor.shape == maps.shape
    assert np.array_equal(tensor.float().numpy(), store.decode_maps(stored, dtype))  # the same values as read()
    torch.testing.assert_close(tensor.float(), maps, rtol=rtol, atol=0)


@pytest.mark.parametrize("tile", [32, 7])
def test_tiles_that_do_not_divide_the_map_store_and_read_back(tmp_path, tile):
    # the paper grid is 180 cells, foreground's default tile 32: Zarr shards must be whole tiles
    layout = CacheLayout(num_samples=2, views=1, shard_samples=2, tile=tile, height=45, width=38,
                         channels={"low": 3, "high": 2, "heatmap": 10, "regression": 66})
    uri = str(tmp_path / "c")
    group = store.create_cache_group(uri, layout, {"storage": "foreground"}, "float16", "zstd")
    maps = np.random.default_rng(0).normal(size=(2, 3, 45, 38)).astype(np.float16)
    maps[:, :, :tile] = 0  # an all-zero band of tiles: not stored
    group["low"][0:2] = maps
    assert np.array_equal(store.open_cache_group(uri)["low"][0:2], maps)
    assert store.shard_bytes(uri, 0) > 0


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dense1", "dense2"])
def test_cached_maps_equal_the_teacher_run_directly(caches, tiny_teacher, nusc_root, name):
    uri, summary = caches[name]
    views = summary.views
    assert summary.shards == 3 and summary.shards_written == 3
    reader = CacheReader(str(uri))
    tokens = list(reader.row_of)
    assert len(tokens) == 6 and reader.views == views
    for item in (0, 5):
        for view in range(views):
            bda = view_matrix(tokens[item], view, load_detector(tiny_teacher)[1]["data"]["bda"], 0)
            if view == 0:
                assert np.allclose(bda, np.eye(4))
            direct, _ = teacher_outputs(tiny_teacher, nusc_root, item, bda)
            cached = reader.read(tokens[item], view)
            assert np.allclose(cached["bda"], bda, atol=1e-6)
            for name in ("low", "high", "heatmap", "regression"):
                want = direct[name].numpy()
                assert cached[name].shape == want.shape
                np.testing.assert_allclose(cached[name], want, rtol=2e-3, atol=2e-3 * max(1.0, np.abs(want).max()),
                                           err_msg=f"{name} view {view}")
            # What a student's DataLoader worker reads: the same values in the stored precision.
            stored = reader.read_tensors(tokens[item], view)
            assert np.array_equal(stored["bda"], cached["bda"])
            for name in ("low", "high", "heatmap", "regression"):
                assert stored[name].dtype == torch.float16, name
                assert torch.equal(stored[name].float(), torch.from_numpy(cached[name])), name
    # dense storage: one chunk per map per row (a student reads whole rows; every chunk costs a read)
    group = store.open_cache_group(str(uri))
    for name in ("low", "high", "heatmap", "regression"):
        assert group[name].chunks == (1, *group[name].shape[1:]), name
    if views > 1:  # augmented views are really different inputs
        a, b = reader.read(tokens[0], 0)["low"], reader.read(tokens[0], 1)["low"]
        assert not np.allclose(a, b)
    assert inspection.verify(str(uri))["bad"] == {}


@pytest.mark.slow
def test_same_command_reuses_the_cache(caches, tiny_teacher, nusc_root):
    uri, summary = caches["dense2"]
    before = store.read_markers(str(uri))
    again = build(tiny_teacher, nusc_root, uri, views=2)
    assert again.shards_written == 0 and again.shards_skipped == 3 and again.bytes == summary.bytes
    assert store.read_markers(str(uri)) == before
    # A cache built with another tile than today's default is reused when --tile is not given
    # (8-cell tiles here; the foreground default on this grid is 32).
    fg_uri, fg = caches["fg2"]
    kept = build(tiny_teacher, nusc_root, fg_uri, views=2, storage="foreground")
    assert kept.shards_written == 0 and kept.bytes == fg.bytes
    with pytest.raises(CacheMismatchError, match="layout.tile"):  # an explicit other tile is another cache
        build(tiny_teacher, nusc_root, fg_uri, views=2, storage="foreground", tile=16)
    with pytest.raises(CacheMismatchError) as other:  # another cache: its --overwrite would get the default tile
        build(tiny_teacher, nusc_root, fg_uri, views=2, storage="dense")
    assert "layout.tile" in other.value.fields and "storage" in other.value.fields


@pytest.mark.slow
def test_fingerprint_mismatch_is_refused_and_overwrite_replaces(caches, tiny_teacher, nusc_root, tmp_path):
    uri = copy_of(caches, "dense1", tmp_path)
    with pytest.raises(CacheMismatchError, match="dtype") as err:
        build(tiny_teacher, nusc_root, uri, dtype="float32")
    assert err.value.fields == ["dtype"]
    with pytest.raises(CacheMismatchError, match="storage"):
        build(tiny_teacher, nusc_root, uri, storage="foreground")
    assert CacheReader(str(uri)).dtype == "float16", "a refused run leaves the cache as it was"
    build(tiny_teacher, nusc_root, uri, dtype="float32", overwrite=True)
    assert CacheReader(str(uri)).dtype == "float32"
    reader = CacheReader(str(uri))
    student = dict(reader.fingerprint)
    student["grid"] = dict(student["grid"], out_size_factor=4)
    with pytest.raises(CacheMismatchError, match="grid.out_size_factor"):
        reader.check_compatible(student)
    reversed_classes = dict(reader.fingerprint, class_order=reader.fingerprint["class_order"][::-1])
    with pytest.raises(CacheMismatchError, match="class_order"):
        reader.check_compatible(reversed_classes)


def test_verify_reports_corrupt_and_missing_shards(caches, tmp_path):
    uri = copy_of(caches, "dense1", tmp_path)
    obj = uri / store.shard_object_key("high", 1)
    data = bytearray(obj.read_bytes())
    data[len(data) // 2] ^= 0xFF
    obj.write_bytes(bytes(data))
    (uri / store.shard_object_key("bda", 2)).unlink()
    report = inspection.verify(str(uri))
    assert report["ok"] == [0]
    assert "high (altered)" in report["bad"][1] and "bda (missing)" in report["bad"][2]
    done = subprocess.run([sys.executable, "stages/cache_teacher.py", "--cache", str(uri), "--verify"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "shard 1: checksum mismatch in high (altered)" in done.stdout


def test_a_task_writes_whole_shards_only(tiny_teacher, nusc_root, tmp_path):
    """write_one_shard refuses part of a shard (concurrent partial writers lose data, DESIGN §3.4)."""
    from pipeline.cache.plan import plan_cache, prepare_store

    job, fp = plan_cache(str(tiny_teacher), str(nusc_root), VERSION, SPLIT, str(tmp_path / "c"), 1, "dense",
                         "float16", 2)
    prepare_store(job, fp, "blosc-zstd", overwrite=False)
    layout = job.cache_layout
    h, w = layout.height, layout.width
    maps = {n: np.zeros((1, c, h, w), np.float16) for n, c in layout.channels.items()}  # 1 row of a 2-row shard
    with pytest.raises(CacheError, match="shard 0: low has 1 rows, the shard has 2"):
        write_one_shard(job, 0, maps, np.zeros((1, 4, 4), np.float32), list(job.tokens[:2]))
    assert store.read_markers(job.uri) == {}
    with pytest.raises(CacheError, match="incomplete: 3 of 3 shards are missing"):
        CacheReader(job.uri)


@pytest.mark.slow
def test_concurrent_writers_each_write_distinct_whole_shards(ray_cluster, tiny_teacher, nusc_root, tmp_path):
    uri = tmp_path / "cache"
    build(tiny_teacher, nusc_root, uri, shard_samples=1, actors=2)
    markers = store.read_markers(str(uri))
    layout = CacheLayout.from_dict(store.open_cache_group(str(uri)).attrs["layout"])
    assert sorted(markers) == list(range(6))
    for shard, rec in markers.items():
        assert rec["rows"] == [layout.shard_rows(shard).start, layout.shard_rows(shard).stop]
        assert rec["samples"] == list(layout.shard_samples_range(shard))
    assert len({rec["teacher_pid"] for rec in markers.values()}) == 2, "both teacher actors produced shards"
    # writers are two long-lived actors (one per teacher by default), not a fresh process per shard
    assert 1 <= len({rec["pid"] for rec in markers.values()}) <= 2


@pytest.mark.slow
def test_foreground_storage_gives_the_same_losses_with_fewer_bytes(caches, tiny_teacher, nusc_root):
    (dense_uri, dense), (fg_uri, fg) = caches["dense2"], caches["fg2"]
    assert fg.bytes < 0.8 * dense.bytes
    rd, rf = CacheReader(str(dense_uri)), CacheReader(str(fg_uri))
    grid, loss = tiny_grid_and_loss(tiny_teacher)
    torch.manual_seed(1)
    tokens = list(rd.row_of)
    for item in range(len(tokens)):
        for view in range(2):
            bda = rd.bda(tokens[item], view)
            _, sample = teacher_outputs(tiny_teacher, nusc_root, item, bda)
            batch = collate([sample])
            student = {"low": torch.randn(1, 64, grid.H, grid.W), "high": torch.randn(1, 128, grid.H, grid.W),
                       "heatmap": torch.randn(1, 10, grid.H, grid.W), "regression": torch.randn(1, 66, grid.H, grid.W)}
            values = []
            for reader in (rd, rf):
                maps = reader.read(tokens[item], view)
                teacher = {k: torch.from_numpy(maps[k])[None] for k in ("low", "high", "heatmap", "regression")}
                values.append(loss(student, teacher, batch["gt_boxes"], batch["gt_mask"]))
            for name in ("feature", "relation", "response_cls", "response_reg"):
                assert torch.allclose(values[0][name], values[1][name], rtol=1e-5, atol=1e-7), (item, view, name)
            if len(sample["gt_boxes"]):
                assert values[0]["distill"] > 0


def _run_stage(args: list[str], env: dict, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "stages/cache_teacher.py", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, **kw)


@pytest.mark.slow
def test_killed_job_resumes_without_rewriting_finished_shards(ray_cluster, tiny_teacher, nusc_root, tmp_path):
    uri = tmp_path / "cache"
    args = ["--teacher", str(tiny_teacher), "--dataroot", str(nusc_root), "--split", SPLIT, "--cache", str(uri),
            "--shard-samples", "1", "--views", "2", "--teacher-batch", "1", "--cpus-per-actor", "0.5"]
    env = dict(os.environ)
    proc = _run_stage(args, env)
    markers: dict = {}
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        markers = store.read_markers(str(uri)) if (uri / "zarr.json").exists() else {}
        if markers:
            break
        time.sleep(0.2)
    exited = proc.poll()
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    before = store.read_markers(str(uri))
    assert exited is None, f"the stage ended by itself (status {exited}) before any shard: {proc.stdout.read()[-3000:]}"
    assert 1 <= len(before) < 6, f"the job should be cut off part-way ({len(before)} shards were done)"
    with pytest.raises(CacheError, match="incomplete"):
        CacheReader(str(uri))
    done = _run_stage(args, env)
    out, _ = done.communicate(timeout=600)
    assert done.returncode == 0, out
    assert f"{len(before)} of 6 shards are already complete: skipping them" in out
    after = store.read_markers(str(uri))
    assert sorted(after) == list(range(6))
    for shard, rec in before.items():  # finished shards were not rewritten
        assert after[shard]["time"] == rec["time"] and after[shard]["pid"] == rec["pid"]
    assert inspection.verify(str(uri))["bad"] == {}
    check = subprocess.run([sys.executable, "stages/cache_teacher.py", "--cache", str(uri), "--verify"], cwd=REPO,
                           capture_output=True, text=True, timeout=120)
    assert check.returncode == 0 and "verified 6 of 6 shards: 0 bad, 0 missing" in check.stdout


@pytest.fixture
def s3_server():
    """A moto S3 server on 127.0.0.1 with a bucket, and the AWS variables pointing at it."""
    boto3 = pytest.importorskip("boto3", reason="moto[server] (dev dependency) provides boto3")
    port = free_port()
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        for _ in range(100):
            try:
                boto3.client("s3").create_bucket(Bucket="caches")
                break
            except Exception:  # noqa: BLE001 - the server is still starting
                time.sleep(0.1)
        yield "s3://caches"
    finally:
        server.terminate()
        server.wait(timeout=30)
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.mark.slow
def test_s3_url_round_trip(s3_server, caches, tiny_teacher, nusc_root):
    """The cache on an S3-compatible object store (moto on 127.0.0.1) holds what a local cache holds."""
    local_uri, local = caches["dense1"]
    remote = build(tiny_teacher, nusc_root, f"{s3_server}/unidistill/cache")
    assert remote.shards_written == 3 and remote.bytes == local.bytes
    rl, rr = CacheReader(str(local_uri)), CacheReader(f"{s3_server}/unidistill/cache")
    assert rl.fingerprint == rr.fingerprint
    for token in list(rl.row_of)[:3]:
        a, b = rl.read(token), rr.read(token)
        for k in a:
            assert np.array_equal(a[k], b[k])
    assert inspection.verify(f"{s3_server}/unidistill/cache")["ok"] == [0, 1, 2]
    assert build(tiny_teacher, nusc_root, f"{s3_server}/unidistill/cache").shards_written == 0
    info = inspection.describe(f"{s3_server}/unidistill/cache")
    assert info["complete"] and json.dumps(info["fingerprint"])
    # Model files on the object store too: the teacher read from s3:// is the same teacher.
    from pipeline.model_files import file_sha256, read_model_file

    fs, root = store.filesystem(f"{s3_server}/runs/teacher")
    fs.put_file(str(tiny_teacher), f"{root}/model.pt")
    remote_teacher = f"{s3_server}/runs/teacher/model.pt"
    assert file_sha256(remote_teacher) == file_sha256(tiny_teacher)
    assert read_model_file(remote_teacher)["config"] == read_model_file(tiny_teacher)["config"]


# --- keypoint storage (issue 16) --------------------------------------------------------------------
def _keypoint_batch(reader: CacheReader, token: str, view: int, sample: dict) -> dict:
    from pipeline.cache.keypoints import teacher_at_boxes
    from pipeline.engine.distill_task import collate_keypoint_teachers

    row = reader.read_keypoints(token, view)
    teacher = teacher_at_boxes(row, sample["gt_boxes"], f"{token} view {view}")
    return collate_keypoint_teachers([teacher], len(sample["gt_boxes"]))


@pytest.mark.slow
def test_keypoint_storage_gives_the_dense_losses_in_a_few_percent_of_the_bytes(caches, tiny_teacher, nusc_root):
    (dense_uri, dense), (kp_uri, kp) = caches["dense2"], caches["kp2"]
    rd, rk = CacheReader(str(dense_uri)), CacheReader(str(kp_uri))
    # issue 16's bound on the tiny grid: <= 5 % of the dense maps' float16 bytes (the paper grid's
    # figure is in bench_cache.py); also far below what the compressed dense cache stores
    lay = rd.layout
    dense_f16 = sum(lay.channels.values()) * lay.height * lay.width * 2 * lay.rows
    assert kp.bytes < 0.05 * dense_f16 and kp.bytes < 0.2 * dense.bytes, (kp.bytes, dense.bytes, dense_f16)
    assert rk.storage == "keypoints" and rk.fingerprint["keypoints"]["min_overlap"] == 0.7
    with pytest.raises(CacheError, match="read_keypoints"):
        rk.read_tensors(next(iter(rk.row_of)), 0)
    grid, loss = tiny_grid_and_loss(tiny_teacher)
    torch.manual_seed(2)
    tokens = list(rd.row_of)
    compared = 0
    for item in range(len(tokens)):
        for view in range(2):
            bda = rd.bda(tokens[item], view)
            assert np.allclose(bda, rk.bda(tokens[item], view))  # the same seeded views
            _, sample = teacher_outputs(tiny_teacher, nusc_root, item, bda)
            batch = collate([sample])
            student = {"low": torch.randn(1, 64, grid.H, grid.W), "high": torch.randn(1, 128, grid.H, grid.W),
                       "heatmap": torch.randn(1, 10, grid.H, grid.W), "regression": torch.randn(1, 66, grid.H, grid.W)}
            maps = rd.read_tensors(tokens[item], view)
            dense_teacher = {k: maps[k][None] for k in ("low", "high", "heatmap", "regression")}
            want = loss(student, dense_teacher, batch["gt_boxes"], batch["gt_mask"])
            got = loss(student, _keypoint_batch(rk, tokens[item], view, sample), batch["gt_boxes"], batch["gt_mask"])
            for name in ("feature", "relation", "response_cls", "response_reg"):
                # float16 rounding: dense samples float16 maps, keypoint storage rounds float32 samples
                assert torch.allclose(want[name], got[name], rtol=2e-3, atol=1e-5), (item, view, name, want, got)
            compared += int(len(sample["gt_boxes"]) > 0 and want["distill"] > 0)
    assert compared >= 6  # most views have boxes: the comparison is not of zeros


def test_keypoint_cache_refuses_what_it_cannot_teach(caches, tiny_teacher, nusc_root):
    from models.errors import UserError
    from pipeline.config import ConfigError, load_config
    from pipeline.data.index import load_index
    from pipeline.engine.distill_task import plan_student

    uri = str(caches["kp2"][0])
    tokens = [r["token"] for r in load_index(nusc_root, VERSION, SPLIT)]
    base = ["distill.teacher_modality=lidar"]
    loop, _ = plan_student(load_config("tiny_lidar_to_camera", base), VERSION, SPLIT, tokens, cache=uri)
    assert loop["view_policy"] == "replay"
    for override, words in ((["distill.view_policy=warp"], "view_policy warp"),
                            (["distill.keypoint_transpose=true"], "mirrored keypoints"),
                            (["distill.response.min_overlap=0.5"], "wider response mask"),
                            (["data.min_points_in_box=0"], "min_points_in_box")):
        cfg = load_config("tiny_lidar_to_camera", base + override)
        if override[0].startswith("data."):
            cfg["data"]["min_points_in_box"] = -1  # below any teacher's filter
        with pytest.raises(ConfigError, match=words):
            plan_student(cfg, VERSION, SPLIT, tokens, cache=uri)

    # at run time: a student box the teacher never saw, and a mask reaching unstored cells
    reader = CacheReader(uri)
    token = tokens[0]
    row = reader.read_keypoints(token, 0)
    m = int(row["counts"][0])
    assert m > 0
    from pipeline.cache.keypoints import teacher_at_boxes

    moved = row["boxes"][:m].copy()
    moved[0, 0] += 0.5
    with pytest.raises(CacheError, match=r"GT box 0 .* not among"):
        teacher_at_boxes(row, moved, token)
    _, cfg = load_detector(tiny_teacher)
    grid = BEVGrid.from_config(cfg["grid"])
    teacher = _keypoint_batch(reader, token, 0, {"gt_boxes": row["boxes"][:m]})
    boxes, mask = torch.as_tensor(row["boxes"][:m])[None], torch.ones(1, m, dtype=torch.bool)
    student = {"heatmap": torch.randn(1, 10, grid.H, grid.W), "regression": torch.randn(1, 66, grid.H, grid.W)}
    wide = build_distill_loss(grid, resolve_distill_config(
        {"feature": {"enabled": False}, "relation": {"enabled": False}, "response": {"min_overlap": 0.3}}, "lidar", "camera"))
    with pytest.raises(UserError, match="did not store"):
        wide(student, teacher, boxes, mask)


def test_teacher_views_keep_the_boxes_each_view_brings_into_range(tiny_teacher, nusc_root):
    """The GT a cache stores for a view is the student's GT for that view: boxes outside the grid in
    the canonical frame that the view's BDA moves inside are kept (they were dropped before)."""
    from pipeline.cache.ray_stages import _inputs_dataset, canonical_inputs
    from pipeline.config import load_config
    from pipeline.data.dataset import DetectionDataset, augment_bev

    # mini_train: it has boxes up to 60 m out (mini_val none past the tiny grid's 51.2 m)
    teacher_inputs = _inputs_dataset(str(tiny_teacher), str(nusc_root), VERSION, "mini_train", None)
    student = DetectionDataset(nusc_root, VERSION, "mini_train", load_config("tiny_lidar_to_camera"), train=False)
    grid = student.grid
    shrink = np.diag([0.8, 0.8, 1.0, 1.0])  # a BEV scale that brings boxes beyond the range inside
    gained = 0
    for i in range(len(student)):
        view = augment_bev(canonical_inputs(teacher_inputs, i), shrink, grid)
        want = student.get(i, bda=shrink)["gt_boxes"]
        assert view["gt_boxes"].shape == want.shape and np.allclose(view["gt_boxes"], want, atol=1e-5), i
        gained += len(want) - len(teacher_inputs.get(i, bda=np.eye(4))["gt_boxes"])
    assert gained > 0


def test_replay_walks_every_view_once_per_k_epochs():
    from pipeline.engine.distill_task import replay_view

    for views in (1, 4, 20):
        for item in range(5):
            seq = [replay_view(3, e, item, views) for e in range(3 * views)]
            for start in range(len(seq) - views + 1):
                assert sorted(seq[start:start + views]) == list(range(views)), (views, item, seq)
    starts = {replay_view(3, 0, item, 20) for item in range(40)}
    assert len(starts) > 5  # items start at different views: an epoch mixes views


@pytest.mark.slow
def test_render_draws_the_boxes_the_teacher_saw_for_every_storage(caches, nusc_root, tmp_path):
    kp_uri, dense_uri = str(caches["kp2"][0]), str(caches["dense2"][0])
    reader = CacheReader(kp_uri)
    for token in list(reader.row_of)[:3]:
        for view in range(2):
            row = reader.read_keypoints(token, view)
            stored = row["boxes"][:int(row["counts"][0])]
            from_data = inspection.view_gt_boxes(CacheReader(dense_uri), token, view, nusc_root)
            assert np.allclose(np.sort(stored[:, 0]), np.sort(from_data[:, 0]), atol=1e-4)
            assert len(stored) == len(from_data)
    token = list(reader.row_of)[0]
    for uri in (kp_uri, dense_uri, str(caches["fg2"][0])):
        out = inspection.render(uri, token, 1, tmp_path / f"{Path(uri).name}.png", nusc_root)
        assert out.stat().st_size > 10_000


def test_keypoint_cache_verify_finds_a_corrupt_shard(caches, tmp_path):
    uri = copy_of(caches, "kp2", tmp_path)
    assert not inspection.verify(str(uri))["bad"]
    obj = uri / store.shard_object_key("keypoint_low", 1, "keypoints")
    data = bytearray(obj.read_bytes())
    data[len(data) // 2] ^= 0xFF
    obj.write_bytes(bytes(data))
    assert "keypoint_low" in inspection.verify(str(uri))["bad"][1]
