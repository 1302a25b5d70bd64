"""Vectorised ray casting against the ground plane and against solids made of boxes.

Both sensors use the same routine: rays (origin, directions) in the global frame, the first hit
wins (occlusion), and each sensor culls the rays a solid can possibly hit before testing it.
"""
from __future__ import annotations

import numpy as np

NO_HIT = np.inf


def ground_hits(origin: np.ndarray, dirs: np.ndarray) -> np.ndarray:
    """Ray parameter [N] where rays origin [3] + t * dirs [N, 3] meet the ground z = 0 (inf if never)."""
    dz = dirs[:, 2]
    t = np.full(len(dirs), NO_HIT, dtype=dirs.dtype)
    down = dz < -1e-9
    t[down] = -origin[2] / dz[down]
    return t


def into_solid(yaw: float) -> np.ndarray:
    """Rotation [3, 3] from the global frame into the frame of a solid with heading yaw;
    directions [N, 3] go in as dirs @ into_solid(yaw).T."""
    c, s = np.cos(yaw), np.sin(yaw)
    return np.array([[c, s, 0.0], [-s, c, 0.0], [0.0, 0.0, 1.0]])


def to_local(points: np.ndarray, centre: np.ndarray, yaw: float) -> np.ndarray:
    """Global points or directions [..., 3] into a solid's frame (centre [3] = 0 for directions)."""
    c, s = np.cos(yaw), np.sin(yaw)
    p = points - centre
    return np.stack([c * p[..., 0] + s * p[..., 1], -s * p[..., 0] + c * p[..., 1], p[..., 2]], -1)


def box_hits(origin: np.ndarray, dirs: np.ndarray, bounds: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """First hit of rays with a union of axis-aligned boxes (slab method), all in one frame.

    origin [3], dirs [N, 3], bounds [P, 6] (x0, x1, y0, y1, z0, z1).
    Returns t [N] (inf where no box is hit), part [N] (index of the box hit) and face [N]
    (int8: 2 * axis + 1 if the face's outward normal points along +axis, else 2 * axis).
    """
    n = len(dirs)
    t = np.full(n, NO_HIT, dtype=dirs.dtype)
    part = np.zeros(n, dtype=np.int64)
    face = np.zeros(n, dtype=np.int8)
    inv = 1.0 / np.where(dirs == 0.0, 1e-12, dirs)
    rays = np.arange(n)
    if len(bounds) > 1:  # rays that miss the parts' bounding box miss every part
        outer = np.concatenate([bounds[:, 0::2].min(0), bounds[:, 1::2].max(0)])[[0, 3, 1, 4, 2, 5]]
        rays = np.flatnonzero(np.isfinite(_entry(origin, inv, outer[None])[:, 0]))
        if len(rays) == 0:
            return t, part, face
        inv = inv[rays]
    t_enter = _entry(origin, inv, bounds)  # [n, P]
    best = t_enter.argmin(1)
    t_best = t_enter[np.arange(len(rays)), best]
    t[rays], part[rays] = t_best, best
    # The face hit is on the axis whose slab the ray entered last.
    b = bounds[best]                                                          # [n, 6]
    near_planes = np.where(inv > 0, b[:, 0::2], b[:, 1::2]) - origin          # [n, 3]
    axis = (near_planes * inv).argmax(1)
    face[rays] = 2 * axis + (inv[np.arange(len(rays)), axis] < 0)  # a ray going -axis hits the +axis face
    return t, part, face


def _entry(origin: np.ndarray, inv: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """Entry parameter [N, P] of rays (inverse directions inv [N, 3]) into boxes bounds [P, 6];
    inf where the ray misses the box or the box is behind the origin."""
    lo = bounds[:, 0::2] - origin   # [P, 3]
    hi = bounds[:, 1::2] - origin
    t_enter = t_exit = None
    for a in range(3):
        ta = inv[:, a, None] * lo[:, a]   # [N, P]
        tb = inv[:, a, None] * hi[:, a]
        near, far = np.minimum(ta, tb), np.maximum(ta, tb)
        if a == 0:
            t_enter, t_exit = near, far
        else:
            np.maximum(t_enter, near, out=t_enter)
            np.minimum(t_exit, far, out=t_exit)
    t_enter[(t_exit < t_enter) | (t_enter <= 1e-6)] = NO_HIT
    return t_enter


def face_normals(yaw: np.ndarray) -> np.ndarray:
    """Global outward normals [S, 6, 3] of the 6 faces (face codes of box_hits) of solids with yaw [S]."""
    c, s = np.cos(yaw), np.sin(yaw)
    ex = np.stack([c, s, np.zeros_like(c)], -1)   # local +x in global
    ey = np.stack([-s, c, np.zeros_like(c)], -1)
    ez = np.broadcast_to(np.array([0.0, 0.0, 1.0]), ex.shape)
    return np.stack([-ex, ex, -ey, ey, -ez, ez], 1)
