"""Particles -> Gaussians: the differentiable link between the simulation and the rasterizer.

Each particle becomes a Gaussian whose covariance follows the material's deformation,
``cov = F Sigma0 F^T`` with an isotropic rest covariance ``Sigma0 = radius^2 I``, so a stretched
body renders stretched. Plain torch ops: autograd carries gradients from the image back to the
particle positions and deformation gradients (and on into ``bridge.simulate``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch


@dataclass
class Gaussians:
    """A set of N 3D Gaussians in the layout ``bridge.rasterize`` takes with ``covars=``."""

    means: torch.Tensor      # (N, 3)
    covars: torch.Tensor     # (N, 6) upper triangle xx, xy, xz, yy, yz, zz
    opacities: torch.Tensor  # (N,)
    colors: torch.Tensor     # (N, 3)


def upper_triangle(cov: torch.Tensor) -> torch.Tensor:
    """(..., 3, 3) symmetric -> (..., 6) as xx, xy, xz, yy, yz, zz."""
    i, j = torch.triu_indices(3, 3, device=cov.device)
    return cov[..., i, j]


def particles_to_gaussians(positions: torch.Tensor, deformation: Optional[torch.Tensor], radius: float,
                           colors: Union[torch.Tensor, tuple] = (0.8, 0.3, 0.3),
                           opacity: Union[float, torch.Tensor] = 1.0,
                           dtype: torch.dtype = torch.float32) -> Gaussians:
    """Turn MPM particles into renderable Gaussians.

    Args:
        positions: (N, 3) particle positions.
        deformation: (N, 3, 3) deformation gradients F, or None for undeformed (F = I).
        radius: standard deviation of a particle's Gaussian at rest; about half the particle
            spacing gives a closed surface.
        colors: (N, 3) per-particle or (3,) shared RGB in [0, 1].
        opacity: scalar or (N,) opacity in [0, 1].
        dtype: of the result; the rasterizer takes float32.
    """
    if positions.dim() != 2 or positions.shape[1] != 3:
        raise ValueError(f"positions must be (N, 3), got {tuple(positions.shape)}")
    n, dev, real = positions.shape[0], positions.device, positions.dtype
    if not radius > 0:
        raise ValueError(f"radius must be positive, got {radius}")
    if deformation is None:
        cov = torch.eye(3, device=dev, dtype=real).expand(n, 3, 3) * radius ** 2
    else:
        if deformation.shape != (n, 3, 3):
            raise ValueError(f"deformation must be (N, 3, 3) = ({n}, 3, 3), got {tuple(deformation.shape)}")
        cov = radius ** 2 * deformation @ deformation.transpose(1, 2)
    colors = torch.as_tensor(colors, dtype=real, device=dev)
    if colors.shape == (3,):
        colors = colors.expand(n, 3)
    elif colors.shape != (n, 3):
        raise ValueError(f"colors must be (3,) or (N, 3) = ({n}, 3), got {tuple(colors.shape)}")
    opacities = torch.as_tensor(opacity, dtype=real, device=dev).expand(n)
    return Gaussians(positions.to(dtype).contiguous(), upper_triangle(cov).to(dtype).contiguous(),
                     opacities.to(dtype).contiguous(), colors.to(dtype).contiguous())
