"""MPMSolver: the user-facing 3D MLS-MPM simulator (one object per scene).

    solver = MPMSolver(res=64)
    solver.add_collider(Plane(point=(0, 0.1, 0)))
    solver.add_mesh("bunny.obj", Elastic(E=2e5), scale=0.3, translation=(0.5, 0.4, 0.5))
    for frame in range(120):
        solver.step(1 / 60)
        solver.export_ply(f"out/{frame:04d}.ply")

Particle state lives in torch tensors on the Taichi device (``taichi_mpm.runtime.device()``), two
ping-pong slots of the substep convention in ``substep.py``; getters return numpy copies or
zero-copy torch views.
"""
from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np
import taichi as ti
import torch

from .runtime import device, ensure_init

from . import materials as mat
from .boundary import (BOUNDARY_MODES, COLLIDER_WIDTH, MAX_COLLIDERS, WALL_CELLS, Box, Plane,
                       Sphere, pack_colliders, _friction)
from .grid_layout import vector_grid_shape
from .ply import write_particles_ply
from .substep import GridSetup, run_substep, substep_launchers, tiled_p2g
from .validation import check_nu, check_positive

ArrayLike = Union[np.ndarray, Sequence[float], torch.Tensor]

# The grid has res + 1 nodes per axis (nodes on both faces of the domain). Particles must stay
# this many cells inside the domain: the quadratic stencil of a particle there still lies inside
# the grid without clamping.
DOMAIN_MARGIN_CELLS = 1
STATE_KEYS = ("x", "v", "C", "F", "plastic")
# sort_particles orders particles by blocks of SORT_BLOCK cells (x, y, z), and inside a block by
# their rank in their cell, then by cell (see sort_particles)
SORT_BLOCK = (1, 2, 32)
CONSTANT_KEYS = ("material", "E", "nu", "density", "volume", "aux", "id")
INT_KEYS = ("material", "id")


def gather_rows(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """t[index] along dim 0, contiguous. Rows of a multiple of 16 bytes (aux's [N, 4] float32)
    go through a 1-D index: torch 2.11's CUDA gather of such rows took 605 us for 1M rows where a
    1-D gather of the same floats took 56 us (H200, torch 2.11, 2026-11-28)."""
    row = t[0].numel() if t.dim() > 1 else 1
    if row == 1 or (row * t.element_size()) % 16:
        return t[index]
    flat = (index[:, None] * row + torch.arange(row, device=index.device)).view(-1)
    return t.reshape(-1)[flat].view((len(index),) + tuple(t.shape[1:]))


class SimulationError(RuntimeError):
    """The simulation went unstable (NaN, particles leaving the domain, CFL broken)."""


def _as_dtype(dtype) -> Tuple[torch.dtype, object]:
    if dtype in ("float32", torch.float32, np.float32, ti.f32):
        return torch.float32, ti.f32
    if dtype in ("float64", torch.float64, np.float64, ti.f64):
        return torch.float64, ti.f64
    raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")


def _finite_array(name: str, value, shape_tail: Tuple[int, ...]) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim != 1 + len(shape_tail) or arr.shape[1:] != shape_tail:
        raise ValueError(f"{name} must have shape [N, {', '.join(map(str, shape_tail))}], got {arr.shape}"
                         if shape_tail else f"{name} must have shape [N], got {arr.shape}")
    bad = ~np.isfinite(arr).all(axis=tuple(range(1, arr.ndim)))
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"{name} contains NaN or Inf (first at index {i}: {arr[i]})")
    return arr


@lru_cache(maxsize=64)
def _bounds_on(device: torch.device, dtype: torch.dtype, lower: tuple, upper: tuple) -> Tuple[torch.Tensor, torch.Tensor]:
    """The valid domain's corners as tensors on the device (made once: a host-to-device copy at
    every check would cost more than the check's own kernels)."""
    return (torch.tensor(lower, dtype=dtype, device=device), torch.tensor(upper, dtype=dtype, device=device))


def _device_bounds(x: torch.Tensor, lower, upper) -> Tuple[torch.Tensor, torch.Tensor]:
    return _bounds_on(x.device, x.dtype, tuple(map(float, lower)), tuple(map(float, upper)))


def particle_extent(x: torch.Tensor, v: torch.Tensor, lower, upper) -> torch.Tensor:
    """[2] tensor on x's (CUDA) device: how far the farthest particle of x [N, 3] lies outside
    [lower, upper] (<= 0: none does) and the top squared speed of v [N, 3]; NaN propagates through
    both. No sync: check_particles reads it, or a caller that reads it later (bridge.rollout)."""
    lo, hi = _device_bounds(x, lower, upper)
    return torch.stack([torch.maximum(x - hi, lo - x).amax(), (v * v).sum(1).amax()])


