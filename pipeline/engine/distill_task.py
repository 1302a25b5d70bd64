"""Distillation training task for pipeline.engine.train_loop: a student detector trained on its detection
loss plus the UniDistill losses against a teacher's maps (spec §2, DESIGN §3.4-3.5).

Teacher maps come from one of two sources:
- cached: read per sample from a teacher-target cache in the DataLoader workers; the student's BEV
  augmentation follows the cache's view policy (replay a stored view, canonical view only, or a
  fresh augmentation with the cached maps warped to it). Replay walks each sample's K views in
  turn from a seeded start, so a view never repeats within K epochs (K = epochs: a fresh exact
  view every epoch). A keypoint cache gives the teacher at the GT keypoints and response cells only
  (pipeline/cache/keypoints.py), aligned here with the sample's own boxes;
- online: the frozen teacher (eval mode, no gradients) runs on the same batch, as the original did.

The adaptation layers live in the task's `extra` modules: trained, checkpointed, never exported.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, default_collate

from models.bev_grid import BEVGrid
from models.classes import CLASS_NAMES
from models.detector import BEVDetector, build_detector
from pipeline.cache.keypoints import teacher_at_boxes
from pipeline.cache.reader import CacheReader, loader_worker_init
from pipeline.cache.schema import CacheError, CacheMismatchError, channel_layout
from pipeline.cache.warp import warp_teacher_maps
from pipeline.config import ConfigError, diff_keys
from pipeline.data.collate import collate
from pipeline.data.dataset import DetectionDataset
from pipeline.data.loading import sweep_padding
from pipeline.data.sample import Sample
from pipeline.engine.comm import mean_over_workers
from pipeline.engine.distill_config import build_distill_loss, resolve_distill_config
from pipeline.engine.train_loop import TrainTask, unwrap
from pipeline.model_files import load_detector, read_model_file

MAPS = ("low", "high", "heatmap", "regression")
VIEW_POLICIES = ("auto", "replay", "canonical", "warp")
# Teacher input settings an online teacher must share with the student's data pipeline.
SHARED_INPUTS = ("cameras", "lidar_sweeps", "image_size", "image_mean", "image_std")


def resolve_view_policy(policy: str, views: int, student_augments: bool) -> str:
    """The concrete policy for a cache of `views` views ('replay', 'canonical' or 'warp')."""
    if policy not in VIEW_POLICIES:
        raise ConfigError(f"distill.view_policy: {policy!r} is not one of {VIEW_POLICIES}")
    if policy == "auto":
        if views > 1:
            return "replay"
        return "warp" if student_augments else "canonical"
    if policy == "replay" and views < 2:
        raise ConfigError("distill.view_policy replay needs a cache with --views > 1 (this cache has 1 view); "
                          "use warp or canonical")
    return policy


def replay_view(seed: int, epoch: int, item: int, views: int) -> int:
    """The stored view item `item` replays in `epoch`: a seeded start per item, then the next view
    each epoch, so that any K consecutive epochs see all K views once."""
    start = int(np.random.default_rng([int(seed), int(item), 2]).integers(0, views))
    return (start + int(epoch)) % views


def check_keypoint_cache(reader: CacheReader, cfg: Mapping[str, Any], policy: str, settings: Mapping[str, Any]) -> None:
    """Refuse a student configuration that would read the teacher outside a keypoint cache's support."""
    why = None
    if policy == "warp":
        why = ("a fresh BEV augmentation (view_policy warp) needs the teacher's whole maps to warp, and a keypoint "
               "cache holds them only at the stored views' boxes: build it with --views K (the student replays "
               "them; K up to the epochs gives a fresh view every epoch), or set distill.view_policy canonical "
               "(no augmentation)")
    elif settings.get("keypoint_transpose"):
        why = "distill.keypoint_transpose samples mirrored keypoints, which the cache did not store"
    elif float(settings["response"]["min_overlap"]) < float(reader.fingerprint["keypoints"]["min_overlap"]):
        why = (f"distill.response.min_overlap {settings['response']['min_overlap']} draws a wider response mask than "
               f"the cache stored cells for ({reader.fingerprint['keypoints']['min_overlap']})")
    elif int(cfg["data"]["min_points_in_box"]) < int(reader.fingerprint["inputs"]["min_points_in_box"]):
        why = (f"data.min_points_in_box {cfg['data']['min_points_in_box']} keeps GT boxes the teacher's filter "
               f"({reader.fingerprint['inputs']['min_points_in_box']}) dropped, so the cache has no keypoints for them")
    if why:
        raise ConfigError(f"cache {reader.uri} has keypoint storage: {why}; or use a dense cache")


