"""Differentiable MPM rollout: checkpointed forward, segment recompute + kernel.grad backward.

    scene = RolloutScene.from_solver(solver, dt=2e-4)
    traj = simulate(scene, x0, v0, {"E": E, "nu": nu}, n_substeps=400, frames=[100, 400])
    loss = ((traj.x[-1] - target) ** 2).sum() + grid_mass(traj.x[0], scene).square().sum()
    loss.backward()          # grads on x0, v0, E, nu (and "controls" when given)

Checkpoint schedule (DiffTaichi's recompute-instead-of-store rule). The T substeps are cut into
segments of K. The forward keeps only the particle state at each segment start (a checkpoint:
x, v, C, F, plastic = 25 reals a particle), on the device or in pinned host memory. The backward
walks the segments in reverse: it copies the checkpoint into a (K + 1)-slot buffer, runs the K
substeps forward again to refill the slots, then for each substep s (last first) runs
g2p.grad, grid_update.grad, p2g.grad, particle_stress.grad on the two slots (s, s + 1). The grid
of substep s is either kept from the refill pass (``store_grids``: K grids on the device, only
the per-particle stress is recomputed) or recomputed (clear_grid, particle_stress, p2g,
grid_update). Particle memory: N * (T / K + K + 2) states instead of N * T; K defaults to
sqrt(T), lowered when the segment buffer would not fit ``device_budget_bytes``
(:class:`CheckpointPlan`).

The substep kernels and their data convention are ``taichi_mpm.substep``; this module only
schedules them. Gradients of Taichi kernels accumulate into ``tensor.grad``: the backward passes
fresh leaf views with zeroed grad buffers it owns, never the caller's tensors, so calling the
Function several times in one graph counts each gradient once.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Mapping, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import taichi as ti
import torch

from taichi_mpm.runtime import device as runtime_device, ensure_init
from taichi_mpm.materials import FIXED_COROTATED_ID, FLUID_ID, NEO_HOOKEAN_ID
from taichi_mpm.solver import STATE_KEYS, SimulationError, check_particles  # noqa: F401  (SimulationError: raised here too)

STATE_SHAPES = {"x": (3,), "v": (3,), "C": (3, 3), "F": (3, 3), "plastic": ()}
REALS_PER_PARTICLE = 25  # x 3 + v 3 + C 9 + F 9 + plastic 1
NU_LIMITS = (-1.0, 0.5)


@dataclass(frozen=True, eq=False)
class RolloutScene:
    """Everything about a simulation except the differentiable inputs.

    Grid: ``grid_shape`` nodes per axis, spacing ``dx``, node 0 at ``origin``. ``dt`` is the fixed
    substep. Walls: ``wall_mode`` (0 sticky, 1 slip, 2 separate, as ``taichi_mpm.boundary``) with
    ``wall_friction``; ``colliders`` [MAX_COLLIDERS, COLLIDER_WIDTH] packed rows, ``n_colliders``
    in use. Per-particle constants (torch, on the Taichi device): ``material`` [N] int32,
    ``density`` [N], ``volume`` [N], ``aux`` [N, 4], ``plastic0`` [N] initial plastic state,
    ``body`` [N] int64 body index (for per-body parameters), ``n_bodies``.
    ``control_stride``: F controls act on substeps 0, stride, 2 stride, ...
    ``valid_lower/valid_upper``: particles outside this box are an error (grid stencil margin).
    """

    grid_shape: Tuple[int, int, int]
    dx: float
    origin: Tuple[float, float, float]
    dt: float
    material: torch.Tensor
    density: torch.Tensor
    volume: torch.Tensor
    aux: torch.Tensor
    plastic0: torch.Tensor
    body: torch.Tensor
    n_bodies: int
    colliders: torch.Tensor
    n_colliders: int = 0
    gravity: Tuple[float, float, float] = (0.0, -9.8, 0.0)
    wall_mode: int = 0
    wall_friction: float = 0.0
    control_stride: int = 1
    valid_lower: Tuple[float, float, float] = field(default=None)
    valid_upper: Tuple[float, float, float] = field(default=None)

    @property
    def n_particles(self) -> int:
        return int(self.material.shape[0])

    @property
    def dtype(self) -> torch.dtype:
        return self.density.dtype

    @property
    def mass(self) -> torch.Tensor:
        """[N] particle masses."""
        return self.density * self.volume

    @classmethod
    def from_solver(cls, solver, dt: float, control_stride: int = 1,
                    body: Optional[torch.Tensor] = None) -> "RolloutScene":
        """Take grid, boundaries and particle constants from a ``taichi_mpm.MPMSolver`` whose
        particles were added with add_cube / add_mesh / ...; ``body`` [N] groups particles into
        bodies (default: one body per material id, in order of first appearance)."""
        if not (isinstance(dt, (int, float)) and math.isfinite(dt) and dt > 0):
            raise ValueError(f"dt must be a finite number > 0, got {dt!r}")
        if not (isinstance(control_stride, int) and control_stride >= 1):
            raise ValueError(f"control_stride must be an int >= 1, got {control_stride!r}")
        n = solver.n_particles
        if n == 0:
            raise ValueError("the solver holds no particles")
        stable = solver.stable_dt(0.0)
        if dt > stable:
            raise ValueError(f"dt={dt:.3g} s breaks the CFL condition for these materials "
                             f"(stable dt ~ {stable:.3g} s)")
        state = solver.state
        material = state["material"].clone()
        if body is None:
            _, body = torch.unique_consecutive(material.long().cpu(), return_inverse=True)
        body = torch.as_tensor(body, dtype=torch.int64, device=material.device)
        if body.shape != (n,) or int(body.min()) < 0:
            raise ValueError(f"body must be [N={n}] non-negative ints, got shape {tuple(body.shape)}")
        return cls(grid_shape=tuple(solver.grid_shape), dx=solver.dx, origin=tuple(solver.lower.tolist()),
                   dt=float(dt), material=material, density=state["density"].clone(),
                   volume=state["volume"].clone(), aux=state["aux"].clone(),
                   plastic0=state["plastic"][solver.src].clone(), body=body,
                   n_bodies=int(body.max()) + 1, colliders=solver.collider_table.clone(),
                   n_colliders=len(solver.colliders), gravity=tuple(solver.gravity.tolist()),
                   wall_mode=solver.wall_mode, wall_friction=solver.wall_friction,
                   control_stride=control_stride, valid_lower=tuple(solver.valid_lower.tolist()),
                   valid_upper=tuple(solver.valid_upper.tolist()))

    def n_controls(self, n_substeps: int) -> int:
        """How many F controls a rollout of n_substeps takes (one every control_stride substeps)."""
        return -(-n_substeps // self.control_stride)


class Trajectory(NamedTuple):
    """States at the requested frames: x [n_frames, N, 3], v [n_frames, N, 3], C [n_frames, N, 3, 3]
    (APIC affine velocity), F [n_frames, N, 3, 3]. ``trajectory[-1]``-style restarts: pass the
    last frame's x, v, C, F as the next rollout's x0, v0, C0, F0."""

    x: torch.Tensor
    v: torch.Tensor
    C: torch.Tensor
    F: torch.Tensor


# ----------------------------------------------------------------------------- workarounds
# Kernels come from substep_kernels(real, plastic_models=False): Taichi cannot reverse-differentiate
# the ti.svd of the plastic return maps, so the rollout takes elastic and fluid particles only.
DIFFERENTIABLE_MATERIALS = {FIXED_COROTATED_ID: "fixed_corotated", NEO_HOOKEAN_ID: "neo_hookean",
                            FLUID_ID: "fluid"}


@contextmanager
def _stress_grad_build():
    """Scope for calls of particle_stress.grad (the first one compiles it) with Taichi's advanced
    IR optimisation off: on the reverse of the stress (polar decomposition unrolled) its passes
    cost 76 s of build against 19 s without (CPU, f64, measured 2026-11-22 beside another job;
    over 15 minutes when stress and scatter were one kernel). Only this kernel's build is affected.
    """
    cfg = ti.lang.impl.current_cfg()
    original = cfg.advanced_optimization
    cfg.advanced_optimization = False
    try:
        yield
    finally:
        cfg.advanced_optimization = original


# ----------------------------------------------------------------------------- schedule
@dataclass(frozen=True)
class CheckpointPlan:
    """K substeps a segment (``every``), where the checkpoints live ("device" or "host"), and
    whether the backward keeps the segment's grids from its refill pass (``store_grids``) instead
    of recomputing each substep's grid a second time."""

    every: int
    storage: str
    store_grids: bool

    @staticmethod
    def choose(n_substeps: int, state_bytes: int, grid_bytes: int, on_cuda: bool, every: Optional[int] = None,
               storage: str = "auto", device_budget_bytes: int = 1 << 30,
               store_grids: Optional[bool] = None) -> "CheckpointPlan":
        """Device bytes of a plan: checkpoints (if on the device) + (K + 1) segment states + K grids
        (if stored). K = sqrt(T) unless given. In order, the first plan within
        ``device_budget_bytes`` wins: device checkpoints with grids; on CUDA, host checkpoints with
        grids and K lowered to fit (if K stays >= sqrt(T) / 8: a small K only
        costs host copies and host memory); device checkpoints without grids;
        host checkpoints without grids, K lowered to fit. Off CUDA the host is the device."""
        if storage not in ("auto", "device", "host"):
            raise ValueError(f"checkpoint storage must be 'auto', 'device' or 'host', got {storage!r}")
        if every is not None and not (isinstance(every, int) and every >= 1):
            raise ValueError(f"checkpoint_every must be an int >= 1, got {every!r}")
        k0 = every if every is not None else max(1, min(n_substeps, round(math.sqrt(n_substeps))))
        budget, S, G = device_budget_bytes, max(state_bytes, 1), grid_bytes
        candidates = []
        for grids in ((True, False) if store_grids is None else (store_grids,)):
            per_step = S + (G if grids else 0)
            for where in (("device", "host") if storage == "auto" else (storage,)):
                if where == "host" and not on_cuda:
                    where = "device"
                k = k0
                if where == "host" and every is None:
                    k = max(1, min(k0, (budget - S) // per_step))
                    if grids and k < max(2, k0 // 8):
                        continue
                ckpt = -(-n_substeps // k) * S if where == "device" else 0
                candidates.append(CheckpointPlan(int(k), where, grids))
                if ckpt + (k + 1) * S + (k * G if grids else 0) <= budget:
                    return candidates[-1]
        return candidates[-1]  # nothing fits: the leanest plan asked for


# ----------------------------------------------------------------------------- buffers
def _alloc_state(slots: int, n: int, dtype, dev) -> dict:
    return {k: torch.zeros((slots, n) + STATE_SHAPES[k], dtype=dtype, device=dev) for k in STATE_KEYS}


class _Kernels:
    """Thin scheduling layer over ``taichi_mpm.substep`` kernels for one scene."""

    def __init__(self, scene: RolloutScene):
        from taichi_mpm.substep import substep_kernels

        self.scene = scene
        self.real = ti.f64 if scene.dtype == torch.float64 else ti.f32
        self.k = substep_kernels(self.real, plastic_models=False)
        self.origin = ti.Vector(list(scene.origin), self.real)
        self.gravity = ti.Vector(list(scene.gravity), self.real)
        self.inv_dx = 1.0 / scene.dx
        dev, dt_ = scene.density.device, scene.dtype
        shape = tuple(scene.grid_shape)
        self.grid_mv = torch.zeros(shape + (3,), dtype=dt_, device=dev)
        self.grid_m = torch.zeros(shape, dtype=dt_, device=dev)
        self.grid_v = torch.zeros(shape + (3,), dtype=dt_, device=dev)
        self.no_control = torch.zeros((1, 3, 3), dtype=dt_, device=dev)
        self.affine = torch.zeros((scene.n_particles, 3, 3), dtype=dt_, device=dev)  # per-substep scratch

    def stress(self, S: dict, j: int, E, nu, dFc, scale: float, affine=None):
        """particle_stress of slots j -> j + 1: writes F[j + 1], plastic[j + 1] and affine."""
        sc = self.scene
        self.k.particle_stress(j, j + 1, sc.n_particles, S["C"], S["F"], S["plastic"], sc.material, E, nu,
                               sc.density, sc.volume, sc.aux, dFc, scale,
                               self.affine if affine is None else affine, self.inv_dx, sc.dt)

    def grid(self, S: dict, j: int, E, nu, dFc, scale: float, grid=None, affine=None):
        """clear_grid + particle_stress + p2g + grid_update of the substep slots (j -> j + 1)."""
        sc, k = self.scene, self.k
        mv, m, gv = grid if grid is not None else (self.grid_mv, self.grid_m, self.grid_v)
        affine = self.affine if affine is None else affine
        k.clear_grid(mv, m)
        self.stress(S, j, E, nu, dFc, scale, affine)
        k.p2g(j, sc.n_particles, S["x"], S["v"], sc.density, sc.volume, affine, mv, m, self.origin, self.inv_dx)
        self.grid_update(mv, m, gv)

    def grid_update(self, mv, m, gv, grad: bool = False):
        sc = self.scene
        kernel = self.k.grid_update.grad if grad else self.k.grid_update
        kernel(mv, m, gv, sc.dt, self.gravity, self.origin, sc.dx, sc.wall_mode, sc.wall_friction,
               sc.colliders, sc.n_colliders, 0.0)

    def substep(self, S: dict, j: int, E, nu, dFc, scale: float, grid=None, particles: bool = True):
        """One substep (slots j -> j + 1), on the scratch grid or the given (mv, m, v) buffers;
        ``particles=False`` stops after the grid (the backward's last refill substep)."""
        grid = grid if grid is not None else (self.grid_mv, self.grid_m, self.grid_v)
        self.grid(S, j, E, nu, dFc, scale, grid)
        if particles:
            self.k.g2p(j, j + 1, self.scene.n_particles, S["x"], S["v"], S["C"], grid[2],
                       self.origin, self.inv_dx, self.scene.dt)

    def check(self, S: dict, j: int, substep: int):
        """Raise SimulationError if slot j holds NaN/Inf or particles outside the valid domain."""
        sc = self.scene
        check_particles(S["x"][j], S["v"][j], np.asarray(sc.valid_lower), np.asarray(sc.valid_upper),
                        f"substep {substep}", "Lower dt or keep the bodies away from the walls.")


def _control_for(scene: RolloutScene, controls: Optional[torch.Tensor], s: int):
    """(dFc [N, 3, 3] or None, scale) acting on substep s."""
    if controls is None or s % scene.control_stride != 0:
        return None, 0.0
    return controls[s // scene.control_stride], 1.0


# ----------------------------------------------------------------------------- autograd
class _Rollout(torch.autograd.Function):
    """(x0, v0, C0, F0, E, nu, controls) -> (x, v, C, F) at frames; see the module docstring."""

    @staticmethod
    def forward(ctx, scene: RolloutScene, n_substeps: int, frames: Tuple[int, ...], plan: CheckpointPlan,
                x0, v0, C0, F0, E, nu, controls):
        kern = _Kernels(scene)
        n, dtype, dev = scene.n_particles, scene.dtype, x0.device
        K = plan.every
        S = _alloc_state(K + 1, n, dtype, dev)
        frame_slot = {t: i for i, t in enumerate(frames)}
        out_x = torch.empty((len(frames), n, 3), dtype=dtype, device=dev)
        out_v = torch.empty_like(out_x)
        out_F = torch.empty((len(frames), n, 3, 3), dtype=dtype, device=dev)
        out_C = torch.empty_like(out_F)
        S["x"][0], S["v"][0], S["C"][0], S["F"][0], S["plastic"][0] = x0, v0, C0, F0, scene.plastic0
        E, nu = E.detach().contiguous(), nu.detach().contiguous()
        controls = None if controls is None else controls.detach().contiguous()
        pin = plan.storage == "host" and dev.type == "cuda"
        checkpoints = []

        def record(t: int, j: int):
            if t in frame_slot:
                i = frame_slot[t]
                out_x[i], out_v[i], out_C[i], out_F[i] = S["x"][j], S["v"][j], S["C"][j], S["F"][j]

        record(0, 0)
        for start in range(0, n_substeps, K):
            length = min(K, n_substeps - start)
            if start > 0:
                for key in STATE_KEYS:
                    S[key][0] = S[key][K]
            if any(ctx.needs_input_grad[4:]):
                checkpoints.append(_store(S, plan.storage, pin))
            for j in range(length):
                dFc, scale = _control_for(scene, controls, start + j)
                kern.substep(S, j, E, nu, kern.no_control if dFc is None else dFc, scale)
                record(start + j + 1, j + 1)
            kern.check(S, length, start + length)
        ctx.scene, ctx.n_substeps, ctx.frames, ctx.plan = scene, n_substeps, frames, plan
        ctx.checkpoints = checkpoints
        ctx.save_for_backward(E, nu, controls)
        return out_x, out_v, out_C, out_F

    @staticmethod
    def backward(ctx, g_x, g_v, g_C, g_F):
        scene, T, frames, plan = ctx.scene, ctx.n_substeps, ctx.frames, ctx.plan
        E, nu, controls = ctx.saved_tensors
        kern = _Kernels(scene)
        n, dtype, dev = scene.n_particles, scene.dtype, E.device
        K = plan.every
        frame_index = {t: i for i, t in enumerate(frames)}
        S = _alloc_state(K + 1, n, dtype, dev)
        G = _alloc_state(2, n, dtype, dev)  # adjoints of slots (src, dst) of the substep in reverse
        g_E, g_nu = torch.zeros_like(E), torch.zeros_like(nu)
        E_leaf, nu_leaf = _leaf(E, g_E), _leaf(nu, g_nu)
        g_controls = None if controls is None else torch.zeros_like(controls)
        # no grad on the [1, 3, 3] stand-in of substeps without control: its adjoint would be N
        # atomic adds per substep into the same 9 numbers (a serialising hot spot on the GPU)
        no_control_leaf = kern.no_control
        g_affine = torch.zeros_like(kern.affine)
        affine = _leaf(kern.affine, g_affine)
        scratch = (kern.grid_mv, kern.grid_m, kern.grid_v)
        grid_grads = [torch.zeros_like(t) for t in scratch]
        # the grids of every substep of a segment, kept from the refill pass (plan.store_grids)
        stored = [torch.empty((K,) + tuple(t.shape), dtype=dtype, device=dev) for t in scratch] \
            if plan.store_grids else None

        def add_frame_grads(t: int):
            i = frame_index.get(t)
            if i is not None:
                for key, g in (("x", g_x), ("v", g_v), ("C", g_C), ("F", g_F)):
                    if g is not None:
                        G[key][1] += g[i]

        starts = list(range(0, T, K))
        for seg in reversed(range(len(starts))):
            start = starts[seg]
            length = min(K, T - start)
            _restore(S, ctx.checkpoints[seg])
            for j in range(length):  # refill slots 1..length-1 (slot length is never read)
                dFc, scale = _control_for(scene, controls, start + j)
                if stored is not None:
                    kern.substep(S, j, E, nu, kern.no_control if dFc is None else dFc, scale,
                                 [t[j] for t in stored], particles=j < length - 1)
                elif j < length - 1:
                    kern.substep(S, j, E, nu, kern.no_control if dFc is None else dFc, scale)
            for j in reversed(range(length)):
                s = start + j
                add_frame_grads(s + 1)
                pair = {key: _leaf(S[key][j:j + 2], G[key]) for key in STATE_KEYS}
                dFc, scale = _control_for(scene, controls, s)
                dFc_leaf = no_control_leaf if dFc is None else _leaf(dFc, g_controls[s // scene.control_stride])
                if stored is not None:  # the grid is kept; only the per-particle affine is recomputed
                    grid = [_leaf(t[j], g) for t, g in zip(stored, grid_grads)]
                    kern.stress(pair, 0, E_leaf, nu_leaf, dFc_leaf, scale, affine)
                else:  # DiffTaichi's rule: recompute the grid of substep s rather than keep it
                    grid = [_leaf(t, g) for t, g in zip(scratch, grid_grads)]
                    kern.grid(pair, 0, E_leaf, nu_leaf, dFc_leaf, scale, grid, affine)
                for g in grid_grads + [g_affine]:
                    g.zero_()
                k, sc = kern.k, scene
                k.g2p.grad(0, 1, n, pair["x"], pair["v"], pair["C"], grid[2], kern.origin, kern.inv_dx, sc.dt)
                kern.grid_update(*grid, grad=True)
                k.p2g.grad(0, n, pair["x"], pair["v"], sc.density, sc.volume, affine, grid[0], grid[1],
                           kern.origin, kern.inv_dx)
                with _stress_grad_build():
                    k.particle_stress.grad(0, 1, n, pair["C"], pair["F"], pair["plastic"], sc.material, E_leaf,
                                           nu_leaf, sc.density, sc.volume, sc.aux, dFc_leaf, scale, affine,
                                           kern.inv_dx, sc.dt)
                for key in STATE_KEYS:  # the adjoint of state s becomes the dst adjoint of substep s - 1
                    G[key][1].copy_(G[key][0])
                    G[key][0].zero_()
        add_frame_grads(0)
        ctx.checkpoints = None
        grads = [G[key][1].clone() for key in ("x", "v", "C", "F")] + [g_E, g_nu, g_controls]
        return (None, None, None, None) + tuple(g if need else None
                                                for g, need in zip(grads, ctx.needs_input_grad[4:]))


def _leaf(t: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """A fresh leaf sharing t's memory whose .grad is our buffer (Taichi accumulates into it)."""
    leaf = t.detach().requires_grad_(True)
    leaf.grad = grad
    return leaf


def _store(S: dict, storage: str, pin: bool) -> torch.Tensor:
    flat = torch.cat([S[key][0].reshape(S[key].shape[1], -1) for key in STATE_KEYS], dim=1)
    if storage == "device":
        return flat
    host = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=pin)
    host.copy_(flat, non_blocking=pin)
    return host


def _restore(S: dict, flat: torch.Tensor) -> None:
    flat = flat.to(S["x"].device, non_blocking=True)
    col = 0
    for key in STATE_KEYS:
        width = int(np.prod(STATE_SHAPES[key], dtype=int))
        S[key][0].view(S[key].shape[1], -1).copy_(flat[:, col:col + width])
        col += width


# ----------------------------------------------------------------------------- public face
def material_per_particle(scene: RolloutScene, params: Mapping[str, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-particle (E [N], nu [N]) from params holding ("E", "nu") or ("lam", "mu"), each a
    scalar, per body [n_bodies] or per particle [N] tensor. Differentiable (torch ops)."""
    has_e, has_lame = "E" in params or "nu" in params, "lam" in params or "mu" in params
    if has_e == has_lame:
        raise ValueError(f"params must hold 'E' and 'nu', or 'lam' and 'mu'; got keys {sorted(params)}")
    a, b = ("E", "nu") if has_e else ("lam", "mu")
    if a not in params or b not in params:
        raise ValueError(f"params must hold both {a!r} and {b!r}; got keys {sorted(params)}")
    first, second = (_expand(scene, name, params[name]) for name in (a, b))
    if has_e:
        return first, second
    lam, mu = first, second
    return mu * (3 * lam + 2 * mu) / (lam + mu), lam / (2 * (lam + mu))


def _expand(scene: RolloutScene, name: str, value) -> torch.Tensor:
    value = torch.as_tensor(value, dtype=scene.dtype, device=scene.density.device)
    if value.dim() == 0:
        return value.expand(scene.n_particles)
    if value.dim() == 1 and value.shape[0] == scene.n_particles:
        return value
    if value.dim() == 1 and value.shape[0] == scene.n_bodies:
        return value[scene.body]
    raise ValueError(f"{name} must be a scalar, per body [{scene.n_bodies}] or per particle "
                     f"[{scene.n_particles}], got shape {tuple(value.shape)}")


def _same_device(a: torch.device, b: torch.device) -> bool:
    """torch.device("cuda") and torch.device("cuda:0") name one GPU when 0 is the current one."""
    index = lambda d: d.index if d.index is not None else (torch.cuda.current_device() if d.type == "cuda" else 0)  # noqa: E731
    return a.type == b.type and index(a) == index(b)


def _check_input(name: str, t: torch.Tensor, shape: tuple, scene: RolloutScene, dev) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")
    if t.dtype != scene.dtype:
        raise TypeError(f"{name} must be {scene.dtype} (the scene's dtype), got {t.dtype}")
    if not _same_device(t.device, dev):
        raise ValueError(f"{name} must be on {dev} (the Taichi device), got {t.device}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or Inf")


def plan_for(scene: RolloutScene, n_substeps: int, checkpoint_every: Optional[int] = None,
             checkpoint_storage: str = "auto", device_budget_bytes: int = 1 << 30,
             store_grids: Optional[bool] = None) -> CheckpointPlan:
    """The :class:`CheckpointPlan` that :func:`simulate` uses for this scene and length."""
    real_bytes = torch.finfo(scene.dtype).bits // 8
    state_bytes = scene.n_particles * REALS_PER_PARTICLE * real_bytes
    grid_bytes = int(np.prod(scene.grid_shape)) * 7 * real_bytes  # mv 3 + m 1 + v 3 per node
    return CheckpointPlan.choose(n_substeps, state_bytes, grid_bytes, runtime_device().type == "cuda",
                                 checkpoint_every, checkpoint_storage, device_budget_bytes, store_grids)


def simulate(scene: RolloutScene, x0: torch.Tensor, v0: torch.Tensor, params: Mapping[str, torch.Tensor],
             n_substeps: int, frames: Sequence[int], controls: Optional[torch.Tensor] = None,
             C0: Optional[torch.Tensor] = None, F0: Optional[torch.Tensor] = None,
             checkpoint_every: Optional[int] = None, checkpoint_storage: str = "auto",
             device_budget_bytes: int = 1 << 30, store_grids: Optional[bool] = None) -> Trajectory:
    """Run ``n_substeps`` MPM substeps of ``scene.dt`` from (x0 [N, 3], v0 [N, 3]) and return the
    states at ``frames`` (substep indices in [0, n_substeps], increasing; 0 is the initial state).

    params: {"E", "nu"} or {"lam", "mu"}, each scalar / per body / per particle (see
    :func:`material_per_particle`); controls: optional [scene.n_controls(T), N, 3, 3] F controls,
    control c acting on substep c * control_stride as F <- (I + dt C)(F + controls[c]).
    C0, F0: optional initial affine velocity / deformation gradient [N, 3, 3] (default 0 and I),
    e.g. the last frame of a previous rollout.
    Differentiable w.r.t. x0, v0, C0, F0, the params and controls; memory is N * (T / K + K)
    states with K = checkpoint_every (default sqrt(T), see :class:`CheckpointPlan`);
    checkpoint_storage "auto" | "device" | "host" (pinned, for large N on the GPU); store_grids:
    keep each segment's grids in the backward instead of recomputing them (None: when the budget
    allows); see :class:`CheckpointPlan`.
    Returns :class:`Trajectory` (x, v, C, F) with a leading frame axis.
    """
    ensure_init()
    dev = runtime_device()
    if not (isinstance(n_substeps, (int, np.integer)) and n_substeps >= 1):
        raise ValueError(f"n_substeps must be an int >= 1, got {n_substeps!r}")
    n_substeps = int(n_substeps)
    frames = tuple(int(f) for f in frames)
    if not frames or any(f < 0 or f > n_substeps for f in frames) or any(
            b <= a for a, b in zip(frames, frames[1:])):
        raise ValueError(f"frames must be increasing substep indices in [0, {n_substeps}], got {list(frames)}")
    n = scene.n_particles
    if not _same_device(scene.density.device, dev):
        raise ValueError(f"scene tensors live on {scene.density.device}, Taichi runs on {dev}")
    unsupported = set(torch.unique(scene.material).tolist()) - set(DIFFERENTIABLE_MATERIALS)
    if unsupported:
        raise NotImplementedError(
            f"material ids {sorted(unsupported)} (plastic models) are not differentiable yet: Taichi "
            f"cannot reverse-differentiate ti.svd; supported: {sorted(DIFFERENTIABLE_MATERIALS.values())}")
    _check_input("x0", x0, (n, 3), scene, dev)
    _check_input("v0", v0, (n, 3), scene, dev)
    C0 = torch.zeros((n, 3, 3), dtype=scene.dtype, device=dev) if C0 is None else C0
    F0 = torch.eye(3, dtype=scene.dtype, device=dev).expand(n, 3, 3) if F0 is None else F0
    _check_input("C0", C0, (n, 3, 3), scene, dev)
    _check_input("F0", F0, (n, 3, 3), scene, dev)
    lower = torch.tensor(scene.valid_lower, dtype=x0.dtype, device=dev)
    upper = torch.tensor(scene.valid_upper, dtype=x0.dtype, device=dev)
    outside = ((x0 < lower) | (x0 > upper)).any(dim=1)
    if outside.any():
        i = int(outside.nonzero()[0])
        raise ValueError(f"x0[{i}] = {x0[i].tolist()} lies outside the valid domain "
                         f"[{scene.valid_lower}, {scene.valid_upper}]")
    E, nu = material_per_particle(scene, params)
    _check_input("E", E, (n,), scene, dev)
    _check_input("nu", nu, (n,), scene, dev)
    if (E <= 0).any():
        raise ValueError(f"E must be > 0 (min is {E.min().item():.3g})")
    if ((nu <= NU_LIMITS[0]) | (nu >= NU_LIMITS[1])).any():
        raise ValueError(f"nu must lie in {NU_LIMITS} (range {nu.min().item():.3g}..{nu.max().item():.3g})")
    if controls is not None:
        _check_input("controls", controls, (scene.n_controls(n_substeps), n, 3, 3), scene, dev)
    plan = plan_for(scene, n_substeps, checkpoint_every, checkpoint_storage, device_budget_bytes, store_grids)
    return Trajectory(*_Rollout.apply(scene, n_substeps, frames, plan, x0.contiguous(), v0.contiguous(),
                                      C0.contiguous(), F0.contiguous(), E.contiguous(), nu.contiguous(),
                                      None if controls is None else controls.contiguous()))


def grid_mass(x: torch.Tensor, scene: RolloutScene, mass: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Grid node masses [X, Y, Z] that P2G scatters from positions x [N, 3] (quadratic B-splines,
    stencil base clamped into the grid as in ``taichi_mpm.substep``). Pure torch, differentiable
    w.r.t. x (and mass [N], default ``scene.mass``)."""
    if x.dim() != 2 or x.shape[1] != 3:
        raise ValueError(f"x must be [N, 3], got {list(x.shape)}")
    mass = scene.mass if mass is None else mass
    shape = torch.tensor(scene.grid_shape, device=x.device)
    local = (x - torch.tensor(scene.origin, dtype=x.dtype, device=x.device)) / scene.dx
    base = torch.minimum(torch.clamp((local - 0.5).floor().long(), min=0), shape - 3)
    fx = local - base.to(x.dtype)
    w = torch.stack([0.5 * (1.5 - fx) ** 2, 0.75 - (fx - 1.0) ** 2, 0.5 * (fx - 0.5) ** 2])  # [3, N, 3]
    out = torch.zeros(int(np.prod(scene.grid_shape)), dtype=x.dtype, device=x.device)
    X, Y, Z = scene.grid_shape
    for i in range(3):
        for j in range(3):
            for k in range(3):
                node = base + torch.tensor([i, j, k], device=x.device)
                flat = (node[:, 0] * Y + node[:, 1]) * Z + node[:, 2]
                out = out.index_add(0, flat, mass * w[i, :, 0] * w[j, :, 1] * w[k, :, 2])
    return out.view(X, Y, Z)
