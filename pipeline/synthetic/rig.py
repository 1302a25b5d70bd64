"""The sensor rig: six cameras and LIDAR_TOP placed like on the nuScenes car (Renault Zoe), with a
small per-scene calibration jitter as real calibrations differ between logs.

Extrinsics are sensor -> ego (translation in metres, rotation matrix). A camera frame has z
forward, x right, y down; LIDAR_TOP has x to the right of the car, y forward, z up (nuScenes).
Intrinsics are the nuScenes values for 1600 x 900 images, scaled to the generated image size.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pyquaternion import Quaternion

CAMERAS = ("CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_FRONT_LEFT", "CAM_BACK", "CAM_BACK_LEFT", "CAM_BACK_RIGHT")
LIDAR = "LIDAR_TOP"
NUSCENES_IMAGE_SIZE = (1600, 900)  # (W, H) of real nuScenes images

# channel: (translation in ego frame, yaw of the optical axis in degrees, focal length, cx, cy)
_CAMERA_SPECS: dict[str, tuple[tuple[float, float, float], float, float, float, float]] = {
    "CAM_FRONT": ((1.70, 0.016, 1.511), 0.0, 1266.4, 816.3, 491.5),
    "CAM_FRONT_RIGHT": ((1.551, -0.493, 1.496), -55.0, 1260.8, 807.4, 495.3),
    "CAM_FRONT_LEFT": ((1.524, 0.495, 1.509), 55.0, 1272.6, 826.6, 479.8),
    "CAM_BACK": ((0.028, 0.003, 1.579), 180.0, 809.2, 829.2, 481.8),
    "CAM_BACK_LEFT": ((1.036, 0.485, 1.591), 110.0, 1256.7, 817.8, 451.9),
    "CAM_BACK_RIGHT": ((1.015, -0.481, 1.562), -110.0, 1259.5, 807.3, 501.2),
}
_LIDAR_TRANSLATION = (0.986, 0.0, 1.840)
_LIDAR_YAW_DEG = -90.0  # LIDAR_TOP x axis points to the car's right
LIDAR_PERIOD_US = 50_000  # one 20 Hz LiDAR revolution
CAMERA_TRIGGERS = ("keyframe", "sweep")


def camera_trigger_offset_us(channel: str) -> int:
    """When a camera fires after its LiDAR key frame, with camera trigger "sweep" (microseconds).

    As on the nuScenes car, a camera is exposed when the rotating LiDAR sweeps across the centre of
    its field of view: here the sweep starts at the key frame's timestamp along LIDAR_TOP's x axis
    and turns clockwise (seen from above) once per LIDAR_PERIOD_US, so the six cameras fire 3-45 ms
    after the key frame, each at its own ego pose.
    """
    swept_deg = (_LIDAR_YAW_DEG - _CAMERA_SPECS[channel][1]) % 360.0
    return int(round(swept_deg / 360.0 * LIDAR_PERIOD_US))


@dataclass(frozen=True)
class Sensor:
    """One calibrated sensor: extrinsics sensor -> ego, intrinsics (cameras only, for 1600x900)."""

    channel: str
    translation: np.ndarray  # [3]
    rotation: np.ndarray     # [3, 3] sensor -> ego
    intrinsic: np.ndarray | None = None  # [3, 3] at NUSCENES_IMAGE_SIZE

    @property
    def quaternion(self) -> list[float]:
        """Rotation as a nuScenes quaternion [w, x, y, z]."""
        return [float(v) for v in Quaternion(matrix=self.rotation, atol=1e-9).elements]

    def intrinsic_for(self, image_size: tuple[int, int]) -> np.ndarray:
        """Camera matrix [3, 3] for images of size (W, H)."""
        if self.intrinsic is None:
            raise ValueError(f"{self.channel} is not a camera")
        sx, sy = image_size[0] / NUSCENES_IMAGE_SIZE[0], image_size[1] / NUSCENES_IMAGE_SIZE[1]
        return np.diag([sx, sy, 1.0]) @ self.intrinsic


@dataclass(frozen=True)
class Rig:
    """The cameras (in CAMERAS order) and the LiDAR of one scene."""

    cameras: tuple[Sensor, ...]
    lidar: Sensor

    def camera(self, channel: str) -> Sensor:
        for cam in self.cameras:
            if cam.channel == channel:
                return cam
        raise KeyError(f"no camera {channel!r}; expected one of {CAMERAS}")


def rotation_zyx(yaw: np.ndarray | float, pitch: np.ndarray | float = 0.0,
                 roll: np.ndarray | float = 0.0) -> np.ndarray:
    """Rotation Rz(yaw) @ Ry(pitch) @ Rx(roll) [..., 3, 3] for angles of any one shape (rad)."""
    yaw, pitch, roll = np.broadcast_arrays(*(np.asarray(a, dtype=np.float64) for a in (yaw, pitch, roll)))
    cy, sy, cp, sp, cr, sr = np.cos(yaw), np.sin(yaw), np.cos(pitch), np.sin(pitch), np.cos(roll), np.sin(roll)
    return np.stack([np.stack([cy * cp, cy * sp * sr - sy * cr, cy * sp * cr + sy * sr], -1),
                     np.stack([sy * cp, sy * sp * sr + cy * cr, sy * sp * cr - cy * sr], -1),
                     np.stack([-sp, cp * sr, cp * cr], -1)], -2)


# Camera axes (x right, y down, z forward) expressed in a forward-looking ego-aligned frame.
_CAMERA_AXES = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])


def make_rig(rng: np.random.Generator, jitter: bool = True) -> Rig:
    """The nuScenes-like rig with small random calibration offsets (about 1 cm, 0.3 degrees)."""
    def noise(scale: float, n: int = 3) -> np.ndarray:
        return rng.normal(0.0, scale, size=n) if jitter else np.zeros(n)

    cameras = []
    for channel in CAMERAS:
        t, yaw, f, cx, cy = _CAMERA_SPECS[channel]
        dyaw, dpitch, droll = np.deg2rad(noise(0.3))
        rotation = rotation_zyx(np.deg2rad(yaw) + dyaw, dpitch, droll) @ _CAMERA_AXES
        k = np.array([[f, 0.0, cx], [0.0, f, cy], [0.0, 0.0, 1.0]])
        cameras.append(Sensor(channel, np.array(t) + noise(0.01), rotation, k))
    dyaw, dpitch, droll = np.deg2rad(noise(0.3))
    lidar = Sensor(LIDAR, np.array(_LIDAR_TRANSLATION) + noise(0.01),
                   rotation_zyx(np.deg2rad(_LIDAR_YAW_DEG) + dyaw, 0.3 * dpitch, 0.3 * droll))
    return Rig(tuple(cameras), lidar)
