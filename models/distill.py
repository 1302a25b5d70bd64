"""UniDistill's three distillation losses (spec §2) and their optional adaptation layers (the
`distill` config with the paper's per-path defaults is pipeline/engine/distill_config.py).

    feature  (L_Fea): student low  (-> adapter) vs teacher low,  L1 at 9 keypoints per GT box
    relation (L_Rel): student high (-> adapter) vs teacher high, L1 of 9x9 keypoint cosine relations
    response (L_Resp): class-max heat-map probability and regression, L1 under a Gaussian GT mask

Everything spatial goes through one BEVGrid (DESIGN §3.1): maps are [B, C, H=y, W=x]; keypoints
are sampled at their true (x, y). The original code samples them mirrored across the diagonal
(spec §2.2); `keypoint_transpose=True` reproduces that for comparison. Only GT boxes are used;
rows with gt_mask False are padding and contribute nothing anywhere (unlike the original's
response mask, spec §2.5).

Teacher maps may come from a float16 cache: they are cast to float32 and detached here, so
nothing flows back into a teacher. A keypoint cache gives, instead of maps, the teacher's
low keypoint samples (`low_keypoints` [B, M, 9, C]) and high keypoint relations (`high_relations`
[B, M, 9, 9]), aligned with gt_boxes, and its class-max heat-map logit and regression at the
response mask's cells (`response_cells` [B, N], `heatmap_max_cells` [B, N, 1], `regression_cells`
[B, N, 66]); the losses are then the same sums over the same values. The adaptation layers live in `UniDistillLoss`, not in the
student, so an exported student is the plain detector.
"""
from __future__ import annotations

from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.bev_grid import BEVGrid
from models.box_ops import bev_corners
from models.classes import NUM_CLASSES, NUM_REGRESSION
from models.errors import UserError
from models.gaussian_mask import box_gaussian_mask

ReduceCount = Callable[[Tensor], Tensor]
CHANNEL_KEYS = ("student_low", "student_high", "teacher_low", "teacher_high")

# Keypoint order (spec §2.2): corners c0..c3 of the local offsets (-,-), (-,+), (+,+), (+,-) of
# (dx/2, dy/2), the centre, then the midpoints of edges (0,1), (1,2), (2,3), (0,3).
KEYPOINT_NAMES: tuple[str, ...] = ("c0", "c1", "c2", "c3", "centre", "e01", "e12", "e23", "e03")
# box_ops.bev_corners goes counter-clockwise from (-,-): (-,-), (+,-), (+,+), (-,+). The spec's
# order is that sequence reversed after c0; since both losses are symmetric in a consistent
# keypoint permutation only the documented order depends on this, but we keep the original's.
_SPEC_FROM_BEV_CORNERS = (0, 3, 2, 1)
_EDGES = ((0, 1), (1, 2), (2, 3), (0, 3))

NORM_EPS = 1e-4  # added to the box count, mask sum and feature norms (spec §2.3-2.5)
STUDENT_EPS = 1e-4  # clamp of the student's heat-map probabilities (spec §2.5)


# --- keypoints and sampling ----------------------------------------------------------------------
def box_keypoints(gt_boxes: Tensor) -> Tensor:
    """Metric (x, y) [B, M, 9, 2] of the 9 BEV keypoints (KEYPOINT_NAMES order) of boxes [B, M, >=7].

    Corners come from models.box_ops.bev_corners (sizes taken as magnitudes, rotated
    counter-clockwise by yaw), re-ordered to the spec's order. z is ignored.
    """
    corners = bev_corners(gt_boxes)[..., _SPEC_FROM_BEV_CORNERS, :]  # [B, M, 4, 2]
    centre = corners.mean(dim=-2, keepdim=True)  # [B, M, 1, 2]
    mids = torch.stack([(corners[..., i, :] + corners[..., j, :]) / 2 for i, j in _EDGES], dim=-2)  # [B, M, 4, 2]
    return torch.cat([corners, centre, mids], dim=-2)


