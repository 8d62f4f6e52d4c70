"""PhysicsScene: the nn.Module users put in a training loop, bodies -> MPM -> Gaussians -> images.

    scene = PhysicsScene([Body("scenes/assets/checker_cube.obj", E=2e4, nu=0.3, velocity=(1, 0, 0),
                               size=0.2, center=(0.4, 0.3, 0.5), learn=("E", "nu", "velocity"))],
                         res=32, frame_dt=1 / 30)
    images, alphas, depths = scene(cameras, frames=[0, 5, 10])   # (T, C, H, W, 3), (T, C, H, W, 1) x 2
    loss = (images - target).square().mean(); loss.backward()   # grads on E, nu, v0, sigma0, thickness

Bodies come from OBJ files (filled by winding number, rendered by a :class:`SurfaceUpsampler`) or
3DGS PLYs (filled by ``taichi_mpm.gaussian_fill``, rendered by advecting their own splats). Each
body's E (log), nu (logit into (0, NU_MAX)) and initial velocity are parameters or buffers, per
body. The ground is a plane collider. ``forward`` runs one ``bridge.simulate`` rollout to the last
frame asked for and rasterizes every frame from every camera (``bridge.rasterize``, RGB + expected
depth). The substep dt is fixed at construction from the CFL condition for ``E_max`` (default 4x the
largest starting E); a learned E above it raises instead of silently blowing up.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from render.binning import DEFAULT_MAX_PAIRS, TooManyPairsError
from render.camera import Camera, stack_cameras
from render.sh import C0 as SH_C0
from taichi_mpm import Elastic, MPMSolver, Plane
from taichi_mpm.sampling import sample_mesh

from .gaussian_sim import Splats, advect_splats, bind_splats, fill_splats, load_splats
from .modules import NU_MAX, LogElasticity
from .rasterization import rasterize
from .rollout import RolloutScene, simulate
from .upsampling import SurfaceConfig, SurfaceUpsampler, bind_surface



@dataclass
class Body:
    """One body: ``source`` an OBJ (any mesh trimesh reads) or a 3DGS ``.ply``; placed so that its
    largest extent is ``size`` and its bounding-box centre is ``center``. Material: fixed-corotated
    E, nu, density; ``velocity`` initial; ``learn`` names which of "E", "nu", "velocity" are learnable.
    Surface (meshes): ``surface`` config, ``sigma0`` / ``thickness`` in world units (None: from the
    particle spacing), ``learn_surface`` which of "sigma0", "thickness" are learnable."""

    source: Union[str, Path]
    E: float = 2e4
    nu: float = 0.3
    velocity: Sequence[float] = (0.0, 0.0, 0.0)
    size: float = 0.25
    center: Sequence[float] = (0.5, 0.4, 0.5)
    density: float = 1000.0
    learn: Sequence[str] = ("E", "nu", "velocity")
    surface: SurfaceConfig = SurfaceConfig()
    sigma0: Optional[float] = None
    thickness: Optional[float] = None
    learn_surface: Sequence[str] = ("sigma0", "thickness")


class BodyMaterial(LogElasticity, nn.Module):
    """log E, logit(nu / NU_MAX) and velocity of one body, each a parameter or a buffer."""

    def __init__(self, E: float, nu: float, velocity: Sequence[float], learn: Sequence[str], dtype, device):
        super().__init__()
        unknown = set(learn) - {"E", "nu", "velocity"}
        if unknown:
            raise ValueError(f"learn may name 'E', 'nu', 'velocity'; got {sorted(unknown)}")
        if not (math.isfinite(E) and E > 0):
            raise ValueError(f"E must be a finite number > 0, got {E!r}")
        if not (0 < nu < NU_MAX):
            raise ValueError(f"nu must lie in (0, {NU_MAX}), got {nu!r}")
        v = torch.as_tensor(velocity, dtype=dtype, device=device)
        if v.shape != (3,) or not bool(torch.isfinite(v).all()):
            raise ValueError(f"velocity must be 3 finite numbers, got {velocity!r}")
        values = {"log_E": torch.tensor(math.log(E), dtype=dtype, device=device),
                  "nu_logit": torch.logit(torch.tensor(nu / NU_MAX, dtype=dtype, device=device)),
                  "velocity": v.clone()}
        for name, key in (("log_E", "E"), ("nu_logit", "nu"), ("velocity", "velocity")):
            if key in learn:
                self.register_parameter(name, nn.Parameter(values[name]))
            else:
                self.register_buffer(name, values[name])


class SplatRenderer(nn.Module):
    """A 3DGS body's own splats, advected with the particles (see ``bridge.gaussian_sim``)."""

    def __init__(self, splats: Splats, x_rest: torch.Tensor):
        super().__init__()
        self.splats = splats
        self.binding = bind_splats(splats, x_rest)

    def forward(self, x: torch.Tensor, F: torch.Tensor):
        return advect_splats(x, F, self.splats, self.binding)


