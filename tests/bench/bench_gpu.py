"""Benchmark for a CUDA machine: training steps of the paper's presets with mixed precision.

One prepared script for a GPU node (or a `device` session): it builds each detector of the
`nuscenes` presets on the GPU, feeds it synthetic inputs of the preset's shapes
(tests/bench/bench_models.py: 10-sweep LiDAR scans, six 256x704 images, 12 boxes) and runs the
training loop's step (pipeline/engine/train_loop.py: autocast float16 + GradScaler, AdamW, gradient
clipping) at batch 1 and 2. Reported per (modality, batch): ms/step (mean after warm-up, CUDA
synchronised), peak GPU memory (torch.cuda.max_memory_allocated, model and optimiser state
included), whether every loss was finite, AMP steps the GradScaler skipped, and the sparse-conv
algorithm spconv picked for the LiDAR encoder (the default on CUDA: `algo=None` at build time).
Then UniDistill student steps on the paper grid (lidar -> camera, batch 1): no distillation,
teacher targets already in GPU memory in float16 (what a cached run hands the loss, minus the
DataLoader's cache read), and the teacher run online.

The backbones start from random weights (timings do not depend on the values; the nuscenes
camera/fusion presets' ImageNet requirement applies to `fit`, not to this script); the camera
encoder's frozen stem is as in the presets.

Not covered here (see tests/bench/bench_cache.py and bench_student.py, which measure them on the
CPU with the tiny presets): the caching job with the teacher on the GPU (samples/s against the
teacher alone) on a generated 1600x900 split; stored bytes per sample, dense and foreground, on the
paper grid; student steps that read their targets from a real cache through the DataLoader
(dense and foreground), with their data-wait fraction.

    python tests/bench/bench_gpu.py                         # CUDA: nuscenes presets, AMP, batch 1 and 2
    python tests/bench/bench_gpu.py --device cpu --steps 2  # smoke mode: tiny presets, no AMP

Prints one line per measurement, then one JSON line (the last line of the output).
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from models.detector import BEVDetector, build_detector  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.engine.detection_task import detection_losses  # noqa: E402
from pipeline.engine.distill_config import build_distill_loss  # noqa: E402
from pipeline.engine.distill_task import DistillLosses, MAPS, distill_settings  # noqa: E402
from pipeline.engine.optim import build_optimizer, clip_gradients, scaled_lr  # noqa: E402
from pipeline.engine.train_loop import to_device  # noqa: E402
from tests.bench.bench_models import synthetic_batch  # noqa: E402

MODALITIES = ("lidar", "camera", "fusion")
LossFn = Callable[[nn.Module, nn.ModuleDict, dict], dict]


def stack_batches(batches: list[dict[str, Any]]) -> dict[str, Any]:
    """One collate-format batch from several (synthetic_batch gives B = 1 each)."""
    out: dict[str, Any] = {}
    for key, first in batches[0].items():
        values = [b[key] for b in batches]
        out[key] = torch.cat(values) if isinstance(first, torch.Tensor) else [v for vs in values for v in vs]
    return out


def make_batch(cfg: Mapping[str, Any], preset: str, batch_size: int, device: torch.device) -> dict[str, Any]:
    """Synthetic inputs of the preset's shapes, `batch_size` different samples, on `device`."""
    return to_device(stack_batches([synthetic_batch(cfg, preset, seed=s) for s in range(batch_size)]), device)


