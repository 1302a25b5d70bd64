"""Run a trained, frozen teacher once over a nuScenes split with Ray Data and store its BEV features
and head responses in a sharded Zarr v3 cache (DESIGN §3.4).

    python stages/cache_teacher.py --teacher runs/lidar_teacher/model.pt --dataroot DIR \
        --split mini_train --cache caches/lidar_mini_train [--views K] [--storage dense|foreground|keypoints]
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python stages/cache_teacher.py ...
    python stages/cache_teacher.py --cache URI --verify | --inspect | --render TOKEN [--view K] [--dataroot DIR]

Re-running the same command skips the shards already written; a cache of the same fingerprint is
reused as is; a different fingerprint at the same URI is refused unless --overwrite.
"""
from __future__ import annotations

import argparse
import sys

try:  # `python stages/cache_teacher.py` (script) or `import stages.cache_teacher`
    from _cli import job_args, parse_stage_args, run_main, stage_parser
except ImportError:
    from stages._cli import job_args, parse_stage_args, run_main, stage_parser


def build_parser() -> argparse.ArgumentParser:
    """The stage's command line (also checked against the cluster manifests by the tests)."""
    from pipeline.cache import store

    ap = stage_parser(__doc__)
    ap.add_argument("--cache", required=True, help="cache location: a local path or a URL (s3://bucket/caches/x)")
    ap.add_argument("--teacher", help="teacher model file (RUN_DIR/model.pt)")
    ap.add_argument("--dataroot", help="nuScenes dataroot (real or generated)")
    ap.add_argument("--version", default="v1.0-mini")
    ap.add_argument("--split", default=None, help="split to cache (default: the version's train split)")
    ap.add_argument("--views", type=int, default=1, help="views per sample: 1 = canonical only; K > 1 adds "
                    "K-1 seeded BEV augmentations for exact replay")
    ap.add_argument("--storage", default="dense", choices=("dense", "foreground", "keypoints"),
                    help="dense: whole maps; foreground: map tiles near GT boxes; keypoints: only what the losses read "
                         "(the 9 keypoints of every GT box and the response mask's cells), ~1-3%% of dense")
    ap.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    ap.add_argument("--shard-samples", type=int, default=8, help="samples per shard (the unit of writing)")
    ap.add_argument("--tile", type=int, default=None,
                    help="chunk tile size in BEV cells, the unit of reading (default: the whole map for dense storage, "
                         "half the map's shorter side within 8-32 cells for foreground)")
    ap.add_argument("--compressor", default=store.DEFAULT_COMPRESSOR, choices=store.COMPRESSORS,
                    help="chunk compressor (default: %(default)s, chosen by tests/bench/bench_cache.py)")
    ap.add_argument("--overwrite", action="store_true", help="replace a cache built with other settings")
    ap.add_argument("--actors", type=int, default=1, help="teacher actors")
    ap.add_argument("--teacher-batch", type=int, default=2, help="samples per teacher forward")
    ap.add_argument("--cpus-per-actor", type=float, default=1.0, help="CPUs reserved per teacher actor")
    ap.add_argument("--loaders", type=int, default=None,
                    help="loader actors (default: one per teacher actor; raise it when loading is the bottleneck, "
                         "e.g. 4 per GPU teacher on nuScenes)")
    ap.add_argument("--writers", type=int, default=None, help="writer actors (default: one per teacher actor)")
    ap.add_argument("--cpus-per-loader", type=float, default=0.0,
                    help="CPUs reserved per loader actor (default none, so that loaders lost with a node can "
                         "always restart on the survivors)")
    ap.add_argument("--cpus-per-writer", type=float, default=0.0,
                    help="CPUs reserved per writer actor (default none); it compresses on max(1, ceil(this)) threads")
    ap.add_argument("--gpu", action="store_true", help="one GPU per teacher actor")
    ap.add_argument("--verify", action="store_true", help="check every shard against the manifest checksums")
    ap.add_argument("--inspect", action="store_true", help="print schema, fingerprint and sizes")
    ap.add_argument("--render", metavar="TOKEN", help="write a PNG of this sample's cached maps")
    ap.add_argument("--view", type=int, default=0, help="view to render")
    ap.add_argument("--out", default="cache_render.png", help="PNG path for --render")
    return job_args(ap)


def main(argv: list[str] | None = None) -> None:
    ap, args = parse_stage_args(build_parser, argv)

    if args.verify or args.inspect or args.render:
        from pipeline.cache.inspection import run_check

        sys.exit(run_check(args.cache, args.verify, args.inspect, args.render, args.view, args.out, args.dataroot))
    if not args.teacher or not args.dataroot:
        ap.error("--teacher and --dataroot are needed to build a cache")

    from pipeline.cache.build import build_cache
    from pipeline.cache.plan import CacheRequest
    from pipeline.data.nusc_db import default_split

    split = args.split or default_split(args.version)
    if args.check_files:
        from pipeline.data.file_check import check_model_split_files

        check_model_split_files(args.teacher, args.dataroot, args.version, split)
    build_cache(CacheRequest(
        args.teacher, args.dataroot, args.version, split, args.cache, views=args.views, storage=args.storage,
        dtype=args.dtype, shard_samples=args.shard_samples, tile=args.tile, compressor_name=args.compressor,
        overwrite=args.overwrite, actors=args.actors, use_gpu=args.gpu, cpus_per_actor=args.cpus_per_actor,
        teacher_batch=args.teacher_batch, address=args.address, loaders=args.loaders, writers=args.writers,
        cpus_per_loader=args.cpus_per_loader, cpus_per_writer=args.cpus_per_writer))


if __name__ == "__main__":
    raise SystemExit(run_main(main))
