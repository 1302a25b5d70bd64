"""The detection head of spec §3.6: a CenterHead with an IoU-aware branch and an FCOS-style
assigner ("CenterHead-IoU-aware"), with its targets, losses and decoding.

Everything spatial goes through one BEVGrid (models/bev_grid.py). Anchors: the original puts its
anchor points at BEV cell *corners*; this project's BEV frame has cell *centres* at
(j + 0.5) * cell, so here the anchor of cell (row i, col j) is its centre from
`BEVGrid.cell_centers()`. A positive's centre offset is (gt - anchor) / cell and decoding adds
offset * cell back to the same anchor, so decoding is the exact inverse of target encoding on
any grid.

Outputs follow the detector contract (DESIGN §3.2): heat-map logits [B, 10, H, W] in CLASS_NAMES
order (the tasks' heat maps concatenated) and regression [B, 66, H, W], per task the 11
channels of models.classes.REGRESSION_CHANNELS, tasks in TASKS order.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from models.bev_grid import BEVGrid
from models.box_ops import aligned_iou_3d, aligned_iou_bev, rotated_nms
from models.classes import NUM_CLASSES, REGRESSION_CHANNELS, REGRESSION_PER_TASK, TASKS
from models.errors import UserError
from models.head_coding import (BOX_CODE_SIZE, IOU_CHANNEL, TASK_OF_CLASS, TASK_OFFSETS, HeadTargets, decode_boxes,
                                encode_boxes, split_heatmap)
from models.layers import conv_bn_relu


# --- layers --------------------------------------------------------------------------------------
class SepHead(nn.Module):
    """One task's branches: for each of reg 2, height 1, dim 3, rot 2, vel 2, iou 1 and hm n_cls,
    Conv3x3 + BN + ReLU then Conv3x3 to the branch's channels. Regression convs are Kaiming-normal
    (fan_out, relu) with zero bias; the heat-map convs keep PyTorch's default init, its output bias
    is hm_bias (as the original's SepHead).

    Args:
        c_in: input channels (the shared conv's output).
        num_classes: classes of this task (heat-map channels).
        c_head: channels of each branch's hidden conv.
        hm_bias: initial bias of the heat-map output (-2.19: sigmoid ~ 0.1).
    Returns (forward): (heat-map logits [B, num_classes, H, W], regression [B, 11, H, W] in
        REGRESSION_CHANNELS order).
    """

    def __init__(self, c_in: int, num_classes: int, c_head: int = 64, hm_bias: float = -2.19) -> None:
        super().__init__()
        outs = dict(REGRESSION_CHANNELS, hm=num_classes)
        self.branches = nn.ModuleDict({name: nn.Sequential(nn.Sequential(*conv_bn_relu(c_in, c_head, inplace=True)),
                                                           nn.Conv2d(c_head, n, 3, padding=1))
                                       for name, n in outs.items()})
        for name, branch in self.branches.items():
            if name == "hm":
                # The heat-map branch keeps PyTorch's default conv init (small outputs), so that its
                # bias sets the initial probabilities to ~sigmoid(hm_bias); Kaiming-normal weights
                # here would give logits of std ~4 around it (spec §3.6: only the other branches).
                nn.init.constant_(branch[-1].bias, hm_bias)
                continue
            for m in branch.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        reg = torch.cat([self.branches[name](x) for name, _ in REGRESSION_CHANNELS], dim=1)  # [B, 11, H, W]
        return self.branches["hm"](x), reg


class CenterHead(nn.Module):
    """CenterHead-IoU-aware (spec §3.6): a shared conv, then one SepHead per class group of TASKS.

    Args:
        grid: the BEV grid of the input maps (H, W, cell centres = anchors).
        c_in: channels of the BEV encoder's output.
        c_shared: channels of the shared Conv3x3 + BN + ReLU (64 in the paper).
        c_head: hidden channels of every branch (64 in the paper).
        num_candidates: k nearest anchors per GT that become candidate positives (9).
        focal_alpha, focal_gamma: the heat-map focal loss (0.25, 2).
        code_weights: L1 weights of the 10 box-code channels ([1] * 8 + [0.2, 0.2]).
        iou3d_weight: weight of the mean (1 - IoU3D) term (5.0) ...
        iou3d_gate: ... added for a task only while its box loss is below this (1.0).
        max_candidates: top-K cells x classes per task kept before NMS at decode (1500).
        score_threshold: decoded boxes need a heat-map score above this (0.1).
        post_center_range: (x_min, y_min, z_min, x_max, y_max, z_max) decoded centres must lie in
            (None: no limit; the paper uses [-61.2, -61.2, -10, 61.2, 61.2, 10]).
        nms_iou_threshold: rotated BEV IoU above which NMS drops a box (0.1).
        iou_rectifier: alpha of the NMS ranking score score^(1 - alpha) * iou^alpha (0.65).
        max_per_task, max_per_sample: boxes kept after NMS per task (100) and per sample (500,
            the nuScenes submission limit).
    Returns (forward): (heat-map logits [B, 10, H, W] in CLASS_NAMES order,
        regression [B, 66, H, W] in REGRESSION_CHANNELS order per task, tasks in TASKS order).
    """

    def __init__(self, grid: BEVGrid, c_in: int, c_shared: int = 64, c_head: int = 64, *,
                 num_candidates: int = 9, focal_alpha: float = 0.25, focal_gamma: float = 2.0,
                 code_weights: Sequence[float] = (1.0,) * 8 + (0.2, 0.2),
                 iou3d_weight: float = 5.0, iou3d_gate: float = 1.0,
                 max_candidates: int = 1500, score_threshold: float = 0.1,
                 post_center_range: Sequence[float] | None = None, nms_iou_threshold: float = 0.1,
                 iou_rectifier: float = 0.65, max_per_task: int = 100, max_per_sample: int = 500) -> None:
        super().__init__()
        if len(code_weights) != BOX_CODE_SIZE:
            raise UserError(f"CenterHead: code_weights needs {BOX_CODE_SIZE} values, got {len(code_weights)}")
        if post_center_range is not None and len(post_center_range) != 6:
            raise UserError(f"CenterHead: post_center_range needs 6 values, got {post_center_range}")
        if num_candidates < 1:
            raise UserError(f"CenterHead: num_candidates must be >= 1, got {num_candidates}")
        self.grid = grid
        self.shared = nn.Sequential(*conv_bn_relu(c_in, c_shared, inplace=True))
        self.tasks = nn.ModuleList(SepHead(c_shared, len(names), c_head) for names in TASKS)
        # Learnable uncertainty weights of (heat map, box, IoU-aware) losses, shared by all tasks.
        self.uncertainty = nn.Parameter(torch.ones(3))
        self.num_candidates = num_candidates
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self.register_buffer("code_weights", torch.tensor(list(code_weights), dtype=torch.float32),
                             persistent=False)
        self.iou3d_weight, self.iou3d_gate = iou3d_weight, iou3d_gate
        self.max_candidates, self.score_threshold = max_candidates, score_threshold
        self.post_center_range = None if post_center_range is None else tuple(float(v) for v in post_center_range)
        self.nms_iou_threshold, self.iou_rectifier = nms_iou_threshold, iou_rectifier
        self.max_per_task, self.max_per_sample = max_per_task, max_per_sample
        xs, ys = grid.cell_centers()
        self.register_buffer("anchor_x", torch.as_tensor(xs, dtype=torch.float32), persistent=False)  # [W]
        self.register_buffer("anchor_y", torch.as_tensor(ys, dtype=torch.float32), persistent=False)  # [H]
        self.register_buffer("task_of_class", torch.tensor(TASK_OF_CLASS), persistent=False)  # [10]

    # --- forward -------------------------------------------------------------------------------
    def forward(self, high: Tensor) -> tuple[Tensor, Tensor]:
        self._check_map(high, None, "high")
        x = self.shared(high)  # [B, c_shared, H, W]
        outs = [task(x) for task in self.tasks]
        return torch.cat([hm for hm, _ in outs], dim=1), torch.cat([reg for _, reg in outs], dim=1)

    def _check_map(self, t: Tensor, channels: int | None, name: str) -> None:
        ok = t.dim() == 4 and t.shape[2:] == (self.grid.H, self.grid.W) and channels in (None, t.shape[1])
        if not ok:
            want = f"[B, {channels if channels is not None else 'C'}, {self.grid.H}, {self.grid.W}]"
            raise ValueError(f"CenterHead: {name} must be {want} for this grid, got {tuple(t.shape)}")

    def _anchors(self, cells: Tensor) -> Tensor:
        """Anchor points [..., 2] (metres) of flat cell indices row * W + col [...]."""
        return torch.stack([self.anchor_x[cells % self.grid.W], self.anchor_y[cells // self.grid.W]], dim=-1)

    # --- targets -------------------------------------------------------------------------------
    @torch.no_grad()
    def get_targets(self, gt_boxes: Tensor, gt_labels: Tensor, gt_mask: Tensor) -> HeadTargets:
        """Assign a batch's ground truth to grid cells (spec §3.6, FCOS-style, anchors at cell centres).

        For every GT the `num_candidates` anchors nearest to its centre are candidate positives of
        its task; each candidate is then assigned to the nearest GT centre of that task.
        Args:
            gt_boxes: [B, M, 9] (x, y, z, dx, dy, dz, yaw, vx, vy) in the augmented LiDAR frame.
            gt_labels: [B, M] int, CLASS_NAMES index, -1 for padding.
            gt_mask: [B, M] bool, False for padding.
        """
        if gt_boxes.dim() != 3 or gt_boxes.shape[2] != 9:
            raise ValueError(f"get_targets: gt_boxes must be [B, M, 9], got {tuple(gt_boxes.shape)}")
        b, m = gt_boxes.shape[:2]
        for name, t in (("gt_labels", gt_labels), ("gt_mask", gt_mask)):
            if t.shape != (b, m):
                raise ValueError(f"get_targets: {name} must be [B, M] = {(b, m)} like gt_boxes, "
                                 f"got {tuple(t.shape)}")
        valid = gt_mask.bool() & (gt_labels >= 0)
        if bool((gt_labels[valid] >= NUM_CLASSES).any()):
            raise ValueError(f"get_targets: gt_labels must be < {NUM_CLASSES} (CLASS_NAMES index) or -1, "
                             f"got {gt_labels[valid].max().item()}")
        grid, device, n_task = self.grid, gt_boxes.device, len(TASKS)
        h, w = grid.H, grid.W
        heat = torch.zeros(b, NUM_CLASSES, h * w, device=device)
        positive = torch.zeros(b, n_task, h * w, dtype=torch.bool, device=device)
        box = torch.zeros(b, n_task, BOX_CODE_SIZE, h * w, device=device)
        gt_index = torch.full((b, n_task, h * w), -1, dtype=torch.long, device=device)
        if bool(valid.any()):
            boxes = gt_boxes.float()
            labels = gt_labels.long().clamp(min=0)
            task = self.task_of_class[labels]  # [B, M]
            cand = self._nearest_cells(boxes[..., :2])  # [B, M, k]
            k = cand.shape[2]
            cand = cand.reshape(b, m * k)
            cand_task = task[:, :, None].expand(b, m, k).reshape(b, m * k)
            cand_ok = valid[:, :, None].expand(b, m, k).reshape(b, m * k)
            # Owner of each candidate: the nearest valid GT centre of the candidate's task.
            d2 = ((self._anchors(cand)[:, :, None, :] - boxes[:, None, :, :2]) ** 2).sum(-1)  # [B, M*k, M]
            same = (task[:, None, :] == cand_task[:, :, None]) & valid[:, None, :]
            owner = d2.masked_fill(~same, float("inf")).argmin(dim=2)  # [B, M*k]
            bi = torch.arange(b, device=device)[:, None].expand(b, m * k)[cand_ok]
            ti, ci, oi = cand_task[cand_ok], cand[cand_ok], owner[cand_ok]  # [P] each
            # A cell named by several GTs gets the same owner each time, so repeated writes agree.
            positive[bi, ti, ci] = True
            gt_index[bi, ti, ci] = oi
            heat[bi, labels[bi, oi], ci] = 1.0
            box[bi, ti, :, ci] = encode_boxes(boxes[bi, oi], self._anchors(ci), grid.cell)
        return HeadTargets(heat.view(b, NUM_CLASSES, h, w), positive.view(b, n_task, h, w),
                           box.view(b, n_task, BOX_CODE_SIZE, h, w), gt_index.view(b, n_task, h, w))

    def _nearest_cells(self, centres: Tensor) -> Tensor:
        """Flat indices [B, M, k] of the k cells whose centres are nearest to each centre [B, M, 2].

        The k nearest cells lie in the k nearest rows and the k nearest columns (a cell outside
        them has k cells of the same column or row at least as near), so only that k x k block
        is ranked: exact, and cheap for any grid size.
        """
        h, w = self.grid.H, self.grid.W
        k = self.num_candidates
        dy, rows = (self.anchor_y - centres[..., 1:2]).abs().topk(min(k, h), dim=-1, largest=False)  # [B, M, kr]
        dx, cols = (self.anchor_x - centres[..., 0:1]).abs().topk(min(k, w), dim=-1, largest=False)  # [B, M, kc]
        d2 = dy[..., :, None] ** 2 + dx[..., None, :] ** 2  # [B, M, kr, kc]
        cells = rows[..., :, None] * w + cols[..., None, :]
        best = d2.flatten(2).topk(min(k, h * w), dim=-1, largest=False).indices
        return cells.flatten(2).gather(2, best)

    # --- losses --------------------------------------------------------------------------------
    def loss_terms(self, heatmap: Tensor, regression: Tensor, targets: HeadTargets,
                   reduce_count: Callable[[Tensor], Tensor] | None = None) -> dict[str, Tensor]:
        """Unweighted loss terms per task, each [T]: heatmap (focal), box (weighted L1),
        iou_aware (L1 to 2 * (IoU - 0.5)), iou3d (mean 1 - IoU3D, 0 while the box loss >= gate).

        All are normalised by the task's positive count, passed through `reduce_count` first (e.g.
        `pipeline.engine.comm.mean_over_workers`) and floored at 1, so a batch without objects gives finite zeros.
        """
        self._check_map(heatmap, NUM_CLASSES, "heatmap")
        self._check_map(regression, REGRESSION_PER_TASK * len(TASKS), "regression")
        if targets.heatmap.shape != heatmap.shape:
            raise ValueError(f"loss_terms: targets are for {tuple(targets.heatmap.shape)} but heatmap is "
                             f"{tuple(heatmap.shape)}")
        b, n_task, hw = heatmap.shape[0], len(TASKS), self.grid.H * self.grid.W
        pos = targets.positive.reshape(b, n_task, hw)
        count = pos.sum(dim=(0, 2)).float()  # [T]
        if reduce_count is not None:
            count = reduce_count(count)
        norm = count.clamp(min=1.0)

        # Heat map: alpha-focal loss on clamped probabilities, summed over cells and classes.
        p = heatmap.float().sigmoid().clamp(1e-4, 1 - 1e-4)
        gt = targets.heatmap
        focal = -(gt * self.focal_alpha * (1 - p) ** self.focal_gamma * torch.log(p)
                  + (1 - gt) * (1 - self.focal_alpha) * p ** self.focal_gamma * torch.log(1 - p))
        per_class = focal.sum(dim=(0, 2, 3))  # [10]
        hm = torch.stack([per_class[TASK_OFFSETS[t]:TASK_OFFSETS[t + 1]].sum() for t in range(n_task)]) / norm

        # Regression at positives: [P, 11] predictions, [P, 10] codes, their task and anchor.
        pred = regression.float().reshape(b, n_task, REGRESSION_PER_TASK, hw).transpose(2, 3)[pos]
        code = targets.box.reshape(b, n_task, BOX_CODE_SIZE, hw).transpose(2, 3)[pos]
        task_of = torch.arange(n_task, device=pos.device)[None, :, None].expand_as(pos)[pos]
        cells = torch.arange(hw, device=pos.device).expand_as(pos)[pos]
        anchors = self._anchors(cells)

        def per_task(values: Tensor) -> Tensor:  # [P, ...] summed per task -> [T, ...]
            return values.new_zeros((n_task,) + values.shape[1:]).index_add_(0, task_of, values)

        l1 = per_task((pred[:, :BOX_CODE_SIZE] - code).abs()) / norm[:, None]  # [T, 10]
        box = (l1 * self.code_weights).sum(dim=1)

        gt_boxes = decode_boxes(code, anchors, self.grid.cell)
        with torch.no_grad():
            iou = aligned_iou_bev(decode_boxes(pred[:, :BOX_CODE_SIZE], anchors, self.grid.cell), gt_boxes)
        iou_aware = per_task((pred[:, IOU_CHANNEL] - 2.0 * (iou - 0.5)).abs()) / norm

        # Yaw only picks the snapping axis in aligned_iou_3d; keep atan2 out of the graph.
        live = torch.cat([pred[:, :6], pred[:, 6:BOX_CODE_SIZE].detach()], dim=1)
        iou3d = per_task(1.0 - aligned_iou_3d(decode_boxes(live, anchors, self.grid.cell), gt_boxes)) / norm
        iou3d = iou3d * (box.detach() < self.iou3d_gate)
        return {"heatmap": hm, "box": box, "iou_aware": iou_aware, "iou3d": iou3d}

    def compute_loss(self, heatmap: Tensor, regression: Tensor, gt_boxes: Tensor, gt_labels: Tensor,
                     gt_mask: Tensor, reduce_count: Callable[[Tensor], Tensor] | None = None) -> dict[str, Tensor]:
        """Named detection losses (scalars) of head outputs against a batch's ground truth.

        heatmap, box, iou_aware: per task 0.5 / p_i^2 * L_i + log(1 + p_i^2) with the learnable
        uncertainty p (spec §3.6), summed over tasks; iou3d: iou3d_weight * the gated 1 - IoU3D
        term, summed over tasks; loss: their sum, the head's training loss. Ground truth as in
        `get_targets`; `reduce_count` as in `loss_terms`.
        """
        targets = self.get_targets(gt_boxes, gt_labels, gt_mask)
        return self.weigh_losses(self.loss_terms(heatmap, regression, targets, reduce_count))

    def weigh_losses(self, terms: dict[str, Tensor]) -> dict[str, Tensor]:
        """The named, weighted losses of `compute_loss` from per-task `loss_terms`, plus their sum 'loss'."""
        p2 = self.uncertainty ** 2
        out = {name: (0.5 / p2[i] * terms[name] + torch.log1p(p2[i])).sum()
               for i, name in enumerate(("heatmap", "box", "iou_aware"))}
        out["iou3d"] = self.iou3d_weight * terms["iou3d"].sum()
        out["loss"] = out["heatmap"] + out["box"] + out["iou_aware"] + out["iou3d"]
        return out

    # --- decoding ------------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, heatmap: Tensor, regression: Tensor) -> list[dict[str, Tensor]]:
        """Detections of each sample from head outputs (spec §3.6 post-processing).

        Per task: sigmoid heat map, top `max_candidates` over classes and cells, boxes decoded at
        their cells' anchors, kept if the score exceeds `score_threshold` and the centre lies in
        `post_center_range`, rotated NMS ranked by score^(1 - a) * iou^a, at most `max_per_task`.
        Then at most `max_per_sample` per sample, best score first.
        Returns: per sample {"boxes": [K, 9] (x, y, z, dx, dy, dz, yaw, vx, vy) in the (augmented)
            LiDAR frame, "scores": [K] heat-map probability, "labels": [K] int64 CLASS_NAMES index}.
        """
        self._check_map(heatmap, NUM_CLASSES, "heatmap")
        self._check_map(regression, REGRESSION_PER_TASK * len(TASKS), "regression")
        b, hw = heatmap.shape[0], self.grid.H * self.grid.W
        per_sample: list[list[tuple[Tensor, Tensor, Tensor]]] = [[] for _ in range(b)]
        reg_all = regression.float().reshape(b, len(TASKS), REGRESSION_PER_TASK, hw)
        for t, hm in enumerate(split_heatmap(heatmap)):
            scores = hm.float().sigmoid().flatten(1)  # [B, n_cls * HW]
            top, idx = scores.topk(min(self.max_candidates, scores.shape[1]), dim=1)  # [B, K]
            cls, cells = idx // hw, idx % hw
            codes = reg_all[:, t].gather(2, cells[:, None, :].expand(-1, REGRESSION_PER_TASK, -1)).transpose(1, 2)
            boxes = decode_boxes(codes.reshape(-1, REGRESSION_PER_TASK), self._anchors(cells).reshape(-1, 2),
                                 self.grid.cell).view(b, -1, 9)  # [B, K, 9]
            iou = (codes[..., IOU_CHANNEL] / 2 + 0.5).clamp(0.0, 1.0)
            rank = top ** (1 - self.iou_rectifier) * iou ** self.iou_rectifier
            keep = (top > self.score_threshold) & self._in_range(boxes)
            for s in range(b):
                sel = keep[s].nonzero().squeeze(1)
                sel = sel[rotated_nms(boxes[s, sel], rank[s, sel], self.nms_iou_threshold, self.max_per_task)]
                per_sample[s].append((boxes[s, sel], top[s, sel], cls[s, sel] + TASK_OFFSETS[t]))
        out = []
        for parts in per_sample:
            boxes, scores, labels = (torch.cat(x) for x in zip(*parts))
            order = scores.argsort(descending=True, stable=True)[:self.max_per_sample]
            out.append({"boxes": boxes[order], "scores": scores[order], "labels": labels[order].long()})
        return out

    def _in_range(self, boxes: Tensor) -> Tensor:
        """Mask [...] of boxes [..., 9] whose centre lies in post_center_range (all True without one)."""
        if self.post_center_range is None:
            return torch.ones(boxes.shape[:-1], dtype=torch.bool, device=boxes.device)
        r = boxes.new_tensor(self.post_center_range)
        return ((boxes[..., :3] >= r[:3]) & (boxes[..., :3] <= r[3:])).all(dim=-1)
