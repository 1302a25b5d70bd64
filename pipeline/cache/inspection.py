"""Checking and looking at a cache: `verify` (every shard against its recorded checksums),
`describe` (schema, fingerprint, sizes) and `render` (PNG of a sample's cached maps with its GT)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from models.bev_grid import BEVGrid
from pipeline.cache import store
from pipeline.cache.schema import MAP_NAMES, CacheLayout


def verify(uri: str) -> dict[str, Any]:
    """Re-hash every shard's stored objects against its marker.

    Returns {"shards": total, "ok": [...], "bad": {shard: reason}, "missing": [...]}; a shard is
    bad when an object is missing, altered or unreadable, missing when it has no marker.
    """
    group = store.open_cache_group(uri, mode="r")
    layout = CacheLayout.from_dict(group.attrs["layout"])
    markers = store.read_markers(uri)
    ok, bad = [], {}
    for shard, rec in sorted(markers.items()):
        now = store.shard_checksums(uri, shard)
        differ = [name for name in store.ARRAY_NAMES if now.get(name) != rec["checksums"].get(name)]
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
    for name in (*MAP_NAMES, "bda"):
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


def render(uri: str, token: str, view: int, out_path: str | Path, gt_boxes: np.ndarray | None = None) -> Path:
    """PNG of one cached view: low and high feature magnitude, class-max heat map, with GT boxes."""
    from pipeline.cache.reader import CacheReader
    from pipeline.evaluation.visualize import render_bev_maps

    reader = CacheReader(uri)
    maps = reader.read(token, view)
    grid = BEVGrid.from_config(reader.fingerprint["grid"])
    heat = 1.0 / (1.0 + np.exp(-maps["heatmap"].max(axis=0)))
    panels = [("low |mean|", np.abs(maps["low"]).mean(axis=0)), ("high |mean|", np.abs(maps["high"]).mean(axis=0)),
              ("heat map (class max)", heat)]
    return render_bev_maps(out_path, grid, panels, gt_boxes)


def run_check(uri: str, verify_cache: bool = False, describe_cache: bool = False, render_token: str | None = None,
              view: int = 0, out_path: str | Path = "cache_render.png") -> int:
    """`stages/cache_teacher.py --verify | --inspect | --render`: print the report; exit status 1
    when --verify finds a bad or missing shard, else 0."""
    if verify_cache:
        report = verify(uri)
        print(format_verify(report))
        return 1 if report["bad"] or report["missing"] else 0
    if describe_cache:
        print(format_describe(describe(uri)))
    if render_token:
        print(f"wrote {render(uri, render_token, view, out_path)}")
    return 0