def student_expectation(student: BEVDetector) -> dict[str, Any]:
    """The fingerprint fields a cache must share with this student."""
    return {"grid": student.grid.to_dict(), "class_order": list(CLASS_NAMES),
            "channels": channel_layout(student.low_channels, student.high_channels)}


def check_cache_for_student(reader: CacheReader, student: BEVDetector, version: str, split: str,
                            tokens: Sequence[str]) -> None:
    """Refuse a cache that cannot teach this student on this split, naming what differs."""
    reader.check_compatible(student_expectation(student))
    ds = reader.fingerprint["dataset"]
    if (ds["version"], ds["split"]) != (version, split):
        raise CacheMismatchError(f"cache {reader.uri} holds {ds['version']} {ds['split']}, the student trains on "
                                 f"{version} {split}", ["dataset.version", "dataset.split"])
    missing = [t for t in tokens if t not in reader]
    if missing:
        raise CacheError(f"cache {reader.uri} lacks {len(missing)} of the split's {len(tokens)} samples "
                         f"(e.g. {missing[:3]})")


def teacher_widths(reader: CacheReader | None, teacher: BEVDetector | None) -> tuple[int, int]:
    if reader is not None:
        ch = reader.fingerprint["channels"]
        return int(ch["low"]), int(ch["high"])
    return teacher.low_channels, teacher.high_channels


def distill_settings(cfg: Mapping[str, Any], teacher_modality: str, student: BEVDetector,
                     widths: tuple[int, int]) -> dict[str, Any]:
    """The complete `distill` config of a run: per-path defaults filled, channel widths known."""
    section = {k: v for k, v in cfg["distill"].items() if k not in ("view_policy", "teacher_modality")}
    return resolve_distill_config(section, teacher_modality, student.modality,
                                  student_channels=(student.low_channels, student.high_channels),
                                  teacher_channels=widths)


def check_online_teacher(teacher_cfg: Mapping[str, Any], student_cfg: Mapping[str, Any], path: str) -> None:
    """An online teacher sees the student's batches: its input settings and grid must be the student's."""
    def inputs(cfg: Mapping[str, Any]) -> dict[str, Any]:
        return {"grid": cfg["grid"], "data": {**{k: cfg["data"][k] for k in SHARED_INPUTS},
                                              "lidar_sweep_padding": sweep_padding(cfg["data"])}}

    differ = diff_keys(inputs(teacher_cfg), inputs(student_cfg))
    if differ:
        raise CacheMismatchError(f"teacher {path} was built for other inputs than the student's "
                                 f"(differing: {', '.join(differ)})", differ)


class DistillDataset(Dataset):
    """Student training samples, each with its teacher maps when a cache is given (see module docstring)."""

    def __init__(self, base: DetectionDataset, reader: CacheReader | None, policy: str) -> None:
        self.base = base
        self.reader = reader
        self.policy = policy
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.base)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.base.set_epoch(epoch)

    def __getitem__(self, item: int) -> Sample:
        if self.reader is None:
            return self.base.get(item)
        token = self.base.row(item)["token"]
        replay = self.policy == "replay"
        view = replay_view(self.base.seed, self.epoch, item, self.reader.views) if replay else 0
        if self.reader.storage == "keypoints":
            row = self.reader.read_keypoints(token, view)
            sample = self.base.get(item, bda=row["bda"] if replay else np.eye(4))
            sample["teacher"] = teacher_at_boxes(row, sample["gt_boxes"],
                                                 f"cache {self.reader.uri}, sample {token}, view {view}")
            return sample
        maps = self.reader.read_tensors(token, view, MAPS)  # stored precision, with the view's stored BDA
        # replay: the stored view's BDA; canonical: none; warp (None): the student's own fresh
        # augmentation, the maps follow in the loss
        bda = maps["bda"] if replay else np.eye(4) if self.policy == "canonical" else None
        sample = self.base.get(item, bda=bda)
        sample["teacher"] = {k: maps[k] for k in MAPS}
        return sample


