"""What the paper table runs (pipeline/experiments/paper_table.py): the paths, presets and generated
datasets, and the plan of runs, caches, evaluations and ablation variants for chosen paths and seeds."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from pipeline.config import CONFIG_DIR, ConfigError

PATHS = {  # path -> (teacher modality, student modality), in the paper's order
    "lidar_to_camera": ("lidar", "camera"),
    "fusion_to_camera": ("fusion", "camera"),
    "camera_to_lidar": ("camera", "lidar"),
    "fusion_to_lidar": ("fusion", "lidar"),
}
PATH_LABELS = {"lidar_to_camera": "L -> C", "fusion_to_camera": "L+C -> C", "camera_to_lidar": "C -> L",
               "fusion_to_lidar": "L+C -> L"}
MODALITIES = ("lidar", "camera", "fusion")
# The dataset generated into OUT/nuscenes when no --dataroot is given, per preset
# (pipeline.synthetic.generate's keywords): the mini set for tiny, and for small the trainval-format
# set of README "Toward a setting where detectors learn" (384 train / 96 val samples, 2.5 GiB).
TABLE_DATASETS: dict[str, dict[str, Any]] = {
    "tiny": dict(samples_per_scene=10, seed=0),
    "small": dict(version="v1.0-trainval", scenes=80, val_scenes=16, samples_per_scene=6, image_size=(400, 225),
                  seed=0),
}


def table_dataset(preset: str) -> dict[str, Any]:
    """The generated dataset of a preset's table (the tiny one for presets without their own)."""
    return TABLE_DATASETS.get(preset, TABLE_DATASETS["tiny"])
# Caches as the demo builds them: replayed BEV-augmentation views, foreground tiles.
CACHE_VIEWS, CACHE_STORAGE, CACHE_SHARD_SAMPLES = 4, "foreground", 8
ABLATION_PATH = "lidar_to_camera"
ABLATION_GRID = CONFIG_DIR / "sweeps" / "losses.yaml"
ABLATION_CONCURRENT = 1  # one student at a time: two would only share 2 cores
LOG = "[paper_table]"


@dataclass(frozen=True)
class Run:
    """A training run: its folder under OUT/runs, config and seed; `teacher` is the modality of the
    cache a distilled student reads (None: a detector trained without distillation)."""

    name: str
    config: str
    seed: int
    teacher: str | None = None

    def overrides(self, common: Sequence[str]) -> list[str]:
        """The run's --set overrides: the common ones, then its seed (seed 0 is the config's own)."""
        return [*common, *([f"train.seed={self.seed}"] if self.seed else [])]


@dataclass(frozen=True)
class Step:
    """One step of the table: `action` train | evaluate (a run name), cache (a teacher modality) or
    ablation (a path); `kind` groups steps of one cost for the ETA ('train camera distilled');
    `eta` the kinds of the steps it stands for (default: its own kind)."""

    action: str
    target: str
    kind: str
    eta: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Cell:
    """A row of results.csv: the run that fills `role` of `path` at `seed`."""

    path: str
    role: str
    seed: int
    run: str


@dataclass
class TablePlan:
    preset: str
    paths: list[str]
    seeds: list[int]
    runs: dict[str, Run] = field(default_factory=dict)
    caches: dict[str, str] = field(default_factory=dict)  # teacher modality -> the seed-0 run it caches
    steps: list[Step] = field(default_factory=list)
    cells: list[Cell] = field(default_factory=list)
    ablation_variants: list[dict[str, Any]] = field(default_factory=list)


def parse_paths(text: str) -> list[str]:
    """'lidar_to_camera,camera_to_lidar' -> the paths, checked, in the given order."""
    paths = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in paths if p not in PATHS]
    if bad or not paths:
        raise ConfigError(f"--paths: unknown path {', '.join(map(repr, bad)) or '(none given)'}; "
                          f"allowed: {', '.join(PATHS)}")
    if len(set(paths)) != len(paths):
        raise ConfigError(f"--paths: {text!r} names a path twice")
    return paths


def parse_seeds(text: str) -> list[int]:
    """'0,1,2' -> [0, 1, 2]: distinct non-negative integers."""
    items = [s.strip() for s in text.split(",") if s.strip()]
    if not items or not all(s.isdigit() for s in items):
        raise ConfigError(f"--seeds: {text!r} is not a comma-separated list of non-negative integers (e.g. 0,1,2)")
    seeds = [int(s) for s in items]
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds: {text!r} names a seed twice")
    return seeds


