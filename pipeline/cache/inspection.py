"""Checking and looking at a cache: `verify` (every shard against its recorded checksums),
`describe` (schema, fingerprint, sizes) and `render` (PNG of a sample's cached maps with its GT
boxes and their 9 keypoints, for every storage mode)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.bev_grid import BEVGrid
from models.distill import box_keypoints
from pipeline.cache import store
from pipeline.cache.schema import MAP_NAMES, CacheError, CacheLayout, storage_arrays, storage_of


def verify(uri: str) -> dict[str, Any]:
    """Re-hash every shard's stored objects against its marker.

    Returns {"shards": total, "ok": [...], "bad": {shard: reason}, "missing": [...]}; a shard is
    bad when an object is missing, altered or unreadable, missing when it has no marker.
    """
    group = store.open_cache_group(uri, mode="r")
    layout = CacheLayout.from_dict(group.attrs["layout"])
    storage = storage_of(group.attrs.get("fingerprint", {}))
    markers = store.read_markers(uri)
    ok, bad = [], {}
    for shard, rec in sorted(markers.items()):
        now = store.shard_checksums(uri, shard, storage)
        differ = [name for name in storage_arrays(storage) if now.get(name) != rec["checksums"].get(name)]
        if differ:
            bad[shard] = "checksum mismatch in " + ", ".join(
                f"{name} ({'missing' if now.get(name) is None else 'altered'})" for name in differ)
        else:
            ok.append(shard)
    missing = sorted(set(range(layout.num_shards)) - set(markers))
    return {"shards": layout.num_shards, "ok": ok, "bad": bad, "missing": missing}


def format_verify(report: dict[str, Any]) -> str:
    lines = [f"verified {len(report['ok'])} of {report['shards']} shards: {len(report['bad'])} bad, "
             f"{len(report['missing'])} missing"]
    lines += [f"  shard {s}: {why}" for s, why in sorted(report["bad"].items())]
    if report["missing"]:
        lines.append(f"  missing shards: {report['missing'][:20]}{' ...' if len(report['missing']) > 20 else ''}")
    return "\n".join(lines)


def describe(uri: str) -> dict[str, Any]:
    """Schema, fingerprint and sizes of a cache, as a JSON-ready dict."""
    group = store.open_cache_group(uri, mode="r")
    attrs = dict(group.attrs)
    layout = CacheLayout.from_dict(attrs["layout"])
    markers = store.read_markers(uri)
    arrays = {}
    for name in storage_arrays(storage_of(attrs["fingerprint"])):
        a = group[name]
        shards = a.shards if a.shards is not None else a.chunks
        arrays[name] = {"shape": list(a.shape), "chunks": list(a.chunks), "shards": list(shards),
                        "stored_dtype": str(a.dtype)}
    stored = sum(int(m["bytes"]) for m in markers.values())
    samples_done = sum(len(m["samples"]) for m in markers.values())
    raw = sum(layout.channels[n] for n in MAP_NAMES) * layout.height * layout.width * 4 * layout.views
    return {"uri": str(uri), "schema_version": attrs["schema_version"], "complete": bool(attrs.get("complete")),
            "dtype": attrs["dtype"], "compressor": attrs["compressor"], "layout": layout.to_dict(),
            "arrays": arrays, "fingerprint": attrs["fingerprint"], "shards_done": len(markers),
            "bytes": stored, "bytes_per_sample": stored / max(1, samples_done),
            "raw_float32_bytes_per_sample": raw}


def format_describe(info: dict[str, Any]) -> str:
    lay = info["layout"]
    lines = [f"cache {info['uri']} (schema {info['schema_version']}, {'complete' if info['complete'] else 'INCOMPLETE'})",
             f"  {lay['num_samples']} samples x {lay['views']} views, shards of {lay['shard_samples']} samples "
             f"({info['shards_done']} done), tiles of {lay['tile']} cells, {info['dtype']}, {info['compressor']}, "
             f"storage {info['fingerprint']['storage']}"]
    if lay.get("max_boxes"):
        lines.append(f"  keypoint rows padded to {lay['max_boxes']} GT boxes and {lay['max_cells']} response cells "
                     f"(the most of any sample in the split)")
    for name, a in info["arrays"].items():
        lines.append(f"  {name:<10} shape {a['shape']} chunks {a['chunks']} shards {a['shards']} {a['stored_dtype']}")
    ratio = info["raw_float32_bytes_per_sample"] / max(info["bytes_per_sample"], 1e-9)
    lines.append(f"  size {info['bytes'] / 2**20:.1f} MiB, {info['bytes_per_sample'] / 2**20:.3f} MiB/sample "
                 f"({ratio:.1f}x smaller than raw float32)")
    fp = info["fingerprint"]
    lines.append(f"  teacher {fp['teacher']['modality']} sha256 {fp['teacher']['sha256'][:16]}..., "
                 f"dataset {fp['dataset']['version']} {fp['dataset']['split']}, grid {fp['grid']}")
    lines.append("  fingerprint: " + json.dumps(fp, sort_keys=True)[:400] + " ...")
    return "\n".join(lines)


def view_gt_boxes(reader: Any, token: str, view: int, dataroot: str | Path) -> np.ndarray:
    """The GT boxes [M, 9] of a cached view, from the dataset: the sample's boxes through the teacher's
    GT filter, moved by the view's stored BDA, those in the grid's range kept (as the teacher saw them)."""
    from pipeline.data.dataset import view_boxes
    from pipeline.data.index import load_index
    from pipeline.data.loading import filter_gt

    fp = reader.fingerprint
    rows = [r for r in load_index(dataroot, fp["dataset"]["version"], fp["dataset"]["split"]) if r["token"] == token]
    if not rows:
        raise CacheError(f"sample {token} is not in {fp['dataset']['version']} {fp['dataset']['split']} of {dataroot}")
    boxes, _ = filter_gt(rows[0], int(fp["inputs"]["min_points_in_box"]))
    return view_boxes(boxes, reader.bda(token, view), BEVGrid.from_config(fp["grid"]))[0]


def _at_cells(grid: BEVGrid, cells: np.ndarray, values: np.ndarray) -> np.ndarray:
    """A map [H, W] that holds `values` [N] at flat `cells` [N] and 0 elsewhere."""
    out = np.zeros(grid.H * grid.W, dtype=np.float32)
    out[cells] = values
    return out.reshape(grid.H, grid.W)


def _keypoint_panels(reader: Any, token: str, view: int, grid: BEVGrid) -> tuple[list, np.ndarray]:
    """Panels of a keypoint cache (each keypoint's |mean| low feature on its nearest cell; the class-max
    heat map at the stored response cells) and the stored boxes."""
    row = reader.read_keypoints(token, view)
    m, n = (int(v) for v in row["counts"])
    boxes = row["boxes"][:m]
    feats = row["keypoint_low"][:m].float().numpy()  # [M, 9, C]
    kp = box_keypoints(torch.as_tensor(boxes)[None])[0].numpy().reshape(-1, 2)  # [M * 9, 2]
    uv = np.floor(grid.metric_to_cell(kp)).astype(int)
    inside = (uv[:, 0] >= 0) & (uv[:, 0] < grid.W) & (uv[:, 1] >= 0) & (uv[:, 1] < grid.H)
    cells = uv[inside, 1] * grid.W + uv[inside, 0]
    panels = [("low |mean| at keypoints", _at_cells(grid, cells, np.abs(feats).mean(-1).reshape(-1)[inside]))]
    values = row["cell_values"][:n].float().numpy()  # [N, 1 + 66]
    heat = 1.0 / (1.0 + np.exp(-values[:, 0]))
    panels.append(("heat map at stored cells", _at_cells(grid, row["cells"][:n], heat)))
    return panels, boxes


def render(uri: str, token: str, view: int, out_path: str | Path, dataroot: str | Path | None = None) -> Path:
    """PNG of one cached view: low and high feature magnitude and the class-max heat map, with the
    view's GT boxes and their 9 keypoints drawn over every panel (a keypoint cache stores its boxes;
    a dense or foreground cache takes them from `dataroot`, without which none are drawn)."""
    from pipeline.cache.reader import CacheReader
    from pipeline.evaluation.visualize import render_bev_maps

    reader = CacheReader(uri)
    grid = BEVGrid.from_config(reader.fingerprint["grid"])
    if reader.storage == "keypoints":
        panels, boxes = _keypoint_panels(reader, token, view, grid)
    else:
        maps = reader.read(token, view)
        heat = 1.0 / (1.0 + np.exp(-maps["heatmap"].max(axis=0)))
        panels = [("low |mean|", np.abs(maps["low"]).mean(axis=0)), ("high |mean|", np.abs(maps["high"]).mean(axis=0)),
                  ("heat map (class max)", heat)]
        boxes = view_gt_boxes(reader, token, view, dataroot) if dataroot else None
        if boxes is None:
            print("[cache] --render: pass --dataroot to draw the sample's GT boxes and keypoints", flush=True)
    keypoints = box_keypoints(torch.as_tensor(boxes)[None])[0].numpy() if boxes is not None else None
    return render_bev_maps(out_path, grid, panels, boxes, keypoints)


def run_check(uri: str, verify_cache: bool = False, describe_cache: bool = False, render_token: str | None = None,
              view: int = 0, out_path: str | Path = "cache_render.png", dataroot: str | Path | None = None) -> int:
    """`stages/cache_teacher.py --verify | --inspect | --render`: print the report; exit status 1
    when --verify finds a bad or missing shard, else 0."""
    if verify_cache:
        report = verify(uri)
        print(format_verify(report))
        return 1 if report["bad"] or report["missing"] else 0
    if describe_cache:
        print(format_describe(describe(uri)))
    if render_token:
        print(f"wrote {render(uri, render_token, view, out_path, dataroot)}")
    return 0
