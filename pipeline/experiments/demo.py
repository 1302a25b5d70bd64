"""The demo behind `make demo` (stages/demo.py): the whole pipeline on the generated dataset, on a laptop.

    generated nuScenes (v1.0-mini format)
      -> LiDAR teacher (Ray Train)                  -> evaluation (Ray Data + devkit, mini_val)
      -> camera baseline, no distillation            -> evaluation
      -> teacher-target cache of mini_train (Ray Data -> Zarr v3, replayed views)
      -> camera student distilled from the cache     -> evaluation
      -> a table of teacher, baseline and student (mAP, NDS)

Everything runs through the same functions as the stages, on one local Ray cluster on 127.0.0.1,
and writes under --out; a second run reuses the dataset, finished runs and the cache.
"""
from __future__ import annotations

import time
from pathlib import Path

from pipeline.evaluation.report import markdown_table
from pipeline.experiments.runs import StepTimes, ensure_dataset, format_seed_table
from pipeline.synthetic import format_summary

DEMO_DATASET = dict(samples_per_scene=10, seed=0)
VERSION, TRAIN, VAL = "v1.0-mini", "mini_train", "mini_val"
# Run settings of the demo (the tiny presets' defaults, sized for 2 CPU cores).
TEACHER = ("tiny_lidar", [])
BASELINE = ("tiny_camera", [])
STUDENT = ("tiny_lidar_to_camera", [])
CACHE_VIEWS = 4


def step(name: str, fn, *args, **kwargs):
    """Run one demo step with a banner and its wall time."""
    print(f"\n[demo] === {name} ===", flush=True)
    t0 = time.perf_counter()
    result = fn(*args, **kwargs)
    print(f"[demo] {name}: {time.perf_counter() - t0:.0f} s", flush=True)
    return result, time.perf_counter() - t0


def format_table(rows: list[tuple[str, str, dict, float]]) -> str:
    """Markdown table of the demo's models."""
    return "\n".join(markdown_table(
        ["model", "config", "mAP", "NDS", "mATE", "mAOE", "mAVE", "minutes"],
        [(name, config, f"{s['mean_ap']:.4f}", f"{s['nd_score']:.4f}", f"{s['tp_errors']['trans_err']:.3f}",
          f"{s['tp_errors']['orient_err']:.3f}", f"{s['tp_errors']['vel_err']:.3f}", f"{seconds / 60:.1f}")
         for name, config, s, seconds in rows]))


def run_demo(out: str | Path, dataset_only: bool = False, seeds: int = 1) -> None:
    """Generate the dataset, train and evaluate the teacher, baseline and student, write results.md
    (and results_seeds.md with `seeds` > 1) under `out`."""
    out = Path(out).resolve()
    root = out / "nuscenes"
    root.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    print(format_summary(ensure_dataset(root, DEMO_DATASET, "[demo]")))
    if dataset_only:
        return

    from pipeline.cache.build import build_cache
    from pipeline.cache.plan import CacheRequest
    from pipeline.config import load_config
    from pipeline.engine.detection_task import detection_task
    from pipeline.engine.distill_task import distill_task
    from pipeline.engine.student import plan_student_run
    from pipeline.engine.trainer import fit
    from pipeline.evaluation.model_eval import evaluate_model
    from pipeline.ray_env import ray_session

    runs, rows = out / "runs", []
    timings = StepTimes(out / "timings.json")
    with ray_session():
        def train(name, preset, task=detection_task, identity=None, **kw):
            cfg = load_config(preset[0], preset[1])
            done = (runs / name / "model.pt").exists()
            model, seconds = step(f"train {name} ({preset[0]})", fit, cfg, root, VERSION, TRAIN, str(runs / name),
                                  task, identity=identity or {"stage": f"demo_{name}"}, **kw)
            return model, timings.record(f"train {name}", seconds, reused=done)

        def evaluate(name, model, seconds, config):
            summary, _ = step(f"evaluate {name}", evaluate_model, model, root, VERSION, VAL, out / "eval" / name)
            rows.append((name, config, summary, seconds))

        teacher, t_teacher = train("lidar_teacher", TEACHER)
        evaluate("LiDAR teacher", teacher, t_teacher, TEACHER[0])
        baseline, t_base = train("camera_baseline", BASELINE)
        evaluate("camera baseline", baseline, t_base, BASELINE[0])
        cache = str(out / "caches" / "lidar_teacher_mini_train")
        cached, t_cache = step("cache the teacher's targets", build_cache,
                               CacheRequest(teacher, str(root), VERSION, TRAIN, cache, views=CACHE_VIEWS,
                                            storage="foreground", shard_samples=8))
        t_cache = timings.record("cache", t_cache, reused=cached.shards_written == 0)
        cfg = load_config(*STUDENT)
        loop, identity = plan_student_run(cfg, root, VERSION, TRAIN, cache=cache)
        student, t_student = train("camera_student", STUDENT, distill_task, identity=identity, extra_loop_config=loop)
        evaluate("camera student (UniDistill, cached)", student, t_student + t_cache, STUDENT[0])
        # More seeds of the two camera models, same recipe and budget (seed 0 is the runs above).
        seeded = {"camera baseline": [(0, rows[1][2])], "camera student (UniDistill, cached)": [(0, rows[2][2])]}
        for seed in range(1, seeds):
            extra = [f"train.seed={seed}"]
            for name, folder, preset, task, kw in (
                    ("camera baseline", "camera_baseline", BASELINE, detection_task, {}),
                    ("camera student (UniDistill, cached)", "camera_student", STUDENT, distill_task,
                     {"identity": identity, "extra_loop_config": loop})):
                run = f"{folder}_seed{seed}"
                model, _ = train(run, (preset[0], preset[1] + extra), task, **kw)
                summary, _ = step(f"evaluate {run}", evaluate_model, model, root, VERSION, VAL, out / "eval" / run)
                seeded[name].append((seed, summary))

    table = format_table(rows)
    (out / "results.md").write_text(table + "\n")
    print(f"\n[demo] results on generated mini_val ({(time.perf_counter() - t_start) / 60:.1f} min in all):\n{table}")
    if seeds > 1:
        seeds_table = format_seed_table(seeded)
        (out / "results_seeds.md").write_text(seeds_table + "\n")
        print(f"\n[demo] camera models over {seeds} seeds:\n{seeds_table}")
    print(f"[demo] written to {out / 'results.md'}; runs in {runs}, evaluations in {out / 'eval'}")
