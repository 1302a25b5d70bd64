"""The teacher-target cache: sharded Zarr v3 arrays of a frozen teacher's BEV maps (DESIGN §3.4).

schema (layout, fingerprint), store (Zarr group, markers, checksums, manifest), views (replayed
BEV augmentations, foreground tiles), writer (the Ray Data job), reader (what students read),
inspect (verify, inspect, render).
"""