def sample_at_keypoints(feature: Tensor, keypoints_xy: Tensor, grid: BEVGrid, transpose: bool = False) -> Tensor:
    """Bilinear samples [B, M, 9, C] of a BEV map [B, C, H, W] at metric keypoints [B, M, 9, 2].

    Zero padding outside the map, align_corners=False, so a point at a cell centre reads that
    cell exactly. `transpose=True` passes (y_n, x_n) instead of (x_n, y_n) to grid_sample, the
    original code's swap (spec §2.2), which reads the point mirrored across the diagonal.
    """
    if keypoints_xy.dim() != 4 or keypoints_xy.shape[-1] != 2 or keypoints_xy.shape[0] != feature.shape[0]:
        raise ValueError(f"sample_at_keypoints: keypoints must be [B, M, P, 2] with B = {feature.shape[0]}, "
                         f"got {tuple(keypoints_xy.shape)}")
    b, c = feature.shape[:2]
    m, p = keypoints_xy.shape[1:3]
    if m == 0:
        return feature.new_zeros(b, 0, p, c) + feature.flatten()[:0].sum()  # 0, but in the graph (DDP)
    norm = grid.metric_to_normalized(keypoints_xy.to(feature.dtype))  # [B, M, P, 2] (x_n, y_n)
    if transpose:
        norm = norm.flip(-1)
    out = F.grid_sample(feature, norm, mode="bilinear", padding_mode="zeros", align_corners=False)  # [B, C, M, P]
    return out.permute(0, 2, 3, 1)


# --- the three losses ----------------------------------------------------------------------------
def _box_mean(per_box: Tensor, valid: Tensor, reduce_count: ReduceCount | None) -> Tensor:
    """Sum of per-box losses [B, M] over valid boxes / (box count, reduced across workers, + 1e-4)."""
    count = valid.sum().to(per_box.dtype)
    if reduce_count is not None:
        count = reduce_count(count)
    return torch.where(valid, per_box, torch.zeros_like(per_box)).sum() / (count + NORM_EPS)


def feature_distill_loss(student: Tensor, teacher: Tensor, valid: Tensor,
                         reduce_count: ReduceCount | None = None) -> Tensor:
    """L_Fea (spec §2.3): per box mean |S - T| over keypoints and channels, then the mean over boxes.

    student, teacher: keypoint features [B, M, 9, C]; valid: [B, M] bool.
    """
    per_box = (student - teacher).abs().mean(dim=(2, 3))  # [B, M]
    return _box_mean(per_box, valid.bool(), reduce_count)


def relation_matrix(features: Tensor, eps: float = NORM_EPS) -> Tensor:
    """Cosine similarities [..., P, P] between the P keypoint features [..., P, C], f / (||f|| + eps)."""
    unit = features / (features.norm(dim=-1, keepdim=True) + eps)
    return unit @ unit.transpose(-1, -2)


def relation_distill_loss(student: Tensor, teacher: Tensor, valid: Tensor,
                          reduce_count: ReduceCount | None = None) -> Tensor:
    """L_Rel (spec §2.4): per box mean |R_S - R_T| over the 9 x 9 relation entries, mean over boxes.

    student: [B, M, 9, C_s], teacher: [B, M, 9, C_t] (widths may differ: only relations are compared).
    """
    return relation_distill_loss_to(student, relation_matrix(teacher), valid, reduce_count)


def relation_distill_loss_to(student: Tensor, teacher_relations: Tensor, valid: Tensor,
                             reduce_count: ReduceCount | None = None) -> Tensor:
    """L_Rel against the teacher's relation matrices [B, M, 9, 9] (what a keypoint cache stores);
    student: keypoint features [B, M, 9, C_s]."""
    per_box = (relation_matrix(student) - teacher_relations.detach().float()).abs().mean(dim=(2, 3))  # [B, M]
    return _box_mean(per_box, valid.bool(), reduce_count)


def _response_terms(s_hm: Tensor, s_reg: Tensor, t_hm: Tensor, t_reg: Tensor, temperature: float,
                    teacher_eps: float, student_eps: float) -> tuple[Tensor, Tensor]:
    """Per-cell L_Resp distances (cls [B, N], reg [B, N]) of heat maps [B, 10, N] and regression [B, 66, N]."""
    p_s = s_hm.float().sigmoid().clamp(student_eps, 1 - student_eps)
    p_t = (t_hm.detach().float() / temperature).sigmoid().clamp(teacher_eps, 1 - teacher_eps)
    d_cls = (p_s.max(dim=1).values - p_t.max(dim=1).values).abs()
    d_reg = (s_reg.float() - t_reg.detach().float()).abs().mean(dim=1)
    return d_cls, d_reg


