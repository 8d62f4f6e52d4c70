"""Simulating a trained 3DGS scene (PhysGaussian's idea), differentiably.

    splats = load_splats("scene.ply", size=0.3, center=(0.5, 0.4, 0.5))     # placed in the sim domain
    x0 = fill_splats(splats, spacing=solver.dx / 2)                          # particles inside (numpy)
    binding = bind_splats(splats, torch.as_tensor(x0))                       # each splat -> k particles
    means, covars, opacities, sh = advect_splats(x, F, splats, binding)      # per frame, torch autograd
    write_ply(path, splats_to_ply(means, covars, opacities, sh))             # viewers open it

Interior: ``taichi_mpm.gaussian_fill`` (opacity-density grid + six-ray crossing vote). Advection:
each splat follows its k nearest rest particles exactly as the surface upsampler's Gaussians do
(``bridge.upsampling.deform_points``): mu = sum w_p (x_p + F_p (X - X_p)), F_g = sum w_p F_p,
cov_t = F_g cov_0 F_g^T. View dependence: the colour seen along direction d must be SH(R^T d) with
R = polar(F_g) (the material turned, its appearance turns with it). Rather than evaluating SH per
camera in torch, the coefficients are rotated: c' = A(R) c with Y(d) A(R) = Y(R^T d) for every d,
A(R) solved by least squares on fixed directions (exact: each SH band is closed under rotation).
The rasterizer then evaluates c' along d as usual, and the exported PLY is correct for any viewer.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch

from render.ply import GaussianPly, read_ply
from render.reference import sh_basis  # the real SH basis in render.sh's convention
from taichi_mpm.gaussian_fill import fill_gaussians
from taichi_mpm.runtime import device as runtime_device
from taichi_mpm.validation import check_tensor

from .surface import upper_triangle
from .upsampling import deform_points, nearest_particles


@dataclass
class Splats:
    """Activated 3DGS Gaussians (torch, on the Taichi device): means (N, 3), cov (N, 3, 3),
    opacities (N,), sh (N, B, 3)."""

    means: torch.Tensor
    cov: torch.Tensor
    opacities: torch.Tensor
    sh: torch.Tensor

    @property
    def sh_degree(self) -> int:
        return int(round(self.sh.shape[1] ** 0.5)) - 1

    def __len__(self) -> int:
        return int(self.means.shape[0])


@dataclass
class SplatBinding:
    """Each splat's k rest particles (M, k) int64 and weights (M, k); x_rest (N, 3)."""

    particles: torch.Tensor
    weights: torch.Tensor
    x_rest: torch.Tensor


def quat_to_matrix(q: torch.Tensor) -> torch.Tensor:
    """(N, 4) wxyz (any length) -> (N, 3, 3) rotation matrices."""
    w, x, y, z = (q / q.norm(dim=1, keepdim=True)).unbind(1)
    return torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
                        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
                        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], 1).view(-1, 3, 3)


def splats_from_ply(ply: GaussianPly, dtype: torch.dtype = torch.float32,
                    device: Optional[torch.device] = None) -> Splats:
    """Activate a stored PLY (quats/log-scales -> covariance, logit -> opacity); checks for NaN."""
    if len(ply.means) == 0:
        raise ValueError("the PLY holds zero Gaussians")
    for name in ("means", "sh", "opacity_logits", "log_scales", "quats"):
        if not np.isfinite(getattr(ply, name)).all():
            raise ValueError(f"the PLY's {name} contain NaN or Inf")
    if np.any(np.linalg.norm(ply.quats, axis=1) == 0):
        raise ValueError("the PLY has zero-length rotation quaternions")
    dev = runtime_device() if device is None else device
    t = lambda a: torch.as_tensor(np.ascontiguousarray(a), dtype=dtype, device=dev)  # noqa: E731
    R = quat_to_matrix(t(ply.quats))
    S = t(np.exp(ply.log_scales))
    cov = R @ torch.diag_embed(S * S) @ R.transpose(1, 2)
    return Splats(t(ply.means), cov, torch.sigmoid(t(ply.opacity_logits)), t(ply.sh))


