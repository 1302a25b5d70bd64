"""Which scenes a generated dataset holds: for each, its devkit scene name, location, index and ego
speed profile (a `SceneSpec`), for the two versions the generator writes.

- v1.0-mini: the 10 scenes of the devkit's mini splits at fixed locations, with the profiles of
  `_PROFILES` shuffled per seed (two scenes stand still).
- v1.0-trainval: the first N - M names of the devkit's `train` list and the first M of `val`, so
  that the devkit's split logic (`create_splits_scenes`, `DetectionEval(eval_set='val')`) works
  unchanged.
- v1.0-test: the first N names of the devkit's `test` list, without annotations (as the real
  test set: its sample_annotation and instance tables are empty).
Each trainval or test scene draws its location and profile from its own random stream (seed,
name), so a scene is the same whatever else the dataset holds.
"""
from __future__ import annotations

from dataclasses import dataclass

from nuscenes.utils.splits import create_splits_scenes

from pipeline.synthetic.tokens import make_rng

MINI = "v1.0-mini"
TRAINVAL = "v1.0-trainval"
TEST = "v1.0-test"
VERSIONS: tuple[str, ...] = (MINI, TRAINVAL, TEST)
LOCATIONS: tuple[str, ...] = ("boston-seaport", "singapore-onenorth", "singapore-queenstown",
                              "singapore-hollandvillage")
PROFILES: tuple[str, ...] = ("stopped", "cruise", "accelerate", "decelerate")

# The scenes of the devkit's v1.0-mini splits, with the location each is generated at.
SCENES: tuple[tuple[str, str], ...] = (
    ("scene-0061", "singapore-onenorth"),
    ("scene-0103", "boston-seaport"),
    ("scene-0553", "boston-seaport"),
    ("scene-0655", "boston-seaport"),
    ("scene-0757", "boston-seaport"),
    ("scene-0796", "singapore-queenstown"),
    ("scene-0916", "singapore-queenstown"),
    ("scene-1077", "singapore-hollandvillage"),
    ("scene-1094", "singapore-hollandvillage"),
    ("scene-1100", "singapore-hollandvillage"),
)
# Ego speed profiles of the mini scenes (shuffled per seed): two scenes stand still throughout.
_PROFILES = ("stopped", "stopped", "cruise", "cruise", "cruise", "cruise", "accelerate", "accelerate",
             "decelerate", "decelerate")
# Per-scene draw for trainval: the mini mix (20 % stopped, 40 % cruise, 20 % each speed change),
# and about half the scenes in Boston as in nuScenes, the rest spread over Singapore.
_PROFILE_WEIGHTS = (0.2, 0.4, 0.2, 0.2)
_LOCATION_WEIGHTS = (0.5, 0.5 / 3, 0.5 / 3, 0.5 / 3)


@dataclass(frozen=True)
class SceneSpec:
    """One scene to generate. `index` orders the scenes in time (see placement.scene_start_us): the
    position in SCENES for mini, in the devkit's train + val lists for trainval."""

    name: str
    location: str
    index: int
    profile: str


def mini_scenes(seed: int) -> list[SceneSpec]:
    """The 10 v1.0-mini scenes in SCENES order."""
    profiles = make_rng(seed, "profiles").permutation(_PROFILES)
    return [SceneSpec(name, location, i, str(profiles[i])) for i, (name, location) in enumerate(SCENES)]


def trainval_names() -> tuple[list[str], list[str]]:
    """The devkit's train and val scene name lists (700 and 150 names)."""
    splits = create_splits_scenes()
    return list(splits["train"]), list(splits["val"])


def default_val_scenes(scenes: int) -> int:
    """Val scenes of a trainval dataset of `scenes` scenes: a fifth, at least 1, at most what the
    devkit's val list holds (so 850 scenes are the whole train and val lists)."""
    return min(len(trainval_names()[1]), max(1, round(0.2 * scenes)))


