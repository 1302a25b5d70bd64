"""A training run's metrics: one JSON line per step in `metrics.jsonl`, the same scalars in
TensorBoard (tensorboardX), and a short console line every few steps.

Written by the rank-0 worker only. On resume, lines from steps after the restored checkpoint are
dropped first, so the log reads as one uninterrupted run.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Mapping

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def truncate_after(path: Path, step: int) -> int:
    """Drop lines of a metrics file whose `step` is > `step`; return how many lines remain."""
    if not path.is_file():
        return 0
    keep = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut off by a crash
        if int(rec.get("step", -1)) <= step:
            keep.append(line)
    path.write_text("".join(f"{line}\n" for line in keep))
    return len(keep)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a metrics file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


class MetricsLog:
    """Appends step records to `<folder>/metrics.jsonl` and TensorBoard; prints every `print_every` steps."""

    def __init__(self, folder: str | Path, resume_step: int = 0, print_every: int = 10, prefix: str = "") -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / METRICS_FILE
        truncate_after(self.path, resume_step)
        self.print_every = max(1, int(print_every))
        self.prefix = prefix
        self._file = open(self.path, "a", buffering=1)
        self._tb = None
        try:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(self.folder / TENSORBOARD_DIR), purge_step=resume_step + 1)
        except ImportError:  # TensorBoard output is optional; the JSONL log is the record
            self._tb = None
        self._t0 = time.time()

    def log(self, step: int, record: Mapping[str, Any]) -> None:
        """Write one step's record (scalars) and maybe print a console line."""
        rec = {"step": int(step), "time": round(time.time() - self._t0, 3), **record}
        self._file.write(json.dumps(rec, default=float) + "\n")
        if self._tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(key, value, step)
        if step % self.print_every == 0:
            print(self.prefix + format_line(rec), flush=True)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def format_line(rec: Mapping[str, Any]) -> str:
    """'epoch 1 step 20  loss 3.21  heatmap 1.02 ...  lr 2.0e-04  12.3 samples/s  wait 5%'."""
    parts = [f"epoch {rec.get('epoch', '?')} step {rec['step']}"]
    for key, value in rec.items():
        if key.startswith("loss"):
            parts.append(f"{key.removeprefix('loss/') or 'loss'} {value:.4g}")
    if "lr" in rec:
        parts.append(f"lr {rec['lr']:.2e}")
    if "samples_per_s" in rec:
        parts.append(f"{rec['samples_per_s']:.2f} samples/s")
    if "data_wait_frac" in rec:
        parts.append(f"wait {100 * rec['data_wait_frac']:.0f}%")
    return "  ".join(parts)
