"""Differentiable MPM rollout: checkpointed forward, segment recompute + adjoint-kernel backward.

    scene = RolloutScene.from_solver(solver, dt=2e-4)
    traj = simulate(scene, x0, v0, {"E": E, "nu": nu}, n_substeps=400, frames=[100, 400])
    loss = ((traj.x[-1] - target) ** 2).sum() + grid_mass(traj.x[0], scene).square().sum()
    loss.backward()          # grads on x0, v0, E, nu (and "controls" when given)

Every material is differentiable, the plastic ones (von Mises, snow, sand) too, including their
own parameters: params may hold "yield_stress", "friction_angle", "hardening", ... (see
:func:`aux_per_particle`).

Checkpoint schedule (DiffTaichi's recompute-instead-of-store rule). The T substeps are cut into
segments of K. The forward keeps only the particle state at each segment start (a checkpoint:
x, v, C, F, plastic = 25 reals a particle), on the device or in pinned host memory. The backward
walks the segments in reverse: it copies the checkpoint into a (K + 1)-slot buffer, runs the K
substeps forward again to refill the slots, then for each substep s (last first) runs its adjoint
on the two slots (s, s + 1): g2p_grad, grid_update_grad, p2g_grad and the stress's adjoint, the
plastic particles' through their return maps and their SVD, all hand-written
(``_Substeps.backward``; taichi_mpm.substep). The grid of substep s is either kept from the
refill pass (``store_grids``: K grids on the device, only the per-particle stress is recomputed)
or recomputed (particle_stress, p2g, grid_update). Particle memory:
N * (T / K + K + 2) states instead of N * T; K defaults to the longest segment of up to 4 sqrt(T)
substeps that fits ``device_budget_bytes``, sqrt(T) when none does, lowered when that would not fit
either (:class:`CheckpointPlan`).

The substep kernels and their data convention are ``taichi_mpm.substep``; this module only
schedules them. The adjoint kernels accumulate into buffers the backward owns, never into the
caller's tensors' ``.grad``, so calling the Function several times in one graph counts each
gradient once.
"""
from __future__ import annotations

import functools
import math
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Mapping, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import taichi as ti
import torch

from taichi_mpm.materials import PLASTIC_IDS, PLASTIC_PARAMETERS, plastic_model_set
from taichi_mpm.runtime import device as runtime_device, ensure_init
from taichi_mpm.solver import STATE_KEYS, SimulationError, check_particles, extent_is_valid, particle_extent
from taichi_mpm.substep import FORWARD_GROUP, grouped_substeps
from taichi_mpm.validation import check_nu, check_tensor, same_device

STATE_SHAPES = {"x": (3,), "v": (3,), "C": (3, 3), "F": (3, 3), "plastic": ()}
REALS_PER_PARTICLE = 25  # x 3 + v 3 + C 9 + F 9 + plastic 1
ELASTIC_PARAMETERS = ("E", "nu", "lam", "mu")


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
    ``time0``: the colliders' clock at x0 (a moving collider is at origin + velocity * time; substep
    s of a rollout runs at time0 + s * dt).
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
    time0: float = 0.0

    @property
    def n_particles(self) -> int:
        return int(self.material.shape[0])

    @property
    def dtype(self) -> torch.dtype:
        return self.density.dtype

    @functools.cached_property
    def material_ids(self) -> Tuple[int, ...]:
        """The material ids the particles hold, read once (a device sync; ~1.8 ms for 100k
        particles on an H200 host, and every forward and backward asked)."""
        return tuple(torch.unique(self.material).tolist())

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
                   valid_upper=tuple(solver.valid_upper.tolist()), time0=float(solver.time))

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


# ----------------------------------------------------------------------------- compile notice
_COMPILED: set = set()  # (stage, dtype) whose kernels this process has built
NOTICE_AFTER_S = 3.0


@contextmanager
def _compile_notice(stage: str, dtype: torch.dtype):
    """The first time this process runs ``stage`` ("forward" / "backward") in ``dtype``, print one
    line on stderr if it is still running after NOTICE_AFTER_S seconds: Taichi is compiling its
    kernels (cached on disk for later processes), which is not a hang."""
    key = (stage, dtype)
    if key in _COMPILED:
        yield
        return
    import sys
    import threading

    timer = threading.Timer(NOTICE_AFTER_S, lambda: print(
        f"taichi_mpm: compiling the MPM {stage} kernels ({str(dtype).replace('torch.', '')}) for the first "
        f"time; Taichi caches them on disk for later runs ...", file=sys.stderr, flush=True))
    timer.daemon = True
    timer.start()
    try:
        yield
        _COMPILED.add(key)
    finally:
        timer.cancel()


# ----------------------------------------------------------------------------- schedule
SEGMENT_GROWTH = 4  # a default segment may grow to this many times sqrt(T) substeps (CheckpointPlan)