def check_scene_counts(version: str, scenes: int | None, val_scenes: int | None) -> tuple[int, int] | None:
    """(scenes, val_scenes) for trainval with the default filled in, (scenes, 0) for test, None for
    mini; ValueError naming the bad value otherwise."""
    if version not in VERSIONS:
        raise ValueError(f"version must be one of {list(VERSIONS)} (the generator writes no other), got {version!r}")
    if version == MINI:
        if scenes is not None or val_scenes is not None:
            raise ValueError(f"{MINI} always holds its 10 fixed scenes: scenes / val_scenes (--scenes / "
                             f"--val-scenes) are for {TRAINVAL} (and --scenes for {TEST}) only, got "
                             f"scenes={scenes!r}, val_scenes={val_scenes!r}")
        return None
    if version == TEST:
        available = len(create_splits_scenes()["test"])
        if val_scenes is not None:
            raise ValueError(f"{TEST} has no val scenes: val_scenes (--val-scenes) is for {TRAINVAL} only, "
                             f"got {val_scenes!r}")
        if isinstance(scenes, bool) or not isinstance(scenes, int) or not 1 <= scenes <= available:
            raise ValueError(f"{TEST} needs the number of scenes (scenes=N, --scenes N), an integer in "
                             f"1..{available} (the devkit's test split), got {scenes!r}")
        return scenes, 0
    train_names, val_names = trainval_names()
    if scenes is None:
        raise ValueError(f"{TRAINVAL} needs the number of scenes (scenes=N, --scenes N)")
    if isinstance(scenes, bool) or not isinstance(scenes, int) or scenes < 2:
        raise ValueError(f"scenes (--scenes) must be an integer >= 2 for {TRAINVAL} (at least one train and one val "
                         f"scene), got {scenes!r}")
    if val_scenes is None:
        val_scenes = default_val_scenes(scenes)
    if isinstance(val_scenes, bool) or not isinstance(val_scenes, int) or not 1 <= val_scenes < scenes:
        raise ValueError(f"val_scenes (--val-scenes) must be an integer in 1..{scenes - 1} for scenes={scenes} "
                         f"(at least one train scene), got {val_scenes!r}")
    if val_scenes > len(val_names):
        raise ValueError(f"val_scenes={val_scenes} is more than the devkit's val split holds "
                         f"({len(val_names)} scenes)")
    if scenes - val_scenes > len(train_names):
        raise ValueError(f"scenes={scenes} with val_scenes={val_scenes} needs {scenes - val_scenes} train scenes, "
                         f"more than the devkit's train split holds ({len(train_names)} scenes); at most "
                         f"{len(train_names) + len(val_names)} scenes in all")
    return scenes, val_scenes


def trainval_scenes(seed: int, scenes: int, val_scenes: int) -> list[SceneSpec]:
    """The first scenes - val_scenes train scenes, then the first val_scenes val scenes (counts as
    `check_scene_counts` accepts them)."""
    train_names, val_names = trainval_names()
    indexed = list(enumerate(train_names))[:scenes - val_scenes]
    indexed += list(enumerate(val_names, start=len(train_names)))[:val_scenes]
    return [_drawn_scene(seed, name, index) for index, name in indexed]


def testset_scenes(seed: int, scenes: int) -> list[SceneSpec]:
    """The first `scenes` names of the devkit's test list (their indices follow the train and val
    lists, so they come later in time)."""
    offset = sum(len(names) for names in trainval_names())
    return [_drawn_scene(seed, name, index)
            for index, name in enumerate(create_splits_scenes()["test"][:scenes], start=offset)]


def _drawn_scene(seed: int, name: str, index: int) -> SceneSpec:
    """A trainval or test scene: location and profile drawn from the scene's own stream."""
    rng = make_rng(seed, "scene", name)
    location = str(rng.choice(LOCATIONS, p=_LOCATION_WEIGHTS))
    profile = str(rng.choice(PROFILES, p=_PROFILE_WEIGHTS))
    return SceneSpec(name, location, index, profile)
