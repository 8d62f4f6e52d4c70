"""Boundaries: domain walls and colliders (ground plane, sphere, box), applied on grid nodes.

Each boundary acts on the grid velocity of a node inside it, relative to the boundary's own
velocity, with one of three conditions:
    sticky:   v = v_boundary
    slip:     normal component removed, tangential kept (minus Coulomb friction)
    separate: like slip, but only while the node moves into the boundary
Coulomb friction shrinks the tangential velocity by friction * |normal velocity removed|.

Colliders are packed into a small array of rows (``COLLIDER_WIDTH`` reals each) that the grid
kernel reads, at most ``MAX_COLLIDERS`` of them (the kernel unrolls over the colliders in use).
"""

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence, Tuple

import numpy as np
import taichi as ti

STICKY, SLIP, SEPARATE = 0, 1, 2
BOUNDARY_MODES = {"sticky": STICKY, "slip": SLIP, "separate": SEPARATE}
PLANE, SPHERE, BOX = 0, 1, 2
MAX_COLLIDERS = 8
# Row layout: kind, mode, friction, origin xyz, shape abc, velocity xyz (origin moves with it).
COLLIDER_WIDTH = 12
# Nodes this many cells from a domain face belong to the wall.
WALL_CELLS = 3

Vec3 = Tuple[float, float, float]


def _vec3(owner: str, name: str, value) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float64)
    if arr.shape != (3,) or not np.all(np.isfinite(arr)):
        raise ValueError(f"{owner}.{name} must be 3 finite numbers, got {value!r}")
    return arr


def _mode(owner: str, mode: str) -> int:
    if mode not in BOUNDARY_MODES:
        raise ValueError(f"{owner}.mode must be one of {tuple(BOUNDARY_MODES)}, got {mode!r}")
    return BOUNDARY_MODES[mode]


def _friction(owner: str, friction: float) -> float:
    if not (isinstance(friction, (int, float)) and math.isfinite(friction) and friction >= 0):
        raise ValueError(f"{owner}.friction must be a finite number >= 0, got {friction!r}")
    return float(friction)


@dataclass(frozen=True)
class Plane:
    """Half-space behind a plane through ``point`` whose ``normal`` points into the free side."""

    point: Vec3 = (0.0, 0.0, 0.0)
    normal: Vec3 = (0.0, 1.0, 0.0)
    velocity: Vec3 = (0.0, 0.0, 0.0)
    friction: float = 0.5
    mode: str = "separate"

    def row(self) -> np.ndarray:
        n = _vec3("Plane", "normal", self.normal)
        length = np.linalg.norm(n)
        if length == 0:
            raise ValueError("Plane.normal must not be zero")
        return _pack(PLANE, self.mode, self.friction, _vec3("Plane", "point", self.point), n / length,
                     _vec3("Plane", "velocity", self.velocity), "Plane")


@dataclass(frozen=True)
class Sphere:
    """Solid ball; with a velocity its center moves as center + velocity * time."""

    center: Vec3 = (0.5, 0.5, 0.5)
    radius: float = 0.1
    velocity: Vec3 = (0.0, 0.0, 0.0)
    friction: float = 0.5
    mode: str = "separate"

    def row(self) -> np.ndarray:
        if not (isinstance(self.radius, (int, float)) and math.isfinite(self.radius) and self.radius > 0):
            raise ValueError(f"Sphere.radius must be a finite number > 0, got {self.radius!r}")
        return _pack(SPHERE, self.mode, self.friction, _vec3("Sphere", "center", self.center),
                     np.array([self.radius, 0.0, 0.0]), _vec3("Sphere", "velocity", self.velocity), "Sphere")


@dataclass(frozen=True)
class Box:
    """Solid axis-aligned box [lower, upper]; with a velocity it translates."""

    lower: Vec3 = (0.4, 0.0, 0.4)
    upper: Vec3 = (0.6, 0.2, 0.6)
    velocity: Vec3 = (0.0, 0.0, 0.0)
    friction: float = 0.5
    mode: str = "separate"

    def row(self) -> np.ndarray:
        lo, hi = _vec3("Box", "lower", self.lower), _vec3("Box", "upper", self.upper)
        if not np.all(hi > lo):
            raise ValueError(f"Box.upper must exceed Box.lower on every axis, got {self.lower} {self.upper}")
        return _pack(BOX, self.mode, self.friction, (lo + hi) / 2, (hi - lo) / 2,
                     _vec3("Box", "velocity", self.velocity), "Box")


Collider = Plane | Sphere | Box


def _pack(kind, mode, friction, origin, shape, velocity, owner) -> np.ndarray:
    return np.concatenate([[kind, _mode(owner, mode), _friction(owner, friction)], origin, shape, velocity])


def pack_colliders(colliders: Sequence[Collider]) -> np.ndarray:
    """[MAX_COLLIDERS, COLLIDER_WIDTH] float64 rows (unused rows are zero)."""
    rows = np.zeros((MAX_COLLIDERS, COLLIDER_WIDTH))
    for i, c in enumerate(colliders):
        rows[i] = c.row()
    return rows