def extent_is_valid(outside: float, max_speed2: float) -> bool:
    """Whether particle_extent's two numbers pass (False for NaN)."""
    return outside <= 0.0 and max_speed2 < 1e30


def check_particles(x: torch.Tensor, v: torch.Tensor, lower: np.ndarray, upper: np.ndarray, where: str,
                    advice: str) -> float:
    """Raise SimulationError if a particle of x, v [N, 3] is NaN/Inf or outside [lower, upper];
    return the max squared speed. Two reductions (how far the farthest particle is outside, and the
    top speed; NaN propagates through both) and one sync: torch on the GPU (a Taichi kernel with
    global atomic max/min took 2.2 ms for 1M particles on an H200, torch 0.19 ms with a mask and a
    count, which this halves), numpy on the CPU (torch's thread pool stalls for milliseconds when
    Taichi's threads share the cores). Only a failing check builds the per-particle mask."""
    on_cuda = x.is_cuda
    if on_cuda:
        outside, max_speed2 = particle_extent(x, v, lower, upper).tolist()
    else:
        x, v = x.numpy(), v.numpy()
        lo, hi = np.asarray(lower, dtype=x.dtype), np.asarray(upper, dtype=x.dtype)
        speed2 = (v * v).sum(1)
        outside, max_speed2 = float(np.maximum(x - hi, lo - x).max()), float(speed2.max())
    if extent_is_valid(outside, max_speed2):
        return max_speed2
    # comparisons with NaN are False, so NaN positions or speeds count as bad
    if on_cuda:
        lo, hi = _device_bounds(x, lower, upper)
    bad = ~(((x >= lo) & (x <= hi)).all(1) & ((v * v).sum(1) < 1e30))
    i = int(bad.nonzero()[0][0])
    raise SimulationError(
        f"{where}: {int(bad.sum())} particles have NaN/Inf state or left the valid domain "
        f"[{np.asarray(lower).tolist()}, {np.asarray(upper).tolist()}]; "
        f"first is particle {i} at x={x[i].tolist()}, v={v[i].tolist()}. {advice}")