def collate_with_teacher(samples: list[Sample]) -> dict[str, Any]:
    """`collate`, plus the samples' cached teacher maps stacked [B, C, H, W] in the cache's precision
    (the losses and the warp cast them to float32, a batch at a time).

    The maps are stacked by torch's default_collate, which in a DataLoader worker stacks straight
    into shared memory: one copy per sample fewer than stacking and then sharing.
    """
    teachers = [s.pop("teacher", None) for s in samples]
    batch = collate(samples)
    if teachers[0] is not None and "response_cells" in teachers[0]:
        batch["teacher"] = collate_keypoint_teachers(teachers, batch["gt_boxes"].shape[1])
    elif teachers[0] is not None:
        batch["teacher"] = {k: default_collate([t[k] for t in teachers]) for k in MAPS}
    return batch


def _pad_stack(tensors: list[torch.Tensor], length: int, fill: float) -> torch.Tensor:
    """Stack [L_i, ...] tensors into [B, length, ...], padding the first dimension with `fill`."""
    out = tensors[0].new_full((len(tensors), length, *tensors[0].shape[1:]), fill)
    for i, t in enumerate(tensors):
        out[i, :len(t)] = t
    return out


def collate_keypoint_teachers(teachers: list[dict[str, torch.Tensor]], boxes: int) -> dict[str, torch.Tensor]:
    """Keypoint-cache targets of a batch: keypoint samples and relations padded like gt_boxes ([B, M_max, 9, C]),
    response cells padded to the batch's most cells ([B, N_max], -1) with their values ([B, N_max, C])."""
    cells = max(len(t["response_cells"]) for t in teachers)
    out = {k: _pad_stack([t[k] for t in teachers], boxes, 0) for k in ("low_keypoints", "high_relations")}
    out["response_cells"] = _pad_stack([t["response_cells"] for t in teachers], cells, -1)
    for k in ("heatmap_max_cells", "regression_cells"):
        out[k] = _pad_stack([t[k] for t in teachers], cells, 0)
    return out


class DistillLosses:
    """(student, extra, batch) -> detection losses + UniDistill losses, with 'loss' their total."""

    def __init__(self, grid: BEVGrid, teacher: BEVDetector | None, warp: bool) -> None:
        self.grid = grid
        self.teacher = teacher
        self.warp = warp

    def __call__(self, model: nn.Module, extra: nn.ModuleDict, batch: dict) -> dict[str, torch.Tensor]:
        out = model(batch)
        det = unwrap(model).loss(batch, out, reduce_count=mean_over_workers)
        if self.teacher is not None:
            with torch.no_grad():
                teacher = self.teacher(batch)
        else:
            teacher = batch["teacher"]  # maps, or a keypoint cache's samples (never warped: refused in planning)
            if self.warp:
                teacher = warp_teacher_maps(teacher, batch["bda"], self.grid)
        kd = extra["distill"](out, teacher, batch["gt_boxes"], batch["gt_mask"], reduce_count=mean_over_workers)
        losses = {f"det_{k}" if k != "loss" else "det": v for k, v in det.items()}
        losses.update(kd)
        losses["loss"] = det["loss"] + kd["distill"]
        return losses


