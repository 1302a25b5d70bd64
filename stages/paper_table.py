"""The paper's tables in one command: teachers, caches, baselines and distilled students of the
UniDistill paths over seeds, evaluated by the devkit, plus the loss ablation on lidar -> camera.

    python stages/paper_table.py --out paper_out                      # generated trainval set, small presets
    python stages/paper_table.py --out paper_out --paths lidar_to_camera --seeds 0,1,2
    python stages/paper_table.py --out smoke_out --preset tiny        # generated mini set: minutes, no learning
    python stages/paper_table.py --out paper_out --preset nuscenes --dataroot /data/nuscenes \
        --version v1.0-trainval --set model.camera_encoder.pretrained=resnet50-0676ba61.pth
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python stages/paper_table.py ...

Writes OUT/results.csv, OUT/results.md (per path: teacher, baseline, student, gain; mean +- std
over seeds), OUT/results.png and OUT/ablation/results.md. A second call reuses every finished
run, cache and evaluation (see pipeline/experiments/paper_table.py).
"""
from __future__ import annotations

import argparse
from pathlib import Path

try:  # `python stages/paper_table.py` (script) or `import stages.paper_table`
    from _cli import job_args, parse_stage_args, run_main, stage_parser
except ImportError:
    from stages._cli import job_args, parse_stage_args, run_main, stage_parser

ALL_PATHS = "lidar_to_camera,fusion_to_camera,camera_to_lidar,fusion_to_lidar"


def build_parser() -> argparse.ArgumentParser:
    """The stage's command line."""
    ap = stage_parser(__doc__)
    ap.add_argument("--out", required=True, type=Path,
                    help="folder for the runs, caches, evaluations and tables (absolute under `ray job submit`)")
    ap.add_argument("--paths", default=ALL_PATHS, help=f"comma-separated distillation paths (default: {ALL_PATHS})")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds of baselines and students (0,1,2)")
    ap.add_argument("--preset", default="small",
                    help="config prefix: PRESET_lidar, PRESET_lidar_to_camera, ... (small: the setting where the "
                         "detectors learn on generated data; tiny: a smoke run)")
    ap.add_argument("--dataroot", default=None, help="nuScenes dataroot (default: generate one into OUT/nuscenes)")
    ap.add_argument("--version", default=None,
                    help="nuScenes version of --dataroot (default: the preset's generated set's, v1.0-trainval for small)")
    ap.add_argument("--ablation", action=argparse.BooleanOptionalAction, default=None,
                    help="the loss ablation on lidar_to_camera (default: on when that path is chosen)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a key of every config, e.g. --set train.epochs=2 (repeatable)")
    return job_args(ap, check_files=False)


def main(argv: list[str] | None = None) -> None:
    _, args = parse_stage_args(build_parser, argv)

    from pipeline.experiments.paper_plan import parse_paths, parse_seeds
    from pipeline.experiments.paper_table import make_table

    make_table(args.out, parse_paths(args.paths), parse_seeds(args.seeds), preset=args.preset,
               dataroot=args.dataroot, version=args.version, ablation=args.ablation, overrides=args.overrides,
               address=args.address)


if __name__ == "__main__":
    raise SystemExit(run_main(main))
