"""Render MPM particles as Gaussians through the splatting rasterizer (shared by the scenes and the viewer).

Also the colourings the viewer offers (by body / material, speed, stress) and the export of a
rendered scene as a 3DGS PLY that other splat viewers open.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from bridge.rasterization import rasterize
from bridge.surface import Gaussians, particles_to_gaussians
from render.camera import Camera, stack_cameras
from render.ply import GaussianPly
from render.sh import C0

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


# colour ramp for scalar fields (speed, stress): dark blue -> teal -> yellow (viridis-like anchors)
RAMP = torch.tensor([[0.27, 0.00, 0.33], [0.23, 0.32, 0.55], [0.13, 0.57, 0.55], [0.37, 0.79, 0.38],
                     [0.99, 0.91, 0.14]])


def ramp(values: torch.Tensor, vmax: Optional[float] = None) -> torch.Tensor:
    """(N,) non-negative scalars -> (N, 3) colours; ``vmax`` (default: the 99th percentile) maps to yellow."""
    values = values.float()
    if vmax is None:
        vmax = float(torch.quantile(values, 0.99)) if len(values) else 1.0
    t = (values / max(vmax, 1e-12)).clamp(0, 1) * (len(RAMP) - 1)
    low = t.floor().long().clamp(max=len(RAMP) - 2)
    w = (t - low)[:, None]
    table = RAMP.to(values.device)
    return table[low] * (1 - w) + table[low + 1] * w


def stress_measure(F: torch.Tensor, E: torch.Tensor, nu: torch.Tensor) -> torch.Tensor:
    """(N,) a von Mises-like stress [Pa] from F (N, 3, 3): 2 mu |dev(log sigma)| (Hencky strain),
    with mu from E and nu; cheap and the same for every elastic model, for colouring only."""
    sigma = torch.linalg.svdvals(F.float()).clamp_min(1e-4)
    log_s = sigma.log()
    dev = log_s - log_s.mean(1, keepdim=True)
    mu = E.float() / (2 * (1 + nu.float()))
    return 2 * mu * dev.norm(dim=1) * (1.5 ** 0.5)


def scene_gaussians(positions: torch.Tensor, deformation: Optional[torch.Tensor], radius: float,
                    colors: torch.Tensor, floor: Optional[Gaussians] = None) -> Gaussians:
    """The Gaussians :func:`render_particles` draws: one per particle (cov = F Sigma0 F^T), shaded
    by height, plus ``floor``."""
    g = particles_to_gaussians(positions, deformation, radius, shade_by_height(colors, positions))
    if floor is not None:
        g = Gaussians(*(torch.cat([a, b]) for a, b in zip((g.means, g.covars, g.opacities, g.colors),
                                                           (floor.means, floor.covars, floor.opacities, floor.colors))))
    return g


def gaussians_to_ply(g: Gaussians, min_scale: float = 1e-7) -> GaussianPly:
    """Gaussians (covariance form) -> a 3DGS PLY record (scales, wxyz quaternions, SH degree 0).

    The covariance's eigenvectors give the rotation (made proper), the square roots of its
    eigenvalues the scales; colours become the DC SH coefficient, opacities their logits.
    """
    a, b, c, d, e, f = g.covars.detach().double().cpu().unbind(-1)
    cov = torch.stack([a, b, c, b, d, e, c, e, f], -1).reshape(-1, 3, 3)
    values, vectors = torch.linalg.eigh(cov)
    vectors[:, :, 2] *= torch.sign(torch.linalg.det(vectors))[:, None]  # a rotation, not a reflection
    scales = values.clamp_min(min_scale ** 2).sqrt()
    opacity = g.opacities.detach().double().cpu().clamp(1e-6, 1 - 1e-6)
    return GaussianPly(
        means=g.means.detach().double().cpu().numpy().astype(np.float32),
        sh=((g.colors.detach().double().cpu() - 0.5) / C0)[:, None, :].numpy().astype(np.float32),
        opacity_logits=torch.logit(opacity).numpy().astype(np.float32),
        log_scales=scales.log().numpy().astype(np.float32),
        quats=_matrix_to_quaternion(vectors).numpy().astype(np.float32))


def _matrix_to_quaternion(R: torch.Tensor) -> torch.Tensor:
    """(N, 3, 3) proper rotations -> (N, 4) unit quaternions wxyz (Shepperd's method, branch-free)."""
    m = R
    trace = m[:, 0, 0] + m[:, 1, 1] + m[:, 2, 2]
    candidates = torch.stack([
        torch.stack([1 + trace, m[:, 2, 1] - m[:, 1, 2], m[:, 0, 2] - m[:, 2, 0], m[:, 1, 0] - m[:, 0, 1]], -1),
        torch.stack([m[:, 2, 1] - m[:, 1, 2], 1 + m[:, 0, 0] - m[:, 1, 1] - m[:, 2, 2], m[:, 0, 1] + m[:, 1, 0],
                     m[:, 0, 2] + m[:, 2, 0]], -1),
        torch.stack([m[:, 0, 2] - m[:, 2, 0], m[:, 0, 1] + m[:, 1, 0], 1 - m[:, 0, 0] + m[:, 1, 1] - m[:, 2, 2],
                     m[:, 1, 2] + m[:, 2, 1]], -1),
        torch.stack([m[:, 1, 0] - m[:, 0, 1], m[:, 0, 2] + m[:, 2, 0], m[:, 1, 2] + m[:, 2, 1],
                     1 - m[:, 0, 0] - m[:, 1, 1] + m[:, 2, 2]], -1),
    ], 1)  # row k is 4 q_k q (largest |q_k| is the stable one)
    diag = torch.stack([1 + trace, 1 + m[:, 0, 0] - m[:, 1, 1] - m[:, 2, 2],
                        1 - m[:, 0, 0] + m[:, 1, 1] - m[:, 2, 2], 1 - m[:, 0, 0] - m[:, 1, 1] + m[:, 2, 2]], -1)
    best = diag.argmax(1)
    q = candidates[torch.arange(len(m)), best]
    return torch.nn.functional.normalize(q, dim=1)


def render_gaussians(g: Gaussians, camera: Camera, background: Sequence[float] = (1.0, 1.0, 1.0)) -> np.ndarray:
    """Gaussians -> (H, W, 3) uint8 image through bridge.rasterize (no gradients)."""
    dev = g.means.device
    viewmats, Ks = stack_cameras([camera], dev)
    bg = torch.tensor([background], dtype=torch.float32, device=dev)
    with torch.no_grad():
        image, _, _ = rasterize(g.means, None, None, g.opacities, g.colors, viewmats, Ks,
                                camera.width, camera.height, backgrounds=bg, covars=g.covars)
    return (image[0].clamp(0, 1) * 255).to(torch.uint8).cpu().numpy()


def render_particles(positions: torch.Tensor, deformation: Optional[torch.Tensor], radius: float,
                     colors: torch.Tensor, camera: Camera, background: Sequence[float] = (1.0, 1.0, 1.0),
                     floor: Optional[Gaussians] = None) -> np.ndarray:
    """(N, 3) positions, (N, 3, 3) F or None, (N, 3) colours -> (H, W, 3) uint8 image.
    ``floor``: extra static Gaussians drawn with the particles (e.g. :func:`checker_floor`)."""
    return render_gaussians(scene_gaussians(positions, deformation, radius, colors, floor), camera, background)


def default_camera(width: int = 480, height: int = 360, center=(0.5, 0.25, 0.5)) -> Camera:
    """A three-quarter view of the unit box, y up."""
    return Camera.look_at(eye=(1.3, 0.75, 1.5), target=center, up=(0.0, 1.0, 0.0),
                          width=width, height=height, fov_y_degrees=40.0)