def distill_task(loop_config: Mapping[str, Any], device: torch.device) -> TrainTask:
    """Train the config's detector as a UniDistill student (loop config keys: cache or teacher)."""
    cfg = loop_config["cfg"]
    student = build_detector(cfg, device)
    reader = CacheReader(loop_config["cache"]) if loop_config.get("cache") else None
    teacher = None
    if reader is None:
        teacher, _ = load_detector(loop_config["teacher"], device=device)
        teacher.eval().requires_grad_(False)
    needs_images = student.modality != "lidar" or (teacher is not None and teacher.modality != "lidar")
    base = DetectionDataset(loop_config["dataroot"], loop_config["version"], loop_config["split"], cfg, train=True,
                            seed=int(cfg["train"]["seed"]),
                            with_images=needs_images, index=loop_config.get("index"))
    policy = loop_config["view_policy"]
    dataset = DistillDataset(base, reader, policy)
    losses = DistillLosses(student.grid, teacher, warp=reader is not None and policy == "warp")
    extra = nn.ModuleDict({"distill": build_distill_loss(student.grid, loop_config["distill"])})
    return TrainTask(model=student, dataset=dataset, losses=losses, extra=extra, collate_fn=collate_with_teacher,
                     worker_init_fn=loader_worker_init if reader is not None else None)


def teacher_modality_of(cache: str | None, teacher: str | None) -> str:
    """The teacher's modality, from the cache fingerprint or the teacher's model file."""
    if cache:
        return CacheReader(cache).fingerprint["teacher"]["modality"]
    return read_model_file(teacher)["config"]["model"]["modality"]


def student_augments(cfg: Mapping[str, Any]) -> bool:
    """Whether the config's training BEV augmentation can differ from the identity."""
    b = cfg["data"]["bda"]
    return (any(float(v) != 0 for v in b["rot_lim"]) or any(float(v) != 1 for v in b["scale_lim"])
            or any(float(v) != 0 for v in b["trans_std"]) or float(b["flip_x_prob"]) > 0
            or float(b["flip_y_prob"]) > 0)


def plan_student(cfg: Mapping[str, Any], version: str, split: str, tokens: Sequence[str], cache: str | None = None,
                 teacher: str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Check a student run's targets before anything starts; return (loop config keys, run identity).

    Exactly one of `cache` (cached mode) and `teacher` (online mode) is given. A cache must be
    complete and fit the student (grid, class order, channel layout, split); an online teacher is
    loaded strictly and must share the student's input settings.
    """
    if bool(cache) == bool(teacher):
        raise ConfigError("give exactly one of --cache (cached teacher targets) and --teacher (online teacher)")
    student = build_detector(cfg)
    if cache:
        reader = CacheReader(cache)
        check_cache_for_student(reader, student, version, split, tokens)
        modality, widths = reader.fingerprint["teacher"]["modality"], teacher_widths(reader, None)
        policy = resolve_view_policy(cfg["distill"]["view_policy"], reader.views, student_augments(cfg))
        epochs = int(cfg["train"]["epochs"])
        if policy == "replay" and reader.views > epochs:
            print(f"[student] the cache has {reader.views} views per sample and the run {epochs} epochs: each sample "
                  f"replays {epochs} of them (one per epoch), the other {reader.views - epochs} are never read", flush=True)
        identity = {"cache": str(cache), "cache_fingerprint": reader.fingerprint}
    else:
        model, teacher_cfg = load_detector(teacher)
        check_online_teacher(teacher_cfg, cfg, teacher)
        modality, widths, policy = model.modality, teacher_widths(None, model), "online"
        identity = {"teacher": str(teacher), "teacher_config": teacher_cfg["model"]}
    want = cfg["distill"].get("teacher_modality")
    if want not in (None, modality):
        raise ConfigError(f"config expects a {want} teacher (distill.teacher_modality) but the "
                          f"{'cache' if cache else 'teacher'} holds a {modality} teacher; use the "
                          f"{modality}_to_{student.modality} config")
    settings = distill_settings(cfg, modality, student, widths)
    if cache and reader.storage == "keypoints":
        check_keypoint_cache(reader, cfg, policy, settings)
    loop = {"cache": cache, "teacher": teacher, "view_policy": policy, "distill": settings}
    return loop, {"stage": "train_student", "teacher_modality": modality, "view_policy": policy, **identity}