@dataclass(frozen=True)
class CheckpointPlan:
    """K substeps a segment (``every``), where the checkpoints live ("device" or "host"), whether
    the backward keeps the segment's grids from its refill pass (``store_grids``) instead of
    recomputing each substep's grid a second time, and whether the forward keeps its last segment's
    states and grids for the backward (``keep_last``: that segment needs no checkpoint and no refill;
    the buffers the backward would allocate are held from the forward on instead, so only with
    device checkpoints and stored grids)."""

    every: int
    storage: str
    store_grids: bool
    keep_last: bool = True

    @property
    def keeps_last_segment(self) -> bool:
        return self.keep_last and self.storage == "device" and self.store_grids

    @staticmethod
    def choose(n_substeps: int, state_bytes: int, grid_bytes: int, on_cuda: bool, every: Optional[int] = None,
               storage: str = "auto", device_budget_bytes: int = 1 << 30,
               store_grids: Optional[bool] = None, group: int = 1) -> "CheckpointPlan":
        """Device bytes of a plan: checkpoints (if on the device) + (K + 1) segment states + K grids
        (if stored). Unless K is given it is sqrt(T) rounded up to whole groups of ``group``
        substeps (the substeps a launch, see ``_grouped``) or, with device checkpoints, the longest
        such segment up to SEGMENT_GROWTH times that which fits the budget: each segment costs the
        forward and the backward a checkpoint copy, a state check and a restore (~30 small torch
        calls), and its tail breaks a group; bench/e2e_step.py's step (200 substeps) took 6 ms
        less with 4 segments of 56 than with 13 of 16 (median of 20 interleaved steps, H200,
        2026-11-28), its peak memory 1.00 -> 1.39 GB. In order, the first plan within
        ``device_budget_bytes`` wins: device checkpoints with grids; on CUDA, host checkpoints with
        grids and K lowered to fit (if K stays >= sqrt(T) / 8: a small K only costs host copies
        and host memory); device checkpoints without grids; host checkpoints without grids, K
        lowered to fit. Off CUDA the host is the device."""
        if storage not in ("auto", "device", "host"):
            raise ValueError(f"checkpoint storage must be 'auto', 'device' or 'host', got {storage!r}")
        if every is not None and not (isinstance(every, int) and every >= 1):
            raise ValueError(f"checkpoint_every must be an int >= 1, got {every!r}")
        whole = lambda k: min(n_substeps, -(-k // group) * group)  # noqa: E731  (rounded up to whole groups)
        k0 = every if every is not None else whole(max(1, round(math.sqrt(n_substeps))))
        budget, S, G = device_budget_bytes, max(state_bytes, 1), grid_bytes
        candidates = []

        def plan_bytes(k: int, where: str, grids: bool) -> int:
            return (-(-n_substeps // k) * S if where == "device" else 0) + (k + 1) * S + (k * G if grids else 0)

        for grids in ((True, False) if store_grids is None else (store_grids,)):
            per_step = S + (G if grids else 0)
            for where in (("device", "host") if storage == "auto" else (storage,)):
                if where == "host" and not on_cuda:
                    where = "device"
                k = k0
                if where == "host" and every is None:
                    k = max(1, min(k0, (budget - S) // per_step))
                    k = k // group * group if k >= group else k
                    if grids and k < max(2, k0 // 8):
                        continue
                elif every is None:
                    k = next((g for g in range(whole(SEGMENT_GROWTH * k0), k0, -group)
                              if plan_bytes(g, where, grids) <= budget), k0)
                candidates.append(CheckpointPlan(int(k), where, grids))
                if plan_bytes(k, where, grids) <= budget:
                    return candidates[-1]
        return candidates[-1]  # nothing fits: the leanest plan asked for


# ----------------------------------------------------------------------------- buffers
def _alloc_state(slots: int, n: int, dtype, dev) -> dict:
    return {k: torch.zeros((slots, n) + STATE_SHAPES[k], dtype=dtype, device=dev) for k in STATE_KEYS}


def _alloc_grids(count: int, grid: tuple) -> list:
    """``count`` stored grids like ``grid`` (mv, m, v), as one array each, at zero: the adjoint's
    grid_update_grad zeroes mv and m after reading them, and the grid update leaves nodes without
    mass as they are, whose velocities are read with weight 0 (taichi_mpm.substep.grid_update_at)
    and must not meet NaN."""
    return [torch.zeros((count,) + tuple(t.shape), dtype=t.dtype, device=t.device) for t in grid]


class _Substeps:
    """One scene's substep kernels, scratch buffers and the two halves of a substep's gradient.

    Scenes holding plastic particles take the stress in two kernels (``trial_svd`` then
    ``particle_stress_svd``) so that the SVD gets its hand-written adjoint; others take the single
    ``particle_stress`` (no SVD). The sequence itself is ``taichi_mpm.substep.run_substep``, the
    one the forward solver runs.
    """

    def __init__(self, scene: RolloutScene):
        from taichi_mpm.constitutive import svd_separation
        from taichi_mpm.grid_layout import vector_grid_shape
        from taichi_mpm.substep import GridSetup, substep_launchers, tiled_p2g

        self.scene = scene
        real = ti.f64 if scene.dtype == torch.float64 else ti.f32
        self.k = substep_launchers(real, plastic_models=False)
        self.tiled = tiled_p2g(scene.n_particles)  # P2G through shared memory (CUDA, large scenes)
        self.separation = svd_separation(real)
        ids = scene.material_ids
        self.plastic_models = plastic_model_set(ids)
        self.has_plastic = self.plastic_models != 0
        self.has_elastic = any(i not in PLASTIC_IDS for i in ids)  # particles of a non-plastic model
        self.setup = GridSetup(origin=ti.Vector(list(scene.origin), real), dx=scene.dx,
                               gravity=ti.Vector(list(scene.gravity), real), wall_mode=scene.wall_mode,
                               wall_friction=scene.wall_friction, colliders=scene.colliders,
                               n_colliders=scene.n_colliders)
        n, dev, dtype, shape = scene.n_particles, scene.density.device, scene.dtype, tuple(scene.grid_shape)
        zeros = lambda *s: torch.zeros(s, dtype=dtype, device=dev)  # noqa: E731
        vector = vector_grid_shape(shape)
        # (momentum, mass, velocity); mv and m stay clear between substeps: the forward's grid
        # update or the adjoint's grid_update_grad zeroes them once read
        self.grid = (zeros(*vector), zeros(*shape), zeros(*vector))
        self.no_control = zeros(1, 3, 3)
        self.affine = zeros(n, 3, 3)  # per-substep scratch of the stress -> p2g
        # the plastic particles' SVD of F_trial (U, sig, V): scratch, recomputed in the backward
        self.svd = (zeros(n, 3, 3), zeros(n, 3), zeros(n, 3, 3)) if self.has_plastic else None
        # adjoints of the scratch: grid_update_grad writes g_mv, g_m and resets g_v (g2p_grad's atomics)
        # after reading it, p2g_grad writes affine's; the SVD's are zeroed for every substep
        self.grid_grads = tuple(torch.zeros_like(t) for t in self.grid)
        self.affine_grad = torch.zeros_like(self.affine)
        self.svd_grads = None if self.svd is None else tuple(torch.zeros_like(t) for t in self.svd)

    def constants(self, E, nu, aux) -> dict:
        sc = self.scene
        return {"material": sc.material, "E": E, "nu": nu, "aux": aux, "density": sc.density, "volume": sc.volume}

    def forward(self, state: dict, j: int, constants: dict, control, grid=None, move_particles: bool = True,
                for_adjoint: bool = False, substep: int = 0):
        """Substep from slot j to j + 1 (on the scratch grid, or the given (mv, m, v) buffers);
        ``substep``: its index in the rollout, which sets the colliders' clock.
        ``for_adjoint``: a recompute whose scratch feeds the adjoint (singular values spread, see
        ``taichi_mpm.constitutive.SVD_SEPARATION``); never for states that are kept."""
        from taichi_mpm.substep import run_substep

        # a plain forward step on the scratch grid runs with keep_grid=False; a step whose grid the
        # adjoint reads (or a stored grid slot) keeps it, and the adjoint clears it
        forward_only = grid is None and move_particles and not for_adjoint
        run_substep(self.k, j, j + 1, self.scene.n_particles, state, constants, grid or self.grid, self.affine,
                    control, self.setup, self.scene.dt, self.time(substep), svd=self.svd,
                    move_particles=move_particles, svd_separation=self.separation if for_adjoint else 0.0,
                    keep_grid=not forward_only, tiled=self.tiled)

    def forward_quad(self, state: dict, j: int, constants: dict, controls, grids=None, substep: int = 0):
        """:meth:`forward` from slot j to j + 4 in one launch (elastic scenes, see
        :func:`_grouped`): on the scratch grid (forward only, left clear) or on the given four
        (mv, m, v) grids, which keep what the adjoints read; controls: the four substeps' (dFc, scale)."""
        from taichi_mpm.substep import run_substep_quad

        run_substep_quad(self.k, tuple(range(j, j + 5)), self.scene.n_particles, state, constants,
                         grids or (self.grid,) * 4, controls, self.setup, self.scene.dt,
                         tuple(self.time(substep + i) for i in range(4)), keep_grid=grids is not None,
                         tiled=self.tiled)

    def time(self, substep: int) -> float:
        """The colliders' clock at the start of the rollout's substep ``substep``."""
        return self.scene.time0 + substep * self.scene.dt

    def recompute_stress(self, state: dict, constants: dict, control):
        """The per-particle stage of substep 0 -> 1 of ``state`` again (affine, SVD scratch), for
        the adjoint (singular values spread)."""
        sc, k = self.scene, self.k
        dFc, scale = control
        c = constants
        inv_dx = 1.0 / sc.dx
        if self.svd is None:
            k.particle_stress(0, 1, sc.n_particles, state["C"], state["F"], state["plastic"], c["material"], c["E"],
                              c["nu"], c["density"], c["volume"], c["aux"], dFc, scale, self.affine, inv_dx, sc.dt)
        else:
            U, sig, V = self.svd
            k.trial_svd(0, sc.n_particles, state["C"], state["F"], c["material"], dFc, scale, U, sig, V, sc.dt,
                        self.separation)
            k.particle_stress_svd(0, 1, sc.n_particles, state["C"], state["F"], state["plastic"], c["material"],
                                  c["E"], c["nu"], c["density"], c["volume"], c["aux"], dFc, scale, U, sig, V,
                                  self.affine, inv_dx, sc.dt)

    def backward(self, pair: dict, adjoint: dict, grid, constants: dict, parameter_grads: dict, control,
                 control_grad, stress_ready: bool, substep: int = 0) -> None:
        """Reverse of one substep whose forward (up to grid_update) was just recomputed on
        ``pair`` (slots 0 -> 1) and ``grid``, then the step to the previous substep: the adjoint of
        state 0 becomes the incoming one (slot 1) and slot 0 is zeroed. ``adjoint`` holds the
        state adjoints [2, N, ...] (slot 1 in, slot 0 accumulated); the adjoints of E, nu, aux
        accumulate into ``parameter_grads``; control_grad: [N, 3, 3] adjoint of the control or None;
        stress_ready: whether the plastic scenes' per-particle scratch (affine, SVD) is that of this
        substep; substep: its index in the rollout (the colliders' clock). Elastic scenes: one call
        (substep_adjoint: the stress again, then the g2p, grid_update, p2g and stress adjoints, all
        hand-written). With plastic particles: the transfers' adjoints, the elastic particles'
        stress adjoint, the plastic ones' return maps' and the SVD's adjoint (all hand-written)."""
        sc, k, setup = self.scene, self.k, self.setup
        n, inv_dx = sc.n_particles, 1.0 / sc.dx
        dFc, scale = control
        c = constants
        g_dFc = self.no_control if control_grad is None else control_grad
        if self.svd is None:
            k.substep_adjoint(n, pair["x"], pair["v"], pair["C"], pair["F"], pair["plastic"], c["material"], c["E"],
                              c["nu"], c["density"], c["volume"], c["aux"], dFc, scale, *grid,
                              *self.grid_grads[:2], self.grid_grads[2], *(adjoint[key] for key in STATE_KEYS),
                              parameter_grads["E"], parameter_grads["nu"], g_dFc, setup.origin,
                              inv_dx, sc.dt, setup.gravity, setup.dx, *setup.boundary(self.time(substep)))
            return
        if not stress_ready:
            self.recompute_stress(pair, constants, control)
        for g in self.svd_grads:
            g.zero_()
        k.g2p_grad(0, 1, n, pair["x"], grid[2], adjoint["x"], adjoint["v"], adjoint["C"], self.grid_grads[2],
                   setup.origin, inv_dx, sc.dt)
        k.grid_update_grad(grid[0], grid[1], self.grid_grads[2], self.grid_grads[0], self.grid_grads[1], sc.dt,
                           setup.gravity, setup.origin, setup.dx, *setup.boundary(self.time(substep)))
        k.p2g_grad(0, n, pair["x"], pair["v"], sc.density, sc.volume, self.affine, self.grid_grads[0],
                   self.grid_grads[1], adjoint["x"], adjoint["v"], self.affine_grad, setup.origin, inv_dx)
        # the stress's adjoint: the elastic particles', then the plastic ones' (both hand-written); two
        # kernels, because one holding both compiled 1.4 s longer (2-core CPU, float64, 2026-11-27),
        # and a scene of plastic particles alone needs (and compiles) only the second
        if self.has_elastic:
            k.particle_stress_grad(0, 1, n, pair["C"], pair["F"], c["material"], c["E"], c["nu"], c["density"],
                                   c["volume"], dFc, scale, self.affine_grad, adjoint["C"], adjoint["F"],
                                   adjoint["plastic"], parameter_grads["E"], parameter_grads["nu"], g_dFc, inv_dx,
                                   sc.dt)
        k.plastic_stress_grad(0, 1, n, pair["plastic"], c["material"], c["E"], c["nu"], c["density"], c["volume"],
                              c["aux"], *self.svd, self.affine_grad, adjoint["C"], adjoint["plastic"], adjoint["F"],
                              parameter_grads["E"], parameter_grads["nu"], parameter_grads["aux"], *self.svd_grads,
                              inv_dx, sc.dt, self.plastic_models)
        k.trial_svd_grad(0, n, pair["C"], pair["F"], c["material"], dFc, scale, *self.svd, *self.svd_grads,
                         adjoint["C"], adjoint["F"], g_dFc, sc.dt)
        k.advance_adjoint(n, *(adjoint[key] for key in STATE_KEYS))

    def backward_pair(self, states: Tuple[dict, dict], adjoint: dict, grids, constants: dict,
                      parameter_grads: dict, controls, control_grads, substep: int) -> None:
        """:meth:`backward` of substeps ``substep`` and ``substep + 1`` of an elastic scene in one
        launch (substep_adjoint_pair), the later first, on their kept grids; states, grids, controls
        and control_grads: the two substeps' (each as ``backward`` takes it). For a backward where
        no loss gradient lands on the state between the two."""
        sc, setup = self.scene, self.setup
        c = constants
        (dFc, scale), (dFc1, scale1) = controls
        g_dFc, g_dFc1 = (self.no_control if g is None else g for g in control_grads)
        first, second = states
        self.k.substep_adjoint_pair(
            sc.n_particles, *(first[key] for key in STATE_KEYS), *(second[key] for key in STATE_KEYS),
            c["material"], c["E"], c["nu"], c["density"], c["volume"], c["aux"], dFc, scale, dFc1, scale1,
            *grids[0], *grids[1], *self.grid_grads, *(adjoint[key] for key in STATE_KEYS),
            parameter_grads["E"], parameter_grads["nu"], g_dFc, g_dFc1, setup.origin,
            1.0 / sc.dx, sc.dt, setup.gravity, setup.dx, *setup.boundary(self.time(substep)),
            self.time(substep + 1))

    def check(self, state: dict, j: int, substep: int):
        """Raise SimulationError if slot j holds NaN/Inf or particles outside the valid domain."""
        sc = self.scene
        check_particles(state["x"][j], state["v"][j], np.asarray(sc.valid_lower), np.asarray(sc.valid_upper),
                        f"substep {substep}", "Lower dt or keep the bodies away from the walls.")

    def check_later(self, state: dict, j: int, substep: int):
        """:meth:`check` of slot j without waiting for the GPU: queues its two reductions and their
        copy to pinned memory, returns a ticket for :meth:`finish_check` (on the CPU: checks now,
        returns None). Waiting at every segment cost a 200-substep, 100k-particle forward on an
        H200 ~4 ms of its ~20 (24.5 ms with the checks, 20.5 without, one run, 2026-11-28); the
        substep kernels clamp their grid indices, so particles that went bad run one more segment
        harmlessly before the error."""
        if not state["x"].is_cuda:
            self.check(state, j, substep)
            return None
        sc = self.scene
        values = particle_extent(state["x"][j], state["v"][j], sc.valid_lower, sc.valid_upper)
        host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
        host.copy_(values, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return host, done, substep

    def finish_check(self, ticket, state: dict, j: int):
        """Raise SimulationError if the state a :meth:`check_later` ticket saw was bad; slot j of
        state must still hold that state (the error names its worst particle)."""
        if ticket is None:
            return
        host, done, substep = ticket
        done.synchronize()
        if not extent_is_valid(*host.tolist()):
            self.check(state, j, substep)
            raise SimulationError(f"substep {substep}: particles had NaN/Inf state or left the valid domain")


def _chunks(count: int, grouped: bool):
    """(j, 4) for the groups of four substeps j .. j + 3 among 0 .. count - 1, from 0 on, then (j, 1)
    for each substep left (every one when not grouped)."""
    j = 0
    while j < count:
        step = FORWARD_GROUP if grouped and j + FORWARD_GROUP <= count else 1
        yield j, step
        j += step


def _grouped(scene: RolloutScene, n_substeps: int) -> bool:
    """Whether a rollout of scene runs its substeps several a launch (forward four, adjoint two):
    elastic scenes (the plastic ones' stress takes several kernels) where
    ``taichi_mpm.substep.grouped_substeps`` says so."""
    return plastic_model_set(scene.material_ids) == 0 and grouped_substeps(n_substeps)


def _control_for(scene: RolloutScene, controls: Optional[torch.Tensor], s: int, no_control: torch.Tensor):
    """(dFc [N, 3, 3], scale) acting on substep s; the [1, 3, 3] zero stand-in with scale 0 when none."""
    if controls is None or s % scene.control_stride != 0:
        return no_control, 0.0
    return controls[s // scene.control_stride], 1.0


# ----------------------------------------------------------------------------- autograd
class _Rollout(torch.autograd.Function):
    """(x0, v0, C0, F0, E, nu, aux, controls) -> (x, v, C, F) at frames; see the module docstring."""

    @staticmethod
    def forward(ctx, scene: RolloutScene, n_substeps: int, frames: Tuple[int, ...], plan: CheckpointPlan,
                x0, v0, C0, F0, E, nu, aux, controls):
        ctx.set_materialize_grads(False)  # outputs the loss does not use get no zero-filled gradient
        substeps = _Substeps(scene)
        grouped = _grouped(scene, n_substeps)
        n, dtype, dev = scene.n_particles, scene.dtype, x0.device
        K = plan.every
        state = _alloc_state(K + 1, n, dtype, dev)
        frame_slot = {t: i for i, t in enumerate(frames)}
        out = {key: torch.empty((len(frames), n) + STATE_SHAPES[key], dtype=dtype, device=dev)
               for key in ("x", "v", "C", "F")}
        for key, value in (("x", x0), ("v", v0), ("C", C0), ("F", F0), ("plastic", scene.plastic0)):
            state[key][0] = value
        constants = substeps.constants(E.detach().contiguous(), nu.detach().contiguous(), aux.detach().contiguous())
        controls = None if controls is None else controls.detach().contiguous()
        pin = plan.storage == "host" and dev.type == "cuda"
        checkpoints = []
        # the last segment's states (this buffer) and grids, kept for the backward (see CheckpointPlan)
        keep_last = plan.keeps_last_segment and any(ctx.needs_input_grad[4:])
        kept_grids = kept_views = None  # kept_views[j]: substep j's (mv, m, v)

        def record(t: int, slot: int):
            if t in frame_slot:
                for key in out:
                    out[key][frame_slot[t]] = state[key][slot]

        record(0, 0)
        checking = None  # the last segment's check_later ticket, read once the next segment is queued
        with _compile_notice("forward", dtype):
            for start in range(0, n_substeps, K):
                length = min(K, n_substeps - start)
                if start > 0:
                    for key in STATE_KEYS:
                        state[key][0] = state[key][K]
                last = start + K >= n_substeps
                if keep_last and last:
                    kept_grids = _alloc_grids(K, substeps.grid)
                    kept_views = [[g[j] for g in kept_grids] for j in range(K)]
                elif any(ctx.needs_input_grad[4:]):
                    checkpoints.append(_store(state, plan.storage, pin))
                for j, count in _chunks(length, grouped):
                    step_controls = [_control_for(scene, controls, start + i, substeps.no_control)
                                     for i in range(j, j + count)]
                    kept = None if kept_views is None else kept_views[j:j + count]
                    if count == FORWARD_GROUP:
                        substeps.forward_quad(state, j, constants, step_controls, None if kept is None else tuple(kept),
                                              substep=start + j)
                    else:
                        substeps.forward(state, j, constants, step_controls[0], None if kept is None else kept[0],
                                         substep=start + j)
                    for i in range(j, j + count):
                        record(start + i + 1, i + 1)
                ticket = substeps.check_later(state, length, start + length)
                substeps.finish_check(checking, state, 0)  # the last segment's end state is slot 0 now
                checking = ticket
            substeps.finish_check(checking, state, length)
        ctx.scene, ctx.n_substeps, ctx.frames, ctx.plan = scene, n_substeps, frames, plan
        ctx.checkpoints = checkpoints
        ctx.kept = (state, kept_grids) if keep_last else None
        ctx.save_for_backward(E, nu, aux, controls)
        return out["x"], out["v"], out["C"], out["F"]

    @staticmethod
    def backward(ctx, grad_x, grad_v, grad_C, grad_F):
        with _compile_notice("backward", ctx.scene.dtype):
            return _Rollout._backward(ctx, {"x": grad_x, "v": grad_v, "C": grad_C, "F": grad_F})

    @staticmethod
    def _backward(ctx, output_grads: dict):
        """The checkpoint schedule in reverse: for each segment (last first) restore its checkpoint,
        refill its substeps forward, then walk its substeps backward, each as
        ``recompute`` (grid kept or recomputed) -> ``_Substeps.backward`` (which ends with the
        adjoint of state s as the incoming adjoint of substep s - 1), or two at once
        (``_Substeps.backward_pair``) where substeps are grouped, the grids are kept and no frame lies
        between the two."""
        scene, n_substeps, frames, plan = ctx.scene, ctx.n_substeps, ctx.frames, ctx.plan
        # detached: a tensor that requires grad, passed to a kernel, has Taichi touch its .grad
        E, nu, aux, controls = (None if t is None else t.detach().contiguous() for t in ctx.saved_tensors)
        substeps = _Substeps(scene)
        grouped = _grouped(scene, n_substeps)
        n, dtype, dev = scene.n_particles, scene.dtype, E.device
        segment_length = plan.every
        frame_index = {t: i for i, t in enumerate(frames)}
        kept = ctx.kept  # the forward's last segment (states, grids), or None
        ctx.kept = None
        segment = kept[0] if kept else _alloc_state(segment_length + 1, n, dtype, dev)
        adjoint = _alloc_state(2, n, dtype, dev)  # [0]: state before the substep, [1]: after it
        parameter_grads = {"E": torch.zeros_like(E), "nu": torch.zeros_like(nu), "aux": torch.zeros_like(aux)}
        constants = substeps.constants(E, nu, aux)
        controls_grad = None if controls is None else torch.zeros_like(controls)
        stored_grids = (kept[1] if kept else _alloc_grids(segment_length, substeps.grid)) if plan.store_grids else None

        def add_output_grads(t: int):
            """dL/d(state t) from the frames the caller used."""
            i = frame_index.get(t)
            if i is not None:
                for key, g in output_grads.items():
                    if g is not None:
                        adjoint[key][1] += g[i]

        # views made once (state_views[j]: slots j, j + 1 of every state key): every segment passes
        # the same tensors to the launches, which then skip their checks (taichi_mpm.launch)
        state_views = [{key: segment[key][j:j + 2] for key in STATE_KEYS} for j in range(segment_length)]
        grid_views = None if stored_grids is None else [[g[j] for g in stored_grids] for j in range(segment_length)]

        def kept_grid(j: int):
            return None if grid_views is None else grid_views[j]

        def step_controls(s: int, count: int):
            """(dFc, scale) of substeps s .. s + count - 1 and the adjoints their controls take."""
            acting = [_control_for(scene, controls, i, substeps.no_control) for i in range(s, s + count)]
            grads = [None if controls_grad is None or scale == 0.0 else controls_grad[i // scene.control_stride]
                     for i, (_, scale) in zip(range(s, s + count), acting)]
            return acting, grads

        def refill(start: int, length: int):
            """Run the segment's substeps forward again from its checkpoint (slot `length` is never
            read; with stored grids, keep each substep's grid); the kept last segment needs none."""
            if kept and start + segment_length >= n_substeps:
                return
            _restore(segment, ctx.checkpoints[start // segment_length])
            for j, count in _chunks(length if stored_grids is not None else length - 1, grouped):
                control, _ = step_controls(start + j, count)
                if count == FORWARD_GROUP:
                    substeps.forward_quad(segment, j, constants, control, None if stored_grids is None else
                                          tuple(kept_grid(j + i) for i in range(count)), substep=start + j)
                else:
                    substeps.forward(segment, j, constants, control[0], kept_grid(j), move_particles=j < length - 1,
                                     substep=start + j)

        def recompute(states: dict, j: int, control, s: int):
            """The grid of substep j of the segment as its forward had it, and whether the
            per-particle scratch was recomputed with it."""
            if stored_grids is not None:
                return kept_grid(j), False
            substeps.forward(states, 0, constants, control, move_particles=False, for_adjoint=True, substep=s)
            return substeps.grid, True

        starts = list(range(0, n_substeps, segment_length))
        for start in reversed(starts):
            length = min(segment_length, n_substeps - start)
            refill(start, length)
            j = length - 1
            while j >= 0:
                s = start + j
                add_output_grads(s + 1)
                if grouped and stored_grids is not None and j >= 1 and s not in frame_index:
                    control, control_grad = step_controls(s - 1, 2)
                    substeps.backward_pair((state_views[j - 1], state_views[j]), adjoint,
                                           (kept_grid(j - 1), kept_grid(j)), constants, parameter_grads, control,
                                           control_grad, substep=s - 1)
                    j -= 2
                    continue
                states = state_views[j]  # slots j and j + 1: substep j's input and output
                (control,), (control_grad,) = step_controls(s, 1)
                grid, stress_ready = recompute(states, j, control, s)
                substeps.backward(states, adjoint, grid, constants, parameter_grads, control, control_grad,
                                  stress_ready, substep=s)
                j -= 1
        add_output_grads(0)
        # free the segment buffers (and the last views into them) before the results are copied out
        ctx.checkpoints = segment = stored_grids = substeps = states = grid = state_views = grid_views = None
        grads = [adjoint[key][1].clone() for key in ("x", "v", "C", "F")] + \
            [parameter_grads["E"], parameter_grads["nu"], parameter_grads["aux"], controls_grad]
        return (None, None, None, None) + tuple(g if need else None
                                                for g, need in zip(grads, ctx.needs_input_grad[4:]))


def _store(S: dict, storage: str, pin: bool) -> dict:
    """A checkpoint of slot 0: one tensor a state key, copied straight to where it is kept (no
    device-side staging copy of the whole state)."""
    if storage == "device":
        return {key: S[key][0].clone() for key in STATE_KEYS}
    checkpoint = {}
    for key in STATE_KEYS:
        checkpoint[key] = torch.empty(S[key].shape[1:], dtype=S[key].dtype, pin_memory=pin)
        checkpoint[key].copy_(S[key][0], non_blocking=pin)
    return checkpoint


def _restore(S: dict, checkpoint: dict) -> None:
    for key in STATE_KEYS:
        S[key][0].copy_(checkpoint[key], non_blocking=True)


# ----------------------------------------------------------------------------- public face
def material_per_particle(scene: RolloutScene, params: Mapping[str, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-particle (E [N], nu [N]) from params holding ("E", "nu") or ("lam", "mu"), each a
    scalar, per body [n_bodies] or per particle [N] tensor. Differentiable (torch ops). Other keys
    (the plastic parameters, see :func:`aux_per_particle`) are ignored here."""
    params = {k: v for k, v in params.items() if k in ELASTIC_PARAMETERS}
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


def aux_per_particle(scene: RolloutScene, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Per-particle model parameters [N, 4] (``scene.aux`` layout, see ``taichi_mpm.materials``)
    with the plastic parameters found in ``params`` put in for the particles of their model:
    "yield_stress" (von Mises, Pa), "friction_angle" (sand, degrees), "hardening",
    "critical_compression", "critical_stretch" (snow); each a scalar, per body or per particle
    tensor. Differentiable (torch ops), so gradients reach these parameters."""
    aux = scene.aux
    for name, (material_id, column, to_aux) in PLASTIC_PARAMETERS.items():
        if name not in params:
            continue
        value = _expand(scene, name, params[name])
        check_tensor(name, value, finite=True)
        owners = scene.material == material_id
        if not bool(owners.any()):
            raise ValueError(f"{name} was given but the scene holds no particle of its material (id {material_id})")
        if bool((value[owners] <= 0).any()):
            raise ValueError(f"{name} must be > 0")
        mask = torch.zeros_like(aux, dtype=torch.bool)
        mask[:, column] = owners
        aux = torch.where(mask, to_aux(value, torch).unsqueeze(1).expand_as(aux), aux)
    return aux


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


def _check_input(name: str, t: torch.Tensor, shape: tuple, scene: RolloutScene, dev) -> None:
    check_tensor(name, t, shape=shape, dtype=scene.dtype, device=dev, finite=True)


def plan_for(scene: RolloutScene, n_substeps: int, checkpoint_every: Optional[int] = None,
             checkpoint_storage: str = "auto", device_budget_bytes: int = 1 << 30,
             store_grids: Optional[bool] = None) -> CheckpointPlan:
    """The :class:`CheckpointPlan` that :func:`simulate` uses for this scene and length."""
    real_bytes = torch.finfo(scene.dtype).bits // 8
    state_bytes = scene.n_particles * REALS_PER_PARTICLE * real_bytes
    grid_bytes = int(np.prod(scene.grid_shape)) * 7 * real_bytes  # mv 3 + m 1 + v 3 per node
    return CheckpointPlan.choose(n_substeps, state_bytes, grid_bytes, runtime_device().type == "cuda",
                                 checkpoint_every, checkpoint_storage, device_budget_bytes, store_grids,
                                 FORWARD_GROUP if _grouped(scene, n_substeps) else 1)


def simulate(scene: RolloutScene, x0: torch.Tensor, v0: torch.Tensor, params: Mapping[str, torch.Tensor],
             n_substeps: int, frames: Sequence[int], controls: Optional[torch.Tensor] = None,
             C0: Optional[torch.Tensor] = None, F0: Optional[torch.Tensor] = None,
             checkpoint_every: Optional[int] = None, checkpoint_storage: str = "auto",
             device_budget_bytes: int = 1 << 30, store_grids: Optional[bool] = None,
             keep_last_segment: bool = True) -> Trajectory:
    """Run ``n_substeps`` MPM substeps of ``scene.dt`` from (x0 [N, 3], v0 [N, 3]) and return the
    states at ``frames`` (substep indices in [0, n_substeps], increasing; 0 is the initial state).

    params: {"E", "nu"} or {"lam", "mu"}, each scalar / per body / per particle (see
    :func:`material_per_particle`), and optionally the plastic models' parameters "yield_stress",
    "friction_angle", "hardening", "critical_compression", "critical_stretch" (see
    :func:`aux_per_particle`; when absent, the values the particles were added with); controls: optional [scene.n_controls(T), N, 3, 3] F controls,
    control c acting on substep c * control_stride as F <- (I + dt C)(F + controls[c]).
    C0, F0: optional initial affine velocity / deformation gradient [N, 3, 3] (default 0 and I),
    e.g. the last frame of a previous rollout.
    Every material is differentiable (the plastic ones through a hand-written SVD adjoint).
    Differentiable w.r.t. x0, v0, C0, F0, the params and controls; memory is N * (T / K + K)
    states with K = checkpoint_every (default: see :class:`CheckpointPlan`);
    checkpoint_storage "auto" | "device" | "host" (pinned, for large N on the GPU); store_grids:
    keep each segment's grids in the backward instead of recomputing them (None: when the budget
    allows); keep_last_segment: with device checkpoints and stored grids, the forward's last
    segment stays on the device for the backward, which then skips its refill (False frees it at
    the end of the forward); see :class:`CheckpointPlan`.
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
    if not same_device(scene.density.device, dev):
        raise ValueError(f"scene tensors live on {scene.density.device}, Taichi runs on {dev}")
    unknown = set(params) - set(ELASTIC_PARAMETERS) - set(PLASTIC_PARAMETERS)
    if unknown:
        raise ValueError(f"unknown params {sorted(unknown)}; known: {list(ELASTIC_PARAMETERS) + list(PLASTIC_PARAMETERS)}")
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
    check_nu("nu", nu.detach())
    aux = aux_per_particle(scene, params)
    if controls is not None:
        _check_input("controls", controls, (scene.n_controls(n_substeps), n, 3, 3), scene, dev)
    plan = plan_for(scene, n_substeps, checkpoint_every, checkpoint_storage, device_budget_bytes, store_grids)
    if not keep_last_segment:
        plan = replace(plan, keep_last=False)
    return Trajectory(*_Rollout.apply(scene, n_substeps, frames, plan, x0.contiguous(), v0.contiguous(),
                                      C0.contiguous(), F0.contiguous(), E.contiguous(), nu.contiguous(),
                                      aux.contiguous(), None if controls is None else controls.contiguous()))


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
