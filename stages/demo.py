"""The demo behind `make demo`: the whole pipeline on the generated dataset, on a laptop.

Today it generates the nuScenes-format dataset (reused when it already exists with the same
settings) and prints its summary. Every step writes under --out, so a second run is quick.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from pipeline.synthetic import generate, summarize

DEMO_DATASET = dict(samples_per_scene=10, seed=0)


def ensure_dataset(root: Path) -> dict:
    """Generate the demo dataset under `root` unless one made with the same settings is there."""
    marker = root / "generated.json"
    if marker.is_file() and json.loads(marker.read_text()) == DEMO_DATASET:
        print(f"[demo] dataset: reusing {root}")
        return summarize(root)
    t0 = time.perf_counter()
    print(f"[demo] dataset: generating {DEMO_DATASET} into {root} ...")
    summary = generate(root, **DEMO_DATASET)
    marker.write_text(json.dumps(DEMO_DATASET))
    print(f"[demo] dataset: done in {time.perf_counter() - t0:.1f} s")
    return summary


def print_summary(summary: dict) -> None:
    """Readable table of the dataset summary."""
    print("\n== generated nuScenes-format dataset (v1.0-mini) ==")
    per_class = summary.get("boxes_per_class", {})
    for key, value in summary.items():
        if key != "boxes_per_class":
            print(f"  {key:<22} {value}")
    if per_class:
        print("  boxes per class:")
        for name, n in per_class.items():
            print(f"    {name:<22} {n}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("demo_out"), help="folder for everything the demo writes")
    args = ap.parse_args(argv)
    root = args.out / "nuscenes"
    root.mkdir(parents=True, exist_ok=True)
    print_summary(ensure_dataset(root))


if __name__ == "__main__":
    main()
