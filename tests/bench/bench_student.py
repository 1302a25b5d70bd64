"""Benchmark: student step time with cached teacher targets, with the online teacher, and without
distillation, measured side by side in one process; the data-wait fraction of each; and the
fidelity of warped single-view targets against the teacher run on the augmented input.

Goal (issue 6): cached step time <= 1.10x the no-distillation step time.
Warp fidelity: cosine similarity, at the 9 GT keypoints of every box, between the canonical cached
maps warped to a fresh BEV augmentation and the teacher's maps computed on the augmented input
(1.0 = identical); the same for the un-warped canonical maps as a floor.

    python tests/bench/bench_student.py [--dataroot DIR] [--teacher MODEL] [--steps 30]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from models.detector import build_detector  # noqa: E402
from models.distill import box_keypoints, sample_at_keypoints  # noqa: E402
from pipeline.cache.build import build_cache  # noqa: E402
from pipeline.cache.plan import CacheRequest  # noqa: E402
from pipeline.cache.reader import CacheReader, loader_worker_init  # noqa: E402
from pipeline.cache.warp import warp_teacher_maps  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.data.collate import collate  # noqa: E402
from pipeline.data.dataset import DetectionDataset  # noqa: E402
from pipeline.data.index import load_index  # noqa: E402
from pipeline.engine.detection_task import detection_losses  # noqa: E402
from pipeline.engine.distill_config import build_distill_loss  # noqa: E402
from pipeline.engine.distill_task import DistillDataset, DistillLosses, collate_with_teacher, plan_student  # noqa: E402
from pipeline.model_files import load_detector  # noqa: E402
from pipeline.ray_env import ray_session  # noqa: E402
from tests.bench.bench_inputs import dataset_and_teacher  # noqa: E402

VERSION, SPLIT = "v1.0-mini", "mini_train"


def time_steps(loader: DataLoader, step, steps: int, warmup: int = 3) -> dict:
    """Mean step time (s) and data-wait fraction over `steps` steps after `warmup`."""
    waits, totals = [], []
    it = iter(loader)
    t_end = time.perf_counter()
    for i in range(warmup + steps):
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            batch = next(it)
        t_data = time.perf_counter()
        step(batch)
        t_done = time.perf_counter()
        if i >= warmup:
            waits.append(t_data - t_end)
            totals.append(t_done - t_end)
        t_end = t_done
    return {"step_s": float(np.mean(totals)), "data_wait_frac": float(np.sum(waits) / np.sum(totals))}


def make_step(model, extra, loss_fn):
    params = list(model.parameters()) + list(extra.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step(batch):
        losses = loss_fn(model, extra, batch)
        opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        opt.step()
    return step


def cosine_at_keypoints(a: torch.Tensor, b: torch.Tensor, boxes: torch.Tensor, mask: torch.Tensor, grid) -> list[float]:
    """Cosine similarity [per valid keypoint] of two maps [B, C, H, W] sampled at the boxes' keypoints."""
    kp = box_keypoints(boxes)
    sa, sb = sample_at_keypoints(a, kp, grid), sample_at_keypoints(b, kp, grid)  # [B, M, 9, C]
    cos = torch.nn.functional.cosine_similarity(sa, sb, dim=-1, eps=1e-8)  # [B, M, 9]
    return cos[mask].flatten().tolist()


