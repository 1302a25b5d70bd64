"""The GPU benchmark's smoke mode (tests/bench/bench_gpu.py --device cpu --steps 2): it runs end to
end on the CPU with the tiny presets and its final JSON line has every figure the GPU run reports."""
from __future__ import annotations

import json
import math

from tests.bench import bench_gpu

DETECTOR_KEYS = {"kind", "config", "modality", "batch", "ms_per_step", "ms_min", "peak_mem_mb", "losses_finite",
                 "loss_first", "loss_last", "amp_skipped_steps", "spconv_algo", "params"}
STUDENT_KEYS = {"kind", "config", "targets", "batch", "ms_per_step", "peak_mem_mb", "losses_finite", "vs_no_distillation"}


def test_smoke_mode_prints_the_figures_as_a_json_line(capsys):
    returned = bench_gpu.main(["--device", "cpu", "--steps", "2"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    result = json.loads(last)
    assert result == json.loads(json.dumps(returned))
    assert {"bench", "preset", "amp", "device", "torch", "spconv", "all_losses_finite", "rows", "not_covered"} <= set(result)
    assert result["bench"] == "gpu" and result["preset"] == "tiny" and result["device"] == "cpu"
    assert result["amp"] is False and result["steps"] == 2 and result["all_losses_finite"] is True
    detectors = [r for r in result["rows"] if r["kind"] == "detector"]
    assert sorted((r["modality"], r["batch"]) for r in detectors) == [(m, b) for m in ("camera", "fusion", "lidar")
                                                                      for b in (1, 2)]
    for r in detectors:
        assert DETECTOR_KEYS <= set(r), r
        assert r["losses_finite"] and math.isfinite(r["loss_first"]) and math.isfinite(r["loss_last"])
        assert r["ms_per_step"] > 0 and r["peak_mem_mb"] > 0
        # The CPU needs spconv's Native algorithm; on CUDA the row names spconv's default choice.
        assert r["spconv_algo"] == (None if r["modality"] == "camera" else ["Native"])
    students = [r for r in result["rows"] if r["kind"] == "student"]
    assert [r["targets"] for r in students] == ["none", "targets_in_memory", "online_teacher"]
    for r in students:
        assert STUDENT_KEYS <= set(r) and r["losses_finite"], r
