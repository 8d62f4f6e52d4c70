"""The MLS-MPM substep: one short Taichi kernel per stage, shared by the forward solver and the
differentiable rollout.

Convention (read this before building on these kernels)
-------------------------------------------------------
``substep_kernels(real, plastic_models)`` (real = ti.f32 or ti.f64; cached) returns a namespace of
kernels whose array arguments are ``ti.types.ndarray``: pass torch tensors (contiguous, on the
Taichi device, used in place) or ti.ndarrays. A kernel compiles once per (float type, flag),
whatever the array sizes (measured: sizes 24^3 / 32^3 grids and any N reuse one compile).

``plastic_models=True`` compiles the von Mises / snow / sand return maps, which use ``ti.svd``;
Taichi 1.7 cannot build ``kernel.grad`` of a kernel containing ``ti.svd``. A differentiable rollout
therefore uses ``substep_kernels(ti.f64, plastic_models=False)``: fixed-corotated, neo-Hookean and
fluid particles. For fixed-corotated particles, the .grad of all four kernels over two
substeps matched central finite differences of a loss on x[2] and F[2] (float64, CPU; dL/dE,
dL/dnu, dL/dx0 to ~1e-7 relative). The forward solver uses ``plastic_models=True`` only when the
scene holds plastic materials.

Particle state carries a leading local-step axis, ``[S, N, ...]``:
    x[s, p] vec3 position, v[s, p] vec3 velocity, C[s, p] mat3 APIC affine velocity,
    F[s, p] mat3 deformation gradient, plastic[s, p] plastic scalar (snow: Jp, starts at 1;
    sand: volume gained in tension, starts at 0; unused by the other models)
Per-particle constants, ``[N]``: material int32 (``materials.*_ID``), E, nu (differentiable: the
kernels derive mu, lam from them), density, volume (rest volume per particle), aux [N, 4] (the
model's own parameters, see ``materials``).
Grid, recomputed every substep, never kept: grid_mv [X, Y, Z, 3] momentum, grid_m [X, Y, Z] mass,
grid_v [X, Y, Z, 3] velocity after forces and boundaries.

One substep from local step ``src`` to ``dst``:
    clear_grid(grid_mv, grid_m)
    particle_stress(src, dst, n, C, F, plastic, material, E, nu, density, volume, aux,
                    dFc, control_scale, affine, inv_dx, dt)
        F_trial = (I + dt C[src]) (F[src] + control_scale dFc[p]); writes the return-mapped F[dst],
        plastic[dst], and affine[p] = -dt vol 4/dx^2 tau + m C[src] (the APIC/MLS momentum matrix).
        dFc [N, 3, 3] per-particle controls, or a [1, 3, 3] zero array with control_scale = 0.
        affine [N, 3, 3] is per-substep scratch like the grid (recomputed in the backward).
    p2g(src, n, x, v, density, volume, affine, grid_mv, grid_m, origin, inv_dx)
        scatters mass and momentum m v[src] + affine (x_i - x_p) to the 27 nodes (atomics).
    grid_update(grid_mv, grid_m, grid_v, dt, gravity, origin, dx, wall_mode, wall_friction,
                colliders, n_colliders, time)
        grid_v = mv / m + dt g, then domain walls and colliders (boundary.py); writes every node.
        n_colliders is a compile-time constant (ti.template: one compile per collider count; the
        colliders unroll, which keeps reverse mode exact and its compile short).
    g2p(src, dst, n, x, v, C, grid_v, origin, inv_dx, dt)
        reads x[src] and grid_v; writes v[dst], C[dst], x[dst] = x[src] + dt v[dst].
No kernel writes what it (or a later kernel of the same substep) reads, so ``kernel.grad`` with
the same arguments, called in reverse order, is Taichi's exact reverse mode (DiffTaichi's rule).
Backward of substep s: re-run its forward up to grid_update (grid and affine are not kept), zero
the grid's and affine's .grad, then g2p.grad, grid_update.grad, p2g.grad, particle_stress.grad
with the same arguments. Stress and scatter are separate kernels because one kernel holding both
took 272 s to compile its reverse mode; split, on the 2-core CPU in float64 with a cold cache:
particle_stress.grad 57 s, p2g.grad 64 s, g2p.grad 25 s, grid_update.grad 1.5 s (Taichi's offline
cache keeps them for later runs).
The forward solver ping-pongs between S = 2 slots (src, dst) = (0, 1), (1, 0), ...; a
differentiable rollout uses S = K + 1 and (s, s + 1).

Particles read grid nodes base..base+2 per axis with base clamped to [0, shape - 3], so no index
leaves the grid even for particles that left the domain (``MPMSolver.check`` reports those).
"""

from functools import lru_cache
from types import SimpleNamespace

import taichi as ti

from .boundary import boundary_funcs
from .constitutive import constitutive_funcs

# Grid nodes lighter than this [kg] count as empty. The reverse pass of v = mv / m scales by
# 1 / m^2, which overflows float32 (inf * 0 = NaN in the gradient) for the near-zero masses that
# a particle's outermost stencil weights leave on a node; such nodes carry no momentum worth keeping.
MIN_NODE_MASS = 1e-15

