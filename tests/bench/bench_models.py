"""Benchmark: training-step time, peak memory and size of every detector on the CPU.

For each preset (tiny, nuscenes) x modality (lidar, camera, fusion) a fresh Python process builds
the detector, makes one batch of synthetic inputs of the preset's shapes (batch 1), runs
`--warmup` training passes (forward + detection loss + backward, no optimiser step) and times
`--iters` more. Reported per configuration: milliseconds per sample, the process's peak RSS and
its RSS before the model was built (imports + inputs), so the model's share can be read off, and
the parameter count. Prints a table, then one JSON line.

Inputs (synthetic, shaped like real ones):
- points [N, 5]: the key frame and the preset's sweeps (tiny 3, nuscenes 10) of a simulated
  32-beam spinning LiDAR (~31k points per scan, like real nuScenes and the generated dataset) in a
  world of ground and obstacles: tiny ~122k points, nuscenes ~343k. Their voxel counts (~26k on
  the tiny grid, the 120k cap on the nuscenes grid) are close to the generated dataset's (21-23k,
  100-114k), which is what the sparse backbone's cost follows; the table reports them.
- images [6, 3, H, W] ~ N(0, 1) at the preset's image_size, with a nuScenes-like 6-camera ring
  (1600 x 900 source, f = 1266 px) and the evaluation resize/crop, so that the LSS frustum lands
  on the grid as it does with real data.
- 12 ground-truth boxes of all classes inside the grid.

    python tests/bench/bench_models.py [--presets tiny nuscenes] [--modalities lidar camera fusion]
                                       [--warmup 1] [--iters 3] [--threads 0]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from models.classes import NUM_CLASSES  # noqa: E402
from models.detector import build_detector  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.data.augment import image_aug_matrix  # noqa: E402

PRESETS = ("tiny", "nuscenes")
MODALITIES = ("lidar", "camera", "fusion")
SRC_HW = (900, 1600)  # nuScenes camera images
CAMERA_YAWS_DEG = (0.0, -55.0, 55.0, 180.0, 110.0, -110.0)  # FRONT, FRONT_RIGHT, FRONT_LEFT, BACK, BACK_LEFT, BACK_RIGHT


def rss_mb() -> float:
    """Current resident set size of this process in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MB (Linux reports KB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def lidar_points(frames: int, rng: np.random.Generator, beams: int = 32, azimuths: int = 1085,
                 height: float = 1.84, step: float = 0.1) -> np.ndarray:
    """[N, 5] (x, y, z, intensity, time lag) of `frames` scans of a 32-beam spinning LiDAR.

    The world: flat ground 1.84 m below the sensor and, in every 2-degree sector, an obstacle at
    3 + Exp(15) m with a top 1-8 m above the ground; rays return from whichever they reach first
    (within 70 m). Frame k is a sweep 50 ms * k older, taken `step` m behind the key frame.
    """
    elev = np.deg2rad(np.linspace(-30.67, 10.67, beams))  # HDL-32E-like beam elevations
    sector = np.deg2rad(2.0)
    n_sec = int(round(2 * np.pi / sector))
    dist = 3.0 + rng.exponential(15.0, n_sec)
    top = rng.uniform(1.0, 8.0, n_sec)
    out = []
    for k in range(frames):
        az = (rng.uniform(-np.pi, np.pi) + np.linspace(0, 2 * np.pi, azimuths, endpoint=False) + np.pi) \
            % (2 * np.pi) - np.pi
        sec = ((az + np.pi) / sector).astype(int) % n_sec
        e, a = np.meshgrid(elev, az, indexing="ij")  # [beams, azimuths]
        d, h = dist[sec][None].repeat(beams, 0), top[sec][None].repeat(beams, 0)
        ground = np.where(e < 0, height / np.tan(-np.minimum(e, -1e-6)), np.inf)
        z_obstacle = d * np.tan(e)
        on_obstacle = (d < ground) & (z_obstacle <= h - height)
        r = np.where(on_obstacle, d, ground)
        ok = np.isfinite(r) & (r < 70.0)
        r = r[ok] * (1 + rng.normal(0, 0.005, ok.sum()))
        z = np.where(on_obstacle, z_obstacle, -height)[ok] + rng.normal(0, 0.02, ok.sum())
        n = int(ok.sum())
        out.append(np.stack([r * np.cos(a[ok]) - step * k, r * np.sin(a[ok]), z, rng.uniform(0, 100, n),
                             np.full(n, 0.05 * k)], axis=1))
    return np.concatenate(out).astype(np.float32)


def camera_rig(image_hw: tuple[int, int], ida_cfg: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(intrinsics [6, 3, 3], cam2lidar [6, 4, 4], ida [6, 3, 3]) of a nuScenes-like camera ring."""
    k = np.array([[1266.0, 0.0, 816.0], [0.0, 1266.0, 491.0], [0.0, 0.0, 1.0]])
    c2l = []
    for yaw in np.deg2rad(CAMERA_YAWS_DEG):
        forward, right, down = [np.cos(yaw), np.sin(yaw), 0.0], [np.sin(yaw), -np.cos(yaw), 0.0], [0.0, 0.0, -1.0]
        m = np.eye(4)
        m[:3, :3] = np.stack([right, down, forward], axis=1)  # camera x, y, z axes in the LiDAR frame
        m[:3, 3] = [0.5 * np.cos(yaw), 0.5 * np.sin(yaw), -0.3]
        c2l.append(m)
    ida = image_aug_matrix(None, SRC_HW, image_hw, ida_cfg)
    n = len(CAMERA_YAWS_DEG)
    return np.repeat(k[None], n, 0), np.stack(c2l), np.repeat(ida[None], n, 0)


def synthetic_batch(cfg: Mapping[str, Any], preset: str, seed: int = 0) -> dict[str, Any]:
    """One batch (B = 1) in the collate format with the preset's input shapes."""
    rng = np.random.default_rng(seed)
    data = cfg["data"]
    h, w = (int(x) for x in data["image_size"])
    intrinsics, cam2lidar, ida = camera_rig((h, w), data["ida"])
    boxes = np.zeros((12, 9), dtype=np.float32)
    boxes[:, 0:2] = rng.uniform(-40, 40, (12, 2))
    boxes[:, 2] = -1.0
    boxes[:, 3:6] = rng.uniform(0.5, 5.0, (12, 3))
    boxes[:, 6] = rng.uniform(-np.pi, np.pi, 12)
    labels = np.arange(12) % NUM_CLASSES
    t = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32)[None]  # noqa: E731 - add B
    return {
        "token": ["bench"],
        "points": [torch.from_numpy(lidar_points(int(data["lidar_sweeps"]) + 1, rng))],
        "images": torch.randn(1, len(CAMERA_YAWS_DEG), 3, h, w, generator=torch.Generator().manual_seed(seed)),
        "intrinsics": t(intrinsics), "cam2lidar": t(cam2lidar), "ida": t(ida), "bda": t(np.eye(4)),
        "gt_boxes": t(boxes), "gt_labels": torch.as_tensor(labels)[None],
        "gt_mask": torch.ones(1, 12, dtype=torch.bool),
    }


def run_one(preset: str, modality: str, warmup: int, iters: int) -> dict[str, Any]:
    """Measure one configuration in this process (call in a fresh process for a clean peak RSS)."""
    cfg = load_config(f"{preset}_{modality}")
    batch = synthetic_batch(cfg, preset)
    base = rss_mb()
    torch.manual_seed(0)
    model = build_detector(cfg).train()
    n_voxels = None
    if model.lidar_encoder is not None:
        with torch.no_grad():
            n_voxels = int(model.lidar_encoder.voxelize(batch["points"]).indices.shape[0])
    times = []
    for i in range(warmup + iters):
        start = time.perf_counter()
        loss = model.loss(batch)["loss"]
        model.zero_grad(set_to_none=True)
        loss.backward()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return {"preset": preset, "modality": modality, "ms_per_sample": round(1e3 * float(np.mean(times)), 1),
            "ms_min": round(1e3 * float(np.min(times)), 1), "peak_rss_mb": round(peak_rss_mb()),
            "rss_before_model_mb": round(base), "params": sum(p.numel() for p in model.parameters()),
            "points": len(batch["points"][0]) if model.lidar_encoder is not None else None, "voxels": n_voxels,
            "image_hw": list(cfg["data"]["image_size"]) if model.camera_encoder is not None else None,
            "bev_hw": [model.grid.H, model.grid.W], "threads": torch.get_num_threads(),
            "warmup": warmup, "iters": iters}


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of the measurements."""
    lines = ["| preset | modality | fwd+bwd ms/sample | peak RSS MB (before model) | params | inputs |",
             "|---|---|---:|---:|---:|---|"]
    for r in rows:
        inputs = []
        if r["points"]:
            inputs.append(f"{r['points'] // 1000}k pts / {r['voxels'] // 1000}k voxels")
        if r["image_hw"]:
            inputs.append(f"6 x {r['image_hw'][0]}x{r['image_hw'][1]} imgs")
        lines.append(f"| {r['preset']} | {r['modality']} | {r['ms_per_sample']:.0f} | "
                     f"{r['peak_rss_mb']} ({r['rss_before_model_mb']}) | {r['params'] / 1e6:.2f} M | "
                     f"{', '.join(inputs)}; BEV {r['bev_hw'][0]}x{r['bev_hw'][1]} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=PRESETS)
    parser.add_argument("--modalities", nargs="+", default=list(MODALITIES), choices=MODALITIES)
    parser.add_argument("--warmup", type=int, default=1, help="untimed passes first (oneDNN set-up, voxeliser buffers)")
    parser.add_argument("--iters", type=int, default=3, help="timed passes")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--child", nargs=2, metavar=("PRESET", "MODALITY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.child:
        print(json.dumps(run_one(*args.child, args.warmup, args.iters)))
        return

    rows = []
    for preset in args.presets:
        for modality in args.modalities:
            cmd = [sys.executable, __file__, "--child", preset, modality, "--warmup", str(args.warmup),
                   "--iters", str(args.iters), "--threads", str(args.threads)]
            start = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if proc.returncode != 0:
                sys.exit(f"{preset} {modality} failed:\n{proc.stderr[-3000:]}")
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"{preset:8s} {modality:6s} {rows[-1]['ms_per_sample']:9.1f} ms/sample  "
                  f"peak {rows[-1]['peak_rss_mb']} MB  ({time.perf_counter() - start:.0f} s)", flush=True)
    print()
    print(f"CPU, batch 1, {rows[0]['threads']} threads, forward + detection loss + backward, "
          f"mean of {args.iters} after {args.warmup} warm-up:")
    print(table(rows))
    print(json.dumps({"bench": "models", "rows": rows}))


if __name__ == "__main__":
    main()
