"""Training a distilled student: check its targets (a cache or an online teacher), then fit it.

The one sequence behind stages/train_student.py, the demo and the student sweeps.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from pipeline.data.index import load_index
from pipeline.engine.distill_task import distill_task, plan_student
from pipeline.engine.trainer import fit


def plan_student_run(cfg: Mapping[str, Any], dataroot: str | Path, version: str, split: str,
                     cache: str | None = None, teacher: str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(loop config keys, run identity) of a student on `split`, its targets checked (plan_student)."""
    tokens = [r["token"] for r in load_index(dataroot, version, split)]
    return plan_student(cfg, version, split, tokens, cache=cache, teacher=teacher)


def fit_student(cfg: Mapping[str, Any], dataroot: str | Path, version: str, split: str, output: str, *,
                cache: str | None = None, teacher: str | None = None, address: str | None = None) -> str:
    """Train a student from a cache (or an online teacher) with Ray Train; return its model file."""
    loop, identity = plan_student_run(cfg, dataroot, version, split, cache=cache, teacher=teacher)
    return fit(cfg, dataroot, version, split, output, distill_task, identity=identity, address=address,
               extra_loop_config=loop)