@lru_cache(maxsize=None)
def substep_kernels(real, plastic_models: bool = True) -> SimpleNamespace:
    vec3 = ti.types.vector(3, real)
    mat3 = ti.types.matrix(3, 3, real)
    steps_vec = ti.types.ndarray(dtype=vec3, ndim=2)
    steps_mat = ti.types.ndarray(dtype=mat3, ndim=2)
    steps_scalar = ti.types.ndarray(dtype=real, ndim=2)
    per_particle = ti.types.ndarray(dtype=real, ndim=1)
    per_particle_mat = ti.types.ndarray(dtype=mat3, ndim=1)
    per_particle_int = ti.types.ndarray(dtype=ti.i32, ndim=1)
    table = ti.types.ndarray(dtype=real, ndim=2)
    grid_vec = ti.types.ndarray(dtype=vec3, ndim=3)
    grid_scalar = ti.types.ndarray(dtype=real, ndim=3)

    update_and_stress, _ = constitutive_funcs(real, plastic_models)
    apply_walls, apply_collider = boundary_funcs(real)

    @ti.func
    def stencil(xp, origin, inv_dx, shape):
        """Base node (clamped inside the grid), fractional offset and quadratic B-spline weights."""
        local = (xp - origin) * inv_dx
        base = ti.cast(ti.floor(local - 0.5), ti.i32)
        base = ti.max(ti.min(base, shape - 3), 0)
        fx = local - ti.cast(base, real)
        w = [0.5 * (1.5 - fx) ** 2, 0.75 - (fx - 1.0) ** 2, 0.5 * (fx - 0.5) ** 2]
        return base, fx, w

    @ti.kernel
    def clear_grid(grid_mv: grid_vec, grid_m: grid_scalar):
        for I in ti.grouped(grid_m):
            grid_mv[I] = ti.Vector.zero(real, 3)
            grid_m[I] = 0.0

    @ti.kernel
    def particle_stress(src: ti.i32, dst: ti.i32, n: ti.i32, C: steps_mat, F: steps_mat,
                        plastic: steps_scalar, material: per_particle_int, E: per_particle,
                        nu: per_particle, density: per_particle, volume: per_particle, aux: table,
                        dFc: per_particle_mat, control_scale: real, affine: per_particle_mat,
                        inv_dx: real, dt: real):
        for p in range(n):
            # branch-free (fast reverse-mode compile); a [1, 3, 3] dFc serves every particle
            control = dFc[ti.min(p, dFc.shape[0] - 1)]
            F_trial = (ti.Matrix.identity(real, 3) + dt * C[src, p]) @ (F[src, p] + control_scale * control)
            F_new, plastic_new, tau = update_and_stress(
                material[p], F_trial, plastic[src, p], E[p], nu[p],
                ti.Vector([aux[p, 0], aux[p, 1], aux[p, 2], aux[p, 3]], real))
            F[dst, p] = F_new
            plastic[dst, p] = plastic_new
            affine[p] = (-dt * volume[p] * 4.0 * inv_dx * inv_dx) * tau + density[p] * volume[p] * C[src, p]

    @ti.kernel
    def p2g(src: ti.i32, n: ti.i32, x: steps_vec, v: steps_vec, density: per_particle,
            volume: per_particle, affine: per_particle_mat, grid_mv: grid_vec, grid_m: grid_scalar,
            origin: vec3, inv_dx: real):
        for p in range(n):
            # everything lives inside the loop: Taichi's autodiff rejects statements outside it
            shape = ti.Vector([grid_m.shape[0], grid_m.shape[1], grid_m.shape[2]])
            base, fx, w = stencil(x[src, p], origin, inv_dx, shape)
            mass = density[p] * volume[p]
            momentum = mass * v[src, p]
            for i, j, k in ti.static(ti.ndrange(3, 3, 3)):
                offset = ti.Vector([i, j, k])
                dpos = (ti.cast(offset, real) - fx) / inv_dx
                weight = w[i][0] * w[j][1] * w[k][2]
                node = base + offset
                grid_mv[node] += weight * (momentum + affine[p] @ dpos)
                grid_m[node] += weight * mass

    @ti.kernel
    def grid_update(grid_mv: grid_vec, grid_m: grid_scalar, grid_v: grid_vec, dt: real,
                    gravity: vec3, origin: vec3, dx: real, wall_mode: ti.i32, wall_friction: real,
                    colliders: table, n_colliders: ti.template(), time: real):
        for I in ti.grouped(grid_m):
            shape = ti.Vector([grid_m.shape[0], grid_m.shape[1], grid_m.shape[2]])
            v_node = ti.Vector.zero(real, 3)
            m = grid_m[I]
            if m > MIN_NODE_MASS:
                v_node = grid_mv[I] / m + dt * gravity
                pos = origin + ti.cast(I, real) * dx
                for c in ti.static(range(n_colliders)):
                    v_node = apply_collider(v_node, pos, colliders, c, time)
                v_node = apply_walls(v_node, I, shape, wall_mode, wall_friction)
            grid_v[I] = v_node

    @ti.kernel
    def g2p(src: ti.i32, dst: ti.i32, n: ti.i32, x: steps_vec, v: steps_vec, C: steps_mat,
            grid_v: grid_vec, origin: vec3, inv_dx: real, dt: real):
        for p in range(n):
            shape = ti.Vector([grid_v.shape[0], grid_v.shape[1], grid_v.shape[2]])
            base, fx, w = stencil(x[src, p], origin, inv_dx, shape)
            new_v = ti.Vector.zero(real, 3)
            new_C = ti.Matrix.zero(real, 3, 3)
            for i, j, k in ti.static(ti.ndrange(3, 3, 3)):
                offset = ti.Vector([i, j, k])
                dpos = ti.cast(offset, real) - fx
                weight = w[i][0] * w[j][1] * w[k][2]
                g_v = grid_v[base + offset]
                new_v += weight * g_v
                new_C += (4.0 * inv_dx * weight) * g_v.outer_product(dpos)
            v[dst, p] = new_v
            C[dst, p] = new_C
            x[dst, p] = x[src, p] + dt * new_v

    return SimpleNamespace(clear_grid=clear_grid, particle_stress=particle_stress, p2g=p2g,
                           grid_update=grid_update, g2p=g2p)
