"""`make demo`: the whole pipeline on a generated nuScenes set, on a laptop (see
pipeline/experiments/demo.py for the steps). A second run reuses the dataset, finished runs and the cache.

    python -m stages.demo --out demo_out
"""
from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.experiments.demo import run_demo


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("demo_out"), help="folder for everything the demo writes")
    ap.add_argument("--dataset-only", action="store_true", help="only generate the dataset and print its summary")
    ap.add_argument("--seeds", type=int, default=1,
                    help="train the camera baseline and the distilled student with this many seeds (0, 1, ...) "
                         "and write their mean and spread to results_seeds.md (each extra seed adds ~12 min)")
    args = ap.parse_args(argv)
    run_demo(args.out, args.dataset_only, args.seeds)


if __name__ == "__main__":
    main()