def spconv_algos(model: BEVDetector) -> list[str] | None:
    """The algorithms of the LiDAR encoder's sparse convolutions (None without a LiDAR encoder)."""
    if model.lidar_encoder is None:
        return None
    return sorted({m.algo.name for m in model.lidar_encoder.modules()
                   if hasattr(m, "algo") and m.algo is not None and hasattr(m.algo, "name")})


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated since the last reset (CUDA), or the process's peak RSS (CPU)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_training(model: nn.Module, extra: nn.ModuleDict, losses_fn: LossFn, batch: dict, train_cfg: Mapping[str, Any],
                  device: torch.device, amp: bool, warmup: int, steps: int) -> dict[str, Any]:
    """Run the training loop's step (pipeline/engine/train_loop.py) `warmup + steps` times on one batch."""
    params = [p for p in list(model.parameters()) + list(extra.parameters()) if p.requires_grad]
    optimizer = build_optimizer(params, train_cfg, scaled_lr(train_cfg, 4))
    scaler = torch.amp.GradScaler(device.type, enabled=amp)
    model.train()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    times, losses, skipped = [], [], 0
    for i in range(warmup + steps):
        sync(device)
        start = time.perf_counter()
        with torch.autocast(device.type, enabled=amp):
            out = losses_fn(model, extra, batch)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(out["loss"]).backward()
        scaler.unscale_(optimizer)
        clip_gradients([model, extra], float(train_cfg["grad_clip"]))
        scale = scaler.get_scale() if amp else 1.0
        scaler.step(optimizer)
        scaler.update()
        sync(device)
        elapsed = time.perf_counter() - start
        skipped += int(amp and scaler.get_scale() < scale)  # inf/nan gradients: the step was skipped
        losses.append(float(out["loss"].detach()))
        if i >= warmup:
            times.append(elapsed)
    return {"ms_per_step": round(1e3 * sum(times) / len(times), 1), "ms_min": round(1e3 * min(times), 1),
            "peak_mem_mb": round(peak_memory_mb(device)), "losses_finite": all(math.isfinite(v) for v in losses),
            "loss_first": round(losses[0], 4), "loss_last": round(losses[-1], 4), "amp_skipped_steps": skipped}


