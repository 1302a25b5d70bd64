"""Benchmark: the teacher-target cache.

1. Caching throughput (stages/cache_teacher.py's Ray Data job, end to end and steady state) against
   the teacher's inference throughput alone, measured in the same run (goal: ratio >= 0.9).
2. Bytes per sample for each storage mode and dtype, against raw float32 maps, and the compressor
   choice (ratio, write and read speed).
3. Random reads from the cache (samples/s, one thread) against what one student worker consumes
   (goal: >= 3x).
4. Extrapolation to the nuScenes preset (180x180 maps of 256 + 512 + 10 + 66 channels) for the
   28,130 training samples, using the measured compression ratio and the foreground-tile fraction
   of the generated boxes on the paper's grid.

    python tests/bench/bench_cache.py [--dataroot DIR] [--teacher MODEL]
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

from models.detector import build_detector  # noqa: E402
from pipeline.cache import store  # noqa: E402
from pipeline.model_files import load_detector  # noqa: E402
from tests.bench.bench_inputs import dataset_and_teacher  # noqa: E402
from models.bev_grid import BEVGrid  # noqa: E402
from pipeline.cache.build import build_cache  # noqa: E402
from pipeline.cache.plan import CacheRequest, plan_cache  # noqa: E402
from pipeline.cache.ray_stages import TeacherRunner, _inputs_dataset, write_one_shard  # noqa: E402
from pipeline.cache.reader import CacheReader  # noqa: E402
from pipeline.cache.views import foreground_tiles  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.data.collate import collate  # noqa: E402
from pipeline.engine.detection_task import detection_losses  # noqa: E402
from pipeline.evaluation.inference import eval_dataset  # noqa: E402
from pipeline.ray_env import ray_session  # noqa: E402

VERSION, SPLIT = "v1.0-mini", "mini_train"
NUSCENES_TRAIN_SAMPLES = 28130
MIB = 2 ** 20


def teacher_alone(teacher_path: Path, root: Path, batch: int) -> float:
    """Teacher forward samples/s over the split, inputs loaded beforehand (inference only)."""
    model, cfg = load_detector(teacher_path)
    model.eval()
    ds = eval_dataset(cfg, root, VERSION, SPLIT, model.modality)
    samples = [ds.get(i) for i in range(len(ds))]
    with torch.no_grad():
        model(collate(samples[:batch]))  # warm-up
        t0 = time.perf_counter()
        for i in range(0, len(samples), batch):
            model(collate(samples[i:i + batch]))
    return len(samples) / (time.perf_counter() - t0)


def caching_rate(teacher_path: Path, root: Path, uri: str, batch: int) -> dict:
    """The Ray Data job's samples/s, end to end and between its first and last durable shard."""
    t0 = time.perf_counter()
    summary = build_cache(CacheRequest(str(teacher_path), str(root), VERSION, SPLIT, uri, shard_samples=4, teacher_batch=batch))
    wall = time.perf_counter() - t0
    markers = sorted(store.read_markers(uri).values(), key=lambda m: m["time"])
    span = markers[-1]["time"] - markers[0]["time"]
    after_first = sum(len(m["samples"]) for m in markers[1:])
    return {"end_to_end_samples_per_s": summary.samples / wall, "steady_samples_per_s": after_first / span,
            "wall_s": wall, "samples": summary.samples}


def encode_sizes(teacher_path: Path, root: Path, out: Path, samples: int) -> tuple[dict, dict]:
    """Stored bytes/sample per (storage, dtype) and per compressor, through the real writer, without Ray."""
    sizes, codecs = {}, {}
    runner = None
    best = store.DEFAULT_COMPRESSOR
    for storage, dtype, comp in [("dense", d, best) for d in ("float16", "bfloat16", "float32")] + \
            [("foreground", d, best) for d in ("float16", "bfloat16", "float32")] + \
            [("dense", "float16", c) for c in store.COMPRESSORS if c != best] + [("dense", "float16", best)]:
        # (the default compressor is timed again last: the first write of a process pays Zarr's set-up)
        uri = str(out / f"{storage}_{dtype}_{comp}")
        job, fp = plan_cache(str(teacher_path), str(root), VERSION, SPLIT, uri, 1, storage, dtype, samples)
        store.create_cache_group(uri, job.cache_layout, fp, dtype, comp)
        if runner is None or runner.job.storage != storage or runner.job.dtype != dtype:
            runner = TeacherRunner(job)
            inputs = [_inputs_dataset(job.teacher_path, job.dataroot, VERSION, SPLIT, None).get(i, bda=np.eye(4))
                      for i in range(samples)]
        t0 = time.perf_counter()
        maps, bda = runner.run_views(inputs)
        t1 = time.perf_counter()
        rec = write_one_shard(job, 0, maps, bda, list(job.tokens[:samples]))
        t_write = time.perf_counter() - t1
        raw = sum(a.nbytes for a in maps.values())
        reader_group = store.open_cache_group(uri)
        t2 = time.perf_counter()
        for name in maps:
            np.asarray(reader_group[name][0:samples])
        t_read = time.perf_counter() - t2
        entry = {"bytes_per_sample": rec["bytes"] / samples, "write_mib_per_s": raw / MIB / t_write,
                 "read_mib_per_s": raw / MIB / t_read, "teacher_s": t1 - t0}
        if comp == best:
            sizes[f"{storage}/{dtype}"] = entry
        if storage == "dense" and dtype == "float16":
            codecs[comp] = entry
    return sizes, codecs


