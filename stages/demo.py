"""The demo behind `make demo`: the whole pipeline on the generated dataset, on a laptop.

Today it generates the nuScenes-format dataset (reused when it already exists with the same
settings) and prints its summary. Every step writes under --out, so a second run is quick.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from pipeline.synthetic import META_FILE, format_summary, generate, summarize

DEMO_DATASET = dict(samples_per_scene=10, seed=0)


def ensure_dataset(root: Path) -> dict:
    """Generate the demo dataset under `root` unless a complete one made with the same settings is there.

    The generator writes its settings file last, so a dataset cut off mid-way is regenerated.
    """
    meta_path = root / META_FILE
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    if all(meta.get(k) == v for k, v in DEMO_DATASET.items()):
        print(f"[demo] dataset: reusing {root}")
        return summarize(root)
    t0 = time.perf_counter()
    print(f"[demo] dataset: generating {DEMO_DATASET} into {root} ...")
    summary = generate(root, **DEMO_DATASET, overwrite=True)
    print(f"[demo] dataset: done in {time.perf_counter() - t0:.1f} s")
    return summary


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("demo_out"), help="folder for everything the demo writes")
    args = ap.parse_args(argv)
    root = args.out / "nuscenes"
    root.mkdir(parents=True, exist_ok=True)
    print(format_summary(ensure_dataset(root)))


if __name__ == "__main__":
    main()
