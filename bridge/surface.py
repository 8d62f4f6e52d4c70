"""Particles -> Gaussians: the differentiable link between the simulation and the rasterizer.

Each particle becomes a Gaussian whose covariance follows the material's deformation,
``cov = F Sigma0 F^T`` with an isotropic rest covariance ``Sigma0 = radius^2 I``, so a stretched
body renders stretched. Plain torch ops: autograd carries gradients from the image back to the
particle positions and deformation gradients (and on into ``bridge.simulate``).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Optional, Union

import torch


@dataclass
class Gaussians:
    """A set of N 3D Gaussians in the layout ``bridge.rasterize`` takes with ``covars=``; a batch
    of such sets (frames, say) leads every field with the same batch shape (...)."""

    means: torch.Tensor      # (..., N, 3)
    covars: torch.Tensor     # (..., N, 6) upper triangle xx, xy, xz, yy, yz, zz
    opacities: torch.Tensor  # (..., N)
    colors: torch.Tensor     # (..., N, 3)


# The per-frame maps from particles to Gaussians work on 10^5-10^6 3x3 matrices at a time, in ways
# chosen for the GPU: products as broadcast multiplies and sums (cuBLAS's batched 3x3 gemm took ~110
# us a call on 180k matrices, twelve calls a step of bench/e2e_step.py; an elementwise pass over the
# same data is memory-bound, a few us), gathers by index_select (its backward adds with atomics;
# advanced indexing's sorts its indices first).
def matvec(A: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """A v for A (..., 3, 3), v (..., 3)."""
    return (A * v[..., None, :]).sum(-1)


def gram(A: torch.Tensor) -> torch.Tensor:
    """A A^T for A (..., 3, 3)."""
    return (A[..., :, None, :] * A[..., None, :, :]).sum(-1)


def gather_rows(t: torch.Tensor, index: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """t's rows (along ``dim``) at an integer index of any shape: (*t.shape[:dim], *index.shape,
    *t.shape[dim + 1:])."""
    return t.index_select(dim, index.reshape(-1)).view(*t.shape[:dim], *index.shape, *t.shape[dim + 1:])


@lru_cache(maxsize=None)
def _upper_entries(device: torch.device) -> torch.Tensor:
    return torch.tensor([0, 1, 2, 4, 5, 8], device=device)  # xx, xy, xz, yy, yz, zz of a row-major 3x3


def upper_triangle(cov: torch.Tensor) -> torch.Tensor:
    """(..., 3, 3) symmetric -> (..., 6) as xx, xy, xz, yy, yz, zz."""
    return cov.flatten(-2).index_select(-1, _upper_entries(cov.device))


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
        cov = radius ** 2 * gram(deformation)
    colors = torch.as_tensor(colors, dtype=real, device=dev)
    if colors.shape == (3,):
        colors = colors.expand(n, 3)
    elif colors.shape != (n, 3):
        raise ValueError(f"colors must be (3,) or (N, 3) = ({n}, 3), got {tuple(colors.shape)}")
    opacities = torch.as_tensor(opacity, dtype=real, device=dev).expand(n)
    return Gaussians(positions.to(dtype).contiguous(), upper_triangle(cov).to(dtype).contiguous(),
                     opacities.to(dtype).contiguous(), colors.to(dtype).contiguous())
