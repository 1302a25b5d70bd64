"""The teacher-target cache: sharded Zarr v3 arrays of a frozen teacher's BEV maps (DESIGN §3.4).

schema (layout, channel layout), store (Zarr group, markers, checksums, manifest), views (replayed
BEV augmentations, foreground tiles), plan (the request, the job, the fingerprint, creating or
checking the group), ray_stages (loader, teacher and writer actors), build (the driver:
build_cache), reader (what students read), warp (single-view warping), inspection (verify,
describe, render).
"""