@lru_cache(maxsize=None)
def boundary_funcs(real):
    """ti.funcs for the grid update, specialised to the float type ``real``.

    Each boundary maps (v, J) to (v', J'): the node velocity after it and the Jacobian of the
    chain so far, J' = (dv'/dv) J. The grid update's adjoint (substep.grid_update_grad) transposes
    J; it is written by hand because Taichi 1.7's reverse pass of this code came out as all zeros in
    float32 on CUDA (right on the CPU and in float64). ti.funcs are inlined, so a kernel that reads
    only v' (the forward grid update) has the Jacobian arithmetic removed by the compiler.
    Every case is evaluated and one picked with ti.select, each finite (norms carry an epsilon)."""
    vec3 = ti.types.vector(3, real)
    mat3 = ti.types.matrix(3, 3, real)

    @ti.func
    def pick(condition, a, b):
        return vec3(ti.select(condition, a[0], b[0]), ti.select(condition, a[1], b[1]),
                    ti.select(condition, a[2], b[2]))

    @ti.func
    def pick_matrix(condition, a, b):
        return mat3([[ti.select(condition, a[i, j], b[i, j]) for j in ti.static(range(3))]
                     for i in ti.static(range(3))])

    @ti.func
    def respond(v, J, normal, mode, friction):
        """Velocity v (relative to the boundary, unit outward ``normal``) after contact, and J
        carried through: the Coulomb slide v_t * max(0, 1 - friction * max(-v.n, 0) / |v_t|)."""
        zero = ti.Vector.zero(real, 3)
        vn = v.dot(normal)
        tangential = v - vn * normal
        project = ti.Matrix.identity(real, 3) - normal.outer_product(normal)  # d tangential / dv
        t_norm = tangential.norm(1e-12)  # d t_norm / dv = tangential / t_norm
        pushed = ti.max(-vn, 0.0)
        raw = 1.0 - friction * pushed / t_norm
        scale = ti.max(0.0, raw)
        d_pushed = pick(vn < 0, -normal, zero)
        d_scale = pick(raw > 0, -friction * (d_pushed / t_norm - (pushed / t_norm ** 3) * tangential), zero)
        slides = mode == SLIP or vn < 0
        sticks = mode == STICKY
        v_out = pick(sticks, zero, pick(slides, tangential * scale, v))
        local = pick_matrix(sticks, ti.Matrix.zero(real, 3, 3),
                            pick_matrix(slides, scale * project + tangential.outer_product(d_scale),
                                        ti.Matrix.identity(real, 3)))
        return v_out, local @ J

    @ti.func
    def apply_walls(v, J, node, shape, mode, friction):
        for d in ti.static(range(3)):
            low = node[d] < WALL_CELLS
            high = node[d] > shape[d] - 1 - WALL_CELLS
            sign = ti.select(low, 1.0, -1.0)
            normal = vec3(sign * float(d == 0), sign * float(d == 1), sign * float(d == 2))
            v_wall, J_wall = respond(v, J, normal, mode, friction)
            v, J = pick(low or high, v_wall, v), pick_matrix(low or high, J_wall, J)
        return v, J

    @ti.func
    def apply_collider(v, J, pos, colliders: ti.template(), c: ti.template(), time):
        kind = ti.cast(colliders[c, 0], ti.i32)
        mode = ti.cast(colliders[c, 1], ti.i32)
        friction = colliders[c, 2]
        velocity = vec3(colliders[c, 9], colliders[c, 10], colliders[c, 11])
        origin = vec3(colliders[c, 3], colliders[c, 4], colliders[c, 5]) + velocity * time
        shape = vec3(colliders[c, 6], colliders[c, 7], colliders[c, 8])
        # plane
        plane_distance = (pos - origin).dot(shape)
        # sphere
        offset = pos - origin
        length = offset.norm(1e-12)
        sphere_distance = length - shape[0]
        # box: outward normal of the face nearest to the node
        q = ti.abs(pos - origin) - shape
        box_distance = ti.max(q[0], q[1], q[2])
        on_x = q[0] >= q[1] and q[0] >= q[2]
        on_y = (not on_x) and q[1] >= q[2]
        face = vec3(ti.cast(on_x, real), ti.cast(on_y, real), ti.cast(not (on_x or on_y), real))
        side = vec3(ti.select(pos[0] >= origin[0], 1.0, -1.0), ti.select(pos[1] >= origin[1], 1.0, -1.0),
                    ti.select(pos[2] >= origin[2], 1.0, -1.0))
        normal = pick(kind == PLANE, shape, pick(kind == SPHERE, offset / length, face * side))
        distance = ti.select(kind == PLANE, plane_distance, ti.select(kind == SPHERE, sphere_distance, box_distance))
        v_rel, J_hit = respond(v - velocity, J, normal, mode, friction)
        inside = distance < 0
        return pick(inside, v_rel + velocity, v), pick_matrix(inside, J_hit, J)

    return apply_walls, apply_collider
