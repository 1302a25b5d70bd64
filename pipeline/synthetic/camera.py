"""Camera images rendered by casting one ray per pixel into the world: sky, textured ground with
road markings, clutter with facades, and objects in their class colour, lit by a sun, with a
little haze and sensor noise. Occlusion is exact (first hit along each pixel's ray).

Besides the image, a render returns which solid each pixel shows and its depth, so that the
visibility of every object can be measured (and a test can check what a pixel should show).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.synthetic.raycast import box_hits, face_normals, ground_hits, into_solid, to_local
from pipeline.synthetic.road import MATERIAL_COLOURS
from pipeline.synthetic.world import Solids, World

SKY, GROUND = -2, -1  # owner ids of pixels that show no solid
_HORIZON = np.array([205.0, 214.0, 224.0])
_ZENITH = np.array([105.0, 145.0, 205.0])
_WINDOW = np.array([62.0, 78.0, 96.0])
_HAZE_DISTANCE = 350.0  # m; haze mixes in 1 - exp(-depth / this) of the horizon colour
_NOISE = 2.0            # per-pixel sensor noise (standard deviation, 0-255 scale)
_NEAR = 0.05            # m
_EDGES = np.array([(0, 1), (1, 2), (2, 3), (3, 0), (4, 5), (5, 6), (6, 7), (7, 4), (0, 4), (1, 5), (2, 6), (3, 7)])
JPEG_QUALITY = 90


@dataclass
class CameraFrame:
    """A rendered image and what each pixel shows."""

    rgb: np.ndarray        # uint8 [H, W, 3]
    owner: np.ndarray      # int32 [H, W]: SKY, GROUND, or solid index (objects first, then clutter)
    depth: np.ndarray      # float32 [H, W] camera-frame z of the surface seen (inf for sky)
    footprint: np.ndarray  # int64 [num_objects] pixels each object covers when nothing is in front of it


@lru_cache(maxsize=16)
def _pixel_rays(width: int, height: int, fx: float, fy: float, cx: float, cy: float) -> np.ndarray:
    """Rays [H * W, 3] (float32) through the pixel centres, camera frame, scaled to z = 1."""
    u, v = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5)
    rays = np.stack([(u - cx) / fx, (v - cy) / fy, np.ones_like(u)], -1).reshape(-1, 3).astype(np.float32)
    rays.setflags(write=False)
    return rays


_NOISE_BANK_SIZE = 1 << 22


@lru_cache(maxsize=1)
def _noise_bank() -> np.ndarray:
    """Gaussian sensor noise (float32, 0-255 scale) to cut per-image windows from: drawing a
    fresh window offset per image is as random as new noise for the eye, and much cheaper."""
    bank = np.random.default_rng(20180718).standard_normal(_NOISE_BANK_SIZE, dtype=np.float32) * _NOISE
    bank.setflags(write=False)
    return bank


def _noise(n: int, rng: np.random.Generator) -> np.ndarray:
    """n noise values [n] from a random window of the bank (wrapping round if n is large)."""
    bank = _noise_bank()
    start = int(rng.integers(0, len(bank)))
    idx = (start + np.arange(n)) % len(bank) if n > len(bank) - start else slice(start, start + n)
    return bank[idx]


def _pixel_box(corners_cam: np.ndarray, k: np.ndarray, width: int, height: int) -> tuple[int, int, int, int] | None:
    """Pixel rectangle (u0, u1, v0, v1), end exclusive, that holds the projection of a box given
    by its 8 corners in the camera frame; None if it lies behind the camera or off the image."""
    z = corners_cam[:, 2]
    if z.max() <= _NEAR:
        return None
    front = corners_cam[z > _NEAR]
    a, b = corners_cam[_EDGES[:, 0]], corners_cam[_EDGES[:, 1]]  # clip edges at the near plane
    crossing = (a[:, 2] > _NEAR) != (b[:, 2] > _NEAR)
    if crossing.any():
        a, b = a[crossing], b[crossing]
        f = (_NEAR - a[:, 2]) / (b[:, 2] - a[:, 2])
        front = np.concatenate([front, a + f[:, None] * (b - a)])
    uv = (front @ k.T)[:, :2] / front[:, 2:3]
    u0, v0 = np.floor(uv.min(0)).astype(int)
    u1, v1 = np.ceil(uv.max(0)).astype(int) + 1
    u0, v0, u1, v1 = max(u0, 0), max(v0, 0), min(u1, width), min(v1, height)
    if u0 >= u1 or v0 >= v1:
        return None
    return u0, u1, v0, v1


def render(world: World, t: float, channel: str, image_size: tuple[int, int],
           rng: np.random.Generator) -> CameraFrame:
    """Render camera `channel` at time t (s) as an image of size (W, H)."""
    width, height = image_size
    k = world.rig.camera(channel).intrinsic_for(image_size)
    origin, rot = world.sensor_pose(world.rig.camera(channel), t)
    rays_cam = _pixel_rays(width, height, k[0, 0], k[1, 1], k[0, 2], k[1, 2])
    dirs = rays_cam @ rot.T.astype(np.float32)            # [HW, 3] global, camera z = 1
    depth = ground_hits(origin, dirs)                     # [HW] camera z == ray parameter
    owner = np.where(np.isfinite(depth), GROUND, SKY).astype(np.int32)
    part = np.zeros(len(dirs), dtype=np.int64)
    face = np.full(len(dirs), 5, dtype=np.int8)           # the ground faces up

    solids = world.solids(t)
    footprint = np.zeros(solids.num_objects, dtype=np.int64)
    corners = (solids.corners - origin) @ rot                 # [S, 8, 3] camera frame
    z = corners[..., 2]
    near = np.maximum(z.min(1), _NEAR)                        # no surface of solid i is nearer
    uv = (corners @ k.T)[..., :2] / np.maximum(z, _NEAR)[..., None]  # [S, 8, 2], right where z > near
    in_front = z.min(1) > _NEAR
    for i in np.argsort(near, kind="stable"):  # front to back, so occluded pixels are skipped early
        if z[i].max() <= _NEAR:
            continue
        if in_front[i]:
            u0, v0 = np.maximum(np.floor(uv[i].min(0)).astype(int), 0)
            u1, v1 = np.minimum(np.ceil(uv[i].max(0)).astype(int) + 1, (width, height))
            if u0 >= u1 or v0 >= v1:
                continue
        else:
            rect = _pixel_box(corners[i], k, width, height)
            if rect is None:
                continue
            u0, u1, v0, v1 = rect
        pix = (np.arange(v0, v1)[:, None] * width + np.arange(u0, u1)[None]).ravel()
        if i >= solids.num_objects:  # skip pixels that already see something nearer than the solid
            pix = pix[depth[pix] > near[i]]
        centre = np.array([solids.centre[i, 0], solids.centre[i, 1], 0.0])
        t_hit, part_hit, face_hit = box_hits(to_local(origin, centre, solids.yaw[i]),
                                             dirs[pix] @ into_solid(solids.yaw[i]).T.astype(np.float32),
                                             solids.bounds[i])
        if i < solids.num_objects:
            footprint[i] = np.isfinite(t_hit).sum()
        closer = t_hit < depth[pix]
        pix = pix[closer]
        depth[pix] = t_hit[closer]
        owner[pix] = i
        part[pix] = part_hit[closer]
        face[pix] = face_hit[closer]

    rgb = _shade(world, solids, origin, dirs, depth, owner, part, face)
    rgb += _noise(rgb.size, rng).reshape(rgb.shape)
    image = np.clip(np.round(rgb), 0, 255).astype(np.uint8).reshape(height, width, 3)
    return CameraFrame(rgb=image, owner=owner.reshape(height, width),
                       depth=depth.astype(np.float32).reshape(height, width), footprint=footprint)


def _shade(world: World, solids: Solids, origin: np.ndarray, dirs: np.ndarray, depth: np.ndarray,
           owner: np.ndarray, part: np.ndarray, face: np.ndarray) -> np.ndarray:
    """Colour [HW, 3] (float32, 0-255) of every pixel."""
    rgb = np.empty((len(dirs), 3), dtype=np.float32)
    sky = np.flatnonzero(owner == SKY)
    d = dirs[sky]
    a = np.clip(2.5 * d[:, 2] / np.sqrt((d * d).sum(1)), 0.0, 1.0)[:, None]
    rgb[sky] = _HORIZON + a * (_ZENITH - _HORIZON)

    ground = np.flatnonzero(owner == GROUND)
    hit = origin[:2] + depth[ground, None] * dirs[ground, :2]
    material, shade = world.ground.lookup(hit)
    rgb[ground] = MATERIAL_COLOURS[material] * (0.95 * shade)[:, None]

    px = np.flatnonzero(owner >= 0)
    ids, faces = owner[px], face[px]
    colour = solids.colours[solids.first[ids] + part[px]]                                   # [n, 3]
    on_facade = np.flatnonzero(solids.facade[ids] & (faces < 4))
    if len(on_facade):  # rows of windows on building walls
        f_px, f_ids = px[on_facade], ids[on_facade]
        hit = origin + depth[f_px, None] * dirs[f_px]
        yaw = solids.yaw[f_ids]
        c, s = np.cos(yaw), np.sin(yaw)
        rel = hit[:, :2] - solids.centre[f_ids]
        along = np.where(faces[on_facade] < 2, -s * rel[:, 0] + c * rel[:, 1], c * rel[:, 0] + s * rel[:, 1]) % 3.0
        height = hit[:, 2] % 3.2
        window = (height > 1.0) & (height < 2.3) & (along > 0.7) & (along < 2.2) & (hit[:, 2] > 0.8)
        colour[on_facade[window]] = _WINDOW
    light = (0.55 + 0.45 * np.clip(face_normals(solids.yaw) @ world.sun, 0.0, None)).astype(np.float32)  # [S, 6]
    rgb[px] = colour * light[ids, faces][:, None]

    haze = -np.expm1(-depth / np.float32(_HAZE_DISTANCE))                    # [HW], 1 for the sky
    haze[sky] = 0.0
    rgb += (_HORIZON.astype(np.float32) - rgb) * haze[:, None]
    return rgb


def write_jpeg(image: np.ndarray, path: Path) -> None:
    """Write an RGB uint8 [H, W, 3] image as JPEG (full-resolution colour, so small objects keep it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