def load_splats(path: Union[str, Path], size: Optional[float] = None,
                center: Optional[Sequence[float]] = None, dtype: torch.dtype = torch.float32) -> Splats:
    """Read a 3DGS PLY; with ``size``/``center``, scale it uniformly so that its largest extent (of
    the Gaussians with opacity >= 0.05) is ``size`` and move its box centre to ``center``."""
    splats = splats_from_ply(read_ply(path), dtype)
    if size is None and center is None:
        return splats
    solid = splats.means[splats.opacities >= 0.05]
    solid = splats.means if len(solid) == 0 else solid
    lo, hi = solid.min(0).values, solid.max(0).values
    s = 1.0 if size is None else float(size) / float((hi - lo).max().clamp_min(1e-12))
    c = (lo + hi) / 2 if center is None else torch.as_tensor(center, dtype=dtype, device=lo.device)
    return Splats((splats.means - (lo + hi) / 2) * s + c, splats.cov * s * s, splats.opacities, splats.sh)


def fill_splats(splats: Splats, spacing: float, **options) -> np.ndarray:
    """(P, 3) particles filling the splats' solid (``taichi_mpm.gaussian_fill.fill_gaussians``)."""
    as_np = lambda t: t.detach().to("cpu", torch.float64).numpy()  # noqa: E731
    return fill_gaussians(as_np(splats.means), as_np(splats.cov), as_np(splats.opacities), spacing, **options)


def bind_splats(splats: Splats, x_rest: torch.Tensor, neighbours: int = 4) -> SplatBinding:
    """Bind each splat to its k nearest rest particles with inverse-distance weights (set-up)."""
    check_tensor("x_rest", x_rest, (None, 3))
    if x_rest.shape[0] == 0:
        raise ValueError("x_rest holds no particles")
    index, weights = nearest_particles(splats.means.to(x_rest.device, x_rest.dtype), x_rest, neighbours)
    return SplatBinding(index, weights, x_rest.detach().clone())


def polar_rotation(F: torch.Tensor, iterations: int = 12) -> torch.Tensor:
    """R of F = R S (det F > 0) by Newton's iteration R <- (R + R^-T) / 2: smooth autograd, unlike an
    SVD whose backward divides by differences of singular values (equal at rest, F = I)."""
    R = F
    for _ in range(iterations):
        R = 0.5 * (R + torch.linalg.inv(R).transpose(-1, -2))
    return R


def _directions(count: int, dtype, device) -> torch.Tensor:
    """Fixed, well-spread unit directions (Fibonacci sphere)."""
    i = torch.arange(count, dtype=torch.float64) + 0.5
    phi = torch.acos(1 - 2 * i / count)
    theta = np.pi * (1 + 5 ** 0.5) * i
    d = torch.stack([torch.cos(theta) * torch.sin(phi), torch.sin(theta) * torch.sin(phi), torch.cos(phi)], 1)
    return d.to(dtype=dtype, device=device)


