"""Benchmark: Ray Train throughput of the tiny detectors with 1 and 2 data-parallel workers.

Trains each modality for a few epochs through the real stage machinery (pipeline.engine.trainer.fit on a
loopback Ray cluster started here), then reads the run's metrics.jsonl: samples/s (global batch /
step time) and the fraction of each step spent waiting for data, over the steps after the first
epoch (start-up and worker spawn excluded). Prints a table, then one JSON line.

    python tests/bench/bench_training.py [--dataroot DIR] [--modalities lidar camera] [--epochs 3]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pipeline.config import load_config  # noqa: E402
from pipeline.engine.detection_task import detection_task  # noqa: E402
from pipeline.engine.run_log import read_metrics  # noqa: E402
from pipeline.engine.trainer import fit  # noqa: E402
from pipeline.ray_env import ray_session  # noqa: E402


def measure(root: Path, modality: str, workers: int, epochs: int, batch: int, loader_workers: int,
            out: Path) -> dict:
    """Train tiny_<modality> with `workers` workers; steady-state samples/s and data-wait fraction."""
    cfg = load_config(f"tiny_{modality}", [f"runtime.num_workers={workers}", f"train.epochs={epochs}",
                                           f"train.batch_size={batch}", f"runtime.loader_workers={loader_workers}",
                                           "runtime.cpus_per_worker=1", "runtime.torch_threads=1"])
    run = out / f"{modality}_{workers}w"
    t0 = time.perf_counter()
    fit(cfg, root, "v1.0-mini", "mini_train", str(run), detection_task, identity={"bench": "training"})
    wall = time.perf_counter() - t0
    recs = read_metrics(run / "metrics.jsonl")
    steady = [r for r in recs if r["epoch"] > 1] or recs
    step_s = [batch * workers / r["samples_per_s"] for r in steady]
    wait = [r["data_wait_frac"] for r in steady]
    return {"modality": modality, "workers": workers, "global_batch": batch * workers,
            "samples_per_s": round(batch * workers * len(step_s) / sum(step_s), 3),
            "data_wait_frac": round(statistics.mean(wait), 4), "steps": len(recs), "wall_s": round(wall, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataroot", type=Path, default=None, help="generated/real v1.0-mini dataroot "
                    "(default: generate one with 4 key frames per scene)")
    ap.add_argument("--modalities", nargs="+", default=["lidar", "camera"])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=2, help="samples per worker per step")
    ap.add_argument("--loader-workers", type=int, default=1)
    args = ap.parse_args()

    tmp = tempfile.TemporaryDirectory(prefix="bench_training_")
    root = args.dataroot
    if root is None:
        from pipeline.synthetic import generate

        root = Path(tmp.name) / "nuscenes"
        generate(root, samples_per_scene=4, seed=0, image_size=(400, 225))
    rows = []
    with ray_session(num_cpus=2):
        for modality in args.modalities:
            for workers in (1, 2):
                rows.append(measure(root, modality, workers, args.epochs, args.batch_size, args.loader_workers,
                                    Path(tmp.name)))
                r = rows[-1]
                print(f"tiny_{modality:<7} {workers} worker(s): {r['samples_per_s']:6.2f} samples/s, "
                      f"data wait {100 * r['data_wait_frac']:4.1f}%  (global batch {r['global_batch']}, "
                      f"{r['steps']} steps, {r['wall_s']} s wall)", flush=True)
    for modality in args.modalities:
        one, two = (r for r in rows if r["modality"] == modality)
        print(f"tiny_{modality}: 2 workers / 1 worker = {two['samples_per_s'] / one['samples_per_s']:.2f}x")
    print(json.dumps({"bench": "training", "cpus": 2, "results": rows}))
    tmp.cleanup()


if __name__ == "__main__":
    main()