def _mask_norm(mask_sum: Tensor, reduce_count: ReduceCount | None) -> Tensor:
    return (reduce_count(mask_sum) if reduce_count is not None else mask_sum) + NORM_EPS


def response_distill_loss(student_heatmap: Tensor, student_regression: Tensor, teacher_heatmap: Tensor,
                          teacher_regression: Tensor, mask: Tensor, *, temperature: float = 2.0,
                          teacher_eps: float = 1e-4, student_eps: float = STUDENT_EPS,
                          reduce_count: ReduceCount | None = None) -> tuple[Tensor, Tensor]:
    """L_Resp (spec §2.5) as (cls part, reg part), each sum(D * mask) / (mask sum, reduced, + 1e-4).

    cls: D = |max_c clamp(sigmoid(hm_S)) - max_c clamp(sigmoid(hm_T / temperature), teacher_eps)|;
    reg: D = mean over the 66 channels of |R_S - R_T|. Heat maps are logits [B, 10, H, W],
    regression [B, 66, H, W], mask [B, H, W]. Teacher inputs are detached and cast to float32.
    """
    d_cls, d_reg = _response_terms(student_heatmap.flatten(2), student_regression.flatten(2),
                                   teacher_heatmap.flatten(2), teacher_regression.flatten(2),
                                   temperature, teacher_eps, student_eps)  # [B, H*W] each
    mask = mask.flatten(1).to(d_cls.dtype)
    norm = _mask_norm(mask.sum(), reduce_count)
    return (d_cls * mask).sum() / norm, (d_reg * mask).sum() / norm


def response_distill_loss_at_cells(student_heatmap: Tensor, student_regression: Tensor, teacher_heatmap: Tensor,
                                   teacher_regression: Tensor, cells: Tensor, mask: Tensor, *,
                                   temperature: float = 2.0, teacher_eps: float = 1e-4,
                                   student_eps: float = STUDENT_EPS,
                                   reduce_count: ReduceCount | None = None) -> tuple[Tensor, Tensor]:
    """L_Resp with the teacher given only at some cells (a keypoint cache): equal to
    response_distill_loss on maps that hold the teacher's values at those cells, provided the mask
    is zero everywhere else (checked: a mask reaching an unstored cell raises UserError).

    student maps [B, 10 | 66, H, W]; teacher_heatmap [B, N, 10] logits, or [B, N, 1] their class
    max (the loss reads only the class max of a monotone function of them); teacher_regression
    [B, N, 66]; at flat cells [B, N] (row * W + col; -1 = padding); mask [B, H, W].
    """
    valid = cells >= 0  # [B, N]
    idx = cells.clamp(min=0)
    flat_mask = mask.flatten(1).float()  # [B, H*W]
    m = torch.where(valid, flat_mask.gather(1, idx), torch.zeros_like(idx, dtype=flat_mask.dtype))  # [B, N]
    outside = flat_mask.sum(1) - m.sum(1)  # [B] mask weight on cells the teacher was not stored at
    if bool((outside > 1e-3 * flat_mask.sum(1).clamp(min=1)).any()):
        worst = int(outside.argmax())
        raise UserError(f"UniDistillLoss: the response mask of batch sample {worst} reaches cells the keypoint cache "
                        f"did not store (mask weight {float(outside[worst]):.3f} outside them): the student's "
                        f"distill.response.min_overlap must be at least the cache's, and its GT the teacher's")

    def at(maps: Tensor) -> Tensor:  # [B, C, H, W] -> [B, C, N]
        flat = maps.flatten(2)
        return flat.gather(2, idx[:, None].expand(-1, flat.shape[1], -1))

    d_cls, d_reg = _response_terms(at(student_heatmap), at(student_regression), teacher_heatmap.transpose(1, 2),
                                   teacher_regression.transpose(1, 2), temperature, teacher_eps, student_eps)
    norm = _mask_norm(flat_mask.sum(), reduce_count)
    return (d_cls * m).sum() / norm, (d_reg * m).sum() / norm


