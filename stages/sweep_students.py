"""Student ablations over one teacher-target cache as concurrent Ray Tune trials, with one table.

    python stages/sweep_students.py --config tiny_lidar_to_camera --cache caches/lidar_mini_train \
        --grid stages/configs/sweeps/losses.yaml --dataroot DIR --output sweeps/losses
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python stages/sweep_students.py ...

Each variant trains (Ray Train) and is evaluated (Ray Data + devkit) on the validation split;
OUTPUT/results.md and OUTPUT/results.csv compare mAP, NDS and TP errors per variant.
"""
from __future__ import annotations

import argparse
from pathlib import Path

try:  # `python stages/sweep_students.py` (script) or `import stages.sweep_students`
    from _cli import add_config_args, add_data_args, job_args, parse_stage_args, run_main, stage_parser
except ImportError:
    from stages._cli import add_config_args, add_data_args, job_args, parse_stage_args, run_main, stage_parser


def build_parser() -> argparse.ArgumentParser:
    """The stage's command line (also checked against the cluster manifests by the tests)."""
    ap = stage_parser(__doc__)
    add_config_args(ap)  # the student preset every variant starts from; --set applies to all variants
    ap.add_argument("--cache", required=True, help="teacher-target cache every distilled variant reads")
    ap.add_argument("--grid", required=True, help="YAML file of variants (see pipeline/experiments/sweep.py)")
    add_data_args(ap, "training split (default: the version's train split)")
    ap.add_argument("--eval-split", default=None, help="evaluation split (default: the version's val split)")
    ap.add_argument("--output", required=True, help="sweep folder: one run folder per variant and the tables")
    ap.add_argument("--concurrent", type=int, default=2, help="trials running at once")
    return job_args(ap, check_files=False)


def main(argv: list[str] | None = None) -> None:
    ap, args = parse_stage_args(build_parser, argv)

    from pipeline.data.nusc_db import default_split
    from pipeline.experiments.sweep import read_grid, run_sweep

    variants = [dict(v, overrides=[*args.overrides, *v["overrides"]]) for v in read_grid(args.grid)]
    rows = run_sweep(variants, args.config, args.cache, args.dataroot, args.version, args.split or default_split(args.version),
                     args.eval_split or default_split(args.version, "eval"), args.output, args.concurrent, address=args.address)
    print(Path(args.output, "results.md").read_text())
    print(f"{len(rows)} variants -> {args.output}/results.md, results.csv")


if __name__ == "__main__":
    raise SystemExit(run_main(main))