def warp_fidelity(reader: CacheReader, teacher, dataset: DetectionDataset, items: int) -> dict:
    """Mean keypoint cosine of warped (and of un-warped) canonical maps against the teacher on augmented input."""
    grid = teacher.grid
    out = {k: {"warped": [], "canonical": []} for k in ("low", "high", "heatmap", "regression")}
    for item in range(min(items, len(dataset))):
        sample = dataset.get(item)  # a fresh training BEV augmentation
        if len(sample["gt_boxes"]) == 0:
            continue
        batch = collate([sample])
        with torch.no_grad():
            online = teacher(batch)
        cached = reader.read(dataset.row(item)["token"], 0)
        canonical = {k: torch.from_numpy(cached[k])[None] for k in out}
        warped = warp_teacher_maps(canonical, batch["bda"], grid)
        for k in out:
            out[k]["warped"] += cosine_at_keypoints(warped[k], online[k], batch["gt_boxes"], batch["gt_mask"], grid)
            out[k]["canonical"] += cosine_at_keypoints(canonical[k].float(), online[k], batch["gt_boxes"],
                                                       batch["gt_mask"], grid)
    return {k: {kind: round(float(np.mean(v)), 4) for kind, v in d.items()} for k, d in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataroot", type=Path, default=None)
    ap.add_argument("--teacher", type=Path, default=None, help="teacher model file (default: tiny_lidar, seeded init)")
    ap.add_argument("--student", default="tiny_lidar_to_camera")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--loader-workers", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3, help="alternating baseline / cached measurements")
    args = ap.parse_args()

    torch.set_num_threads(1)
    tmp = tempfile.TemporaryDirectory(prefix="bench_student_")
    root, teacher_path = dataset_and_teacher(Path(tmp.name), args.dataroot, args.teacher, samples_per_scene=4)
    with ray_session(num_cpus=2):
        caches = {k: str(Path(tmp.name) / f"cache{k}") for k in (1, 2)}
        for k, uri in caches.items():
            build_cache(CacheRequest(str(teacher_path), str(root), VERSION, SPLIT, uri, views=k, shard_samples=8))

    cfg = load_config(args.student, ["train.batch_size=%d" % args.batch_size])
    tokens = [r["token"] for r in load_index(root, VERSION, SPLIT)]
    teacher, _ = load_detector(teacher_path)
    teacher.eval().requires_grad_(False)

    def loader(ds, collate_fn, worker_init_fn=None):  # as pipeline.engine.train_loop builds it
        return DataLoader(ds, batch_size=args.batch_size, shuffle=True, num_workers=args.loader_workers,
                          collate_fn=collate_fn, drop_last=True, worker_init_fn=worker_init_fn)

    def measure(mode: str) -> dict:
        torch.manual_seed(0)
        student = build_detector(cfg).train()
        base = DetectionDataset(root, VERSION, SPLIT, cfg, train=True, seed=0,
                                with_images=True)
        if mode != "none":
            loop, _ = plan_student(cfg, VERSION, SPLIT, tokens, cache=caches[2] if mode == "cached" else None,
                                   teacher=None if mode == "cached" else str(teacher_path))
            extra = torch.nn.ModuleDict({"distill": build_distill_loss(student.grid, loop["distill"])})
        if mode == "none":
            step = make_step(student, torch.nn.ModuleDict(), detection_losses)
            out = time_steps(loader(base, collate), step, args.steps)
        elif mode == "cached":
            ds = DistillDataset(base, CacheReader(caches[2]), "replay")
            step = make_step(student, extra, DistillLosses(student.grid, None, warp=False))
            out = time_steps(loader(ds, collate_with_teacher, loader_worker_init), step, args.steps)
        else:
            step = make_step(student, extra, DistillLosses(student.grid, teacher, warp=False))
            out = time_steps(loader(base, collate), step, args.steps)
        print(f"{mode:>7}: {1e3 * out['step_s']:7.1f} ms/step, data wait {100 * out['data_wait_frac']:4.1f}%",
              flush=True)
        return out

    # Rounds alternate the baseline and the cached student so both see the same machine; the
    # ratio is the median over rounds, each figure the run of median step time.
    rounds = {"none": [], "cached": []}
    for _ in range(args.rounds):
        for mode in rounds:
            rounds[mode].append(measure(mode))
    ratios = [c["step_s"] / n["step_s"] for n, c in zip(rounds["none"], rounds["cached"])]
    results = {m: sorted(r, key=lambda x: x["step_s"])[len(r) // 2] for m, r in rounds.items()}
    results["online"] = measure("online")
    ratio_cached = float(np.median(ratios))
    ratio_online = results["online"]["step_s"] / results["none"]["step_s"]
    print(f"cached / none = {ratio_cached:.3f} median of {args.rounds} rounds "
          f"({', '.join(f'{r:.3f}' for r in ratios)}; goal <= 1.10); online / none = {ratio_online:.3f}")

    fidelity = warp_fidelity(CacheReader(caches[1]), teacher,
                             DetectionDataset(root, VERSION, SPLIT, load_config("tiny_lidar"), train=True, seed=5,
                                              with_images=False), items=16)
    for k, v in fidelity.items():
        print(f"warp fidelity {k:<10}: cosine warped {v['warped']:.4f}, un-warped canonical {v['canonical']:.4f}")
    print(json.dumps({"bench": "student", "threads": 1, "batch_size": args.batch_size, "student": args.student,
                      "teacher": str(args.teacher or "tiny_lidar seeded init"),
                      "step_ms": {k: round(1e3 * v["step_s"], 2) for k, v in results.items()},
                      "data_wait_frac": {k: round(v["data_wait_frac"], 4) for k, v in results.items()},
                      "cached_over_none": round(ratio_cached, 4),
                      "cached_over_none_rounds": [round(r, 4) for r in ratios], "online_over_none": round(ratio_online, 4),
                      "warp_fidelity_cosine": fidelity}))
    tmp.cleanup()


if __name__ == "__main__":
    main()