# --- adaptation ----------------------------------------------------------------------------------
def _adapter(c_in: int, c_out: int, kernel_size: int) -> nn.Conv2d:
    conv = nn.Conv2d(c_in, c_out, kernel_size, padding=kernel_size // 2)
    if c_in == c_out:  # start as the identity: distillation begins as if there were no adapter
        with torch.no_grad():
            conv.weight.zero_()
            conv.weight[:, :, kernel_size // 2, kernel_size // 2] = torch.eye(c_in)
            conv.bias.zero_()
    return conv


class DistillAdaptation(nn.Module):
    """Adapt_1 / Adapt_2 of the paper (spec §2.7): one conv on the student's low map before L_Fea
    and one on its high map before L_Rel, mapping student channels to teacher channels.

    One plain conv layer (no BN, no ReLU), as the paper's "one-layer convolutional network".
    Default 1x1: it changes channels per cell without mixing neighbours, so a keypoint still
    reads the student's feature at that point (a 3x3, like the original's commented-out
    candidates, can borrow from adjacent cells and hide misalignment); 3x3 is allowed. With
    equal widths the conv starts as the identity. Training-only: it lives in UniDistillLoss.

    Args:
        student_low, teacher_low: channels of the low maps (None: no low adapter).
        student_high, teacher_high: channels of the high maps (None: no high adapter).
        kernel_size: 1 or 3.
    """

    def __init__(self, student_low: int | None = None, teacher_low: int | None = None,
                 student_high: int | None = None, teacher_high: int | None = None, kernel_size: int = 1) -> None:
        super().__init__()
        if kernel_size not in (1, 3):
            raise UserError(f"distill.adaptation.kernel_size must be 1 or 3, got {kernel_size}")
        self.low = _adapter(student_low, teacher_low, kernel_size) if student_low is not None else None
        self.high = _adapter(student_high, teacher_high, kernel_size) if student_high is not None else None

    def forward(self, low: Tensor | None, high: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
        """Adapted (low [B, C_t_low, H, W], high [B, C_t_high, H, W]); a map without an adapter passes through."""
        return (self.low(low) if self.low is not None and low is not None else low,
                self.high(high) if self.high is not None and high is not None else high)


# --- the loss module -----------------------------------------------------------------------------
class UniDistillLoss(nn.Module):
    """UniDistill's distillation losses between a student's and a teacher's detector outputs.

    Args:
        grid: the BEV grid of both detectors' maps.
        feature_weight, relation_weight, response_weight: each loss's weight (0: off, reads no maps).
        temperature, teacher_eps, min_overlap: the response loss's teacher temperature, clamp of
            the teacher's probabilities and Gaussian-mask overlap.
        keypoint_transpose: sample keypoints mirrored across the diagonal like the original (spec §2.2).
        adaptation, adaptation_kernel_size: the adaptation layers (one per enabled feature/relation
            loss; `channels` must then give all four widths): put this module's parameters in the
            optimiser next to the student's.
        channels: {student_low, student_high, teacher_low, teacher_high} widths; given ones are checked.
    pipeline.engine.distill_config.build_distill_loss builds one from a `distill` config section.

    forward(student_out, teacher_out, gt_boxes [B, M, 9], gt_mask [B, M], reduce_count=None)
    returns scalars {feature, relation, response_cls, response_reg, distill = their sum}, each
    already weighted; a disabled loss (weight 0 or enabled false) is 0 and reads no maps.
    Outputs are DESIGN §3.2 dicts (low, high, heatmap logits, regression); teacher maps may be
    float16 and never receive gradients. `reduce_count` maps a local count to the count every
    worker should divide by (pipeline.engine.comm.mean_over_workers under DDP).
    """

    def __init__(self, grid: BEVGrid, *, feature_weight: float, relation_weight: float, response_weight: float,
                 temperature: float = 2.0, teacher_eps: float = 1e-4, min_overlap: float = 0.7,
                 keypoint_transpose: bool = False, adaptation: bool = False, adaptation_kernel_size: int = 1,
                 channels: Mapping[str, int | None] | None = None) -> None:
        super().__init__()
        self.grid = grid
        self.weights = {"feature": float(feature_weight), "relation": float(relation_weight),
                        "response": float(response_weight)}
        bad = {k: v for k, v in self.weights.items() if not v >= 0}
        if bad:
            raise UserError(f"UniDistillLoss: weights must be >= 0, got {bad}")
        self.temperature, self.teacher_eps, self.min_overlap = float(temperature), float(teacher_eps), float(min_overlap)
        self.keypoint_transpose = bool(keypoint_transpose)
        self.channels = {k: None for k in CHANNEL_KEYS} | dict(channels or {})
        self.adaptation: DistillAdaptation | None = None
        if adaptation and (self.weights["feature"] > 0 or self.weights["relation"] > 0):
            ch = self.channels
            need = [f"{p}_{lv}" for lv, name in (("low", "feature"), ("high", "relation"))
                    if self.weights[name] > 0 for p in ("student", "teacher") if ch[f"{p}_{lv}"] is None]
            if need:
                raise UserError(f"distill.adaptation is enabled but distill.channels lacks {need}: give the "
                                 f"student and teacher widths (resolve_distill_config(..., student_channels=, "
                                 f"teacher_channels=))")
            low = self.weights["feature"] > 0
            high = self.weights["relation"] > 0
            self.adaptation = DistillAdaptation(ch["student_low"] if low else None, ch["teacher_low"] if low else None,
                                                ch["student_high"] if high else None,
                                                ch["teacher_high"] if high else None,
                                                kernel_size=adaptation_kernel_size)

    def forward(self, student_out: Mapping[str, Tensor], teacher_out: Mapping[str, Tensor], gt_boxes: Tensor,
                gt_mask: Tensor, reduce_count: ReduceCount | None = None) -> dict[str, Tensor]:
        if gt_boxes.dim() != 3 or gt_boxes.shape[2] < 7 or gt_mask.shape != gt_boxes.shape[:2]:
            raise ValueError(f"UniDistillLoss: gt_boxes must be [B, M, 9] and gt_mask [B, M], got "
                             f"{tuple(gt_boxes.shape)} and {tuple(gt_mask.shape)}")
        zero = torch.zeros((), device=gt_boxes.device)
        valid = gt_mask.bool()
        losses = {"feature": zero, "relation": zero, "response_cls": zero, "response_reg": zero}
        transpose = self.keypoint_transpose
        keypoints = box_keypoints(gt_boxes.float()) if self.weights["feature"] or self.weights["relation"] else None

        for name, level in (("feature", "low"), ("relation", "high")):
            if not self.weights[name]:
                continue
            s = self._map(student_out, level, "student", gt_boxes.shape[0]).float()  # [B, C_s, H, W]
            adapter = getattr(self.adaptation, level) if self.adaptation is not None else None
            if adapter is not None:
                s = adapter(s)
            # from a keypoint cache: low samples [B, M, 9, C_t] or high relations [B, M, 9, 9]; else None
            stored = self._teacher_stored(teacher_out, name, gt_boxes.shape[:2])
            t = self._map(teacher_out, level, "teacher", gt_boxes.shape[0]).detach().float() if stored is None else None
            # Relations are 9 x 9 whatever the width, so only feature KD (or an adapter) needs equal widths.
            t_width = t.shape[1] if t is not None else stored.shape[-1] if name == "feature" else s.shape[1]
            if s.shape[1] != t_width and (name == "feature" or adapter is not None):
                raise ValueError(self._width_error(name, level, s.shape[1], t_width, adapter is not None))
            s_kp = sample_at_keypoints(s, keypoints, self.grid, transpose)  # [B, M, 9, C]
            if stored is None:
                with torch.no_grad():
                    t_kp = sample_at_keypoints(t, keypoints, self.grid, transpose)
                    stored = t_kp if name == "feature" else relation_matrix(t_kp)
            if name == "feature":
                losses[name] = self.weights[name] * feature_distill_loss(s_kp, stored, valid, reduce_count)
            else:
                losses[name] = self.weights[name] * relation_distill_loss_to(s_kp, stored, valid, reduce_count)

        if self.weights["response"]:
            b = gt_boxes.shape[0]
            cells = teacher_out.get("response_cells")  # [B, N] from a keypoint cache, else None
            sources = (("student", student_out),) if cells is not None else (("student", student_out),
                                                                              ("teacher", teacher_out))
            maps = {f"{who}_{k}": self._map(out, k, who, b, channels) for who, out in sources
                    for k, channels in (("heatmap", NUM_CLASSES), ("regression", NUM_REGRESSION))}
            mask = box_gaussian_mask(gt_boxes, valid, self.grid, self.min_overlap)  # [B, H, W]
            kw = {"temperature": self.temperature, "teacher_eps": self.teacher_eps, "reduce_count": reduce_count}
            if cells is not None:
                cls, reg = response_distill_loss_at_cells(maps["student_heatmap"], maps["student_regression"],
                                                          teacher_out["heatmap_max_cells"],
                                                          teacher_out["regression_cells"], cells, mask, **kw)
            else:
                cls, reg = response_distill_loss(maps["student_heatmap"], maps["student_regression"],
                                                 maps["teacher_heatmap"], maps["teacher_regression"], mask, **kw)
            losses["response_cls"] = self.weights["response"] * cls
            losses["response_reg"] = self.weights["response"] * reg

        losses["distill"] = losses["feature"] + losses["relation"] + losses["response_cls"] + losses["response_reg"]
        return losses

    def _teacher_stored(self, teacher_out: Mapping[str, Tensor], name: str, bm: tuple[int, int]) -> Tensor | None:
        """What a keypoint cache gives for a loss, as float32 aligned with gt_boxes: `low_keypoints`
        [B, M, 9, C] for L_Fea, `high_relations` [B, M, 9, 9] for L_Rel; None when the teacher gives maps.
        Mirrored keypoints were not stored."""
        key = "low_keypoints" if name == "feature" else "high_relations"
        t = teacher_out.get(key)
        if t is None:
            return None
        if self.keypoint_transpose:
            raise UserError("UniDistillLoss: keypoint_transpose samples mirrored keypoints, which a keypoint cache "
                             "did not store; use a dense cache for that comparison")
        if t.dim() != 4 or tuple(t.shape[:3]) != (*bm, 9) or (name == "relation" and t.shape[3] != 9):
            raise ValueError(f"UniDistillLoss: teacher {key} must be [{bm[0]}, {bm[1]}, 9, "
                             f"{'C' if name == 'feature' else 9}] (aligned with gt_boxes), got {tuple(t.shape)}")
        return t.detach().float()

    def _map(self, out: Mapping[str, Tensor], key: str, who: str, batch: int, channels: int | None = None) -> Tensor:
        """out[key] checked to be [batch, C, H, W] on this grid (C = `channels` or the configured width)."""
        if key not in out or out[key] is None:
            raise KeyError(f"UniDistillLoss: the {who} outputs lack {key!r}, needed by an enabled loss "
                           f"(got keys {sorted(k for k, v in out.items() if v is not None)})")
        t = out[key]
        if channels is None and key in ("low", "high"):
            channels = self.channels[f"{who}_{key}"]
        ok = t.dim() == 4 and t.shape[0] == batch and tuple(t.shape[2:]) == (self.grid.H, self.grid.W)
        if not ok or (channels is not None and t.shape[1] != channels):
            want = f"[{batch}, {channels if channels is not None else 'C'}, {self.grid.H}, {self.grid.W}]"
            raise ValueError(f"UniDistillLoss: {who} {key} must be {want} (batch, configured channels, "
                             f"this grid), got {tuple(t.shape)}")
        return t

    @staticmethod
    def _width_error(name: str, level: str, c_student: int, c_teacher: int, adapted: bool) -> str:
        if adapted:
            return (f"UniDistillLoss: the {level} adapter maps to {c_student} channels but the teacher's "
                    f"{level} map has {c_teacher}: fix distill.channels.teacher_{level}")
        return (f"UniDistillLoss: {name} distillation compares the student's {level} map ({c_student} channels) "
                f"with the teacher's ({c_teacher} channels); enable distill.adaptation (with distill.channels) "
                f"to map {c_student} -> {c_teacher} channels, or distil between detectors of equal width")