def guarded(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one measurement; an out-of-memory error becomes a row instead of ending the benchmark."""
    try:
        return fn()
    except torch.cuda.OutOfMemoryError as e:
        torch.cuda.empty_cache()
        return {"error": f"out of memory: {str(e).splitlines()[0]}", "losses_finite": False}


def detector_rows(preset: str, modalities: list[str], batches: list[int], device: torch.device, amp: bool,
                  warmup: int, steps: int) -> list[dict[str, Any]]:
    """Training steps of each modality's detector at each batch size."""
    rows = []
    for modality in modalities:
        cfg = load_config(f"{preset}_{modality}")
        torch.manual_seed(0)
        model = build_detector(cfg, device)
        for b in batches:
            batch = make_batch(cfg, preset, b, device)
            row = {"kind": "detector", "config": f"{preset}_{modality}", "modality": modality, "batch": b,
                   "spconv_algo": spconv_algos(model), "params": sum(p.numel() for p in model.parameters())}
            row.update(guarded(lambda: time_training(model, nn.ModuleDict(), detection_losses, batch, cfg["train"],
                                                     device, amp, warmup, steps)))
            rows.append(row)
            print(f"{row['config']:<18} batch {b}: " + (row.get("error") or
                  f"{row['ms_per_step']:8.1f} ms/step, peak {row['peak_mem_mb']} MB, losses finite "
                  f"{row['losses_finite']}, spconv {row['spconv_algo']}"), flush=True)
        del model
    return rows


def student_rows(preset: str, device: torch.device, amp: bool, warmup: int, steps: int,
                 batch_size: int = 1) -> list[dict[str, Any]]:
    """lidar -> camera student steps on the preset's grid: no distillation, targets in memory, online teacher."""
    cfg = load_config(f"{preset}_lidar_to_camera")
    torch.manual_seed(0)
    teacher = build_detector(load_config(f"{preset}_lidar"), device).eval().requires_grad_(False)
    student = build_detector(cfg, device)
    batch = make_batch(cfg, preset, batch_size, device)
    settings = distill_settings(cfg, "lidar", student, (teacher.low_channels, teacher.high_channels))
    with torch.no_grad(), torch.autocast(device.type, enabled=amp):
        maps = teacher(batch)
    cached = dict(batch, teacher={k: maps[k].detach().to(torch.float16) for k in MAPS})  # a cache's float16 maps
    runs = [("none", detection_losses, batch, nn.ModuleDict()),
            ("targets_in_memory", DistillLosses(student.grid, None, warp=False), cached, None),
            ("online_teacher", DistillLosses(student.grid, teacher, warp=False), batch, None)]
    rows = []
    for name, losses_fn, b, extra in runs:
        extra = extra if extra is not None else nn.ModuleDict({"distill": build_distill_loss(student.grid, settings).to(device)})
        row = {"kind": "student", "config": f"{preset}_lidar_to_camera", "targets": name, "batch": batch_size}
        row.update(guarded(lambda: time_training(student, extra, losses_fn, b, cfg["train"], device, amp,
                                                 warmup, steps)))
        rows.append(row)
    base = rows[0].get("ms_per_step")
    for row in rows:
        if base and row.get("ms_per_step"):
            row["vs_no_distillation"] = round(row["ms_per_step"] / base, 3)
        print(f"student {row['targets']:<18} batch {batch_size}: " + (row.get("error") or
              f"{row['ms_per_step']:8.1f} ms/step ({row.get('vs_no_distillation', float('nan')):.2f}x), "
              f"peak {row['peak_mem_mb']} MB, losses finite {row['losses_finite']}"), flush=True)
    return rows


def environment(device: torch.device) -> dict[str, Any]:
    """What the figures were measured on."""
    import spconv

    env = {"device": device.type, "torch": torch.__version__, "spconv": getattr(spconv, "__version__", None),
           "python": platform.python_version(), "threads": torch.get_num_threads()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update({"gpu": props.name, "gpu_memory_gb": round(props.total_memory / 2 ** 30, 1),
                    "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()})
    else:
        env["cpu"] = platform.processor() or platform.machine()
    return env


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu (smoke mode)")
    ap.add_argument("--preset", choices=("nuscenes", "tiny"), default=None,
                    help="model presets (default: nuscenes on CUDA, tiny on the CPU)")
    ap.add_argument("--modalities", nargs="+", default=list(MODALITIES), choices=MODALITIES)
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 2], help="batch sizes of the detector steps")
    ap.add_argument("--warmup", type=int, default=None,
                    help="untimed steps first (default: 3 on CUDA; 0 on the CPU, whose figures are a smoke test)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
    ap.add_argument("--no-amp", action="store_true", help="float32 on CUDA too (AMP is never used on the CPU)")
    ap.add_argument("--no-student", action="store_true", help="skip the student steps")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_gpu: no CUDA device here; use --device cpu for the smoke mode")
    preset = args.preset or ("nuscenes" if device.type == "cuda" else "tiny")
    amp = device.type == "cuda" and not args.no_amp  # as pipeline/engine/train_loop.py: train.amp on GPU only
    warmup = args.warmup if args.warmup is not None else (3 if device.type == "cuda" else 0)
    t0 = time.perf_counter()
    print(f"bench_gpu: {preset} presets on {device}, AMP {'float16' if amp else 'off'}, {warmup} warm-up + "
          f"{args.steps} timed steps", flush=True)
    rows = detector_rows(preset, args.modalities, args.batches, device, amp, warmup, args.steps)
    if not args.no_student:
        rows += student_rows(preset, device, amp, warmup, args.steps)
    result = {"bench": "gpu", "preset": preset, "amp": amp, "amp_dtype": "float16" if amp else None,
              "warmup": warmup, "steps": args.steps, **environment(device),
              "all_losses_finite": all(r.get("losses_finite", False) for r in rows),
              "wall_s": round(time.perf_counter() - t0, 1), "rows": rows,
              "not_covered": ["caching job with the teacher on the GPU (samples/s vs teacher alone)",
                              "cache bytes per sample (dense, foreground) on the paper grid",
                              "student steps reading a real cache through the DataLoader (data-wait fraction)"]}
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