class MPMSolver:
    """3D MLS-MPM (quadratic B-splines, APIC) on a dense grid over an axis-aligned box.

    Args:
        res: grid cells along the longest side of the domain (int), or cells per axis (tuple,
            which must give cubic cells).
        domain: (lower, upper) corners of the simulated box [m].
        dtype: "float32" (default) or "float64".
        gravity: acceleration [m/s^2].
        boundary: domain walls, "sticky" | "slip" | "separate".
        friction: Coulomb friction coefficient of the domain walls (slip / separate).
        max_particles: refuse to hold more particles than this (None: no limit).
        cfl: fraction of a cell a signal may cross per substep (particle speed + wave speed).
        check_every: substeps between state checks (NaN / left the domain / CFL); each check is
            one reduction and a device sync.
        max_substeps_per_frame: step() raises SimulationError rather than run more substeps.
        sort_every: substeps between :meth:`sort_particles` calls inside step() (0: never). It
            restores memory locality of P2G/G2P for particles added in random order (on an H100,
            1M shuffled particles, 2026-11-28: 2.03 ms a substep unsorted, 0.45 ms sorted once; a
            sort takes 1.2 ms on an H200, so sort_every=64 adds ~0.02 ms a substep); it changes the
            storage order.
    """

    def __init__(self, res: Union[int, Tuple[int, int, int]] = 64,
                 domain: Tuple[Sequence[float], Sequence[float]] = ((0, 0, 0), (1, 1, 1)),
                 dtype="float32", gravity: Sequence[float] = (0.0, -9.8, 0.0),
                 boundary: str = "sticky", friction: float = 0.0,
                 max_particles: Optional[int] = None, cfl: float = 0.4, check_every: int = 8,
                 max_substeps_per_frame: int = 20000, sort_every: int = 0):
        ensure_init()
        self.torch_dtype, self.real = _as_dtype(dtype)
        self.device = device()
        lower = _finite_array("domain lower corner", [domain[0]], (3,))[0]
        upper = _finite_array("domain upper corner", [domain[1]], (3,))[0]
        extent = upper - lower
        if not np.all(extent > 0):
            raise ValueError(f"domain upper corner must exceed the lower one on every axis, got {domain}")
        if isinstance(res, (int, np.integer)):
            if res < 2 * WALL_CELLS + 2:
                raise ValueError(f"res must be at least {2 * WALL_CELLS + 2}, got {res}")
            self.dx = float(extent.max() / res)
            shape = np.maximum(np.ceil(extent / self.dx - 1e-9).astype(int), 2 * WALL_CELLS + 2)
        else:
            shape = np.asarray(res, dtype=int)
            if shape.shape != (3,) or np.any(shape < 2 * WALL_CELLS + 2):
                raise ValueError(f"res must be an int or 3 ints >= {2 * WALL_CELLS + 2}, got {res!r}")
            cell = extent / shape
            if not np.allclose(cell, cell[0], rtol=1e-6):
                raise ValueError(f"res {tuple(shape)} over domain extent {tuple(extent)} gives non-cubic cells")
            self.dx = float(cell[0])
        if boundary not in BOUNDARY_MODES:
            raise ValueError(f"boundary must be one of {tuple(BOUNDARY_MODES)}, got {boundary!r}")
        gravity = _finite_array("gravity", [gravity], (3,))[0]
        if not (0 < cfl <= 1):
            raise ValueError(f"cfl must lie in (0, 1], got {cfl!r}")
        if int(check_every) < 1:
            raise ValueError(f"check_every must be >= 1, got {check_every!r}")

        self.grid_shape = tuple(int(s) + 1 for s in shape)
        self.inv_dx = 1.0 / self.dx
        self.lower = lower
        # Particles are valid in [valid_lower, valid_upper]; see DOMAIN_MARGIN_CELLS.
        self.valid_lower = lower + DOMAIN_MARGIN_CELLS * self.dx
        self.valid_upper = lower + (np.asarray(self.grid_shape) - 1 - DOMAIN_MARGIN_CELLS) * self.dx
        self.gravity = gravity
        self.wall_mode = BOUNDARY_MODES[boundary]
        self.wall_friction = _friction("MPMSolver", friction)
        self.max_particles = max_particles
        self.cfl = float(cfl)
        self.check_every = int(check_every)
        self.max_substeps_per_frame = int(max_substeps_per_frame)
        if int(sort_every) < 0:
            raise ValueError(f"sort_every must be >= 0, got {sort_every!r}")
        self.sort_every = int(sort_every)

        self.kernels = substep_launchers(self.real, plastic_models=False)
        self._origin_vec = ti.Vector(self.lower.tolist(), self.real)
        self._gravity_vec = ti.Vector(self.gravity.tolist(), self.real)
        zeros = dict(dtype=self.torch_dtype, device=self.device)
        self.grid_mv = torch.zeros(vector_grid_shape(self.grid_shape), **zeros)
        self.grid_m = torch.zeros(self.grid_shape, **zeros)
        self.grid_v = torch.zeros(vector_grid_shape(self.grid_shape), **zeros)
        self.colliders: list = []
        self.collider_table = torch.zeros((MAX_COLLIDERS, COLLIDER_WIDTH), **zeros)
        self._no_control = torch.zeros((1, 3, 3), **zeros)
        self.state: Dict[str, torch.Tensor] = {}
        self.n_particles = 0
        self._allocate(0)
        self.src = 0  # slot holding the current state
        self.time = 0.0
        self.substep_count = 0
        self.max_wave_speed = 0.0
        self.last_max_speed = 0.0

    # ------------------------------------------------------------------ particles
    def _allocate(self, n: int) -> None:
        real = dict(dtype=self.torch_dtype, device=self.device)
        self.state = {
            "x": torch.zeros((2, n, 3), **real), "v": torch.zeros((2, n, 3), **real),
            "C": torch.zeros((2, n, 3, 3), **real), "F": torch.zeros((2, n, 3, 3), **real),
            "plastic": torch.zeros((2, n), **real),
            "material": torch.zeros(n, dtype=torch.int32, device=self.device),
            "E": torch.zeros(n, **real), "nu": torch.zeros(n, **real),
            "density": torch.zeros(n, **real), "volume": torch.zeros(n, **real),
            "aux": torch.zeros((n, 4), **real),
            "id": torch.zeros(n, dtype=torch.int32, device=self.device),
        }

    def _check_inside(self, name: str, positions: np.ndarray) -> None:
        outside = np.any((positions < self.valid_lower) | (positions > self.valid_upper), axis=1)
        if outside.any():
            i = int(np.argmax(outside))
            raise ValueError(
                f"{name}[{i}] = {positions[i]} lies outside the valid domain "
                f"[{self.valid_lower}, {self.valid_upper}] ({outside.sum()} of {len(positions)} particles); "
                f"particles must stay {DOMAIN_MARGIN_CELLS} cells inside the domain box")

    def add_particles(self, positions: ArrayLike, material: mat.Material,
                      velocity: ArrayLike = (0.0, 0.0, 0.0), volume: Optional[float] = None,
                      E: Optional[ArrayLike] = None, nu: Optional[ArrayLike] = None) -> int:
        """Add particles at positions [N, 3] of one material; returns N.

        velocity: (3,) for all or [N, 3] per particle. volume: rest volume per particle (default:
        8 particles per cell). E, nu: optional per-particle [N] arrays overriding the material's.
        """
        if not isinstance(material, mat.MATERIAL_TYPES):
            raise TypeError(f"material must be one of {[t.__name__ for t in mat.MATERIAL_TYPES]}, "
                            f"got {type(material).__name__}")
        positions = _finite_array("positions", positions, (3,))
        n_new = len(positions)
        if n_new == 0:
            raise ValueError("positions is empty")
        self._check_inside("positions", positions)
        velocity_arr = np.asarray(velocity.detach().cpu() if isinstance(velocity, torch.Tensor) else velocity,
                                  dtype=np.float64)
        if velocity_arr.shape == (3,):
            velocity_arr = np.broadcast_to(velocity_arr, (n_new, 3))
        velocity_arr = _finite_array("velocity", velocity_arr, (3,))
        if len(velocity_arr) != n_new:
            raise ValueError(f"velocity has {len(velocity_arr)} rows for {n_new} positions")
        E_arr = self._per_particle("E", material.E if E is None else E, n_new)
        nu_arr = self._per_particle("nu", material.nu if nu is None else nu, n_new)
        if material.material_id != mat.FLUID_ID:
            if np.any(E_arr <= 0):
                raise ValueError(f"E must be > 0, got {E_arr[E_arr <= 0][0]} at index {int(np.argmax(E_arr <= 0))}")
            check_nu("nu", nu_arr)
        if volume is None:
            volume = (self.dx / 2) ** 3
        if not (math.isfinite(volume) and volume > 0):
            raise ValueError(f"volume must be a finite number > 0, got {volume!r}")
        if self.max_particles is not None and self.n_particles + n_new > self.max_particles:
            raise ValueError(f"adding {n_new} particles to {self.n_particles} exceeds max_particles={self.max_particles}")

        identity = np.broadcast_to(np.eye(3), (n_new, 3, 3))
        initial = {
            "x": positions, "v": velocity_arr, "C": np.zeros((n_new, 3, 3)), "F": identity,
            "plastic": np.full(n_new, 1.0 if material.material_id == mat.SNOW_ID else 0.0),
        }
        constants = {
            "material": np.full(n_new, material.material_id, dtype=np.int32), "E": E_arr, "nu": nu_arr,
            "density": np.full(n_new, material.density), "volume": np.full(n_new, volume),
            "aux": np.broadcast_to(np.asarray(material.aux()), (n_new, 4)),
            "id": np.arange(self.n_particles, self.n_particles + n_new, dtype=np.int32),
        }
        new = {}
        for key, value in initial.items():
            t = torch.as_tensor(np.ascontiguousarray(value), dtype=self.torch_dtype, device=self.device)
            current = self.state[key][self.src]
            new[key] = torch.cat([current, t]).unsqueeze(0).repeat((2,) + (1,) * t.dim()).contiguous()
        for key, value in constants.items():
            dtype = torch.int32 if key in INT_KEYS else self.torch_dtype
            t = torch.as_tensor(np.ascontiguousarray(value), dtype=dtype, device=self.device)
            new[key] = torch.cat([self.state[key], t]).contiguous()
        self.state = new
        self.n_particles += n_new
        self._use_plastic_kernels(constants["material"])
        speed = mat.wave_speed(material.material_id, E_arr, nu_arr, material.density).max()
        self.max_wave_speed = max(self.max_wave_speed, float(speed))
        self.last_max_speed = max(self.last_max_speed, float(np.linalg.norm(velocity_arr, axis=1).max()))
        return n_new

    def _use_plastic_kernels(self, material_ids: np.ndarray) -> None:
        """Switch to the kernels with the SVD-based return maps once a plastic material is in the
        scene (they compile slower and, in Taichi 1.7, cannot be differentiated)."""
        if np.isin(material_ids, mat.PLASTIC_IDS).any():
            self.kernels = substep_launchers(self.real, plastic_models=True)

    @staticmethod
    def _per_particle(name: str, value, n: int) -> np.ndarray:
        arr = np.asarray(value.detach().cpu() if isinstance(value, torch.Tensor) else value, dtype=np.float64)
        if arr.ndim == 0:
            arr = np.full(n, float(arr))
        arr = _finite_array(name, arr, ())
        if len(arr) != n:
            raise ValueError(f"{name} has {len(arr)} entries for {n} particles")
        return arr

    def _spacing(self, particles_per_cell: float) -> float:
        if not (isinstance(particles_per_cell, (int, float)) and particles_per_cell > 0):
            raise ValueError(f"particles_per_cell must be > 0, got {particles_per_cell!r}")
        return self.dx / particles_per_cell ** (1.0 / 3.0)

    def add_cube(self, lower: Sequence[float], size: Sequence[float], material: mat.Material,
                 particles_per_cell: float = 8, velocity: ArrayLike = (0.0, 0.0, 0.0), seed: int = 0) -> int:
        """Fill the box [lower, lower + size] with particles; returns how many were placed."""
        from .sampling import sample_box

        lower = _finite_array("lower", [lower], (3,))[0]
        size = _finite_array("size", [size], (3,))[0]
        if np.any(size <= 0):
            raise ValueError(f"size must be > 0 on every axis, got {size}")
        spacing = self._spacing(particles_per_cell)
        points = sample_box(lower, lower + size, spacing, seed=seed)
        return self.add_particles(points, material, velocity, volume=spacing ** 3)

    def add_sphere(self, center: Sequence[float], radius: float, material: mat.Material,
                   particles_per_cell: float = 8, velocity: ArrayLike = (0.0, 0.0, 0.0), seed: int = 0) -> int:
        """Fill a ball with particles; returns how many were placed."""
        from .sampling import sample_sphere

        center = _finite_array("center", [center], (3,))[0]
        if not (math.isfinite(radius) and radius > 0):
            raise ValueError(f"radius must be a finite number > 0, got {radius!r}")
        spacing = self._spacing(particles_per_cell)
        points = sample_sphere(center, radius, spacing, seed=seed)
        return self.add_particles(points, material, velocity, volume=spacing ** 3)

    # a mesh body with fewer particles than this is probably a units mistake (add_mesh warns), and
    # with fewer than an eighth of it certainly one (add_mesh raises)
    MIN_MESH_PARTICLES = 256
    # add_mesh's default fit: the largest side of the mesh, as a fraction of the valid domain's smallest side
    DEFAULT_FIT_FRACTION = 0.5

    def add_mesh(self, mesh, material: mat.Material, particles_per_cell: float = 8, scale=None,
                 rotation: Optional[ArrayLike] = None, translation: Optional[Sequence[float]] = None,
                 velocity: ArrayLike = (0.0, 0.0, 0.0), seed: int = 0, fit="auto",
                 min_particles: int = MIN_MESH_PARTICLES) -> int:
        """Fill a mesh (path in any format trimesh reads, or a trimesh.Trimesh) with particles.

        The mesh is scaled, rotated (3x3), then placed in the domain. Non-watertight meshes are
        filled by generalized winding number. Placement, by ``fit``:

        * ``"auto"`` (default): with neither ``scale`` nor ``translation`` given, the mesh's bounding
          box is centred in the domain and scaled so its largest side is ``DEFAULT_FIT_FRACTION`` of
          the domain's smallest side, whatever its units and origin; with only ``scale``, it is
          centred at that scale; with ``translation``, it is placed as given (``scale`` default 1).
        * ``(center, size)`` or a ``sampling.MeshFit``: centre the bounding box at ``center`` with
          largest side ``size`` (``size=None`` keeps ``scale``); ``translation`` must be None.
        * ``None``: no fitting; ``x -> rotation @ (scale * x) + translation`` in the mesh's units.

        Returns how many particles were placed. A mesh that encloses no lattice point raises
        ``sampling.EmptyVolumeError`` (a ValueError); one that gives fewer than ``min_particles``
        warns (UserWarning), and fewer than ``min_particles // 8`` raises ValueError, both with the
        fix (a larger fit size / scale, or more particles per cell).
        """
        import warnings

        from .sampling import MeshFit, sample_mesh

        spacing = self._spacing(particles_per_cell)
        if isinstance(fit, str):
            if fit != "auto":
                raise ValueError(f"fit must be 'auto', None, (center, size) or a MeshFit, got {fit!r}")
            fit = None
            if translation is None:
                center = 0.5 * (self.valid_lower + self.valid_upper)
                size = None if scale is not None else \
                    self.DEFAULT_FIT_FRACTION * float(np.min(self.valid_upper - self.valid_lower))
                fit = MeshFit(tuple(center), size)
        scale = 1.0 if scale is None else scale
        points = sample_mesh(mesh, spacing, scale=scale, rotation=rotation, translation=translation, seed=seed,
                             fit=fit)
        if len(points) < min_particles:
            extent = points.max(axis=0) - points.min(axis=0)
            message = (
                f"the mesh gives only {len(points)} particles (fewer than min_particles={min_particles}; "
                f"{np.round(extent, 4).tolist()} m across at particle spacing {spacing:.3g} m): it is too small "
                f"for this grid, probably in other units. Fit it to a size (add_mesh with no scale or translation, "
                f"or fit=(center, size); --size in the scenes), or raise scale or particles_per_cell")
            if len(points) < min_particles // 8:
                raise ValueError(message)
            warnings.warn(message, UserWarning, stacklevel=2)
        return self.add_particles(points, material, velocity, volume=spacing ** 3)

    def add_collider(self, collider: Union[Plane, Sphere, Box]) -> int:
        """Add a ground plane / sphere / box (static, or moving with its velocity); returns its index."""
        if not isinstance(collider, (Plane, Sphere, Box)):
            raise TypeError(f"collider must be a Plane, Sphere or Box, got {type(collider).__name__}")
        if len(self.colliders) >= MAX_COLLIDERS:
            raise ValueError(f"at most {MAX_COLLIDERS} colliders are supported")
        table = pack_colliders(self.colliders + [collider])  # validates the new one
        self.colliders.append(collider)
        self.collider_table.copy_(torch.as_tensor(table, dtype=self.torch_dtype))
        return len(self.colliders) - 1

    # ------------------------------------------------------------------ stepping
    @property
    def tiled(self) -> bool:
        """Whether P2G goes through shared memory (CUDA, large scenes: substep.tiled_p2g)."""
        return tiled_p2g(self.n_particles)

    def _substep(self, dt: float) -> None:
        k, s = self.kernels, self.state
        src, dst = self.src, 1 - self.src
        setup = GridSetup(self._origin_vec, self.dx, self._gravity_vec, self.wall_mode, self.wall_friction,
                          self.collider_table, len(self.colliders))
        # s holds the state and the per-particle constants under the names run_substep reads
        # the forward-only form: the grid stays clear between substeps (zeros at allocation)
        run_substep(k, src, dst, self.n_particles, s, s, (self.grid_mv, self.grid_m, self.grid_v), None,
                    (self._no_control, 0.0), setup, dt, self.time, keep_grid=False, tiled=self.tiled)
        self.src = dst
        self.time += dt
        self.substep_count += 1

    def check(self) -> float:
        """Raise SimulationError if a particle is NaN/Inf or left the valid domain; return max speed."""
        if self.n_particles == 0:
            return 0.0
        max_speed2 = check_particles(
            self.state["x"][self.src], self.state["v"][self.src], self.valid_lower, self.valid_upper,
            f"substep {self.substep_count} (t={self.time:.6g} s)",
            f"The time step is probably too large for the material (stable dt here ~ {self.stable_dt(0.0):.3g} s).")
        self.last_max_speed = math.sqrt(max_speed2)
        return self.last_max_speed

    def set_gravity(self, gravity: Sequence[float]) -> None:
        """Gravity (3,) in m/s^2, acting from the next substep on."""
        g = np.asarray(gravity, dtype=np.float64)
        if g.shape != (3,) or not np.isfinite(g).all():
            raise ValueError(f"gravity must be 3 finite numbers, got {gravity!r}")
        self.gravity = g
        self._gravity_vec = ti.Vector(g.tolist(), self.real)

    def set_elastic_parameters(self, particles: torch.Tensor, E: float, nu: float) -> None:
        """E and nu of the selected particles (a bool mask [N] in storage order, as ``state`` holds
        them), acting from the next substep. The CFL wave speed is recomputed over all particles,
        so a softer material also gets longer substeps."""
        check_positive("E", E)
        check_nu("nu", nu)
        mask = torch.as_tensor(particles, device=self.device)
        if mask.dtype != torch.bool or mask.shape != (self.n_particles,):
            raise ValueError(f"particles must be a bool mask of shape ({self.n_particles},), "
                             f"got {mask.dtype} {tuple(mask.shape)}")
        self.state["E"][mask] = E
        self.state["nu"][mask] = nu
        host = {k: self.state[k].cpu().numpy() for k in ("material", "E", "nu", "density")}
        self.max_wave_speed = max((float(mat.wave_speed(int(m), host["E"][host["material"] == m],
                                                         host["nu"][host["material"] == m],
                                                         host["density"][host["material"] == m]).max())
                                   for m in np.unique(host["material"])), default=0.0)

    def stable_dt(self, max_speed: Optional[float] = None) -> float:
        """Largest dt the CFL condition allows: cfl * dx / (max particle speed + max wave speed)."""
        speed = (self.last_max_speed if max_speed is None else max_speed) + self.max_wave_speed
        return math.inf if speed == 0 else self.cfl * self.dx / speed

    def step(self, frame_dt: float, dt: Optional[float] = None) -> int:
        """Advance the simulation by frame_dt seconds; returns the number of substeps taken.

        Substeps are chosen by the CFL condition (particle speed and elastic wave speed); ``dt``
        forces a fixed substep instead (the last one is shortened to land on the frame time).
        Raises SimulationError naming the substep when the state goes bad.
        """
        if not (isinstance(frame_dt, (int, float)) and math.isfinite(frame_dt) and frame_dt > 0):
            raise ValueError(f"frame_dt must be a finite number > 0, got {frame_dt!r}")
        if dt is not None and not (isinstance(dt, (int, float)) and math.isfinite(dt) and dt > 0):
            raise ValueError(f"dt must be a finite number > 0, got {dt!r}")
        t_end = self.time + frame_dt
        taken = 0
        max_speed = self.check()
        while t_end - self.time > 1e-9 * frame_dt:
            remaining = t_end - self.time
            if dt is not None:
                h = min(dt, remaining)
                if max_speed * h > self.dx:
                    raise SimulationError(
                        f"substep {self.substep_count} (t={self.time:.6g} s): particles move "
                        f"{max_speed * dt / self.dx:.3g} cells per substep at the forced dt={dt:.3g} s "
                        f"(max speed {max_speed:.3g} m/s); the simulation is unstable, use dt <= "
                        f"{self.stable_dt():.3g} s or let step() choose it")
            else:
                n_needed = math.ceil(remaining / self.stable_dt(max_speed))
                if n_needed + taken > self.max_substeps_per_frame:
                    raise SimulationError(
                        f"substep {self.substep_count} (t={self.time:.6g} s): the CFL condition asks for "
                        f"{n_needed + taken} substeps this frame (max speed {max_speed:.3g} m/s, wave speed "
                        f"{self.max_wave_speed:.3g} m/s), over max_substeps_per_frame="
                        f"{self.max_substeps_per_frame}; the simulation is likely unstable")
                h = remaining / n_needed
            if self.sort_every and self.substep_count % self.sort_every == 0:
                self.sort_particles()
            self._substep(h)
            taken += 1
            if taken % self.check_every == 0:
                max_speed = self.check()
        self.time = t_end  # drop the rounding of the substep sum
        self.check()
        return taken

    def sort_particles(self) -> None:
        """Reorder particle storage for the transfers: by blocks of SORT_BLOCK stencil cells (the
        cell of a particle's lowest stencil node), inside a block the first particle of every cell,
        then the second of every cell, and so on. A warp then holds 32 particles of 32 different
        cells along a few rows of the block: no two lanes add to the same node at once in P2G's
        shared tile, a CUDA block's tile stays small, and G2P's loads run along rows. (Sorted by
        4^3-cell blocks alone, stably, a warp held particles of the same cells in input order: 8-way
        clashes for shuffled input.) Inside a cell the particles rank by the octant they sit in, so
        the order does not depend on the input's: shuffled input gets the order that lattice input
        does. Getters return particles in the new order; :meth:`particle_ids` maps them back."""
        if self.n_particles == 0:
            return
        lower = torch.as_tensor(self.lower, dtype=self.torch_dtype, device=self.device)
        shape = torch.as_tensor(self.grid_shape, device=self.device)
        local = (self.state["x"][self.src] - lower) * self.inv_dx - 0.5
        base = torch.minimum(torch.floor(local).long().clamp(min=0), shape - 3)  # clamped as the kernels do
        upper = (local - base) >= 0.5  # the upper half of the cell (the kernels' offset from base >= 1)
        octant = (upper[:, 0] * 4 + upper[:, 1] * 2 + upper[:, 2]).long()
        size = torch.as_tensor(SORT_BLOCK, device=self.device)
        blocks = -(-shape // size)
        block, inner = base // size, base % size
        block = (block[:, 0] * blocks[1] + block[:, 1]) * blocks[2] + block[:, 2]
        inner = (inner[:, 0] * SORT_BLOCK[1] + inner[:, 1]) * SORT_BLOCK[2] + inner[:, 2]
        cells = int(np.prod(SORT_BLOCK))
        # 32-bit sort keys where they fit: a radix sort then makes half the passes of a 64-bit one
        n_cells = int(np.prod(-(-np.asarray(self.grid_shape) // SORT_BLOCK))) * cells
        key_dtype = torch.int32 if n_cells * 8 < 2 ** 31 else torch.int64
        by_cell = torch.sort(((block * cells + inner) * 8 + octant).to(key_dtype), stable=True)
        cell = by_cell.values // 8
        first_of_cell = torch.searchsorted(cell, cell).to(key_dtype)
        rank = torch.arange(self.n_particles, device=self.device, dtype=key_dtype) - first_of_cell
        ranks = int(rank.max()) + 1  # the one host sync: the second key's range
        key_dtype = torch.int32 if n_cells * ranks < 2 ** 31 else torch.int64
        block, inner = block[by_cell.indices], inner[by_cell.indices]
        order = by_cell.indices[torch.sort(((block * ranks + rank) * cells + inner).to(key_dtype)).indices]
        for name in STATE_KEYS:
            self.state[name][self.src] = gather_rows(self.state[name][self.src], order)
        for name in CONSTANT_KEYS:
            self.state[name] = gather_rows(self.state[name], order)

    # ------------------------------------------------------------------ state access
    def _get(self, key: str, as_torch: bool):
        t = self.state[key][self.src] if key in STATE_KEYS else self.state[key]
        return t if as_torch else t.detach().cpu().numpy().copy()

    def positions(self, as_torch: bool = False):
        """[N, 3] positions: numpy copy, or (as_torch) a zero-copy view valid until the next step."""
        return self._get("x", as_torch)

    def velocities(self, as_torch: bool = False):
        """[N, 3] velocities (numpy copy or zero-copy torch view)."""
        return self._get("v", as_torch)

    def deformation_gradients(self, as_torch: bool = False):
        """[N, 3, 3] deformation gradients F."""
        return self._get("F", as_torch)

    def affine_velocities(self, as_torch: bool = False):
        """[N, 3, 3] APIC affine velocity matrices C."""
        return self._get("C", as_torch)

    def plastic_state(self, as_torch: bool = False):
        """[N] plastic scalar (snow Jp, sand volume correction)."""
        return self._get("plastic", as_torch)

    def particle_ids(self, as_torch: bool = False):
        """[N] int32 index of each particle in the order it was added (differs from the storage
        order once :meth:`sort_particles` ran)."""
        return self._get("id", as_torch)

    def material_ids(self, as_torch: bool = False):
        """[N] int32 material ids (``materials.*_ID``)."""
        return self._get("material", as_torch)

    def masses(self) -> np.ndarray:
        """[N] particle masses density * volume (numpy)."""
        return (self.state["density"] * self.state["volume"]).cpu().numpy().astype(np.float64)

    def save_state(self, path: Union[str, Path]) -> Path:
        """Save particles, their parameters and the clock to an .npz file."""
        arrays = {key: self._get(key, False) for key in STATE_KEYS + CONSTANT_KEYS}
        path = Path(path)
        np.savez_compressed(path, time=self.time, substep_count=self.substep_count,
                            grid_shape=np.asarray(self.grid_shape), dx=self.dx, **arrays)
        return path if path.suffix == ".npz" else path.with_name(path.name + ".npz")

    def load_state(self, path: Union[str, Path]) -> None:
        """Restore what save_state wrote (the solver must have the same grid)."""
        with np.load(path) as data:
            if tuple(data["grid_shape"]) != self.grid_shape or not np.isclose(float(data["dx"]), self.dx):
                raise ValueError(f"{path}: saved for grid {tuple(data['grid_shape'])} dx={float(data['dx'])}, "
                                 f"this solver has {self.grid_shape} dx={self.dx}")
            arrays = {key: data[key] for key in STATE_KEYS + CONSTANT_KEYS}
            time, count = float(data["time"]), int(data["substep_count"])
        n = len(arrays["x"])
        for key, value in arrays.items():
            if len(value) != n or (key not in INT_KEYS and not np.all(np.isfinite(value))):
                raise ValueError(f"{path}: array {key!r} is inconsistent or not finite")
        self._check_inside(f"{path}: x", arrays["x"])
        self._allocate(0)
        new = {}
        for key, value in arrays.items():
            dtype = torch.int32 if key in INT_KEYS else self.torch_dtype
            t = torch.as_tensor(value, dtype=dtype, device=self.device)
            new[key] = t.unsqueeze(0).repeat((2,) + (1,) * t.dim()).contiguous() if key in STATE_KEYS else t
        self.state, self.n_particles, self.src = new, n, 0
        # the forward grid update leaves nodes without mass as they are (substep.grid_update_at), so
        # velocities a failed run left there (NaN) must not meet the restored particles
        for t in (self.grid_mv, self.grid_m, self.grid_v):
            t.zero_()
        self.kernels = substep_launchers(self.real, plastic_models=False)
        self._use_plastic_kernels(arrays["material"])
        self.time, self.substep_count = time, count
        self.max_wave_speed = 0.0
        for material_id in np.unique(arrays["material"]):
            sel = arrays["material"] == material_id
            self.max_wave_speed = max(self.max_wave_speed, float(mat.wave_speed(
                int(material_id), arrays["E"][sel], arrays["nu"][sel], arrays["density"][sel]).max()))
        self.last_max_speed = float(np.linalg.norm(arrays["v"], axis=1).max()) if n else 0.0

    def export_ply(self, path: Union[str, Path]) -> Path:
        """Write the current particles (position, velocity, material id, particle id) as a binary PLY."""
        return write_particles_ply(path, self.positions(), {
            "velocity": self.velocities(), "material": self.material_ids(), "id": self.particle_ids()})
