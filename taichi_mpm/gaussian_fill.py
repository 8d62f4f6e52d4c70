"""Fill the inside of a Gaussian-splat object with simulation particles (PhysGaussian's idea).

A trained 3DGS scene only has Gaussians on the visible surface; a solid needs particles inside.
Method: an opacity-density grid plus ray crossings (not a winding number: splats give no oriented
triangles).

1. Density grid: every Gaussian adds ``opacity * exp(-d^T Sigma'^-1 d / 2)`` to the lattice cells of
   spacing ``h`` within ``CUTOFF`` standard deviations of its centre (Sigma' = Sigma + (h/2)^2 I, so
   that splats thinner than a cell still mark the cells they cross). Cells above ``threshold`` are
   *shell* cells.
2. Ray crossings: from every non-shell cell, six axis-aligned rays are cast to the grid border and
   the shell *runs* they enter are counted (a run of consecutive shell cells counts once). An odd
   count means the ray left the object through its shell; a cell is inside when at least
   ``min_votes`` of its six rays say so (a vote rather than all six tolerates small holes in the shell).
3. Particles sit at the centres of inside cells and shell cells (``include_shell``).

Plain numpy arrays in and out; no torch, no Taichi.
"""
from __future__ import annotations

import numpy as np

from .sampling import EmptyVolumeError

CUTOFF = 3.0        # standard deviations a Gaussian reaches on the density grid
MAX_CELLS = 64_000_000


def gaussian_density_grid(means: np.ndarray, covariances: np.ndarray, opacities: np.ndarray, spacing: float,
                          lower: np.ndarray, shape: tuple) -> np.ndarray:
    """Opacity density at the cell centres ``lower + (i + 0.5) * spacing`` of a grid of ``shape``.

    means (N, 3), covariances (N, 3, 3) SPD, opacities (N,). Each Gaussian visits the cells within
    CUTOFF of its largest standard deviation (at least its own cell). Each covariance is widened
    by (spacing / 2)^2 I first: a trained splat is often far thinner than a cell (flat along its
    normal) and would fall between the cell centres; widened, it marks every cell it passes through."""
    density = np.zeros(shape, dtype=np.float64)
    covariances = covariances + (spacing / 2) ** 2 * np.eye(3)
    precision = np.linalg.inv(covariances)
    reach = np.sqrt(np.linalg.eigvalsh(covariances)[:, -1]) * CUTOFF
    radius = np.clip(np.ceil(reach / spacing).astype(int), 0, 8)
    home = np.floor((means - lower) / spacing).astype(int)
    for r in np.unique(radius):  # Gaussians of one stencil size at a time, vectorised over Gaussians
        sel = np.nonzero(radius == r)[0]
        offsets = np.stack(np.meshgrid(*[np.arange(-r, r + 1)] * 3, indexing="ij"), -1).reshape(-1, 3)
        for chunk in np.array_split(sel, max(1, len(sel) * len(offsets) // 4_000_000)):
            cells = home[chunk, None, :] + offsets[None]                          # (n, o, 3)
            d = lower + (cells + 0.5) * spacing - means[chunk, None, :]
            q = np.einsum("noi,nij,noj->no", d, precision[chunk], d)
            value = opacities[chunk, None] * np.exp(-0.5 * q)
            ok = np.all((cells >= 0) & (cells < np.asarray(shape)), axis=-1) & (q <= CUTOFF ** 2)
            c = cells[ok]
            np.add.at(density, (c[:, 0], c[:, 1], c[:, 2]), value[ok])
    return density


def inside_by_ray_crossings(shell: np.ndarray, min_votes: int = 4) -> np.ndarray:
    """Boolean grid: non-shell cells that at least ``min_votes`` of the six axis rays see as enclosed."""
    votes = np.zeros(shell.shape, dtype=np.int8)
    s = shell.astype(np.int32)
    for axis in range(3):
        prev = np.concatenate([np.zeros_like(np.take(s, [0], axis)), np.take(s, np.arange(s.shape[axis] - 1), axis)], axis)
        nxt = np.concatenate([np.take(s, np.arange(1, s.shape[axis]), axis), np.zeros_like(np.take(s, [0], axis))], axis)
        starts = s * (1 - prev)   # first cell of a run, seen walking +axis
        ends = s * (1 - nxt)      # last cell of a run, seen walking -axis
        # runs entered walking +axis from a cell: run starts strictly after it
        ahead = np.flip(np.cumsum(np.flip(starts, axis), axis), axis) - starts
        # runs entered walking -axis: run ends strictly before it
        behind = np.cumsum(ends, axis) - ends
        votes += (ahead % 2).astype(np.int8) + (behind % 2).astype(np.int8)
    return (votes >= min_votes) & ~shell


def fill_gaussians(means: np.ndarray, covariances: np.ndarray, opacities: np.ndarray, spacing: float,
                   threshold: float = 0.5, min_votes: int = 4, include_shell: bool = True,
                   min_opacity: float = 0.05) -> np.ndarray:
    """(P, 3) float64 particle positions filling the solid the Gaussians bound.

    means (N, 3), covariances (N, 3, 3), opacities (N,) in [0, 1] (activated, not logits).
    spacing: particle lattice spacing (world units); threshold: shell density; min_votes of 6 rays;
    min_opacity: nearly transparent Gaussians (floaters) are ignored.

    Raises ValueError for empty or non-finite input, EmptyVolumeError when no cell is inside or shell.
    """
    means = np.asarray(means, dtype=np.float64)
    covariances = np.asarray(covariances, dtype=np.float64)
    opacities = np.asarray(opacities, dtype=np.float64)
    n = len(means)
    if n == 0:
        raise ValueError("no Gaussians to fill: the splat scene is empty")
    if means.shape != (n, 3) or covariances.shape != (n, 3, 3) or opacities.shape != (n,):
        raise ValueError(f"means (N, 3), covariances (N, 3, 3), opacities (N,) expected; got "
                         f"{means.shape}, {covariances.shape}, {opacities.shape}")
    for name, a in (("means", means), ("covariances", covariances), ("opacities", opacities)):
        if not np.isfinite(a).all():
            raise ValueError(f"Gaussian {name} contain NaN or Inf")
    if not (np.isfinite(spacing) and spacing > 0):
        raise ValueError(f"spacing must be > 0, got {spacing!r}")
    if not 1 <= min_votes <= 6:
        raise ValueError(f"min_votes must lie in 1..6, got {min_votes!r}")
    keep = opacities >= min_opacity
    if not keep.any():
        raise EmptyVolumeError(f"every Gaussian has opacity below {min_opacity}: nothing to fill")
    means, covariances, opacities = means[keep], covariances[keep], opacities[keep]
    if np.any(np.linalg.eigvalsh(covariances)[:, 0] <= 0):
        raise ValueError("Gaussian covariances must be positive definite")
    lower = means.min(0) - 2 * spacing
    shape = tuple(int(s) for s in np.ceil((means.max(0) + 2 * spacing - lower) / spacing).astype(int))
    if np.prod(shape, dtype=np.float64) > MAX_CELLS:
        raise ValueError(f"a fill grid of {shape} cells at spacing {spacing:g} is too large; use a larger spacing")
    density = gaussian_density_grid(means, covariances, opacities, spacing, lower, shape)
    shell = density > threshold
    solid = inside_by_ray_crossings(shell, min_votes)
    if include_shell:
        solid |= shell
    cells = np.argwhere(solid)
    if len(cells) == 0:
        raise EmptyVolumeError("the Gaussians enclose no volume at this spacing (no shell or inside cell)")
    return lower + (cells + 0.5) * spacing
