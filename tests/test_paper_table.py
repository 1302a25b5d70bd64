"""stages/paper_table.py: the plan (which runs, caches and evaluations, in what order), the tables
(means, sample std, paired gains, beat counts), the command line's errors, and one small table end
to end on the generated dataset, reused on a second call."""
from __future__ import annotations

import csv
import time

import pytest

from pipeline.config import ConfigError
from pipeline.experiments import paper_plan as pp
from pipeline.experiments import paper_table as pt
from pipeline.experiments.paper_report import format_mean_std, format_results_md, group_by_path, plot_results, write_csv
from pipeline.experiments.runs import Progress, dataset_matches, mean_std
from pipeline.synthetic.dataset import GENERATOR_VERSION
from stages import paper_table as stage

ALL = list(pp.PATHS)


def actions(plan: pp.TablePlan) -> list[str]:
    return [f"{s.action} {s.target}" for s in plan.steps]


def test_plan_of_one_path_and_seed_trains_teacher_and_baseline_then_caches_then_distils():
    plan = pp.plan_table("tiny", ["lidar_to_camera"], [0], ablation=False)
    assert actions(plan) == ["train tiny_lidar", "evaluate tiny_lidar", "train tiny_camera", "evaluate tiny_camera",
                             "cache lidar", "train tiny_lidar_to_camera", "evaluate tiny_lidar_to_camera"]
    assert plan.caches == {"lidar": "tiny_lidar"}
    assert [(c.role, c.seed, c.run) for c in plan.cells] == [
        ("teacher", 0, "tiny_lidar"), ("baseline", 0, "tiny_camera"), ("student", 0, "tiny_lidar_to_camera")]
    assert plan.runs["tiny_lidar_to_camera"].teacher == "lidar" and plan.runs["tiny_camera"].teacher is None
    assert [s.kind for s in plan.steps if s.action == "train"] == ["train lidar", "train camera",
                                                                   "train camera distilled"]


def test_plan_of_all_paths_trains_each_run_once_and_shares_baselines_between_paths():
    plan = pp.plan_table("tiny", ALL, [0, 1, 2], ablation=True)
    trained = [s.target for s in plan.steps if s.action == "train"]
    assert len(trained) == len(set(trained)) == len(plan.runs)
    assert sorted(e.target for e in plan.steps if e.action == "evaluate") == sorted(trained)
    # three seed-0 detectors (teachers and seed-0 baselines), 2 more baselines and 4 students per extra seed
    assert len(trained) == 3 + 4 + 2 * (2 + 4)
    assert plan.caches == {"lidar": "tiny_lidar", "camera": "tiny_camera", "fusion": "tiny_fusion"}
    base = {(c.path, c.seed): c.run for c in plan.cells if c.role == "baseline"}
    assert base["lidar_to_camera", 2] == base["fusion_to_camera", 2] == "tiny_camera_seed2"
    assert base["camera_to_lidar", 1] == base["fusion_to_lidar", 1] == "tiny_lidar_seed1"
    assert base["camera_to_lidar", 0] == "tiny_lidar"  # the LiDAR teacher doubles as the seed-0 baseline
    teachers = {c.path: c.run for c in plan.cells if c.role == "teacher"}
    assert teachers == {"lidar_to_camera": "tiny_lidar", "fusion_to_camera": "tiny_fusion",
                        "camera_to_lidar": "tiny_camera", "fusion_to_lidar": "tiny_fusion"}
    assert plan.runs["tiny_fusion_to_lidar_seed2"] == pp.Run("tiny_fusion_to_lidar_seed2", "tiny_fusion_to_lidar",
                                                             2, "fusion")
    assert len(plan.cells) == 4 * (1 + 3 + 3)
    # dependencies: a run is evaluated after it trains, a cache follows its teacher, a student its cache
    order = actions(plan)
    for name, run in plan.runs.items():
        assert order.index(f"train {name}") < order.index(f"evaluate {name}")
        if run.teacher:
            assert order.index(f"cache {run.teacher}") < order.index(f"train {name}")
    for m, teacher in plan.caches.items():
        assert order.index(f"train {teacher}") < order.index(f"cache {m}")
    assert order[-1] == "ablation lidar_to_camera"


