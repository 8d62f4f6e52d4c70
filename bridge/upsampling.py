"""Learnable surface upsampling: N simulated particles -> M surface Gaussians (M independent of N).

Set-up (once, at rest; numpy / trimesh): :func:`bind_surface` samples M points S on
the body's rest surface, their outward normals n, a fixed depth fraction u in [0, 1] each, colours
from the mesh's texture (at the samples' UVs) or vertex colours, and binds each Gaussian to its
k nearest rest particles X_p with inverse-distance weights w_p.

Per frame (plain torch, differentiable w.r.t. x, F, sigma0 and thickness; no host copy):

    X     = S - u * thickness * n                      rest centre, in a band under the surface
    F_g   = sum_p w_p F_p                               the local deformation
    mu    = sum_p w_p (x_p + F_p (X - X_p))             moves with the particles
    cov   = F_g Sigma0 F_g^T,  Sigma0 = sigma0^2 (I - (1 - flatten^2) n n^T)

``flatten`` < 1 gives disc-like Gaussians lying in the rest surface (std sigma0 * flatten along n).

    binding = bind_surface("scenes/assets/checker_cube.obj", x_rest, SurfaceConfig(n_gaussians=20000),
                           scale=0.2, translation=(0.5, 0.3, 0.5))
    upsampler = SurfaceUpsampler(binding, sigma0=0.004, thickness=0.01)   # learnable log sigma0, log thickness
    g = upsampler(traj.x[-1], traj.F[-1])                                 # bridge.Gaussians, float32
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence, Union

import numpy as np
import torch
import trimesh
from torch import nn

from taichi_mpm.validation import check_tensor

from .surface import Gaussians, gather_rows, gram, matvec, upper_triangle

DEFAULT_COLOR = (0.8, 0.8, 0.8)


@dataclass(frozen=True)
class SurfaceConfig:
    """How the rest surface is sampled and bound.

    n_gaussians: M >= 1 surface Gaussians. neighbours: k rest particles each Gaussian follows.
    flatten: normal std / tangential std of Sigma0 (1: isotropic). opacity: of every Gaussian.
    color: RGB used where the mesh has no texture or vertex colours. seed: of the surface sampling.
    """

    n_gaussians: int = 20_000
    neighbours: int = 4
    flatten: float = 1.0
    opacity: float = 0.9
    color: Sequence[float] = DEFAULT_COLOR
    seed: int = 0

    def __post_init__(self):
        if not (isinstance(self.n_gaussians, (int, np.integer)) and self.n_gaussians >= 1):
            raise ValueError(f"n_gaussians (M) must be an int >= 1, got {self.n_gaussians!r}")
        if not (isinstance(self.neighbours, (int, np.integer)) and self.neighbours >= 1):
            raise ValueError(f"neighbours must be an int >= 1, got {self.neighbours!r}")
        if not (0 < self.flatten <= 1):
            raise ValueError(f"flatten must lie in (0, 1], got {self.flatten!r}")
        if not (0 <= self.opacity <= 1):
            raise ValueError(f"opacity must lie in [0, 1], got {self.opacity!r}")
        if len(self.color) != 3 or not all(0 <= c <= 1 for c in self.color):
            raise ValueError(f"color must be 3 values in [0, 1], got {self.color!r}")


@dataclass
class SurfaceBinding:
    """Rest-state binding of M Gaussians to N particles (tensors on the Taichi device).

    surface (M, 3) rest surface points S; normals (M, 3) unit outward; depth (M,) u in [0, 1];
    particles (M, k) int64 indices; weights (M, k) summing to 1; x_rest (N, 3); colors (M, 3);
    opacities (M,); flatten: Sigma0's normal/tangent std ratio.
    """

    surface: torch.Tensor
    normals: torch.Tensor
    depth: torch.Tensor
    particles: torch.Tensor
    weights: torch.Tensor
    x_rest: torch.Tensor
    colors: torch.Tensor
    opacities: torch.Tensor
    flatten: float

    @property
    def n_gaussians(self) -> int:
        return int(self.surface.shape[0])

    @property
    def n_particles(self) -> int:
        return int(self.x_rest.shape[0])


# ----------------------------------------------------------------------------- set-up (once)
def load_textured_mesh(source: Union[str, trimesh.Trimesh]) -> trimesh.Trimesh:
    """A single mesh with its visuals (texture + UVs or vertex colours) kept."""
    if isinstance(source, trimesh.Trimesh):
        return source
    mesh = trimesh.load(str(source), force="mesh", process=False)
    if not isinstance(mesh, trimesh.Trimesh) or len(mesh.faces) == 0:
        raise ValueError(f"{source}: no triangles to sample a surface from")
    return mesh


def surface_colors(mesh: trimesh.Trimesh, faces: np.ndarray, points: np.ndarray,
                   default: Sequence[float]) -> np.ndarray:
    """(M, 3) RGB in [0, 1] at surface points: texture at their UVs, else vertex colours, else default."""
    visual = mesh.visual
    tri = mesh.triangles[faces]
    bary = trimesh.triangles.points_to_barycentric(tri, points)
    if visual.kind == "texture" and getattr(visual, "uv", None) is not None:
        image = getattr(visual.material, "image", None)
        if image is None:
            image = getattr(visual.material, "baseColorTexture", None)
        if image is not None:
            uv = np.einsum("mk,mkd->md", bary, np.asarray(visual.uv)[mesh.faces[faces]])
            return trimesh.visual.color.uv_to_color(uv, image)[:, :3].astype(np.float64) / 255.0
    if visual.kind == "vertex":
        rgb = np.asarray(visual.vertex_colors, dtype=np.float64)[:, :3] / 255.0
        return np.einsum("mk,mkd->md", bary, rgb[mesh.faces[faces]])
    return np.broadcast_to(np.asarray(default, dtype=np.float64), (len(points), 3)).copy()


def nearest_particles(queries: torch.Tensor, particles: torch.Tensor, k: int):
    """Indices (Q, k) int64 of each query's k nearest particles and inverse-distance weights (Q, k)
    summing to 1 (brute force in chunks on the tensors' device: set-up work, no extra dependency)."""
    k = min(int(k), len(particles))
    p = particles.detach().to(queries.dtype)
    index, distance = [], []
    chunk = max(1, 32_000_000 // max(len(p), 1))  # a (chunk, N) distance block stays near 128 MB
    for q in torch.split(queries.detach(), chunk):
        d, i = torch.cdist(q, p).topk(k, dim=1, largest=False)
        index.append(i)
        distance.append(d)
    w = 1.0 / torch.cat(distance).clamp_min(1e-9)
    return torch.cat(index), w / w.sum(1, keepdim=True)


def bind_surface(mesh: Union[str, trimesh.Trimesh], x_rest: torch.Tensor, config: SurfaceConfig = SurfaceConfig(),
                 scale: Union[float, Sequence[float]] = 1.0, rotation=None,
                 translation: Sequence[float] = (0.0, 0.0, 0.0),
                 band: float = 0.0) -> SurfaceBinding:
    """Sample M = config.n_gaussians points on the mesh surface placed by ``rotation @ (scale * v) +
    translation`` (as ``MPMSolver.add_mesh``) and bind each to its k nearest rest particles.

    x_rest: (N, 3) rest particle positions (the rollout's x0). band: the depth (world units) at which
    the nearest particles are looked up (X = S - u * band * n); later thickness values reuse this binding.
    """
    check_tensor("x_rest", x_rest, (None, 3))
    if x_rest.shape[0] == 0:
        raise ValueError("x_rest holds no particles: the body has no interior to bind a surface to")
    mesh = load_textured_mesh(mesh).copy()
    transform = np.eye(4)
    rot = np.eye(3) if rotation is None else np.asarray(rotation, dtype=np.float64)
    transform[:3, :3] = rot @ np.diag(np.broadcast_to(np.asarray(scale, dtype=np.float64), (3,)))
    transform[:3, 3] = np.asarray(translation, dtype=np.float64)
    mesh.apply_transform(transform)
    if mesh.area <= 0:
        raise ValueError("the mesh has zero surface area")
    points, faces = trimesh.sample.sample_surface(mesh, int(config.n_gaussians), seed=config.seed)
    normals = np.asarray(mesh.face_normals)[faces]
    # outward: the winding-number fill accepts inverted meshes, so orient by the mesh's signed volume
    if mesh.volume < 0:
        normals = -normals
    colors = surface_colors(mesh, faces, points, config.color)
    rng = np.random.default_rng(config.seed + 1)
    depth = rng.uniform(0.0, 1.0, len(points))
    dev, real = x_rest.device, x_rest.dtype
    as_t = lambda a, dt=real: torch.as_tensor(np.ascontiguousarray(a), dtype=dt, device=dev)  # noqa: E731
    index, weights = nearest_particles(as_t(points - (depth * band)[:, None] * normals), x_rest, config.neighbours)
    return SurfaceBinding(surface=as_t(points), normals=as_t(normals), depth=as_t(depth),
                          particles=index, weights=weights,
                          x_rest=x_rest.detach().clone(), colors=as_t(colors),
                          opacities=torch.full((len(points),), float(config.opacity), dtype=real, device=dev),
                          flatten=float(config.flatten))


# ----------------------------------------------------------------------------- per frame (torch)
def deform_points(X: torch.Tensor, particles: torch.Tensor, weights: torch.Tensor, x_rest: torch.Tensor,
                  x: torch.Tensor, F: torch.Tensor):
    """Move rest points X (M, 3) with their bound particles: mu = sum_p w_p (x_p + F_p (X - X_p)).
    x (..., N, 3) and F (..., N, 3, 3) may lead with batch dimensions (frames), as the results do.

    Returns (mu (..., M, 3), F_g (..., M, 3, 3) = sum_p w_p F_p). Shared by the surface upsampler
    and the 3DGS advection (bridge.gaussian_sim)."""
    lead = x.dim() - 2
    offset = X[:, None, :] - gather_rows(x_rest, particles)         # (M, k, 3)
    Fp = gather_rows(F, particles, lead)                            # (..., M, k, 3, 3)
    moved = gather_rows(x, particles, lead) + matvec(Fp, offset)    # (..., M, k, 3)
    w = weights.to(x.dtype)
    return (w[..., None] * moved).sum(-2), (w[..., None, None] * Fp).sum(-3)


def synthesize_surface(x: torch.Tensor, F: torch.Tensor, binding: SurfaceBinding,
                       sigma0: Union[float, torch.Tensor], thickness: Union[float, torch.Tensor],
                       dtype: torch.dtype = torch.float32, validate: bool = True) -> Gaussians:
    """N particles (x (N, 3), F (N, 3, 3)) -> M surface Gaussians (bridge.Gaussians, ``dtype``).
    A batch of states (x (..., N, 3), F (..., N, 3, 3): the frames of a trajectory, say) gives a
    batch of Gaussian sets (..., M, ...) in one pass, which ``bridge.rasterize`` renders in one call.

    sigma0 > 0: tangential standard deviation of Sigma0; thickness >= 0: depth of the band under the
    rest surface. Both may be 0-d tensors carrying gradients. ``validate`` checks the tensor values
    (one device sync); :class:`SurfaceUpsampler` turns it off, its exp-parametrisation keeps both positive.
    """
    n = binding.n_particles
    batch = tuple(x.shape[:-2]) if isinstance(x, torch.Tensor) else ()
    check_tensor("x", x, (*batch, n, 3))
    check_tensor("F", F, (*batch, n, 3, 3), dtype=x.dtype, device=x.device)
    real = x.dtype
    for name, value, low, strict in (("sigma0", sigma0, 0.0, True), ("thickness", thickness, 0.0, False)):
        if isinstance(value, torch.Tensor):
            if value.dim() != 0:
                raise ValueError(f"{name} must be a scalar, got shape {tuple(value.shape)}")
            if not validate:
                continue
            value = float(value.detach())  # one sync; a zero or negative std would give a singular covariance
        if not (math.isfinite(value) and (value > low if strict else value >= low)):
            raise ValueError(f"{name} must be {'>' if strict else '>='} {low:g}, got {value}")
    sigma0 = torch.as_tensor(sigma0, dtype=real, device=x.device)
    thickness = torch.as_tensor(thickness, dtype=real, device=x.device)
    b = binding
    normals = b.normals.to(real)
    X = b.surface.to(real) - (b.depth.to(real) * thickness)[:, None] * normals
    mu, Fg = deform_points(X, b.particles, b.weights, b.x_rest.to(real), x, F)
    FFt = gram(Fg)
    if b.flatten != 1.0:
        Fn = matvec(Fg, normals)
        FFt = FFt - (1.0 - b.flatten ** 2) * Fn[..., :, None] * Fn[..., None, :]
    cov = sigma0.square() * FFt
    M = b.n_gaussians
    return Gaussians(mu.to(dtype).contiguous(), upper_triangle(cov).to(dtype).contiguous(),
                     b.opacities.to(dtype).expand(*batch, M).contiguous(),
                     b.colors.to(dtype).expand(*batch, M, 3).contiguous())


class SurfaceUpsampler(nn.Module):
    """nn.Module over :func:`synthesize_surface` with learnable sigma0 and thickness (stored as logs,
    so every optimizer step keeps them positive). ``learn``: which of "sigma0", "thickness" are
    parameters (the others are buffers)."""

    def __init__(self, binding: SurfaceBinding, sigma0: float, thickness: float,
                 learn: Sequence[str] = ("sigma0", "thickness")):
        super().__init__()
        if not sigma0 > 0:
            raise ValueError(f"sigma0 must be > 0, got {sigma0!r}")
        if not thickness > 0:
            raise ValueError(f"thickness must be > 0 for the learnable (log) form, got {thickness!r}")
        unknown = set(learn) - {"sigma0", "thickness"}
        if unknown:
            raise ValueError(f"learn may name 'sigma0', 'thickness'; got {sorted(unknown)}")
        self.binding = binding
        real, dev = binding.surface.dtype, binding.surface.device
        for name, value in (("log_sigma0", sigma0), ("log_thickness", thickness)):
            t = torch.tensor(float(np.log(value)), dtype=real, device=dev)
            if name[4:] in learn:
                self.register_parameter(name, nn.Parameter(t))
            else:
                self.register_buffer(name, t)

    @property
    def sigma0(self) -> torch.Tensor:
        return self.log_sigma0.exp()

    @property
    def thickness(self) -> torch.Tensor:
        return self.log_thickness.exp()

    def forward(self, x: torch.Tensor, F: torch.Tensor, dtype: torch.dtype = torch.float32) -> Gaussians:
        return synthesize_surface(x, F, self.binding, self.sigma0.to(x.dtype), self.thickness.to(x.dtype), dtype,
                                  validate=False)

    def extra_repr(self) -> str:
        return f"M={self.binding.n_gaussians}, N={self.binding.n_particles}, flatten={self.binding.flatten}"
