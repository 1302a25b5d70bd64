"""Evaluate an exported model on a nuScenes split: Ray Data batch inference, results JSON, devkit metrics.

    python stages/evaluate.py --checkpoint runs/lidar_teacher/model.pt --dataroot DIR --split mini_val --output eval/lidar
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python stages/evaluate.py --checkpoint runs/lidar_teacher/model.pt --dataroot DIR --split mini_val --output eval/lidar

On the test split only the submission file (nuscenes_results.json) is written.
"""
from __future__ import annotations

import argparse

try:  # `python stages/evaluate.py` (script) or `import stages.evaluate`
    from _cli import add_data_args, job_args, parse_stage_args, run_main, stage_parser
except ImportError:
    from stages._cli import add_data_args, job_args, parse_stage_args, run_main, stage_parser


def build_parser() -> argparse.ArgumentParser:
    """The stage's command line (also checked against the cluster manifests by the tests)."""
    ap = stage_parser(__doc__)
    ap.add_argument("--checkpoint", required=True, help="model file exported by a training stage (RUN_DIR/model.pt)")
    add_data_args(ap, "split to evaluate (default: the version's validation split, or test)")
    ap.add_argument("--output", required=True, help="folder for results, metrics and plots")
    ap.add_argument("--config", default=None,
                    help="optional preset the model must have been built with (refused otherwise)")
    ap.add_argument("--actors", type=int, default=None, help="inference actors (default: runtime.eval_actors)")
    ap.add_argument("--batch-size", type=int, default=None, help="samples per inference batch")
    ap.add_argument("--cpus-per-actor", type=float, default=None, help="CPUs reserved by each actor")
    ap.add_argument("--gpu", action="store_true", help="one GPU per inference actor")
    ap.add_argument("--no-render", action="store_true", help="skip PR curves and BEV pictures")
    return job_args(ap)


def main(argv: list[str] | None = None) -> None:
    ap, args = parse_stage_args(build_parser, argv)

    from pipeline.evaluation.model_eval import evaluate_model
    from pipeline.data.nusc_db import default_split

    split = args.split or default_split(args.version, "eval")
    runtime = {k: v for k, v in (("eval_actors", args.actors), ("eval_batch_size", args.batch_size),
                                 ("eval_cpus_per_actor", args.cpus_per_actor)) if v is not None}
    runtime["use_gpu"] = args.gpu
    if args.check_files:
        from pipeline.data.file_check import check_model_split_files

        check_model_split_files(args.checkpoint, args.dataroot, args.version, split)
    evaluate_model(args.checkpoint, args.dataroot, args.version, split, args.output, runtime=runtime,
                   preset=args.config, render=not args.no_render)


if __name__ == "__main__":
    raise SystemExit(run_main(main))
