"""Pinhole cameras: intrinsics + world-to-camera extrinsics, look-at and orbits, and the matrices the
Inria rasterizer (transposed view / full projection, tan of half FoV) and gsplat (viewmats, Ks) expect.

Camera axes follow OpenCV / COLMAP (x right, y down, z forward); pixel centres sit at +0.5.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass
class Camera:
    """A pinhole camera. world_to_camera: (4, 4) float32 tensor; focal lengths and centre in pixels."""

    width: int
    height: int
    fx: float
    fy: float
    cx: float
    cy: float
    world_to_camera: torch.Tensor
    znear: float = 0.01
    zfar: float = 100.0

    @classmethod
    def from_fov(cls, width: int, height: int, fov_y_degrees: float, world_to_camera: torch.Tensor,
                 znear: float = 0.01, zfar: float = 100.0) -> "Camera":
        """Square pixels, principal point at the image centre."""
        f = 0.5 * height / math.tan(math.radians(fov_y_degrees) / 2)
        return cls(width, height, f, f, width / 2, height / 2, world_to_camera.float(), znear, zfar)

    @classmethod
    def look_at(cls, eye: Sequence[float], target: Sequence[float] = (0.0, 0.0, 0.0),
                up: Sequence[float] = (0.0, 0.0, 1.0), width: int = 640, height: int = 480,
                fov_y_degrees: float = 50.0, znear: float = 0.01, zfar: float = 100.0) -> "Camera":
        """Camera at `eye` looking at `target`, with `up` (world) pointing up in the image."""
        eye_t = torch.tensor(eye, dtype=torch.float64)
        forward = torch.tensor(target, dtype=torch.float64) - eye_t
        forward = forward / forward.norm()
        right = torch.linalg.cross(forward, torch.tensor(up, dtype=torch.float64))
        if right.norm() < 1e-9:
            raise ValueError("up is parallel to the viewing direction")
        right = right / right.norm()
        down = torch.linalg.cross(forward, right)
        R = torch.stack([right, down, forward])  # rows: camera axes in world coordinates
        w2c = torch.eye(4, dtype=torch.float64)
        w2c[:3, :3] = R
        w2c[:3, 3] = -R @ eye_t
        return cls.from_fov(width, height, fov_y_degrees, w2c.float(), znear, zfar)

    @classmethod
    def orbit(cls, count: int, radius: float, elevation_degrees: float = 20.0,
              target: Sequence[float] = (0.0, 0.0, 0.0), up_axis: int = 2, **kwargs) -> list["Camera"]:
        """`count` look-at cameras evenly spaced on a circle around `target` (z up by default)."""
        cams = []
        el = math.radians(elevation_degrees)
        for i in range(count):
            az = 2 * math.pi * i / count
            offset = [radius * math.cos(el) * math.cos(az), radius * math.cos(el) * math.sin(az),
                      radius * math.sin(el)]
            if up_axis != 2:  # rotate the (x, y, z-up) offset so that `up_axis` is up
                offset = [offset[(k - up_axis + 2) % 3] for k in range(3)]
            up = [0.0, 0.0, 0.0]
            up[up_axis] = 1.0
            eye = [t + o for t, o in zip(target, offset)]
            cams.append(cls.look_at(eye, target, up, **kwargs))
        return cams

    # ---- gsplat ---------------------------------------------------------------------------------
    @property
    def viewmat(self) -> torch.Tensor:
        """(4, 4) world-to-camera, gsplat's viewmats[c]."""
        return self.world_to_camera

    @property
    def K(self) -> torch.Tensor:
        """(3, 3) intrinsics, gsplat's Ks[c]."""
        return torch.tensor([[self.fx, 0.0, self.cx], [0.0, self.fy, self.cy], [0.0, 0.0, 1.0]])

    # ---- Inria diff-gaussian-rasterization ---------------------------------------------------------
    @property
    def tanfovx(self) -> float:
        return 0.5 * self.width / self.fx

    @property
    def tanfovy(self) -> float:
        return 0.5 * self.height / self.fy

    @property
    def camera_center(self) -> torch.Tensor:
        """(3,) the camera position in world coordinates (Inria's campos)."""
        R, t = self.world_to_camera[:3, :3], self.world_to_camera[:3, 3]
        return -R.T @ t

    def projection_matrix(self) -> torch.Tensor:
        """(4, 4) OpenGL-style projection (Inria's getProjectionMatrix, z in [0, 1]), column-vector form;
        an off-centre principal point shifts the frustum."""
        n, f = self.znear, self.zfar
        P = torch.zeros(4, 4)
        P[0, 0] = 2 * self.fx / self.width
        P[1, 1] = 2 * self.fy / self.height
        P[0, 2] = 2 * self.cx / self.width - 1
        P[1, 2] = 2 * self.cy / self.height - 1
        P[3, 2] = 1.0
        P[2, 2] = f / (f - n)
        P[2, 3] = -(f * n) / (f - n)
        return P

    @property
    def inria_viewmatrix(self) -> torch.Tensor:
        """(4, 4) Inria's world_view_transform (the transpose of world_to_camera)."""
        return self.world_to_camera.T.contiguous()

    @property
    def inria_projmatrix(self) -> torch.Tensor:
        """(4, 4) Inria's full_proj_transform (world_view_transform @ projection^T)."""
        return (self.projection_matrix() @ self.world_to_camera).T.contiguous()


def stack_cameras(cameras: Sequence[Camera], device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(viewmats (C, 4, 4), Ks (C, 3, 3)) for bridge.rasterize; all cameras must share one image size."""
    sizes = {(c.width, c.height) for c in cameras}
    if len(sizes) != 1:
        raise ValueError(f"cameras of one batch must share an image size, got {sorted(sizes)}")
    viewmats = torch.stack([c.viewmat for c in cameras]).to(device)
    Ks = torch.stack([c.K for c in cameras]).to(device)
    return viewmats, Ks
