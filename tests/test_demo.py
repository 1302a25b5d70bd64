"""The demo's result tables (the demo itself runs in `make demo`, not in the test suite)."""
from stages.demo import format_seed_table


def test_seed_table_reports_each_seed_and_the_mean_and_sample_spread():
    runs = {"baseline": [(0, {"mean_ap": 0.1, "nd_score": 0.2}), (1, {"mean_ap": 0.3, "nd_score": 0.6})],
            "student": [(0, {"mean_ap": 0.5, "nd_score": 0.5})]}
    lines = format_seed_table(runs).splitlines()
    assert lines[2] == "| baseline | 0 | 0.1000 | 0.2000 |"
    assert lines[3] == "| baseline | 1 | 0.3000 | 0.6000 |"
    # mean and sample standard deviation (ddof=1): mAP 0.2 +- 0.1414, NDS 0.4 +- 0.2828
    assert lines[4] == "| **baseline** | mean +- std over 2 | **0.2000 +- 0.1414** | **0.4000 +- 0.2828** |"
    assert lines[6] == "| **student** | mean +- std over 1 | **0.5000 +- 0.0000** | **0.5000 +- 0.0000** |"