def test_plan_needs_only_the_detectors_its_paths_use():
    plan = pp.plan_table("tiny", ["fusion_to_lidar"], [1], ablation=False)
    # the fusion teacher (cached), no seed-0 LiDAR baseline (seed 0 is not asked for), no camera at all
    assert [s.target for s in plan.steps if s.action == "train"] == ["tiny_fusion", "tiny_lidar_seed1",
                                                                       "tiny_fusion_to_lidar_seed1"]
    assert plan.caches == {"fusion": "tiny_fusion"}
    assert pp.Run("x", "tiny_lidar", 1).overrides(["train.epochs=1"]) == ["train.epochs=1", "train.seed=1"]
    assert pp.Run("x", "tiny_lidar", 0).overrides(["train.epochs=1"]) == ["train.epochs=1"]


def test_ablation_is_one_sweep_of_the_three_losses_alone_and_all_three_reusing_the_seed0_student():
    plan = pp.plan_table("tiny", ["lidar_to_camera"], [0, 1], ablation=True)
    variants = {v["name"]: v for v in plan.ablation_variants}
    assert sorted(variants) == ["all_losses", "feature_only", "relation_only", "response_only"]
    assert variants["all_losses"]["run"] == "tiny_lidar_to_camera" and variants["all_losses"]["overrides"] == []
    assert "distill.feature.enabled=false" in variants["relation_only"]["overrides"]
    assert all("run" not in v for n, v in variants.items() if n != "all_losses")
    assert plan.steps[-1].eta.count("train camera distilled") == 3  # the all-losses student is the table's
    without_seed0 = pp.plan_table("tiny", ["lidar_to_camera"], [1], ablation=True)
    assert all("run" not in v for v in without_seed0.ablation_variants)
    with pytest.raises(ConfigError, match="lidar_to_camera"):
        pp.plan_table("tiny", ["camera_to_lidar"], [0], ablation=True)


def test_paths_seeds_and_presets_are_checked_with_clear_messages():
    assert pp.parse_paths(" camera_to_lidar,lidar_to_camera ") == ["camera_to_lidar", "lidar_to_camera"]
    assert pp.parse_seeds("0, 2,1") == [0, 2, 1]
    with pytest.raises(ConfigError, match=r"unknown path 'lidar_to_radar'; allowed: lidar_to_camera, fusion_to_camera"):
        pp.parse_paths("lidar_to_camera,lidar_to_radar")
    with pytest.raises(ConfigError, match="twice"):
        pp.parse_paths("lidar_to_camera,lidar_to_camera")
    for bad in ("0,x", "-1", "1.5", ""):
        with pytest.raises(ConfigError, match="non-negative integers"):
            pp.parse_seeds(bad)
    pp.check_preset("nuscenes", ALL)
    with pytest.raises(ConfigError, match=r"--preset 'wee'.* no wee_lidar, wee_camera, wee_lidar_to_camera;"
                                          r" presets with every config these paths need: nuscenes, (.+, )?tiny"):
        pp.check_preset("wee", ["lidar_to_camera"])


