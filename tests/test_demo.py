"""The demo's result tables and step times (the demo itself runs in `make demo`, not in the test suite)."""
from pipeline.experiments.runs import StepTimes, format_seed_table


def test_seed_table_reports_each_seed_and_the_mean_and_sample_spread():
    runs = {"baseline": [(0, {"mean_ap": 0.1, "nd_score": 0.2}), (1, {"mean_ap": 0.3, "nd_score": 0.6})],
            "student": [(0, {"mean_ap": 0.5, "nd_score": 0.5})]}
    lines = format_seed_table(runs).splitlines()
    assert lines[2] == "| baseline | 0 | 0.1000 | 0.2000 |"
    assert lines[3] == "| baseline | 1 | 0.3000 | 0.6000 |"
    # mean and sample standard deviation (ddof=1): mAP 0.2 +- 0.1414, NDS 0.4 +- 0.2828
    assert lines[4] == "| **baseline** | mean +- std over 2 | **0.2000 +- 0.1414** | **0.4000 +- 0.2828** |"
    assert lines[6] == "| **student** | mean +- std over 1 | **0.5000 +- 0.0000** | **0.5000 +- 0.0000** |"


def test_a_reused_step_reports_the_time_it_took_when_it_ran(tmp_path):
    times = StepTimes(tmp_path / "timings.json")
    assert times.record("train teacher", 290.0, reused=False) == 290.0
    again = StepTimes(tmp_path / "timings.json")  # a later demo run that finds the model trained
    assert again.record("train teacher", 0.4, reused=True) == 290.0
    assert again.record("cache", 3.0, reused=True) == 3.0  # no record of it: this run's time is all there is
    assert "cache" not in again.seconds  # ... and it is not kept as the step's time
    assert again.record("train teacher", 250.0, reused=False) == 250.0  # trained again: the new time is kept
    assert StepTimes(tmp_path / "timings.json").seconds["train teacher"] == 250.0


def test_markdown_table_lines_and_row_width_check():
    import pytest

    from pipeline.evaluation.report import markdown_table

    assert markdown_table(["a", "b"], [(1, "x"), (2.5, None)]) == ["| a | b |", "|---|---|", "| 1 | x |", "| 2.5 | None |"]
    with pytest.raises(ValueError, match="a row has 1 cells for 2 columns"):
        markdown_table(["a", "b"], [("only",)])
