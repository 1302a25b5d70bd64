"""Train a detector of any modality with Ray Train: teachers, and the no-distillation baselines.

    python stages/train_teacher.py --config tiny_lidar --dataroot DIR --output runs/lidar_teacher
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python stages/train_teacher.py --config tiny_lidar --dataroot DIR --output runs/lidar_teacher

Re-running the same command resumes from the run's last checkpoint. Writes RUN_DIR/model.pt.
"""
from __future__ import annotations

import argparse

try:  # `python stages/train_teacher.py` (script) or `import stages.train_teacher`
    from _cli import add_check_files_arg, add_config_args, add_data_args, add_ray_args, apply_ray_address, run_main
except ImportError:
    from stages._cli import (add_check_files_arg, add_config_args, add_data_args, add_ray_args, apply_ray_address,
                             run_main)


def build_parser() -> argparse.ArgumentParser:
    """The stage's command line (also checked against the cluster manifests by the tests)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(ap)
    add_data_args(ap, "training split (default: the version's train split)")
    ap.add_argument("--output", required=True, help="run folder (local path or URL, e.g. s3://bucket/runs/x)")
    add_check_files_arg(ap)
    add_ray_args(ap)
    return ap


def main(argv: list[str] | None = None) -> None:
    ap = build_parser()
    args = ap.parse_args(argv)
    apply_ray_address(args.address)

    from pipeline.config import load_config
    from pipeline.engine.detection_task import detection_task
    from pipeline.engine.trainer import default_train_split, fit

    cfg = load_config(args.config, args.overrides)
    split = args.split or default_train_split(args.version)
    if args.check_files:
        from pipeline.data.file_check import check_split_files

        check_split_files(args.dataroot, args.version, split, cfg)
    fit(cfg, args.dataroot, args.version, split, args.output, detection_task,
        identity={"stage": "train_teacher"}, address=args.address)


if __name__ == "__main__":
    raise SystemExit(run_main(main))