@pytest.mark.parametrize("argv, message", [
    (["--paths", "lidar_to_sonar"], "unknown path 'lidar_to_sonar'; allowed: lidar_to_camera"),
    (["--seeds", "0,one"], "--seeds: '0,one' is not a comma-separated list of non-negative integers"),
    (["--preset", "huge"], "--preset 'huge': stages/configs/ has no huge_lidar"),
    (["--set", "train.epochz=1"], "unknown key 'epochz' under train"),
    (["--paths", "camera_to_lidar", "--ablation"], "--ablation needs lidar_to_camera"),
    (["--version", "v1.0-trainval", "--preset", "tiny"], "--version v1.0-trainval needs --dataroot"),
    (["--version", "v1.0-mini"], "--version v1.0-mini needs --dataroot"),  # the small preset generates trainval
])
def test_cli_refuses_bad_input_in_one_line_before_any_work(tmp_path, capsys, argv, message):
    from stages._cli import run_main

    assert run_main(stage.main, ["--out", str(tmp_path / "out"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not (tmp_path / "out" / "nuscenes").exists()


def rows_of(values: dict[tuple[str, int], tuple[float, float]], path: str = "lidar_to_camera") -> list[dict]:
    return [{"path": path, "role": role, "seed": seed, "config": f"tiny_{role}", "mAP": m, "NDS": n, "minutes": 1.0,
             "run": f"{role}{seed}"} for (role, seed), (m, n) in values.items()]


TWO_SEEDS = {("teacher", 0): (0.5, 0.6), ("baseline", 0): (0.1, 0.2), ("baseline", 1): (0.3, 0.4),
             ("student", 0): (0.2, 0.1), ("student", 1): (0.6, 0.7)}


def test_table_gives_mean_and_sample_std_over_seeds_and_gains_paired_by_seed():
    assert mean_std([0.1, 0.3]) == pytest.approx((0.2, 0.1414213))
    assert mean_std([0.5]) == (0.5, None)
    assert format_mean_std([0.1, 0.3]) == "0.2000 +- 0.1414" and format_mean_std([0.5]) == "0.5000"
    assert format_mean_std([0.02, 0.04], signed=True) == "+0.0300 +- 0.0141" and format_mean_std([]) == "-"
    res = group_by_path(rows_of(TWO_SEEDS))[0]
    assert res.gains["mAP"] == pytest.approx([0.1, 0.3]) and res.gains["NDS"] == pytest.approx([-0.1, 0.3])
    md = format_results_md(rows_of(TWO_SEEDS), {"lidar_to_camera": "L -> C"}, before=["# title"], after=["tail"])
    lines = md.splitlines()
    assert lines[0] == "# title" and lines[-1] == "tail"
    assert lines[1] == ("| path | teacher mAP | teacher NDS | baseline mAP | baseline NDS | student mAP | student NDS "
                        "| gain mAP | gain NDS | seeds |")
    assert lines[3] == ("| L -> C | 0.5000 | 0.6000 | 0.2000 +- 0.1414 | 0.3000 +- 0.1414 | 0.4000 +- 0.2828 "
                        "| 0.4000 +- 0.4243 | **+0.2000 +- 0.1414** | **+0.1000 +- 0.2828** | 2 |")
    beat = next(line for line in lines if line.startswith("- L -> C"))
    assert "in 2 of 2 seeds on mAP and 1 of 2 seeds on NDS" in beat
    # the bar: mean gain above twice the larger of the two seed stds (2 x 0.2828, 2 x 0.4243)
    assert "mAP no (+0.2000 vs 0.5657), NDS no (+0.1000 vs 0.8485)" in beat


def test_one_seed_has_no_std_and_no_clear_gain_verdict(tmp_path):
    rows = rows_of({("teacher", 0): (0.5, 0.6), ("baseline", 0): (0.1, 0.2), ("student", 0): (0.15, 0.25)})
    md = format_results_md(rows)
    assert ("| lidar_to_camera | 0.5000 | 0.6000 | 0.1000 | 0.2000 | 0.1500 | 0.2500 | **+0.0500** | **+0.0500** "
            "| 1 |") in md
    assert "in 1 of 1 seeds on mAP and 1 of 1 seeds on NDS." in md and "twice" not in md
    write_csv(tmp_path / "results.csv", rows)
    back = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert [(r["role"], r["seed"], r["mAP"]) for r in back] == [("teacher", "0", "0.5"), ("baseline", "0", "0.1"),
                                                                ("student", "0", "0.15")]
    png = plot_results(tmp_path / "results.png", rows + rows_of(TWO_SEEDS, "fusion_to_camera"))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_outputs_of_a_finished_plan_carry_table_detection_config_and_ablation(tmp_path):
    from pipeline.evaluation.devkit_metrics import detection_config

    plan = pp.plan_table("tiny", ["lidar_to_camera"], [0, 1], ablation=True)
    runner = pt.TableRunner(plan, tmp_path, tmp_path / "nuscenes", "v1.0-mini")
    config = detection_config({"max_range": 40}).serialize()
    scores = {"tiny_lidar": 0.5, "tiny_camera": 0.1, "tiny_camera_seed1": 0.12, "tiny_lidar_to_camera": 0.2,
              "tiny_lidar_to_camera_seed1": 0.22}
    runner.results = {n: ({"mean_ap": v, "nd_score": v + 0.1, "detection_config": config}, 60.0 * i)
                      for i, (n, v) in enumerate(scores.items())}
    runner.cache_seconds = {"lidar": 90.0}
    runner.ablation_rows = [{"variant": "feature_only", "mAP": 0.15, "NDS": 0.3, "minutes": 5.0}]
    md = pt.write_outputs(runner, 600.0).read_text()
    assert "| L -> C | 0.5000 | 0.6000 | 0.1100 +- 0.0141 |" in md and "in 2 of 2 seeds on mAP" in md
    assert "class ranges (m) car 40" in md and "Scored with devkit DetectionConfig" in md
    assert "| feature_only | 0.1500 | 0.3000 | +0.0500 | +0.1000 | 5.0 |" in md
    assert "[ablation/results.md](ablation/results.md)" in md and "lidar 1.5 min" in md
    # training 0+1+2+3+4 min, caching 1.5 min, evaluation (none run here) 0
    assert "when they ran: 11.5 min (training 10.0, caching 1.5, evaluation 0.0;" in md
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert [(r["role"], r["seed"], r["run"], r["minutes"]) for r in rows] == [
        ("teacher", "0", "tiny_lidar", "0.0"), ("baseline", "0", "tiny_camera", "1.0"),
        ("baseline", "1", "tiny_camera_seed1", "2.0"), ("student", "0", "tiny_lidar_to_camera", "3.0"),
        ("student", "1", "tiny_lidar_to_camera_seed1", "4.0")]
    assert (tmp_path / "results.png").stat().st_size > 0


def test_eta_adds_mean_step_times_by_kind_and_names_untimed_kinds():
    p = Progress("[t]", 5)
    p.add("train lidar", 300.0)
    p.add("train lidar", 100.0)
    p.add("train camera", 60.0)
    p.add("evaluate", 30.0)
    assert p.estimate("train lidar") == 200.0 and p.estimate("train fusion") == pytest.approx(460 / 3)
    assert p.estimate("train camera distilled") == 60.0  # nearest by word prefix: the camera detector
    p.add("train camera distilled", 90.0)
    assert p.estimate("train camera distilled") == 90.0 and p.estimate("train camera") == 75.0
    assert p.eta(["train camera distilled", "evaluate"]) == "ETA 2.0 min"
    assert p.eta(["evaluate", "cache lidar", "cache camera", "cache lidar"]) == (
        "ETA 0.5 min + 3 steps not timed yet (cache camera, cache lidar)")
    assert Progress("[t]", 1).eta(["cache lidar"]) == "ETA ? + 1 steps not timed yet (cache lidar)"
    assert Progress("[t]", 1).eta([]) == "ETA 0.0 min"  # all that is left is found done


def test_generated_dataset_is_reused_only_when_made_with_the_same_settings():
    meta = {"generator_version": GENERATOR_VERSION, "version": "v1.0-trainval", "seed": 0, "samples_per_scene": 10,
            "image_size": [800, 450], "scenes": ["scene-0001", "scene-0002", "scene-0003"],
            "val_scenes": ["scene-0003"], "camera_trigger": "sweep"}
    assert dataset_matches(meta, dict(version="v1.0-trainval", scenes=3, val_scenes=1, samples_per_scene=10))
    assert dataset_matches(meta, dict(image_size=(800, 450), seed=0))
    assert not dataset_matches(meta, dict(version="v1.0-trainval", scenes=4))
    assert not dataset_matches(meta, dict(seed=0, camera_trigger="keyframe"))
    # A dataset of an older generator (version 1: no tilt, radar or other categories) is made again.
    assert not dataset_matches({**meta, "generator_version": 1}, dict(seed=0))
    assert not dataset_matches({k: v for k, v in meta.items() if k != "generator_version"}, dict(seed=0))
    tiny = pp.table_dataset("tiny")
    mini = {"generator_version": GENERATOR_VERSION, "seed": 0, "samples_per_scene": 10, "camera_trigger": "sweep"}
    assert dataset_matches(mini, tiny | {"version": "v1.0-mini"})
    assert not dataset_matches({**mini, "seed": 1}, tiny)
    # The small presets' table trains on the larger trainval-format set they were tuned on.
    small = pp.table_dataset("small")
    assert small["version"] == "v1.0-trainval" and small["scenes"] == 80 and small["image_size"] == (400, 225)
    assert pp.table_dataset("nuscenes") == tiny


@pytest.mark.slow
def test_one_path_one_seed_end_to_end_then_all_reused(ray_cluster, nusc_root, tmp_path, monkeypatch):
    monkeypatch.setattr(pt, "CACHE_VIEWS", 2)  # replay still needs 2; fewer teacher passes than 4
    out = tmp_path / "table"
    argv = ["--out", str(out), "--paths", "lidar_to_camera", "--seeds", "0", "--no-ablation", "--preset", "tiny",
            "--dataroot", str(nusc_root), "--set", "train.epochs=1", "--set", "train.batch_size=2", "--set",
            "train.precise_bn_batches=2", "--set", "runtime.torch_threads=1"]  # 1 thread: no OpenMP spinning when busy
    t0 = time.perf_counter()
    stage.main(argv)
    first = time.perf_counter() - t0
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [(r["path"], r["role"], r["seed"], r["config"]) for r in rows] == [
        ("lidar_to_camera", "teacher", "0", "tiny_lidar"), ("lidar_to_camera", "baseline", "0", "tiny_camera"),
        ("lidar_to_camera", "student", "0", "tiny_lidar_to_camera")]
    assert all(0.0 <= float(r["mAP"]) <= 1.0 and 0.0 <= float(r["NDS"]) <= 1.0 and float(r["minutes"]) > 0
               for r in rows)
    md = (out / "results.md").read_text()
    assert "| L -> C |" in md and "Scored with devkit DetectionConfig" in md
    assert "the student beat the baseline in" in md
    assert (out / "results.png").read_bytes()[:4] == b"\x89PNG"
    runs = out / "runs"
    stamps = {p: p.stat().st_mtime_ns for p in [*runs.glob("*/model.pt"), *runs.glob("*/eval/metrics_summary.json")]}
    assert len(stamps) == 6

    t0 = time.perf_counter()
    stage.main(argv)
    second = time.perf_counter() - t0
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps, "nothing trained or evaluated again"
    again = list(csv.DictReader(open(out / "results.csv")))
    assert again == rows, "same scores, and each run keeps the minutes recorded when it ran"
    print(f"paper table end to end: first call {first:.0f} s, second call {second:.0f} s")
    assert second < 60

    # The ablation's sweep, cut to its all-losses variant: the table's seed-0 student, found finished.
    grid = tmp_path / "grid.yaml"
    grid.write_text("variants:\n  - {name: all_losses}\n  - {name: baseline, baseline: true}\n")
    monkeypatch.setattr(pp, "ABLATION_GRID", grid)
    stage.main([a if a != "--no-ablation" else "--ablation" for a in argv])
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert "| all_losses | distilled |" in (out / "ablation" / "results.md").read_text()
    assert "| all_losses | " in (out / "results.md").read_text()
    assert not (out / "ablation" / "all_losses").exists() and not (out / "ablation" / "baseline").exists()