def rotate_sh(sh: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """Coefficients c' (N, B, 3) with SH_c'(d) = SH_c(R^T d) for all d; R (N, 3, 3) rotations.
    Degree 0 is returned as is (the DC term does not depend on direction)."""
    degree = int(round(sh.shape[1] ** 0.5)) - 1
    if degree == 0:
        return sh
    D = _directions(4 * sh.shape[1], sh.dtype, sh.device)                # (K, 3)
    pinv = torch.linalg.pinv(sh_basis(D, degree).double()).to(sh.dtype)  # (B, K)
    rotated = sh_basis(torch.einsum("ki,nij->nkj", D, R.to(sh.dtype)), degree)  # Y(R^T d_k): (N, K, B)
    return pinv @ (rotated @ sh)


def advect_splats(x: torch.Tensor, F: torch.Tensor, splats: Splats, binding: SplatBinding,
                  dtype: torch.dtype = torch.float32):
    """Deformed splats at a frame: (means (M, 3), covars (M, 6) upper triangle, opacities (M,),
    sh (M, B, 3) rotated by polar(F_g)), all ``dtype``, differentiable w.r.t. x (N, 3) and F (N, 3, 3)."""
    n = binding.x_rest.shape[0]
    check_tensor("x", x, (n, 3))
    check_tensor("F", F, (n, 3, 3), dtype=x.dtype, device=x.device)
    mu, Fg = deform_points(splats.means.to(x.dtype), binding.particles, binding.weights,
                           binding.x_rest.to(x.dtype), x, F)
    cov = Fg @ splats.cov.to(x.dtype) @ Fg.transpose(1, 2)
    sh = rotate_sh(splats.sh.to(x.dtype), polar_rotation(Fg)) if splats.sh_degree > 0 else splats.sh.to(x.dtype)
    return (mu.to(dtype).contiguous(), upper_triangle(cov).to(dtype).contiguous(),
            splats.opacities.to(dtype).contiguous(), sh.to(dtype).contiguous())


def splats_to_ply(means: torch.Tensor, covars: torch.Tensor, opacities: torch.Tensor, sh: torch.Tensor) -> GaussianPly:
    """Store deformed splats in the standard 3DGS layout (covariance -> scales + quaternion by an
    eigendecomposition; export only, not on the differentiable path)."""
    c = covars.detach().to("cpu", torch.float64)
    i, j = torch.triu_indices(3, 3)
    full = torch.zeros(len(c), 3, 3, dtype=torch.float64)
    full[:, i, j] = c
    full[:, j, i] = c
    evals, evecs = torch.linalg.eigh(full)
    evecs[:, :, 2] *= torch.sign(torch.linalg.det(evecs))[:, None]  # proper rotation
    quats = _matrix_to_quat(evecs.numpy())
    opac = opacities.detach().to("cpu", torch.float64).clamp(1e-6, 1 - 1e-6).numpy()
    return GaussianPly(means=means.detach().cpu().numpy().astype(np.float32),
                       sh=sh.detach().cpu().numpy().astype(np.float32),
                       opacity_logits=np.log(opac / (1 - opac)).astype(np.float32),
                       log_scales=(0.5 * np.log(np.maximum(evals.numpy(), 1e-20))).astype(np.float32),
                       quats=quats.astype(np.float32))


def _matrix_to_quat(R: np.ndarray) -> np.ndarray:
    """(N, 3, 3) proper rotations -> (N, 4) wxyz (Shepperd's method: the largest pivot per row)."""
    m = R
    trace = m[:, 0, 0] + m[:, 1, 1] + m[:, 2, 2]
    candidates = np.stack([trace, m[:, 0, 0], m[:, 1, 1], m[:, 2, 2]], 1)
    pick = np.argmax(candidates, 1)
    q = np.zeros((len(R), 4))
    for k in range(4):
        s = pick == k
        if not s.any():
            continue
        a = m[s]
        if k == 0:
            r = np.sqrt(1 + trace[s]) * 2
            q[s] = np.stack([r / 4, (a[:, 2, 1] - a[:, 1, 2]) / r, (a[:, 0, 2] - a[:, 2, 0]) / r,
                             (a[:, 1, 0] - a[:, 0, 1]) / r], 1)
        elif k == 1:
            r = np.sqrt(1 + a[:, 0, 0] - a[:, 1, 1] - a[:, 2, 2]) * 2
            q[s] = np.stack([(a[:, 2, 1] - a[:, 1, 2]) / r, r / 4, (a[:, 0, 1] + a[:, 1, 0]) / r,
                             (a[:, 0, 2] + a[:, 2, 0]) / r], 1)
        elif k == 2:
            r = np.sqrt(1 + a[:, 1, 1] - a[:, 0, 0] - a[:, 2, 2]) * 2
            q[s] = np.stack([(a[:, 0, 2] - a[:, 2, 0]) / r, (a[:, 0, 1] + a[:, 1, 0]) / r, r / 4,
                             (a[:, 1, 2] + a[:, 2, 1]) / r], 1)
        else:
            r = np.sqrt(1 + a[:, 2, 2] - a[:, 0, 0] - a[:, 1, 1]) * 2
            q[s] = np.stack([(a[:, 1, 0] - a[:, 0, 1]) / r, (a[:, 0, 2] + a[:, 2, 0]) / r,
                             (a[:, 1, 2] + a[:, 2, 1]) / r, r / 4], 1)
    return q
