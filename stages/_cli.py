"""Argument parsing shared by the stage entry points (kept here so every stage reads the same way)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

# `python stages/X.py` puts stages/ on sys.path, not the repository root; make the project
# importable either way (installed with `pip install -e .`, or run from a `ray job` working dir).
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def stage_parser(doc: str | None) -> argparse.ArgumentParser:
    """A stage's parser, its module docstring as the description (usage lines kept as written)."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def job_args(ap: argparse.ArgumentParser, check_files: bool = True) -> argparse.ArgumentParser:
    """Add the options every Ray job stage ends with (--check-files where it reads sensor files,
    --address); returns `ap`."""
    if check_files:
        add_check_files_arg(ap)
    add_ray_args(ap)
    return ap


def parse_stage_args(build_parser, argv: list[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    """Parse a stage's command line and export its --address before the project (and Ray) is imported."""
    ap = build_parser()
    args = ap.parse_args(argv)
    apply_ray_address(args.address)
    return ap, args


def add_data_args(ap: argparse.ArgumentParser, split_help: str) -> None:
    """--dataroot, --version, --split."""
    ap.add_argument("--dataroot", required=True, help="nuScenes dataroot (real or generated)")
    ap.add_argument("--version", default="v1.0-mini", help="v1.0-mini | v1.0-trainval | v1.0-test")
    ap.add_argument("--split", default=None, help=split_help)


def add_check_files_arg(ap: argparse.ArgumentParser) -> None:
    """--check-files (see pipeline/data/file_check.py)."""
    ap.add_argument("--check-files", action="store_true",
                    help="first check that every sensor file the job reads exists and is whole; list the missing "
                         "or truncated ones and stop before any work")


def add_config_args(ap: argparse.ArgumentParser) -> None:
    """--config and repeated --set key.path=value."""
    ap.add_argument("--config", required=True, help="preset name (tiny_lidar, nuscenes_camera, ...) or YAML path")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key, e.g. --set train.epochs=2 (repeatable)")


def add_ray_args(ap: argparse.ArgumentParser) -> None:
    """--address of a Ray cluster."""
    ap.add_argument("--address", default=None,
                    help="Ray cluster address (default: RAY_ADDRESS, a running local cluster, or a new local one; "
                         "'local': always a new local one)")


def apply_ray_address(address: str | None) -> None:
    """Export --address as RAY_ADDRESS before the project (and Ray) are imported (see pipeline.ray_env)."""
    if address:
        import os

        os.environ["RAY_ADDRESS"] = address


def run_main(main, argv: list[str] | None = None) -> int:
    """Run a stage's main; bad input (models.errors.UserError: ConfigError, DatasetError, CacheError,
    CheckpointError, ...) and missing files print one line and exit with status 2. Any other
    exception is a bug and keeps its traceback."""
    try:
        main(argv)
    except Exception as e:  # imported late: the project must not be imported before --address is applied
        from models.errors import UserError

        if isinstance(e, (UserError, FileNotFoundError)):
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise
    return 0
