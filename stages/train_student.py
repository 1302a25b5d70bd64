"""Train a UniDistill student with Ray Train, from cached teacher targets or an online teacher.

    python stages/train_student.py --config tiny_lidar_to_camera --cache caches/lidar_mini_train \
        --dataroot DIR --output runs/camera_student
    python stages/train_student.py --config tiny_lidar_to_camera --teacher runs/lidar_teacher/model.pt \
        --dataroot DIR --output runs/camera_student_online
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python stages/train_student.py ...

Re-running the same command resumes from the run's last checkpoint. RUN_DIR/model.pt holds the
student alone (no teacher, no adaptation layers).
"""
from __future__ import annotations

import argparse

try:  # `python stages/train_student.py` (script) or `import stages.train_student`
    from _cli import add_check_files_arg, add_config_args, add_data_args, add_ray_args, apply_ray_address, run_main
except ImportError:
    from stages._cli import (add_check_files_arg, add_config_args, add_data_args, add_ray_args, apply_ray_address,
                             run_main)


def build_parser() -> argparse.ArgumentParser:
    """The stage's command line (also checked against the cluster manifests by the tests)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(ap)
    source = ap.add_mutually_exclusive_group(required=True)
    source.add_argument("--cache", help="teacher-target cache (stages/cache_teacher.py) to read targets from")
    source.add_argument("--teacher", help="teacher model file to run online instead (the original's way)")
    add_data_args(ap, "training split (default: the version's train split)")
    ap.add_argument("--output", required=True, help="run folder (local path or URL)")
    add_check_files_arg(ap)
    add_ray_args(ap)
    return ap


def main(argv: list[str] | None = None) -> None:
    ap = build_parser()
    args = ap.parse_args(argv)
    apply_ray_address(args.address)

    from pipeline.config import load_config
    from pipeline.engine.distill_task import distill_task, plan_student
    from pipeline.data.index import load_index
    from pipeline.engine.trainer import default_train_split, fit

    cfg = load_config(args.config, args.overrides)
    split = args.split or default_train_split(args.version)
    if args.check_files:  # an online teacher may need the images of a LiDAR student
        from pipeline.data.file_check import check_split_files

        check_split_files(args.dataroot, args.version, split, cfg, images=args.teacher is not None)
    tokens = [r["token"] for r in load_index(args.dataroot, args.version, split)]
    loop, identity = plan_student(cfg, args.version, split, tokens, cache=args.cache, teacher=args.teacher)
    fit(cfg, args.dataroot, args.version, split, args.output, distill_task, identity=identity,
        address=args.address, extra_loop_config=loop)


if __name__ == "__main__":
    raise SystemExit(run_main(main))