def random_reads(uri: str, seconds: float = 5.0) -> float:
    """Samples/s of reading one random (token, view), one thread: all four maps, or a keypoint
    cache's row aligned with its boxes as the student's dataset does."""
    from pipeline.cache.keypoints import teacher_at_boxes

    reader = CacheReader(uri)
    tokens = list(reader.row_of)
    rng = random.Random(0)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        token, view = rng.choice(tokens), rng.randrange(reader.views)
        if reader.storage == "keypoints":
            row = reader.read_keypoints(token, view)
            teacher_at_boxes(row, row["boxes"][:int(row["counts"][0])], token)
        else:
            reader.read(token, view)
        n += 1
    return n / (time.perf_counter() - t0)


def student_consumption(root: Path, batch: int, steps: int = 8) -> float:
    """Samples/s one tiny camera student worker trains at (one thread, data loaded beforehand)."""
    from pipeline.data.dataset import DetectionDataset

    cfg = load_config("tiny_camera")
    model = build_detector(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ds = DetectionDataset(root, VERSION, SPLIT, cfg, train=True)
    batches = [collate([ds[(i * batch + j) % len(ds)] for j in range(batch)]) for i in range(steps + 1)]
    for i, b in enumerate(batches):
        if i == 1:
            t0 = time.perf_counter()
        loss = detection_losses(model, torch.nn.ModuleDict(), b)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return steps * batch / (time.perf_counter() - t0)


def tile_reads(teacher_path: Path, root: Path, out: Path, samples: int = 8) -> dict[int, float]:
    """Random-read samples/s of a dense float16 cache per chunk tile size (the per-chunk cost)."""
    rates = {}
    runner, inputs = None, None
    for tile in (8, 16, 32, None):  # None: dense storage's default, the whole map
        uri = str(out / f"tile{tile}")
        job, fp = plan_cache(str(teacher_path), str(root), VERSION, SPLIT, uri, 1, "dense", "float16", samples,
                             tile=tile)
        tile = job.cache_layout.tile
        store.create_cache_group(uri, job.cache_layout, fp, "float16", store.DEFAULT_COMPRESSOR)
        if runner is None:
            runner = TeacherRunner(job)
            inputs = [_inputs_dataset(job.teacher_path, job.dataroot, VERSION, SPLIT, None).get(i, bda=np.eye(4))
                      for i in range(samples)]
        maps, bda = runner.run_views(inputs)
        write_one_shard(job, 0, maps, bda, list(job.tokens[:samples]))
        group = store.open_cache_group(uri)
        arrays = [group[name] for name in maps]
        rng = random.Random(0)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < 3.0:  # one random row's four maps, as CacheReader.read does
            row = rng.randrange(samples)
            for a in arrays:
                np.asarray(a[row])
            n += 1
        rates[tile] = n / (time.perf_counter() - t0)
    return rates


def nuscenes_foreground_fraction(root: Path, tile: int) -> float:
    """Fraction of `tile`-cell tiles kept by foreground storage on the paper's 180x180 grid (generated GT)."""
    cfg = load_config("nuscenes")
    grid = BEVGrid.from_config(cfg["grid"])
    ds = eval_dataset(cfg, root, VERSION, SPLIT, "lidar")
    fractions = [foreground_tiles(ds.get(i)["gt_boxes"], grid, tile).mean() for i in range(len(ds))]
    return float(np.mean(fractions))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataroot", type=Path, default=None)
    ap.add_argument("--teacher", type=Path, default=None, help="teacher model (default: tiny_lidar, seeded init)")
    ap.add_argument("--teacher-batch", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="alternating teacher-alone / caching measurements")
    args = ap.parse_args()
    torch.set_num_threads(1)
    tmp = tempfile.TemporaryDirectory(prefix="bench_cache_")
    root, teacher = dataset_and_teacher(Path(tmp.name), args.dataroot, args.teacher, samples_per_scene=6)

    # Rounds alternate teacher-alone and caching runs so both see the same machine; medians are reported.
    alones, jobs = [], []
    with ray_session(num_cpus=2):
        for r in range(args.rounds):
            alones.append(teacher_alone(teacher, root, args.teacher_batch))
            jobs.append(caching_rate(teacher, root, str(Path(tmp.name) / f"cache{r}"), args.teacher_batch))
            print(f"round {r}: teacher alone {alones[-1]:.2f} samples/s, caching {jobs[-1]['steady_samples_per_s']:.2f} "
                  f"samples/s steady ({jobs[-1]['steady_samples_per_s'] / alones[-1]:.2f}x)", flush=True)
    alone = float(np.median(alones))
    ratios = [j["steady_samples_per_s"] / a for j, a in zip(jobs, alones)]
    job = sorted(jobs, key=lambda j: j["steady_samples_per_s"])[len(jobs) // 2]
    ratio = float(np.median(ratios))
    print(f"teacher inference alone: {alone:.2f} samples/s; caching job: {job['steady_samples_per_s']:.2f} "
          f"samples/s steady (median ratio {ratio:.2f}x over {args.rounds} rounds, goal >= 0.9), "
          f"{job['end_to_end_samples_per_s']:.2f} samples/s end to end with actor start-up ({job['samples']} samples "
          f"in {job['wall_s']:.1f} s)")

    sizes, codecs = encode_sizes(teacher, root, Path(tmp.name), samples=8)
    model, cfg = load_detector(teacher)
    raw32 = (model.low_channels + model.high_channels + 10 + 66) * model.grid.H * model.grid.W * 4
    for key, e in sizes.items():
        print(f"{key:<22} {e['bytes_per_sample'] / MIB:7.3f} MiB/sample ({raw32 / e['bytes_per_sample']:5.1f}x "
              f"smaller than raw float32 {raw32 / MIB:.2f} MiB)")
    for key, e in codecs.items():
        print(f"compressor {key:<11} dense float16: {raw32 / e['bytes_per_sample']:5.1f}x, write "
              f"{e['write_mib_per_s']:6.1f} MiB/s, read {e['read_mib_per_s']:6.1f} MiB/s (of uncompressed float16)")

    reads = random_reads(str(Path(tmp.name) / "cache0"))
    consume = student_consumption(root, batch=2)
    print(f"random reads: {reads:.1f} samples/s against {consume:.2f} samples/s one student worker trains "
          f"({reads / consume:.1f}x, goal >= 3x)")

    tiles = tile_reads(teacher, root, Path(tmp.name))
    print("random reads by chunk tile (dense float16): " + ", ".join(f"{t} cells {r:.1f} samples/s"
                                                                    for t, r in tiles.items()))
    from pipeline.cache.plan import default_tile

    nus_tile = default_tile(BEVGrid.from_config(load_config("nuscenes")["grid"]), "foreground")
    fg = nuscenes_foreground_fraction(root, nus_tile)
    dense16 = sizes["dense/float16"]["bytes_per_sample"]
    ratio16 = raw32 / dense16
    nus_raw = (256 + 512 + 10 + 66) * 180 * 180 * 4
    nus_dense = nus_raw / ratio16
    nus_fg = nus_dense * fg
    print(f"nuScenes preset: raw float32 {nus_raw / MIB:.1f} MiB/sample; dense float16 ~{nus_dense / MIB:.1f} MiB "
          f"-> {nus_dense * NUSCENES_TRAIN_SAMPLES / 2 ** 40:.2f} TiB for {NUSCENES_TRAIN_SAMPLES} samples; "
          f"foreground ({nus_tile}-cell tiles, {100 * fg:.0f}% kept) ~{nus_fg / MIB:.1f} MiB -> "
          f"{nus_fg * NUSCENES_TRAIN_SAMPLES / 2 ** 40:.2f} TiB (per view)")
    print(json.dumps({
        "bench": "cache", "threads": 1, "teacher_alone_samples_per_s": round(alone, 3),
        "caching_steady_samples_per_s": round(job["steady_samples_per_s"], 3),
        "caching_end_to_end_samples_per_s": round(job["end_to_end_samples_per_s"], 3),
        "caching_over_teacher": round(ratio, 3), "caching_over_teacher_rounds": [round(r, 3) for r in ratios],
        "bytes_per_sample": {k: int(v["bytes_per_sample"]) for k, v in sizes.items()},
        "raw_float32_bytes_per_sample": raw32,
        "compressors": {k: {"ratio": round(raw32 / v["bytes_per_sample"], 2),
                            "write_mib_per_s": round(v["write_mib_per_s"], 1),
                            "read_mib_per_s": round(v["read_mib_per_s"], 1)} for k, v in codecs.items()},
        "random_read_samples_per_s": round(reads, 2), "student_samples_per_s": round(consume, 3),
        "read_over_student": round(reads / consume, 2),
        "random_read_samples_per_s_by_tile": {str(t): round(r, 2) for t, r in tiles.items()},
        "nuscenes": {"tile": nus_tile, "raw_float32_mib": round(nus_raw / MIB, 1), "dense_float16_mib": round(nus_dense / MIB, 2),
                     "foreground_tile_fraction": round(fg, 3), "foreground_float16_mib": round(nus_fg / MIB, 2),
                     "train_samples": NUSCENES_TRAIN_SAMPLES,
                     "dense_total_tib": round(nus_dense * NUSCENES_TRAIN_SAMPLES / 2 ** 40, 3),
                     "foreground_total_tib": round(nus_fg * NUSCENES_TRAIN_SAMPLES / 2 ** 40, 3)},
    }))
    tmp.cleanup()


if __name__ == "__main__":
    main()
