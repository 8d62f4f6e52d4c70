"""Render MPM particles as Gaussians through the splatting rasterizer (shared by the scenes and the viewer)."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from bridge.rasterization import rasterize
from bridge.surface import Gaussians, particles_to_gaussians
from render.camera import Camera, stack_cameras

# colours handed to bodies in the order they were added
PALETTE = np.array([[0.90, 0.35, 0.30], [0.95, 0.80, 0.35], [0.35, 0.60, 0.90], [0.45, 0.80, 0.45],
                    [0.75, 0.45, 0.85], [0.85, 0.85, 0.85]])


def body_colors(body_ids: np.ndarray) -> np.ndarray:
    """(N,) body index per particle -> (N, 3) RGB."""
    return PALETTE[np.asarray(body_ids) % len(PALETTE)]


def shade_by_height(colors: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Darken lower particles a little so shapes read without lighting."""
    y = positions[:, 1]
    t = (y - y.min()) / (y.max() - y.min()).clamp_min(1e-6)
    return colors * (0.65 + 0.35 * t[:, None])


def checker_floor(lower=(0.0, 0.0), upper=(1.0, 1.0), height: float = 0.0, cells: int = 10,
                  samples: int = 8, device=None) -> Gaussians:
    """Flat grey checkerboard on the plane y = height, made of thin Gaussians, so motion reads."""
    u = (torch.arange(cells * samples, dtype=torch.float32) + 0.5) / (cells * samples)
    gu, gv = torch.meshgrid(u, u, indexing="ij")
    x = lower[0] + gu.flatten() * (upper[0] - lower[0])
    z = lower[1] + gv.flatten() * (upper[1] - lower[1])
    means = torch.stack([x, torch.full_like(x, float(height)), z], 1).float()
    spacing = float(upper[0] - lower[0]) / (cells * samples)
    cov = torch.tensor([spacing ** 2, 0.0, 0.0, 1e-8, 0.0, spacing ** 2]).expand(len(x), 6)
    dark = ((gu.flatten() * cells).floor() + (gv.flatten() * cells).floor()) % 2
    shade = (0.82 - 0.12 * dark)[:, None].expand(-1, 3)
    return Gaussians(means.to(device), cov.contiguous().to(device), torch.ones(len(x), device=device),
                     shade.contiguous().to(device))


def render_particles(positions: torch.Tensor, deformation: Optional[torch.Tensor], radius: float,
                     colors: torch.Tensor, camera: Camera, background: Sequence[float] = (1.0, 1.0, 1.0),
                     floor: Optional[Gaussians] = None) -> np.ndarray:
    """(N, 3) positions, (N, 3, 3) F or None, (N, 3) colours -> (H, W, 3) uint8 image.
    ``floor``: extra static Gaussians drawn with the particles (e.g. :func:`checker_floor`)."""
    dev = positions.device
    g = particles_to_gaussians(positions, deformation, radius, shade_by_height(colors, positions))
    if floor is not None:
        g = Gaussians(*(torch.cat([a, b]) for a, b in zip((g.means, g.covars, g.opacities, g.colors),
                                                           (floor.means, floor.covars, floor.opacities, floor.colors))))
    viewmats, Ks = stack_cameras([camera], dev)
    bg = torch.tensor([background], dtype=torch.float32, device=dev)
    with torch.no_grad():
        image, _, _ = rasterize(g.means, None, None, g.opacities, g.colors, viewmats, Ks,
                                camera.width, camera.height, backgrounds=bg, covars=g.covars)
    return (image[0].clamp(0, 1) * 255).to(torch.uint8).cpu().numpy()


def default_camera(width: int = 480, height: int = 360, center=(0.5, 0.25, 0.5)) -> Camera:
    """A three-quarter view of the unit box, y up."""
    return Camera.look_at(eye=(1.3, 0.75, 1.5), target=center, up=(0.0, 1.0, 0.0),
                          width=width, height=height, fov_y_degrees=40.0)
