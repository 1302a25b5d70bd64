"""Benchmark: keypoint cache storage (issue 16) against dense and foreground storage, side by side.

1. Bytes per (sample, view) of dense / foreground / keypoint storage (float16, zstd) on the tiny
   grid and on the paper grid (the nuscenes_lidar preset, seeded random weights, over generated
   data whose box count is printed), with the keypoint bytes rescaled to nuScenes' ~35 annotated
   boxes per key frame.
2. CPU core-seconds per (sample, view) a DataLoader worker spends reading and decoding each storage
   mode on the paper grid; from them the CPU cores per GPU that feed a student at 10 samples/s per
   GPU, and the total cache size for nuScenes train (28,130 samples) with K = 1, 4, 20 views.
3. Random reads of a keypoint cache (tiny grid, one thread, aligned with the sample's boxes as the
   student's dataset does) against what one student worker trains (goal >= 20x).
4. The student's step with keypoint targets, and with dense ones, against the same step without
   distillation (tiny camera student, one thread; goal <= 1.05x for keypoints).
5. Caching throughput of the Ray Data job writing K = 1, 4, 20 keypoint views against the teacher's
   inference alone on the same K views (goal >= 0.9x at K = 20).

    python tests/bench/bench_keypoints.py [--dataroot DIR] [--skip-paper]
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from models.detector import build_detector, save_detector  # noqa: E402
from pipeline.cache import store  # noqa: E402
from pipeline.cache.build import build_cache  # noqa: E402
from pipeline.cache.keypoints import teacher_at_boxes  # noqa: E402
from pipeline.cache.plan import CacheRequest, plan_cache  # noqa: E402
from pipeline.cache.ray_stages import TeacherRunner, _inputs_dataset, canonical_inputs, write_one_shard  # noqa: E402
from pipeline.cache.reader import CacheReader  # noqa: E402
from pipeline.cache.views import view_matrices  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.data.collate import collate  # noqa: E402
from pipeline.data.dataset import DetectionDataset, augment_bev, boxes_in_range  # noqa: E402
from pipeline.engine.distill_task import DistillDataset, DistillLosses, collate_with_teacher, plan_student  # noqa: E402
from pipeline.engine.detection_task import detection_losses  # noqa: E402
from pipeline.engine.distill_config import build_distill_loss  # noqa: E402
from pipeline.model_files import load_detector  # noqa: E402
from pipeline.ray_env import ray_session  # noqa: E402
from tests.bench.bench_cache import random_reads  # noqa: E402
from tests.bench.bench_inputs import dataset_and_teacher  # noqa: E402

VERSION, TRAIN, VAL = "v1.0-mini", "mini_train", "mini_val"
NUSCENES_TRAIN_SAMPLES = 28130
NUSCENES_BOXES = 35  # annotated boxes per nuScenes key frame, ~30-40
STUDENT_RATE_PER_GPU = 10.0  # samples/s a student trains at per GPU (the sizing figure)
MODES = ("dense", "foreground", "keypoints")
KIB, MIB = 2 ** 10, 2 ** 20


def write_direct(teacher: Path, root: Path, uri: str, storage: str, samples: int, views: int = 1,
                 data: tuple[str, str] = (VERSION, TRAIN)) -> dict:
    """One shard of `samples` samples x `views` views of `data` (version, split) written by the real
    writer without Ray; returns bytes per row, the dense float16 bytes per row uncompressed, and the
    mean GT boxes per row."""
    job, fp = plan_cache(str(teacher), str(root), *data, uri, views, storage, "float16", samples)
    store.create_cache_group(uri, job.cache_layout, fp, "float16", store.DEFAULT_COMPRESSOR)
    runner = TeacherRunner(job)
    dataset = _inputs_dataset(job.teacher_path, job.dataroot, *data, None)
    inputs = [canonical_inputs(dataset, i) for i in range(samples)]
    maps, bda = runner.run_views(inputs)
    rec = write_one_shard(job, 0, maps, bda, list(job.tokens[:samples]))
    lay = job.cache_layout
    boxes = [int(boxes_in_range(s["gt_boxes"], runner.grid.point_cloud_range).sum()) for s in inputs]
    return {"bytes_per_row": rec["bytes"] / (samples * views), "boxes_per_row": float(np.mean(boxes)),
            "dense_f16_raw": sum(lay.channels.values()) * lay.height * lay.width * 2, "tokens": list(job.tokens[:samples])}


def mark_complete(uri: str) -> None:
    """Let CacheReader open a one-shard cache written by write_direct (a manifest of its samples)."""
    markers = store.read_markers(uri)
    store.write_manifest(uri, store.manifest_table(markers.values(), store.open_cache_group(uri).attrs["layout"]["views"]))
    store.open_cache_group(uri, mode="r+").attrs["complete"] = True


def read_cost(uri: str, tokens: list[str], reads: int = 40) -> float:
    """CPU core-seconds per (sample, view) to read and decode one random row as a student's
    DataLoader worker does (one codec thread; keypoint rows also aligned with the boxes)."""
    store.limit_codec_threads(1)
    reader = CacheReader(uri)
    rng = random.Random(0)
    t0 = time.process_time()
    for _ in range(reads):
        token = rng.choice(tokens)
        if reader.storage == "keypoints":
            row = reader.read_keypoints(token, 0)
            teacher_at_boxes(row, row["boxes"][:int(row["counts"][0])], token)
        else:
            reader.read_tensors(token, 0)
    return (time.process_time() - t0) / reads


def storage_figures(teacher: Path, root: Path, out: Path, samples: int, label: str,
                    data: tuple[str, str] = (VERSION, TRAIN)) -> dict:
    """Bytes and read cost of the three storage modes for one teacher (grid)."""
    figs = {}
    for mode in MODES:
        uri = str(out / f"{label}_{mode}")
        figs[mode] = write_direct(teacher, root, uri, mode, samples, data=data)
        mark_complete(uri)
        figs[mode]["read_core_s"] = read_cost(uri, figs[mode]["tokens"])
        del figs[mode]["tokens"]
    dense = figs["dense"]["bytes_per_row"]
    for mode in MODES:
        f = figs[mode]
        f["of_dense"] = f["bytes_per_row"] / dense
        f["of_dense_raw_f16"] = f["bytes_per_row"] / f["dense_f16_raw"]
        print(f"[{label}] {mode:<10} {f['bytes_per_row'] / KIB:9.1f} KiB per (sample, view) = "
              f"{100 * f['of_dense']:6.2f} % of dense float16 as stored, {100 * f['of_dense_raw_f16']:5.2f} % of its "
              f"{f['dense_f16_raw'] / MIB:.1f} MiB uncompressed; {f['boxes_per_row']:.1f} GT boxes/row; read+decode "
              f"{1e3 * f['read_core_s']:.2f} ms CPU", flush=True)
    return figs


def step_times(root: Path, caches: dict[str, str], batch: int = 2, steps: int = 6, rounds: int = 3) -> dict:
    """Median s/step of the tiny camera student: detection loss only, and with the UniDistill losses
    from each cache's targets (batches read beforehand, so only the step is timed)."""
    cfg = load_config("tiny_lidar_to_camera")
    tokens = None
    batches, kd = {}, {}
    torch.manual_seed(0)
    model = build_detector(cfg).train()
    for name, uri in caches.items():
        if tokens is None:
            tokens = list(CacheReader(uri).row_of)
        loop, _ = plan_student(cfg, VERSION, TRAIN, tokens, cache=uri)
        ds = DistillDataset(DetectionDataset(root, VERSION, TRAIN, cfg, train=True), CacheReader(uri), loop["view_policy"])
        batches[name] = [collate_with_teacher([ds[(i * batch + j) % len(ds)] for j in range(batch)])
                         for i in range(steps + 1)]
        kd[name] = torch.nn.ModuleDict({"distill": build_distill_loss(model.grid, loop["distill"])})
    plain = [{k: v for k, v in b.items() if k != "teacher"} for b in batches[next(iter(caches))]]
    opt = torch.optim.SGD(model.parameters(), lr=1e-5)

    def run(fn, data) -> float:
        for i, b in enumerate(data):
            if i == 1:
                t0 = time.perf_counter()
            loss = fn(b)["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
        return (time.perf_counter() - t0) / (len(data) - 1)

    times: dict[str, list[float]] = {"none": [], **{n: [] for n in caches}}
    for _ in range(rounds):  # alternate so that every variant sees the same machine
        times["none"].append(run(lambda b: detection_losses(model, torch.nn.ModuleDict(), b), plain))
        for name in caches:
            losses = DistillLosses(model.grid, None, warp=False)
            times[name].append(run(lambda b, n=name: losses(model, kd[n], b), batches[name]))
    return {k: float(np.median(v)) for k, v in times.items()}


def teacher_alone_views(teacher: Path, root: Path, views: int, batch: int = 2) -> float:
    """(sample, view)s per second of the teacher's forward alone over VAL's samples x `views` views
    (inputs loaded and augmented beforehand)."""
    model, cfg = load_detector(teacher)
    model.eval()
    ds = _inputs_dataset(str(teacher), str(root), VERSION, VAL, None)
    inputs = []
    for i in range(len(ds)):
        s = canonical_inputs(ds, i)
        for m in view_matrices(s["token"], views, cfg["data"]["bda"], 0):
            inputs.append(augment_bev({k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in s.items()}, m,
                                      model.grid))
    with torch.no_grad():
        model(collate(inputs[:batch]))
        t0 = time.perf_counter()
        for i in range(0, len(inputs), batch):
            model(collate(inputs[i:i + batch]))
    return len(inputs) / (time.perf_counter() - t0)


def caching_views(teacher: Path, root: Path, uri: str, views: int, batch: int = 2) -> float:
    """Steady (sample, view)s per second of the Ray Data job writing a keypoint cache of `views` views
    (between its first and last durable shard)."""
    build_cache(CacheRequest(str(teacher), str(root), VERSION, VAL, uri, views=views, storage="keypoints",
                             shard_samples=2, teacher_batch=batch))
    markers = sorted(store.read_markers(uri).values(), key=lambda m: m["time"])
    span = markers[-1]["time"] - markers[0]["time"]
    return sum(len(m["samples"]) for m in markers[1:]) * views / span


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataroot", type=Path, default=None)
    ap.add_argument("--samples", type=int, default=8, help="samples per storage-mode measurement")
    ap.add_argument("--skip-paper", action="store_true", help="skip the paper-grid teacher (~3 s/sample)")
    ap.add_argument("--trained", nargs=4, metavar=("MODEL", "DATAROOT", "VERSION", "SPLIT"),
                    help="also measure the storage modes with this (trained) teacher on this data")
    args = ap.parse_args()
    torch.set_num_threads(1)
    tmp = tempfile.TemporaryDirectory(prefix="bench_keypoints_")
    out = Path(tmp.name)
    root, tiny = dataset_and_teacher(out, args.dataroot, None, samples_per_scene=6)
    result: dict = {"bench": "keypoints", "threads": 1}

    result["tiny"] = storage_figures(tiny, root, out, args.samples, "tiny grid")
    if args.trained:
        model, data_root, version, split = args.trained
        result["trained"] = storage_figures(Path(model), Path(data_root), out, 2 * args.samples, "trained teacher",
                                            (version, split))
    if not args.skip_paper:
        torch.manual_seed(0)
        cfg = load_config("nuscenes_lidar")
        paper = out / "paper_teacher.pt"
        save_detector(paper, build_detector(cfg).eval(), cfg)
        figs = storage_figures(paper, root, out, args.samples, "paper grid")
        kp = figs["keypoints"]
        scaled = kp["bytes_per_row"] * NUSCENES_BOXES / kp["boxes_per_row"]
        figs["keypoints_at_35_boxes"] = {"bytes_per_row": scaled, "of_dense": scaled / figs["dense"]["bytes_per_row"]}
        print(f"[paper grid] keypoints rescaled to {NUSCENES_BOXES} boxes: {scaled / KIB:.1f} KiB = "
              f"{100 * scaled / figs['dense']['bytes_per_row']:.2f} % of dense", flush=True)
        print("nuScenes train (28,130 samples) per storage mode, and CPU cores per GPU feeding 10 samples/s:")
        for mode in MODES:
            per_row = scaled if mode == "keypoints" else figs[mode]["bytes_per_row"]
            sizes = {k: per_row * NUSCENES_TRAIN_SAMPLES * k / 2 ** 30 for k in (1, 4, 20)}
            cores = figs[mode]["read_core_s"] * STUDENT_RATE_PER_GPU
            figs[mode].update(total_gib={str(k): round(v, 1) for k, v in sizes.items()}, cores_per_gpu=cores)
            print(f"  {mode:<10} K=1 {sizes[1]:8.1f} GiB  K=4 {sizes[4]:8.1f} GiB  K=20 {sizes[20]:8.1f} GiB; "
                  f"{cores:.2f} cores/GPU", flush=True)
        result["paper"] = figs

    with ray_session(num_cpus=2):
        rates = {}
        for views in (1, 4, 20):
            alone = teacher_alone_views(tiny, root, views)
            cached = caching_views(tiny, root, str(out / f"kp_val_{views}v"), views)
            kp_bytes = sum(int(m["bytes"]) for m in store.read_markers(str(out / f"kp_val_{views}v")).values())
            rates[views] = {"teacher_alone": alone, "caching": cached, "ratio": cached / alone,
                            "bytes_per_sample": kp_bytes / len(CacheReader(str(out / f"kp_val_{views}v")).row_of)}
            print(f"K={views:<2} keypoint views: caching {cached:.2f} views/s, teacher alone {alone:.2f} views/s "
                  f"({cached / alone:.2f}x, goal >= 0.9 at K=20); {rates[views]['bytes_per_sample'] / KIB:.1f} KiB/sample",
                  flush=True)
        result["caching"] = {str(k): {kk: round(vv, 3) for kk, vv in v.items()} for k, v in rates.items()}
        train_kp, train_dense = str(out / "kp_train_4v"), str(out / "dense_train_4v")
        for uri, storage in ((train_kp, "keypoints"), (train_dense, "dense")):
            build_cache(CacheRequest(str(tiny), str(root), VERSION, TRAIN, uri, views=4, storage=storage,
                                     shard_samples=8))

    reads = random_reads(train_kp)
    steps = step_times(root, {"keypoints": train_kp, "dense": train_dense})
    consume = 2 / steps["none"]
    print(f"random keypoint reads: {reads:.1f} samples/s against {consume:.2f} samples/s one student worker trains "
          f"({reads / consume:.1f}x, goal >= 20x)")
    print(f"student step: {steps['none']:.3f} s without distillation, {steps['keypoints']:.3f} s with keypoint targets "
          f"({steps['keypoints'] / steps['none']:.3f}x, goal <= 1.05), {steps['dense']:.3f} s with dense targets "
          f"({steps['dense'] / steps['none']:.3f}x)")
    result.update(random_reads_per_s=round(reads, 1), student_samples_per_s=round(consume, 3),
                  reads_over_student=round(reads / consume, 1), step_s={k: round(v, 4) for k, v in steps.items()},
                  step_ratio_keypoints=round(steps["keypoints"] / steps["none"], 3),
                  step_ratio_dense=round(steps["dense"] / steps["none"], 3))
    print(json.dumps(result, default=lambda x: round(float(x), 4)))
    tmp.cleanup()


if __name__ == "__main__":
    main()
