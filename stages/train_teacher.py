"""Train a detector of any modality with Ray Train: teachers, and the no-distillation baselines.

    python stages/train_teacher.py --config tiny_lidar --dataroot DIR --output runs/lidar_teacher
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python stages/train_teacher.py --config tiny_lidar --dataroot DIR --output runs/lidar_teacher

Re-running the same command resumes from the run's last checkpoint. Writes RUN_DIR/model.pt.
"""
from __future__ import annotations

import argparse

try:  # `python stages/train_teacher.py` (script) or `import stages.train_teacher`
    from _cli import add_config_args, add_data_args, job_args, parse_stage_args, run_main, stage_parser
except ImportError:
    from stages._cli import add_config_args, add_data_args, job_args, parse_stage_args, run_main, stage_parser


def build_parser() -> argparse.ArgumentParser:
    """The stage's command line (also checked against the cluster manifests by the tests)."""
    ap = stage_parser(__doc__)
    add_config_args(ap)
    add_data_args(ap, "training split (default: the version's train split)")
    ap.add_argument("--output", required=True, help="run folder (local path or URL, e.g. s3://bucket/runs/x)")
    return job_args(ap)


def main(argv: list[str] | None = None) -> None:
    ap, args = parse_stage_args(build_parser, argv)

    from pipeline.config import load_config
    from pipeline.engine.detection_task import detection_task
    from pipeline.data.nusc_db import default_split
    from pipeline.engine.trainer import fit

    cfg = load_config(args.config, args.overrides)
    split = args.split or default_split(args.version)
    if args.check_files:
        from pipeline.data.file_check import check_split_files

        check_split_files(args.dataroot, args.version, split, cfg)
    fit(cfg, args.dataroot, args.version, split, args.output, detection_task,
        identity={"stage": "train_teacher"}, address=args.address)


if __name__ == "__main__":
    raise SystemExit(run_main(main))
