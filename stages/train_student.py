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
    from _cli import add_config_args, add_data_args, job_args, parse_stage_args, run_main, stage_parser
except ImportError:
    from stages._cli import add_config_args, add_data_args, job_args, parse_stage_args, run_main, stage_parser


def build_parser() -> argparse.ArgumentParser:
    """The stage's command line (also checked against the cluster manifests by the tests)."""
    ap = stage_parser(__doc__)
    add_config_args(ap)
    source = ap.add_mutually_exclusive_group(required=True)
    source.add_argument("--cache", help="teacher-target cache (stages/cache_teacher.py) to read targets from")
    source.add_argument("--teacher", help="teacher model file to run online instead (the original's way)")
    add_data_args(ap, "training split (default: the version's train split)")
    ap.add_argument("--output", required=True, help="run folder (local path or URL)")
    return job_args(ap)


def main(argv: list[str] | None = None) -> None:
    ap, args = parse_stage_args(build_parser, argv)

    from pipeline.config import load_config
    from pipeline.engine.student import fit_student
    from pipeline.data.nusc_db import default_split

    cfg = load_config(args.config, args.overrides)
    split = args.split or default_split(args.version)
    if args.check_files:  # an online teacher may need the images of a LiDAR student
        from pipeline.data.file_check import check_split_files

        check_split_files(args.dataroot, args.version, split, cfg, images=args.teacher is not None)
    fit_student(cfg, args.dataroot, args.version, split, args.output, cache=args.cache, teacher=args.teacher,
                address=args.address)


if __name__ == "__main__":
    raise SystemExit(run_main(main))