class PhysicsScene(nn.Module):
    """Bodies on a ground, simulated by differentiable MPM and rendered by Gaussian splatting.

    Args:
        bodies: the :class:`Body` list (at least one).
        res: grid cells along the domain's longest side; domain: (lower, upper) corners.
        ground: height of the ground plane (y up, gravity -y); ``friction`` on it.
        frame_dt: seconds between frames. particles_per_cell: fill density.
        E_max: stiffest E the substep must stay stable for (default 4x the largest body E).
        max_speed: fastest particle speed expected (CFL), default 2 |v0|max + 2 m/s.
        dtype: simulation precision ("float32" or "float64"); background: RGB behind the bodies.
        materials: externally owned material modules, one per body (anything with ``E``, ``nu`` and
            ``velocity [3]`` tensor attributes), e.g. to share one E and nu between the scenes of
            several recordings; None: a :class:`BodyMaterial` per body from its ``Body`` fields.

    ``forward`` renders all its frames from all its cameras in one ``rasterize`` call; ``max_pairs``
    (an attribute) caps that call's tile/splat pairs, past which the frames render in halves.
    """

    max_pairs: int = DEFAULT_MAX_PAIRS

    def __init__(self, bodies: Sequence[Body], res: int = 32,
                 domain: Tuple[Sequence[float], Sequence[float]] = ((0, 0, 0), (1, 1, 1)),
                 ground: float = 0.1, friction: float = 0.5, frame_dt: float = 1 / 30,
                 particles_per_cell: float = 4, E_max: Optional[float] = None, max_speed: Optional[float] = None,
                 dtype: str = "float32", background: Sequence[float] = (1.0, 1.0, 1.0),
                 materials: Optional[Sequence[nn.Module]] = None):
        super().__init__()
        bodies = list(bodies)
        if not bodies:
            raise ValueError("a PhysicsScene needs at least one body")
        if materials is not None and len(materials) != len(bodies):
            raise ValueError(f"give one material module per body: {len(materials)} for {len(bodies)} bodies")
        if not (math.isfinite(frame_dt) and frame_dt > 0):
            raise ValueError(f"frame_dt must be > 0, got {frame_dt!r}")
        E_max = 4 * max(b.E for b in bodies) if E_max is None else float(E_max)
        solver = MPMSolver(res=res, domain=domain, dtype=dtype, boundary="slip")
        solver.add_collider(Plane(point=(0.0, ground, 0.0), normal=(0.0, 1.0, 0.0), friction=friction))
        spacing = solver.dx / particles_per_cell ** (1 / 3)
        placed, counts = [], []
        for b in bodies:
            # the CFL substep is chosen for this material: the stiffest E, and nu = 0.45 (the p-wave
            # speed grows without bound as nu -> 0.5, so a learned nu near NU_MAX costs stability margin)
            material = Elastic(E=E_max, nu=0.45, density=b.density)
            if str(b.source).lower().endswith(".ply"):
                splats = load_splats(b.source, size=b.size, center=b.center, dtype=solver.torch_dtype)
                points = fill_splats(splats, spacing)
                placed.append(("ply", splats))
            else:
                points, scale, translation = _place_mesh(b, spacing)
                placed.append(("mesh", (scale, translation)))
            counts.append(solver.add_particles(points, material, volume=spacing ** 3))
        body_index = torch.repeat_interleave(torch.arange(len(bodies)), torch.tensor(counts))
        self.E_max = E_max
        speed = max_speed if max_speed is not None else 2 * max(float(np.linalg.norm(b.velocity)) for b in bodies) + 2
        dt = solver.stable_dt(max_speed=speed)
        self.substeps_per_frame = max(1, math.ceil(frame_dt / dt))
        self.rollout = RolloutScene.from_solver(solver, dt=frame_dt / self.substeps_per_frame, body=body_index)
        self.frame_dt = float(frame_dt)
        self.register_buffer("x0", solver.positions(as_torch=True).clone())
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).tolist()
        if materials is None:
            materials = [BodyMaterial(b.E, b.nu, b.velocity, b.learn, solver.torch_dtype, solver.device) for b in bodies]
        self.materials = nn.ModuleList(materials)
        renderers = []
        for b, (kind, info), lo, hi in zip(bodies, placed, self.offsets, self.offsets[1:]):
            x_rest = self.x0[lo:hi]
            if kind == "ply":
                renderers.append(SplatRenderer(info, x_rest))
                continue
            scale, translation = info
            sigma0 = b.sigma0 if b.sigma0 is not None else 0.5 * spacing
            thickness = b.thickness if b.thickness is not None else spacing
            binding = bind_surface(b.source, x_rest, b.surface, scale=scale, translation=translation, band=thickness)
            renderers.append(SurfaceUpsampler(binding, sigma0, thickness, learn=b.learn_surface))
        self.renderers = nn.ModuleList(renderers)
        self.register_buffer("background", torch.as_tensor(background, dtype=torch.float32, device=solver.device))
        self.spacing = spacing

    @property
    def n_particles(self) -> int:
        return self.rollout.n_particles

    def material(self) -> dict:
        E = torch.stack([m.E for m in self.materials])
        if bool((E > self.E_max).any()):
            raise ValueError(f"E = {E.max().item():.4g} exceeds E_max = {self.E_max:.4g} the substep was chosen "
                             f"for; build the PhysicsScene with a larger E_max")
        return {"E": E, "nu": torch.stack([m.nu for m in self.materials])}

    def initial_velocity(self) -> torch.Tensor:
        return torch.stack([m.velocity for m in self.materials])[self.rollout.body]

    def simulate(self, frames: Sequence[int]):
        """bridge.Trajectory at the given frame indices (frame f = substep f * substeps_per_frame)."""
        frames = [int(f) for f in frames]
        if not frames or any(f < 0 for f in frames) or any(b <= a for a, b in zip(frames, frames[1:])):
            raise ValueError(f"frames must be increasing indices >= 0, got {frames}")
        k = self.substeps_per_frame
        return simulate(self.rollout, self.x0, self.initial_velocity(), self.material(),
                        max(frames[-1] * k, 1), [f * k for f in frames])

    def gaussians(self, x: torch.Tensor, F: torch.Tensor):
        """(means, covars, opacities, sh (M, B, 3), sh_degree) of all bodies at one state x (N, 3),
        F (N, 3, 3), or at a batch of states (T, N, ...) -> (T, M, ...): surface bodies take the
        whole batch in one pass, 3DGS bodies a state at a time. Surface colours become SH DC terms
        (rgb = C0 * dc + 0.5) so that every body renders in one call."""
        parts = []
        for r, lo, hi in zip(self.renderers, self.offsets, self.offsets[1:]):
            xb, Fb = x[..., lo:hi, :], F[..., lo:hi, :, :]
            if isinstance(r, SplatRenderer):
                parts.append(r(xb, Fb) if x.dim() == 2 else
                             tuple(torch.stack(field) for field in zip(*(r(xt, Ft) for xt, Ft in zip(xb, Fb)))))
            else:
                g = r(xb, Fb)
                parts.append((g.means, g.covars, g.opacities, ((g.colors - 0.5) / SH_C0)[..., None, :]))
        bases = max(p[3].shape[-2] for p in parts)
        sh = [torch.nn.functional.pad(p[3], (0, 0, 0, bases - p[3].shape[-2])) for p in parts]
        return (torch.cat([p[0] for p in parts], -2), torch.cat([p[1] for p in parts], -2),
                torch.cat([p[2] for p in parts], -1), torch.cat(sh, -3), int(round(bases ** 0.5)) - 1)

    def forward(self, cameras: Union[Sequence[Camera], Tuple[torch.Tensor, torch.Tensor]], frames: Sequence[int]):
        """Render ``frames`` (frame indices) from ``cameras`` (Camera list, or (viewmats, Ks) with
        equal image sizes given as ``cameras[0].width`` ...). Returns images (T, C, H, W, 3),
        alphas (T, C, H, W, 1), depths (T, C, H, W, 1) (expected depth, 0 where nothing is seen)."""
        cameras = list(cameras)
        if not cameras:
            raise ValueError("give at least one camera")
        width, height = cameras[0].width, cameras[0].height
        if any((c.width, c.height) != (width, height) for c in cameras):
            raise ValueError("all cameras of one call must share an image size")
        viewmats, Ks = stack_cameras(cameras, self.x0.device)
        traj = self.simulate(frames)
        out, alphas = self._render(*self.gaussians(traj.x, traj.F), viewmats, Ks, width, height)
        return out[..., :3], alphas, out[..., 3:] * (alphas > 1e-4)

    def _render(self, means, covars, opacities, sh, degree, viewmats, Ks, width, height):
        """(RGB+ED images, alphas) (T, C, H, W, ...) of T frames' Gaussians (T, M, ...): every frame
        from every camera in one call (the frames as a batch of scenes), or, where the batch's
        tile/splat pairs pass ``max_pairs``, its two halves each the same way."""
        T, C = means.shape[0], viewmats.shape[0]
        try:
            return rasterize(means, None, None, opacities, sh, viewmats.expand(T, C, 4, 4), Ks.expand(T, C, 3, 3),
                             width, height, sh_degree=degree, covars=covars, render_mode="RGB+ED",
                             backgrounds=self.background.expand(T, C, 3), max_pairs=self.max_pairs)[:2]
        except TooManyPairsError:
            if T == 1:
                raise
        halves = [self._render(means[part], covars[part], opacities[part], sh[part], degree, viewmats, Ks, width,
                               height) for part in (slice(0, T // 2), slice(T // 2, T))]
        return tuple(torch.cat(pieces) for pieces in zip(*halves))


def _place_mesh(body: Body, spacing: float):
    """Particles inside the mesh scaled to ``size`` and centred at ``center`` (winding number)."""
    from taichi_mpm.sampling import load_mesh

    mesh = load_mesh(str(body.source))
    lo, hi = mesh.bounds
    scale = float(body.size) / float((hi - lo).max())
    translation = np.asarray(body.center, dtype=np.float64) - scale * (lo + hi) / 2
    points = sample_mesh(mesh, spacing, scale=scale, translation=translation)
    return points, scale, translation