def needed_configs(preset: str, paths: Sequence[str]) -> list[str]:
    """Config names the table of these paths trains from."""
    names = []
    for path in paths:
        for suffix in (*PATHS[path], path):
            if f"{preset}_{suffix}" not in names:
                names.append(f"{preset}_{suffix}")
    return names


def check_preset(preset: str, paths: Sequence[str]) -> None:
    """Raise ConfigError unless stages/configs/ holds every config the paths need under `preset`."""
    missing = [n for n in needed_configs(preset, paths) if not (CONFIG_DIR / f"{n}.yaml").is_file()]
    if missing:
        full = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")
                      if all((CONFIG_DIR / f"{n}.yaml").is_file() for n in needed_configs(p.stem, paths)))
        raise ConfigError(f"--preset {preset!r}: stages/configs/ has no {', '.join(missing)}; "
                          f"presets with every config these paths need: {', '.join(full) or 'none'}")


def run_name(preset: str, suffix: str, seed: int) -> str:
    """Run folder name: tiny_camera, tiny_camera_seed1, tiny_lidar_to_camera_seed2, ..."""
    return f"{preset}_{suffix}" + (f"_seed{seed}" if seed else "")


def plan_table(preset: str, paths: Sequence[str], seeds: Sequence[int], ablation: bool) -> TablePlan:
    """Which runs, caches and evaluations the table needs, in the order they run (no I/O).

    The seed-0 detectors come first (a cache needs its teacher), then the caches, then each seed's
    baselines and students path by path; a baseline shared by two paths of one student modality is
    trained once. The ablation, last, reuses the seed-0 lidar -> camera student as its all-losses row.
    """
    plan = TablePlan(preset, list(paths), list(seeds))

    def add(suffix: str, seed: int, teacher: str | None) -> str:
        name = run_name(preset, suffix, seed)
        if name not in plan.runs:
            plan.runs[name] = Run(name, f"{preset}_{suffix}", seed, teacher)
            kind = f"train {PATHS[suffix][1]} distilled" if teacher else f"train {suffix}"
            plan.steps += [Step("train", name, kind), Step("evaluate", name, "evaluate")]
        return name

    teachers = [m for m in MODALITIES if any(PATHS[p][0] == m for p in paths)]
    for m in MODALITIES:  # seed-0 detectors: teachers, and the seed-0 baselines
        if m in teachers or (0 in seeds and any(PATHS[p][1] == m for p in paths)):
            add(m, 0, None)
    for m in teachers:
        plan.caches[m] = run_name(preset, m, 0)
        plan.steps.append(Step("cache", m, f"cache {m}"))
    for seed in seeds:
        for p in paths:
            add(PATHS[p][1], seed, None)
            add(p, seed, PATHS[p][0])
    for p in paths:
        plan.cells.append(Cell(p, "teacher", 0, plan.caches[PATHS[p][0]]))
        plan.cells += [Cell(p, "baseline", s, run_name(preset, PATHS[p][1], s)) for s in seeds]
        plan.cells += [Cell(p, "student", s, run_name(preset, p, s)) for s in seeds]
    if ablation:
        if ABLATION_PATH not in paths:
            raise ConfigError(f"--ablation needs {ABLATION_PATH} among --paths (its cache and baseline)")
        plan.ablation_variants = ablation_variants(plan)
        new = sum(1 for v in plan.ablation_variants if "run" not in v)
        plan.steps.append(Step("ablation", ABLATION_PATH, "ablation",
                               (f"train {PATHS[ABLATION_PATH][1]} distilled",) * new + ("evaluate",) * new))
    return plan


def ablation_variants(plan: TablePlan) -> list[dict[str, Any]]:
    """The loss ablation's variants (ABLATION_GRID without its baseline: the table has it); the
    all-losses variant names the table's seed-0 student run, which it is, when the table has one."""
    from pipeline.experiments.sweep import read_grid

    student = run_name(plan.preset, ABLATION_PATH, 0)
    out = []
    for v in read_grid(ABLATION_GRID):
        if v["baseline"]:
            continue
        if not v["overrides"] and student in plan.runs:
            v = dict(v, run=student)  # a run name here; made a folder by TableRunner
        out.append(v)
    return out
