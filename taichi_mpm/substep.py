"""The MLS-MPM substep: one short Taichi loop per stage, shared by the forward solver and the
differentiable rollout.

Convention (read this before building on these kernels)
-------------------------------------------------------
``substep_kernels(real, plastic_models)`` (real = ti.f32 or ti.f64; cached) returns a namespace of
kernels whose array arguments are ``ti.types.ndarray``: pass torch tensors (contiguous, on the
Taichi device, used in place) or ti.ndarrays. A kernel compiles once per (float type, flag),
whatever the array sizes (measured: sizes 24^3 / 32^3 grids and any N reuse one compile).

``plastic_models=True`` compiles the von Mises / snow / sand return maps into ``particle_stress``
(on ``ti.svd``, forward only: Taichi 1.7 cannot build ``kernel.grad`` of a kernel containing
``ti.svd``); the forward solver uses it only when the scene holds plastic materials. The
differentiable rollout uses ``plastic_models=False`` and, for scenes with plastic particles, the
stress in two kernels: ``trial_svd`` (the SVD of F_trial, adjoint ``trial_svd_grad``) and
``particle_stress_svd`` (every model, the plastic return maps on the given U, sig, V; adjoints
``particle_stress_grad`` for the elastic particles, ``plastic_stress_grad`` for the plastic ones).
Every adjoint is written by hand.

Particle state carries a leading local-step axis, ``[S, N, ...]``:
    x[s, p] vec3 position, v[s, p] vec3 velocity, C[s, p] mat3 APIC affine velocity,
    F[s, p] mat3 deformation gradient, plastic[s, p] plastic scalar (snow: Jp, starts at 1;
    sand: volume gained in tension, starts at 0; unused by the other models)
Per-particle constants, ``[N]``: material int32 (``materials.*_ID``), E, nu (differentiable: the
kernels derive mu, lam from them), density, volume (rest volume per particle), aux [N, 4] (the
model's own parameters, see ``materials``).
Grid, recomputed every substep, never kept: grid_mv [3, X, Y, Z] momentum, grid_m [X, Y, Z] mass,
grid_v [3, X, Y, Z] velocity after forces and boundaries (vector grids channel-major: grid_layout.py).

One substep from local step ``src`` to ``dst`` (the grid's mv and m clear on entry: whoever reads
them last, grid_update or grid_update_grad, zeroes them):
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
        grid_v = mv / m + dt g, then domain walls and colliders (boundary.py), at the nodes
        with mass (the velocity of the others is read only with weight 0).
        n_colliders is a compile-time constant (ti.template: one compile per collider count; the
        colliders unroll).
    g2p(src, dst, n, x, v, C, grid_v, origin, inv_dx, dt)
        reads x[src] and grid_v; writes v[dst], C[dst], x[dst] = x[src] + dt v[dst].
No kernel writes what it (or a later kernel of the same substep) reads, so the adjoints called in
reverse order are exact (DiffTaichi's rule). Backward of substep s: re-run its forward up to
grid_update (grid and affine are not kept), then
    g2p_grad        hand-written: adjoints of x, v, C [dst] -> x[src] and the grid velocities
    grid_update_grad  hand-written: grid velocity adjoints -> momentum and mass adjoints
    p2g_grad        hand-written: node adjoints -> x, v [src] and affine
    particle_stress_grad  hand-written, the elastic models' and the fluid's particles: -> C, F,
                    plastic [src], E, nu, controls
    plastic_stress_grad  hand-written, the plastic particles' return maps: -> C, plastic [src],
                    E, nu, aux, U, sig, V
    trial_svd_grad  hand-written SVD adjoint (plastic scenes): -> C, F [src], controls
The transfers' adjoints are written by hand because Taichi's took the longest to compile (on the
2-core CPU in float64, cold cache: p2g.grad 64 s, g2p.grad 25 s, particle_stress.grad 57 s);
what the hand-written ones cost is in bench/first_gradient.py's table. The grid update's is
because Taichi's reverse pass of it gave all-zero adjoints in float32 on CUDA (2026-11-27, H200),
the elastic stress's because Taichi's ran 19x slower than the forward stress on an H200, the
return maps' because Taichi's took 40 s to compile (constitutive.py).
Their arguments name the adjoint arrays explicitly (``g_*``: [S, N, ...] like the state, [N, ...]
or grid-shaped) and accumulate into them, except where one kernel is an array's only writer:
grid_update_grad writes g_mv and g_m (and resets g_grid_v, g2p_grad's atomic target, once read),
p2g_grad writes g_affine. advance_adjoint moves the state adjoints one substep back.
The forward solver ping-pongs between S = 2 slots (src, dst) = (0, 1), (1, 0), ...; a
differentiable rollout uses S = K + 1 and (s, s + 1).

What runs: each stage's loop body is a ``ti.func`` (``*_at``), and besides the one-stage kernels
above (tests, benchmarks, the plastic path) there are two whole-substep kernels, because at 100k
particles the host time of separate calls (~60-80 us each on the H200 machine) was the substep's
cost: ``substep_forward`` (stress and P2G in one pass, grid_update, g2p; run-time flag keep_grid)
serves the solver, the rollout's forward and the backward's recomputes, and ``substep_adjoint``
(the stress again, then the four adjoints above and advance_adjoint) is an elastic substep's
reverse. On CUDA, scenes of TILED_P2G_MIN_PARTICLES or more run P2G through shared memory
(block_scatter.py, ``tiled``) and unroll their stencils (for_axis).

Particles read grid nodes base..base+2 per axis with base clamped to [0, shape - 3], so no index
leaves the grid even for particles that left the domain (``MPMSolver.check`` reports those).
"""

import os
from dataclasses import dataclass
from functools import lru_cache
from types import SimpleNamespace
from typing import Any, Mapping, Optional, Tuple

import taichi as ti

from .block_scatter import BLOCK, CHANNELS, TILE_NODES, block_scatter_funcs, blocked
from .boundary import boundary_funcs
from .constitutive import constitutive_funcs, svd_grad_funcs
from .grid_layout import add_node_vec, node_shape, node_vec, set_node_vec
from .launch import TorchKernel
from .materials import SAND_ID, VON_MISES_ID

# Grid nodes lighter than this [kg] count as empty. The adjoint of v = mv / m scales by 1 / m^2,
# which overflows float32 (inf * 0 = NaN in the gradient) for the near-zero masses that a
# particle's outermost stencil weights leave on a node; such nodes carry no momentum worth keeping.
MIN_NODE_MASS = 1e-15

@ti.func
def for_axis(unrolled: ti.template(), body: ti.template(), args: ti.template()):
    """body(a, *args) for a = 0, 1, 2 along one axis of the 3x3x3 stencil (the transfers nest three).
    unrolled: copies of the body (ti.static), else a run-time loop. The copies make Taichi's own
    compile passes see 27 nodes: the small-scene forward substep (float64) compiled in 1.1 s as
    loops against 7.3 s unrolled on the H200, where unrolled P2G and G2P with global atomics ran
    1.42x faster at 1M particles (1.09 against 1.55 ms a substep; the shared-memory P2G's own
    stencil as fast either way), 2026-11-27. So the large-scene kernels (tiled_p2g) unroll, the
    small-scene and adjoint ones loop."""
    if ti.static(unrolled):
        for a in ti.static(range(3)):
            body(a, *args)
    else:
        for a in range(3):
            body(a, *args)


@lru_cache(maxsize=None)
def substep_kernels(real, plastic_models: bool = True) -> SimpleNamespace:
    vec3 = ti.types.vector(3, real)
    mat3 = ti.types.matrix(3, 3, real)
    steps_vec = ti.types.ndarray(dtype=vec3, ndim=2)
    steps_mat = ti.types.ndarray(dtype=mat3, ndim=2)
    steps_scalar = ti.types.ndarray(dtype=real, ndim=2)
    per_particle = ti.types.ndarray(dtype=real, ndim=1)
    per_particle_mat = ti.types.ndarray(dtype=mat3, ndim=1)
    per_particle_vec = ti.types.ndarray(dtype=vec3, ndim=1)
    per_particle_int = ti.types.ndarray(dtype=ti.i32, ndim=1)
    table = ti.types.ndarray(dtype=real, ndim=2)
    grid_vec = ti.types.ndarray(dtype=real, ndim=4)  # channel-major [3, X, Y, Z] (grid_layout)
    grid_scalar = ti.types.ndarray(dtype=real, ndim=3)

    models = constitutive_funcs(real, plastic_models)
    update_and_stress, plastic_update = models.update_and_stress, models.plastic_update
    elastic_update_grad, plastic_grad = models.elastic_update_grad, models.plastic_grad
    svd_grad = svd_grad_funcs(real)
    apply_walls, apply_collider = boundary_funcs(real)
    tiles = block_scatter_funcs(real)

    @ti.func
    def stencil(xp, origin, inv_dx, shape):
        """Base node (clamped inside the grid), fractional offset and the quadratic B-spline weights
        (3x3: row a for stencil offset a, a column per axis)."""
        local = (xp - origin) * inv_dx
        base = ti.cast(ti.floor(local - 0.5), ti.i32)
        base = ti.max(ti.min(base, shape - 3), 0)
        fx = local - ti.cast(base, real)
        W = ti.Matrix.rows([0.5 * (1.5 - fx) ** 2, 0.75 - (fx - 1.0) ** 2, 0.5 * (fx - 0.5) ** 2])
        return base, fx, W

    @ti.func
    def row(W, a, col: ti.template()):
        """W[a, col] for a stencil offset a known only at run time: selects, where W[a, col] would
        make Taichi keep W in local memory, which CUDA writes through to L2 on every node. In the
        shared-memory P2G (1M particles, H200) those stores were three quarters of the kernel's L2
        writes, and L2 its bound (ncu, 2026-11-27)."""
        return ti.select(a == 0, W[0, col], ti.select(a == 1, W[1, col], W[2, col]))

    @ti.func
    def stencil_weight(W, offset):
        """The quadratic B-spline weight of the node at stencil offset (i, j, k)."""
        return row(W, offset[0], 0) * row(W, offset[1], 1) * row(W, offset[2], 2)

    @ti.func
    def stencil_weight_grad(W, dW, offset, inv_dx):
        """d stencil_weight / d x_p (dW: weight_slopes; d fx / d x = inv_dx)."""
        w = ti.Vector([row(W, offset[0], 0), row(W, offset[1], 1), row(W, offset[2], 2)])
        dw = ti.Vector([row(dW, offset[0], 0), row(dW, offset[1], 1), row(dW, offset[2], 2)])
        return inv_dx * ti.Vector([dw[0] * w[1] * w[2], w[0] * dw[1] * w[2], w[0] * w[1] * dw[2]])

    @ti.func
    def weight_slopes(fx):
        """d W / d fx of stencil's weights (same layout); d fx / d x = inv_dx."""
        return ti.Matrix.rows([fx - 1.5, 2.0 * (1.0 - fx), fx - 0.5])

    @ti.func
    def trial_gradient(p, src, C: ti.template(), F: ti.template(), dFc: ti.template(), control_scale, dt):
        """F_trial = (I + dt C) (F + control_scale dFc) and its two factors; branch-free (fast
        reverse-mode compile): a [1, 3, 3] dFc serves every particle."""
        control = dFc[ti.min(p, dFc.shape[0] - 1)]
        A = ti.Matrix.identity(real, 3) + dt * C[src, p]
        F_base = F[src, p] + control_scale * control
        return A @ F_base, A, F_base

    @ti.func
    def is_plastic(material_id):
        return material_id >= VON_MISES_ID and material_id <= SAND_ID

    @ti.func
    def stress_scale(p, volume: ti.template(), inv_dx, dt):
        """-dt vol 4/dx^2: what the MLS momentum matrix takes of the Kirchhoff stress."""
        return -dt * volume[p] * 4.0 * inv_dx * inv_dx

    @ti.func
    def affine_of(p, src, tau, C: ti.template(), density: ti.template(), volume: ti.template(), inv_dx, dt):
        """The particle's APIC/MLS momentum matrix that p2g scatters: -dt vol 4/dx^2 tau + m C[src]."""
        return stress_scale(p, volume, inv_dx, dt) * tau + density[p] * volume[p] * C[src, p]

    @ti.func
    def store_stress(p, src, dst, F_new, plastic_new, tau, C: ti.template(), F: ti.template(),
                     plastic: ti.template(), density: ti.template(), volume: ti.template(), inv_dx, dt):
        """Write the return-mapped F and plastic state to slot dst; return the particle's affine."""
        F[dst, p] = F_new
        plastic[dst, p] = plastic_new
        return affine_of(p, src, tau, C, density, volume, inv_dx, dt)

    @ti.func
    def updated_stress(p, src, C: ti.template(), F: ti.template(), plastic: ti.template(), material: ti.template(),
                       E: ti.template(), nu: ti.template(), aux: ti.template(), dFc: ti.template(), control_scale,
                       dt):
        """The particle's trial F through its material's return map: (F_new, plastic_new, Kirchhoff tau)."""
        F_trial, _, _ = trial_gradient(p, src, C, F, dFc, control_scale, dt)
        return update_and_stress(material[p], F_trial, plastic[src, p], E[p], nu[p],
                                 ti.Vector([aux[p, 0], aux[p, 1], aux[p, 2], aux[p, 3]], real))

    @ti.func
    def stress_of(p, src, dst, C: ti.template(), F: ti.template(), plastic: ti.template(),
                  material: ti.template(), E: ti.template(), nu: ti.template(), density: ti.template(),
                  volume: ti.template(), aux: ti.template(), dFc: ti.template(), control_scale, inv_dx, dt):
        """particle_stress of one particle: writes F, plastic [dst]; returns its affine."""
        F_new, plastic_new, tau = updated_stress(p, src, C, F, plastic, material, E, nu, aux, dFc, control_scale, dt)
        return store_stress(p, src, dst, F_new, plastic_new, tau, C, F, plastic, density, volume, inv_dx, dt)

    @ti.func
    def scatter_stencil(unrolled: ti.template(), fx, W, momentum, mass, affine_p, inv_dx, add: ti.template(),
                        add_args: ti.template()):
        """P2G of one particle: add(offset, weight (momentum + affine (x_i - x_p)), weight mass,
        *add_args) for the 27 offsets (i, j, k) of its stencil, built axis by axis. With x_i - x_p =
        dx (offset - fx), the node's momentum is start + i a0 + j a1 + k a2 (a_d: column d of dx
        affine, start = momentum - dx affine fx) and its weight W[i, 0] W[j, 1] W[k, 2]: the loops
        carry both, one step a node: about 8 flops a node where the product per node took ~40 (the
        stress+P2G loop at 1M particles 236 -> 205 us, ncu, H200, 2026-11-28). unrolled: see for_axis."""
        step = affine_p / inv_dx
        plane = momentum - step @ fx
        for_axis(unrolled, scatter_plane, (plane, W, step[:, 0], step[:, 1], step[:, 2], mass,
                                           add, add_args, unrolled))

    @ti.func
    def scatter_plane(i, plane: ti.template(), W, a0, a1, a2, mass, add: ti.template(), add_args: ti.template(),
                      unrolled: ti.template()):
        line = plane
        for_axis(unrolled, scatter_line, (i, row(W, i, 0), line, W, a1, a2, mass, add, add_args, unrolled))
        plane += a0

    @ti.func
    def scatter_line(j, i, w_i, line: ti.template(), W, a1, a2, mass, add: ti.template(), add_args: ti.template(),
                     unrolled: ti.template()):
        node = line
        for_axis(unrolled, scatter_point, (i, j, w_i * row(W, j, 1), node, W, a2, mass, add, add_args))
        line += a1

    @ti.func
    def scatter_point(k, i, j, w_ij, node: ti.template(), W, a2, mass, add: ti.template(), add_args: ti.template()):
        weight = w_ij * row(W, k, 2)
        add(ti.Vector([i, j, k]), weight * node, weight * mass, *add_args)
        node += a2

    @ti.func
    def grid_add(offset, node_mv, node_m, base, grid_mv: ti.template(), grid_m: ti.template()):
        add_node_vec(grid_mv, base + offset, node_mv)
        grid_m[base + offset] += node_m

    @ti.func
    def scatter(xp, momentum, mass, affine_p, grid_mv: ti.template(), grid_m: ti.template(), origin, inv_dx,
                unrolled: ti.template()):
        """P2G of one particle: mass and momentum + affine (x_i - x_p) to its 27 nodes (global
        atomics); unrolled: see for_axis."""
        shape = ti.Vector([grid_m.shape[0], grid_m.shape[1], grid_m.shape[2]])
        base, fx, W = stencil(xp, origin, inv_dx, shape)
        scatter_stencil(unrolled, fx, W, momentum, mass, affine_p, inv_dx, grid_add, (base, grid_mv, grid_m))

    @ti.func
    def tile_node_add(offset, node_mv, node_m, slot, strides, tile: ti.template()):
        tiles.tile_add(slot + offset[0] * strides[0] + offset[1] * strides[1] + offset[2], node_mv, node_m, tile)

    @ti.func
    def scatter_block(i, n, xp, momentum, mass, affine_p, grid_mv: ti.template(), grid_m: ti.template(),
                      origin, inv_dx, bounds: ti.template(), tile: ti.template()):
        """scatter() of the particle at index i of a tiled kernel's loop (block_scatter: i >= n are
        idle lanes): through the block's shared tile, or straight to the grid where the block's
        stencils spread over more than TILE_NODES nodes (unrolled: the faster form for global
        atomics; the shared ones ran as fast in a loop, which compiles in a fraction of the time).
        bounds, tile: the block's shared arrays ((6,) int32, (CHANNELS * TILE_NODES,) real); its
        first write to tile follows a sync."""
        lane = i % BLOCK
        active = i < n
        shape = ti.Vector([grid_m.shape[0], grid_m.shape[1], grid_m.shape[2]])
        base, fx, W = stencil(xp, origin, inv_dx, shape)
        lo, extent = tiles.tile_of_block(lane, active, base, bounds)
        if extent.max() <= TILE_NODES and extent[0] * extent[1] * extent[2] <= TILE_NODES:  # same on every lane
            tiles.tile_clear(lane, extent[0] * extent[1] * extent[2], tile)
            if active:
                slot, strides = tiles.tile_slot(base, lo, extent)
                scatter_stencil(False, fx, W, momentum, mass, affine_p, inv_dx, tile_node_add, (slot, strides, tile))
            tiles.tile_flush(lane, lo, extent, tile, grid_mv, grid_m)
        elif active:
            scatter(xp, momentum, mass, affine_p, grid_mv, grid_m, origin, inv_dx, True)
        ti.simt.block.sync()  # the block's next pass reuses bounds and tile

    @ti.func
    def store_staged(lane, first, count, dst, stage: ti.template(), at, M: ti.template()):
        """M[dst, first + q] = the 9 floats stage[at + 9 q ...] (row-major) for the block's count
        particles, as one contiguous run that consecutive lanes store float by float: stored particle
        by particle, a warp's store of one component touched 32 sectors of 32 bytes for 128 bytes of
        data, and L2 writes bound the stage (G2P, 1M particles, H200: 82% of L2's peak, ncu,
        2026-11-27). After a sync; every lane of the block calls it."""
        j = lane
        while j < 9 * count:
            M[dst, first + j // 9][j % 9 // 3, j % 3] = stage[at + j]
            j += BLOCK

    @ti.kernel
    def particle_stress(src: ti.i32, dst: ti.i32, n: ti.i32, C: steps_mat, F: steps_mat,
                        plastic: steps_scalar, material: per_particle_int, E: per_particle,
                        nu: per_particle, density: per_particle, volume: per_particle, aux: table,
                        dFc: per_particle_mat, control_scale: real, affine: per_particle_mat,
                        inv_dx: real, dt: real):
        for p in range(n):
            affine[p] = stress_of(p, src, dst, C, F, plastic, material, E, nu, density, volume, aux, dFc,
                                  control_scale, inv_dx, dt)

    @ti.func
    def particle_stress_grad_at(p, src, dst, C: ti.template(), F: ti.template(), material: ti.template(),
                                E: ti.template(), nu: ti.template(), density: ti.template(),
                                volume: ti.template(), dFc: ti.template(), control_scale,
                                g_aff, g_C: ti.template(), g_F: ti.template(),
                                g_plastic: ti.template(), g_E: ti.template(), g_nu: ti.template(),
                                g_dFc: ti.template(), inv_dx, dt):
        """One particle of particle_stress_grad, its affine's adjoint g_aff given."""
        F_trial, A, F_base = trial_gradient(p, src, C, F, dFc, control_scale, dt)
        g_tau = stress_scale(p, volume, inv_dx, dt) * g_aff
        g_trial, gE, gnu = elastic_update_grad(material[p], F_trial, E[p], nu[p], g_tau, g_F[dst, p])
        g_C[src, p] += (density[p] * volume[p]) * g_aff + dt * g_trial @ F_base.transpose()
        g_base = A.transpose() @ g_trial
        g_F[src, p] += g_base
        g_plastic[src, p] += g_plastic[dst, p]
        g_E[p] += gE
        g_nu[p] += gnu
        if control_scale != 0.0:
            g_dFc[p] += control_scale * g_base

    @ti.kernel
    def particle_stress_grad(src: ti.i32, dst: ti.i32, n: ti.i32, C: steps_mat, F: steps_mat,
                             material: per_particle_int, E: per_particle, nu: per_particle,
                             density: per_particle, volume: per_particle, dFc: per_particle_mat,
                             control_scale: real, g_affine: per_particle_mat, g_C: steps_mat, g_F: steps_mat,
                             g_plastic: steps_scalar, g_E: per_particle, g_nu: per_particle,
                             g_dFc: per_particle_mat, inv_dx: real, dt: real):
        """Adjoint of particle_stress for the elastic models and the fluid (hand-written; plastic
        particles are plastic_stress_grad's): the adjoints of affine, F[dst] and
        plastic[dst] -> C, F, plastic [src], E, nu and dFc (g_dFc: [N, 3, 3], or [1, 3, 3] ignored
        when control_scale is 0)."""
        for p in range(n):
            if not is_plastic(material[p]):
                particle_stress_grad_at(p, src, dst, C, F, material, E, nu, density, volume, dFc, control_scale,
                                        g_affine[p], g_C, g_F, g_plastic, g_E, g_nu, g_dFc, inv_dx, dt)

    # ---- the differentiable stress of plastic materials: SVD outside, return maps inside -------
    @ti.kernel
    def trial_svd(src: ti.i32, n: ti.i32, C: steps_mat, F: steps_mat, material: per_particle_int,
                  dFc: per_particle_mat, control_scale: real, U: per_particle_mat, sig: per_particle_vec,
                  V: per_particle_mat, dt: real, separation: real):
        """U diag(sig) V^T = F_trial of plastic particles (identity for the others). Forward only:
        its adjoint is trial_svd_grad. ``separation`` > 0 (the backward's recompute only): where two
        singular values lie closer than separation * max, spread them by the factors
        (1 - separation, 1, 1 + 3 separation), so that the adjoint's divided differences are not
        0 / 0 (constitutive.SVD_SEPARATION); other particles are left exact."""
        for p in range(n):
            U[p], sig[p], V[p] = ti.Matrix.identity(real, 3), ti.Vector.one(real, 3), ti.Matrix.identity(real, 3)
            if is_plastic(material[p]):
                F_trial, _, _ = trial_gradient(p, src, C, F, dFc, control_scale, dt)
                U_p, S_p, V_p = ti.svd(F_trial, real)
                s = ti.Vector([S_p[0, 0], S_p[1, 1], S_p[2, 2]], real)
                a = ti.abs(s)
                closest = ti.min(ti.abs(a[0] - a[1]), ti.abs(a[0] - a[2]), ti.abs(a[1] - a[2]))
                tie = closest < separation * ti.max(a[0], a[1], a[2])
                spread = ti.Vector([1.0 - separation, 1.0, 1.0 + 3.0 * separation], real)
                U[p], V[p] = U_p, V_p
                sig[p] = ti.Vector([ti.select(tie, s[0] * spread[0], s[0]), s[1], ti.select(tie, s[2] * spread[2], s[2])], real)

    @ti.kernel
    def particle_stress_svd(src: ti.i32, dst: ti.i32, n: ti.i32, C: steps_mat, F: steps_mat,
                            plastic: steps_scalar, material: per_particle_int, E: per_particle,
                            nu: per_particle, density: per_particle, volume: per_particle, aux: table,
                            dFc: per_particle_mat, control_scale: real, U: per_particle_mat,
                            sig: per_particle_vec, V: per_particle_mat, affine: per_particle_mat,
                            inv_dx: real, dt: real):
        """particle_stress for every model, the plastic ones on trial_svd's U, sig, V (adjoints:
        particle_stress_grad, plastic_stress_grad)."""
        for p in range(n):
            F_trial, _, _ = trial_gradient(p, src, C, F, dFc, control_scale, dt)
            F_new, plastic_new, tau = plastic_update(
                material[p], F_trial, U[p], sig[p], V[p], plastic[src, p], E[p], nu[p],
                ti.Vector([aux[p, 0], aux[p, 1], aux[p, 2], aux[p, 3]], real))
            affine[p] = store_stress(p, src, dst, F_new, plastic_new, tau, C, F, plastic, density, volume, inv_dx, dt)

    @ti.kernel
    def plastic_stress_grad(src: ti.i32, dst: ti.i32, n: ti.i32, plastic: steps_scalar, material: per_particle_int,
                            E: per_particle, nu: per_particle, density: per_particle, volume: per_particle,
                            aux: table, U: per_particle_mat, sig: per_particle_vec, V: per_particle_mat,
                            g_affine: per_particle_mat, g_C: steps_mat, g_plastic: steps_scalar, g_F: steps_mat,
                            g_E: per_particle, g_nu: per_particle, g_aux: table, g_U: per_particle_mat,
                            g_sig: per_particle_vec, g_V: per_particle_mat, inv_dx: real, dt: real,
                            models: ti.template()):
        """Adjoint of particle_stress_svd for the plastic particles (hand-written,
        constitutive.plastic_grad): the adjoints of affine, F[dst] and plastic[dst] -> C, plastic
        [src], E, nu, aux and U, sig, V (whose adjoint trial_svd_grad takes on to C, F [src]).
        models: the bit set of the plastic models the particles hold (materials.plastic_model_set),
        the only ones compiled."""
        for p in range(n):
            if is_plastic(material[p]):
                g_aff = g_affine[p]
                g_tau = stress_scale(p, volume, inv_dx, dt) * g_aff
                gU, gsig, gV, gplastic, gE, gnu, gaux = plastic_grad(
                    material[p], U[p], sig[p], V[p], plastic[src, p], E[p], nu[p],
                    ti.Vector([aux[p, 0], aux[p, 1], aux[p, 2], aux[p, 3]], real), g_F[dst, p], g_tau,
                    g_plastic[dst, p], models)
                g_C[src, p] += (density[p] * volume[p]) * g_aff
                g_plastic[src, p] += gplastic
                g_E[p] += gE
                g_nu[p] += gnu
                for j in ti.static(range(4)):
                    g_aux[p, j] += gaux[j]
                g_U[p] += gU
                g_sig[p] += gsig
                g_V[p] += gV

    @ti.kernel
    def trial_svd_grad(src: ti.i32, n: ti.i32, C: steps_mat, F: steps_mat, material: per_particle_int,
                       dFc: per_particle_mat, control_scale: real, U: per_particle_mat, sig: per_particle_vec,
                       V: per_particle_mat, g_U: per_particle_mat, g_sig: per_particle_vec,
                       g_V: per_particle_mat, g_C: steps_mat, g_F: steps_mat, g_dFc: per_particle_mat,
                       dt: real):
        """Adjoint of trial_svd (hand-written): U, sig, V adjoints -> F_trial's -> C[src], F[src],
        dFc (g_dFc: [N, 3, 3], or [1, 3, 3] ignored when control_scale is 0)."""
        for p in range(n):
            if is_plastic(material[p]):
                _, A, F_base = trial_gradient(p, src, C, F, dFc, control_scale, dt)
                g_trial = svd_grad(U[p], sig[p], V[p], g_U[p], g_sig[p], g_V[p])
                g_C[src, p] += dt * g_trial @ F_base.transpose()
                g_base = A.transpose() @ g_trial
                g_F[src, p] += g_base
                if control_scale != 0.0:
                    g_dFc[p] += control_scale * g_base

    @ti.func
    def p2g_at(p, src, x: ti.template(), v: ti.template(), density: ti.template(), volume: ti.template(),
               affine: ti.template(), grid_mv: ti.template(), grid_m: ti.template(), origin, inv_dx):
        """One particle of p2g."""
        mass = density[p] * volume[p]
        scatter(x[src, p], mass * v[src, p], mass, affine[p], grid_mv, grid_m, origin, inv_dx, False)

    @ti.func
    def p2g_tiled_at(i, n, src, x: ti.template(), v: ti.template(), density: ti.template(), volume: ti.template(),
                     affine: ti.template(), grid_mv: ti.template(), grid_m: ti.template(), origin, inv_dx):
        """Loop index i of the tiled p2g (i >= n: an idle lane of the last block)."""
        p = ti.min(i, n - 1)
        bounds = ti.simt.block.SharedArray((6,), ti.i32)
        tile = ti.simt.block.SharedArray((CHANNELS * TILE_NODES,), real)
        mass = density[p] * volume[p]
        scatter_block(i, n, x[src, p], mass * v[src, p], mass, affine[p], grid_mv, grid_m, origin, inv_dx, bounds,
                      tile)

    @ti.kernel
    def p2g(src: ti.i32, n: ti.i32, x: steps_vec, v: steps_vec, density: per_particle,
            volume: per_particle, affine: per_particle_mat, grid_mv: grid_vec, grid_m: grid_scalar,
            origin: vec3, inv_dx: real, tiled: ti.template()):
        """tiled: through shared-memory tiles (CUDA only; block_scatter)."""
        if ti.static(tiled):
            ti.loop_config(block_dim=BLOCK)
            for i in range(blocked(n)):
                p2g_tiled_at(i, n, src, x, v, density, volume, affine, grid_mv, grid_m, origin, inv_dx)
        else:
            for p in range(n):
                p2g_at(p, src, x, v, density, volume, affine, grid_mv, grid_m, origin, inv_dx)

    @ti.func
    def stress_p2g_at(p, src, dst, x: ti.template(), v: ti.template(), C: ti.template(), F: ti.template(),
                      plastic: ti.template(), material: ti.template(), E: ti.template(), nu: ti.template(),
                      density: ti.template(), volume: ti.template(), aux: ti.template(), dFc: ti.template(),
                      control_scale, grid_mv: ti.template(), grid_m: ti.template(), origin, inv_dx, dt):
        """One particle of stress_p2g."""
        affine_p = stress_of(p, src, dst, C, F, plastic, material, E, nu, density, volume, aux, dFc,
                             control_scale, inv_dx, dt)
        mass = density[p] * volume[p]
        scatter(x[src, p], mass * v[src, p], mass, affine_p, grid_mv, grid_m, origin, inv_dx, False)

    @ti.func
    def stress_p2g_tiled_at(i, n, src, dst, x: ti.template(), v: ti.template(), C: ti.template(),
                            F: ti.template(), plastic: ti.template(), material: ti.template(), E: ti.template(),
                            nu: ti.template(), density: ti.template(), volume: ti.template(), aux: ti.template(),
                            dFc: ti.template(), control_scale, grid_mv: ti.template(), grid_m: ti.template(),
                            origin, inv_dx, dt):
        """Loop index i of the tiled stress_p2g (i >= n: an idle lane of the last block). The block's
        new F leave through the tile's memory before the P2G (store_staged): stored particle by
        particle they were 8.2M of the loop's L2 write sectors at 1M particles (ncu, H200, 2026-11-28)."""
        lane = i % BLOCK
        p = ti.min(i, n - 1)
        bounds = ti.simt.block.SharedArray((6,), ti.i32)
        tile = ti.simt.block.SharedArray((CHANNELS * TILE_NODES,), real)
        affine_p = ti.Matrix.zero(real, 3, 3)
        if i < n:
            F_new, plastic_new, tau = updated_stress(p, src, C, F, plastic, material, E, nu, aux, dFc, control_scale,
                                                     dt)
            plastic[dst, p] = plastic_new
            affine_p = affine_of(p, src, tau, C, density, volume, inv_dx, dt)
            for e in ti.static(range(9)):
                tile[9 * lane + e] = F_new[e // 3, e % 3]
        ti.simt.block.sync()
        first = i - lane
        store_staged(lane, first, ti.min(BLOCK, n - first), dst, tile, 0, F)
        mass = density[p] * volume[p]
        scatter_block(i, n, x[src, p], mass * v[src, p], mass, affine_p, grid_mv, grid_m, origin, inv_dx, bounds,
                      tile)

    @ti.func
    def stress_p2g_loop(src: ti.template(), dst: ti.template(), n: ti.template(), x: ti.template(),
                        v: ti.template(), C: ti.template(), F: ti.template(), plastic: ti.template(),
                        material: ti.template(), E: ti.template(), nu: ti.template(), density: ti.template(),
                        volume: ti.template(), aux: ti.template(), dFc: ti.template(), control_scale: ti.template(),
                        grid_mv: ti.template(), grid_m: ti.template(), origin: ti.template(), inv_dx: ti.template(),
                        dt: ti.template(), tiled: ti.template()):
        """particle_stress and p2g in one parallel loop (tiled: through shared memory, CUDA). Every
        parameter a template, as in substep_at."""
        if ti.static(tiled):
            ti.loop_config(block_dim=BLOCK)
            for i in range(blocked(n)):
                stress_p2g_tiled_at(i, n, src, dst, x, v, C, F, plastic, material, E, nu, density, volume, aux,
                                    dFc, control_scale, grid_mv, grid_m, origin, inv_dx, dt)
        else:
            for p in range(n):
                stress_p2g_at(p, src, dst, x, v, C, F, plastic, material, E, nu, density, volume, aux, dFc,
                              control_scale, grid_mv, grid_m, origin, inv_dx, dt)

    @ti.kernel
    def stress_p2g(src: ti.i32, dst: ti.i32, n: ti.i32, x: steps_vec, v: steps_vec, C: steps_mat, F: steps_mat,
                   plastic: steps_scalar, material: per_particle_int, E: per_particle, nu: per_particle,
                   density: per_particle, volume: per_particle, aux: table, dFc: per_particle_mat,
                   control_scale: real, grid_mv: grid_vec, grid_m: grid_scalar, origin: vec3, inv_dx: real,
                   dt: real, tiled: ti.template()):
        """particle_stress and p2g in one pass (a forward that keeps no affine scratch): one launch
        and no affine round trip through memory."""
        stress_p2g_loop(src, dst, n, x, v, C, F, plastic, material, E, nu, density, volume, aux, dFc,
                        control_scale, grid_mv, grid_m, origin, inv_dx, dt, tiled)

    @ti.func
    def node_velocity(I, grid_mv: ti.template(), grid_m: ti.template(), dt, gravity, origin, dx, wall_mode,
                      wall_friction, colliders: ti.template(), n_colliders: ti.template(), time):
        """Velocity of an occupied node after gravity, colliders and walls, and its Jacobian with
        respect to mv / m (see boundary_funcs)."""
        shape = ti.Vector([grid_m.shape[0], grid_m.shape[1], grid_m.shape[2]])
        v_node = node_vec(grid_mv, I) / grid_m[I] + dt * gravity
        J = ti.Matrix.identity(real, 3)
        pos = origin + ti.cast(I, real) * dx
        for c in ti.static(range(n_colliders)):
            v_node, J = apply_collider(v_node, J, pos, colliders, c, time)
        return apply_walls(v_node, J, I, shape, wall_mode, wall_friction)

    @ti.func
    def grid_update_at(I, grid_mv: ti.template(), grid_m: ti.template(), grid_v: ti.template(), dt, gravity,
                       origin, dx, wall_mode, wall_friction, colliders: ti.template(),
                       n_colliders: ti.template(), time, consume):
        """One node of grid_update. A node no particle reached (mass exactly 0) is left as it is:
        P2G left it clear, and its velocity is read only with stencil weight 0 (G2P and g2p_grad
        read the nodes their own P2G gave weight), so the finite value an earlier substep left
        there is harmless (velocity grids start at zero): at 1M particles in a 128^3 grid 94% of
        the nodes are empty, and writing them all was most of the stage's memory traffic.
        consume: zero mv and m of the nodes with mass once read."""
        if grid_m[I] != 0.0:
            v_node = ti.Vector.zero(real, 3)
            if grid_m[I] > MIN_NODE_MASS:
                v_node, _ = node_velocity(I, grid_mv, grid_m, dt, gravity, origin, dx, wall_mode, wall_friction,
                                          colliders, n_colliders, time)
            set_node_vec(grid_v, I, v_node)
            if consume:
                set_node_vec(grid_mv, I, ti.Vector.zero(real, 3))
                grid_m[I] = 0.0

    @ti.kernel
    def grid_update(grid_mv: grid_vec, grid_m: grid_scalar, grid_v: grid_vec, dt: real,
                    gravity: vec3, origin: vec3, dx: real, wall_mode: ti.i32, wall_friction: real,
                    colliders: table, n_colliders: ti.template(), time: real, consume: ti.i32):
        """consume (0/1): zero mv and m once read, so the next substep's P2G finds a clear grid; off
        where the adjoint reads them afterwards (grid_update_grad zeroes them then)."""
        for I in ti.grouped(grid_m):
            grid_update_at(I, grid_mv, grid_m, grid_v, dt, gravity, origin, dx, wall_mode, wall_friction,
                           colliders, n_colliders, time, consume)

    @ti.func
    def grid_update_grad_at(I, grid_mv: ti.template(), grid_m: ti.template(), g_grid_v: ti.template(),
                            g_mv: ti.template(), g_m: ti.template(), dt, gravity, origin, dx, wall_mode,
                            wall_friction, colliders: ti.template(), n_colliders: ti.template(), time):
        """One node of grid_update_grad. A node without mass is left as it is, as grid_update
        leaves it: g2p_grad's atomics added exact zeros to its g_grid_v (stencil weight 0), and
        p2g_grad reads its g_mv, g_m (finite values of an earlier substep; zero at allocation)
        only with weight and weight slope 0."""
        if grid_m[I] != 0.0:
            g_mv_node, g_m_node = ti.Vector.zero(real, 3), ti.cast(0.0, real)
            if grid_m[I] > MIN_NODE_MASS:
                _, J = node_velocity(I, grid_mv, grid_m, dt, gravity, origin, dx, wall_mode, wall_friction,
                                     colliders, n_colliders, time)
                g_in = J.transpose() @ node_vec(g_grid_v, I)
                inv_m = 1.0 / grid_m[I]
                g_mv_node = inv_m * g_in
                g_m_node = -inv_m * inv_m * g_in.dot(node_vec(grid_mv, I))
            set_node_vec(g_mv, I, g_mv_node)
            g_m[I] = g_m_node
            set_node_vec(g_grid_v, I, ti.Vector.zero(real, 3))
            # the grid's last reader: left clear for the P2G of a later refill (no clearing pass)
            set_node_vec(grid_mv, I, ti.Vector.zero(real, 3))
            grid_m[I] = 0.0

    @ti.kernel
    def grid_update_grad(grid_mv: grid_vec, grid_m: grid_scalar, g_grid_v: grid_vec, g_mv: grid_vec,
                         g_m: grid_scalar, dt: real, gravity: vec3, origin: vec3, dx: real, wall_mode: ti.i32,
                         wall_friction: real, colliders: table, n_colliders: ti.template(), time: real):
        """Adjoint of grid_update (hand-written): g_grid_v -> g_mv, g_m of the occupied nodes
        (v = J-chain of mv / m: d/dmv = J / m, d/dm = -J mv / m^2); empty nodes pass nothing.
        Writes g_mv and g_m of every node with mass (no zeroing needed), and resets its g_grid_v
        (ready for the next substep's g2p_grad atomics) and its mv and m (ready for a later P2G on
        this grid) to zero once read; skips the empty ones (see grid_update_grad_at)."""
        for I in ti.grouped(grid_m):
            grid_update_grad_at(I, grid_mv, grid_m, g_grid_v, g_mv, g_m, dt, gravity, origin, dx, wall_mode,
                                wall_friction, colliders, n_colliders, time)

    @ti.func
    def gather(xp, grid_v: ti.template(), origin, inv_dx, unrolled: ti.template()):
        """G2P of one particle: its new velocity v = sum w g and affine velocity C = 4/dx^2 sum w g
        (x_i - x_p)^T, as 4 inv_dx (M - v fx^T) with M = sum w g offset^T: built axis by axis like
        scatter_stencil, a node costs a weight, a scaled load and its sums, not an outer product
        (unrolled: see for_axis)."""
        base, fx, W = stencil(xp, origin, inv_dx, node_shape(grid_v))
        new_v = ti.Vector.zero(real, 3)
        moments = ti.Matrix.zero(real, 3, 3)  # column d: sum of offset[d] w g
        for_axis(unrolled, gather_plane, (base, W, grid_v, new_v, moments, unrolled))
        return new_v, (4.0 * inv_dx) * (moments - new_v.outer_product(fx))

    @ti.func
    def gather_plane(i, base, W, grid_v: ti.template(), new_v: ti.template(), moments: ti.template(),
                     unrolled: ti.template()):
        plane_v, plane_j, plane_k = ti.Vector.zero(real, 3), ti.Vector.zero(real, 3), ti.Vector.zero(real, 3)
        for_axis(unrolled, gather_line, (i, row(W, i, 0), base, W, grid_v, plane_v, plane_j, plane_k, unrolled))
        new_v += plane_v
        moments += ti.Matrix.cols([i * plane_v, plane_j, plane_k])

    @ti.func
    def gather_line(j, i, w_i, base, W, grid_v: ti.template(), plane_v: ti.template(), plane_j: ti.template(),
                    plane_k: ti.template(), unrolled: ti.template()):
        line_v, line_k = ti.Vector.zero(real, 3), ti.Vector.zero(real, 3)
        for_axis(unrolled, gather_point, (i, j, w_i * row(W, j, 1), base, W, grid_v, line_v, line_k))
        plane_v += line_v
        plane_j += j * line_v
        plane_k += line_k

    @ti.func
    def gather_point(k, i, j, w_ij, base, W, grid_v: ti.template(), line_v: ti.template(), line_k: ti.template()):
        share = (w_ij * row(W, k, 2)) * node_vec(grid_v, base + ti.Vector([i, j, k]))
        line_v += share
        line_k += k * share

    @ti.func
    def g2p_at(p, src, dst, x: ti.template(), v: ti.template(), C: ti.template(), grid_v: ti.template(),
               origin, inv_dx, dt):
        """One particle of g2p (the small-scene form: a run-time stencil loop)."""
        new_v, new_C = gather(x[src, p], grid_v, origin, inv_dx, False)
        v[dst, p] = new_v
        C[dst, p] = new_C
        x[dst, p] = x[src, p] + dt * new_v

    @ti.func
    def g2p_tiled_at(i, n, src, dst, x: ti.template(), v: ti.template(), C: ti.template(), grid_v: ti.template(),
                     origin, inv_dx, dt):
        """Loop index i of the large-scene g2p (i >= n: an idle lane of the last block): unrolled
        stencil, and the block's new x, v, C leave through shared memory, each array as one
        contiguous run that consecutive lanes store float by float (see store_staged)."""
        lane = i % BLOCK
        p = ti.min(i, n - 1)
        stage = ti.simt.block.SharedArray((15 * BLOCK,), real)  # x (3), v (3), C (9) a particle, in order
        new_v, new_C = gather(x[src, p], grid_v, origin, inv_dx, True)
        new_x = x[src, p] + dt * new_v
        for d in ti.static(range(3)):
            stage[3 * lane + d] = new_x[d]
            stage[3 * BLOCK + 3 * lane + d] = new_v[d]
        for e in ti.static(range(9)):
            stage[6 * BLOCK + 9 * lane + e] = new_C[e // 3, e % 3]
        ti.simt.block.sync()
        first = i - lane
        count = ti.min(BLOCK, n - first)  # the block's particles
        j = lane
        while j < 3 * count:
            x[dst, first + j // 3][j % 3] = stage[j]
            v[dst, first + j // 3][j % 3] = stage[3 * BLOCK + j]
            j += BLOCK
        store_staged(lane, first, count, dst, stage, 6 * BLOCK, C)
        ti.simt.block.sync()  # the block's next pass reuses stage

    @ti.func
    def g2p_loop(src: ti.template(), dst: ti.template(), n: ti.template(), x: ti.template(), v: ti.template(),
                 C: ti.template(), grid_v: ti.template(), origin: ti.template(), inv_dx: ti.template(),
                 dt: ti.template(), tiled: ti.template()):
        """g2p's parallel loop (tiled: the large-scene form, CUDA). Every parameter a template, as in
        substep_at."""
        if ti.static(tiled):
            ti.loop_config(block_dim=BLOCK)
            for i in range(blocked(n)):
                g2p_tiled_at(i, n, src, dst, x, v, C, grid_v, origin, inv_dx, dt)
        else:
            for p in range(n):
                g2p_at(p, src, dst, x, v, C, grid_v, origin, inv_dx, dt)

    @ti.kernel
    def g2p(src: ti.i32, dst: ti.i32, n: ti.i32, x: steps_vec, v: steps_vec, C: steps_mat,
            grid_v: grid_vec, origin: vec3, inv_dx: real, dt: real, tiled: ti.template()):
        """tiled: the large-scene form (CUDA; see g2p_tiled_at)."""
        g2p_loop(src, dst, n, x, v, C, grid_v, origin, inv_dx, dt, tiled)

    # ---- hand-written adjoints of the transfers (Taichi's took 64 s and 25 s to compile) --------
    @ti.func
    def p2g_grad_at(p, src, x: ti.template(), v: ti.template(), density: ti.template(), volume: ti.template(),
                    A, g_mv: ti.template(), g_m: ti.template(), g_x: ti.template(), g_v: ti.template(), origin,
                    inv_dx):
        """One particle of p2g_grad, its affine A given: adds to g_x, g_v [src] and returns the
        affine's adjoint."""
        shape = ti.Vector([g_m.shape[0], g_m.shape[1], g_m.shape[2]])
        base, fx, W = stencil(x[src, p], origin, inv_dx, shape)
        dW = weight_slopes(fx)
        mass = density[p] * volume[p]
        momentum = mass * v[src, p]
        gx = ti.Vector.zero(real, 3)
        gv = ti.Vector.zero(real, 3)
        gA = ti.Matrix.zero(real, 3, 3)
        # a run-time loop over the 27 nodes (see for_axis): the unrolled one took 10 s of LLVM
        # code generation on every process start
        for i, j, k in ti.ndrange(3, 3, 3):
            offset = ti.Vector([i, j, k])
            dpos = (ti.cast(offset, real) - fx) / inv_dx
            weight = stencil_weight(W, offset)
            node = base + offset
            g = node_vec(g_mv, node)
            weight_grad = stencil_weight_grad(W, dW, offset, inv_dx)
            # d dpos / d x = -I; the weight moves with x
            gx += (g.dot(momentum + A @ dpos) + g_m[node] * mass) * weight_grad \
                - weight * (A.transpose() @ g)
            gv += (weight * mass) * g
            gA += weight * g.outer_product(dpos)
        g_x[src, p] += gx
        g_v[src, p] += gv
        return gA

    @ti.kernel
    def p2g_grad(src: ti.i32, n: ti.i32, x: steps_vec, v: steps_vec, density: per_particle,
                 volume: per_particle, affine: per_particle_mat, g_mv: grid_vec, g_m: grid_scalar,
                 g_x: steps_vec, g_v: steps_vec, g_affine: per_particle_mat, origin: vec3, inv_dx: real):
        """Adjoint of p2g: node adjoints (g_mv, g_m) gathered into g_x[src], g_v[src] (added) and
        g_affine (written: p2g is affine's only reader). Density and volume are constants of the
        rollout: no adjoint."""
        for p in range(n):
            g_affine[p] = p2g_grad_at(p, src, x, v, density, volume, affine[p], g_mv, g_m, g_x, g_v, origin, inv_dx)

    @ti.func
    def g2p_grad_at(p, src, dst, x: ti.template(), grid_v: ti.template(), g_x: ti.template(),
                    g_v: ti.template(), g_C: ti.template(), g_grid_v: ti.template(), origin, inv_dx, dt):
        """One particle of g2p_grad."""
        base, fx, W = stencil(x[src, p], origin, inv_dx, node_shape(grid_v))
        dW = weight_slopes(fx)
        g_new_v = g_v[dst, p] + dt * g_x[dst, p]
        gC = g_C[dst, p]
        gx = g_x[dst, p]
        for i, j, k in ti.ndrange(3, 3, 3):  # run-time loop: see p2g_grad
            offset = ti.Vector([i, j, k])
            dpos = ti.cast(offset, real) - fx  # in cells: d dpos / d x = -inv_dx I
            weight = stencil_weight(W, offset)
            node = base + offset
            g_v_node = node_vec(grid_v, node)
            weight_grad = stencil_weight_grad(W, dW, offset, inv_dx)
            gC_dpos = gC @ dpos
            add_node_vec(g_grid_v, node, weight * g_new_v + (4.0 * inv_dx * weight) * gC_dpos)
            gx += (g_new_v.dot(g_v_node) + 4.0 * inv_dx * g_v_node.dot(gC_dpos)) \
                * weight_grad - (4.0 * inv_dx * inv_dx * weight) * (gC.transpose() @ g_v_node)
        g_x[src, p] += gx

    @ti.kernel
    def g2p_grad(src: ti.i32, dst: ti.i32, n: ti.i32, x: steps_vec, grid_v: grid_vec, g_x: steps_vec,
                 g_v: steps_vec, g_C: steps_mat, g_grid_v: grid_vec, origin: vec3, inv_dx: real, dt: real):
        """Adjoint of g2p: the adjoints of x[dst], v[dst], C[dst] go to x[src] and (atomics) to the
        grid velocities g_grid_v."""
        for p in range(n):
            g2p_grad_at(p, src, dst, x, grid_v, g_x, g_v, g_C, g_grid_v, origin, inv_dx, dt)

    @ti.func
    def advance_adjoint_at(f, n, g_x: ti.template(), g_v: ti.template(), g_C: ti.template(), g_F: ti.template(),
                           g_plastic: ti.template()):
        """Index f in [0, 9n) of advance_adjoint: float f of each array's slot 0 moves to slot 1 and
        is zeroed (floats past an array's end: none). Float by float rather than particle by particle,
        so that consecutive threads store consecutive floats: with a particle a thread, a warp's store
        of one component touched up to 32 sectors for 128 bytes, and this step was the slowest of an
        elastic substep's reverse (1M particles, H200: 263 us, 88% of L2's peak, ncu, 2026-11-27)."""
        p, e = f // 9, f % 9
        g_C[1, p][e // 3, e % 3] = g_C[0, p][e // 3, e % 3]
        g_F[1, p][e // 3, e % 3] = g_F[0, p][e // 3, e % 3]
        g_C[0, p][e // 3, e % 3] = 0.0
        g_F[0, p][e // 3, e % 3] = 0.0
        if f < 3 * n:
            q, d = f // 3, f % 3
            g_x[1, q][d] = g_x[0, q][d]
            g_v[1, q][d] = g_v[0, q][d]
            g_x[0, q][d] = 0.0
            g_v[0, q][d] = 0.0
        if f < n:
            g_plastic[1, f] = g_plastic[0, f]
            g_plastic[0, f] = 0.0

    @ti.kernel
    def advance_adjoint(n: ti.i32, g_x: steps_vec, g_v: steps_vec, g_C: steps_mat, g_F: steps_mat,
                        g_plastic: steps_scalar):
        """A backward's step to the previous substep: the state adjoints of slot 0 (accumulated)
        become slot 1's (the next adjoint's input) and slot 0 is zeroed. One launch for the ten
        copies and fills."""
        for f in range(9 * n):
            advance_adjoint_at(f, n, g_x, g_v, g_C, g_F, g_plastic)
    # ---- whole substeps in one call: one launch context for the stages (each loop still its own
    # GPU launch), because at 100k particles the host time of separate calls was the substep's cost.
    # The bodies are ti.funcs whose parameters are all templates: a by-value parameter is a copy
    # made at the kernel's top level, which Taichi keeps in its global temporaries, where 1.7.4 can
    # put a float64 one at an offset of 4 mod 8 (CUDA_ERROR_MISALIGNED_ADDRESS on CUDA, fine on the
    # CPU; bench/global_temps.py finds them). A template parameter is the kernel's argument itself.
    @ti.func
    def substep_at(src: ti.template(), dst: ti.template(), n: ti.template(), x: ti.template(), v: ti.template(),
                   C: ti.template(), F: ti.template(), plastic: ti.template(), material: ti.template(),
                   E: ti.template(), nu: ti.template(), density: ti.template(), volume: ti.template(),
                   aux: ti.template(), dFc: ti.template(), control_scale: ti.template(), grid_mv: ti.template(),
                   grid_m: ti.template(), grid_v: ti.template(), origin: ti.template(), inv_dx: ti.template(),
                   dt: ti.template(), gravity: ti.template(), dx: ti.template(), wall_mode: ti.template(),
                   wall_friction: ti.template(), colliders: ti.template(), n_colliders: ti.template(),
                   time: ti.template(), keep_grid: ti.template(), tiled: ti.template(), nodes: ti.template()):
        """The loops of substep_forward (see there). nodes: a mass grid of grid_m's shape whose
        shape the grid loop takes (a grouped launch passes its first grid to every substep: Taichi
        computes a loop's range in a launch of its own wherever it is not computed yet)."""
        stress_p2g_loop(src, dst, n, x, v, C, F, plastic, material, E, nu, density, volume, aux, dFc,
                        control_scale, grid_mv, grid_m, origin, inv_dx, dt, tiled)
        for I in ti.grouped(nodes):
            grid_update_at(I, grid_mv, grid_m, grid_v, dt, gravity, origin, dx, wall_mode, wall_friction,
                           colliders, n_colliders, time, 1 - keep_grid)
        g2p_loop(src, dst, n, x, v, C, grid_v, origin, inv_dx, dt, tiled)

    @ti.kernel
    def substep_forward(src: ti.i32, dst: ti.i32, n: ti.i32, x: steps_vec, v: steps_vec, C: steps_mat,
                        F: steps_mat, plastic: steps_scalar, material: per_particle_int, E: per_particle,
                        nu: per_particle, density: per_particle, volume: per_particle, aux: table,
                        dFc: per_particle_mat, control_scale: real, grid_mv: grid_vec, grid_m: grid_scalar,
                        grid_v: grid_vec, origin: vec3, inv_dx: real, dt: real, gravity: vec3, dx: real,
                        wall_mode: ti.i32, wall_friction: real, colliders: table, n_colliders: ti.template(),
                        time: real, keep_grid: ti.i32, tiled: ti.template()):
        """One substep without the plastic return maps' SVD: stress and P2G in one pass (tiled:
        through shared memory, CUDA), grid_update, g2p. The grid's mv and m must be clear on entry;
        keep_grid 0: grid_update zeroes them once read, leaving the grid clear; 1: they are kept
        (with v) for the substep's adjoint, whose grid_update_grad zeroes them once read. Run-time
        flags rather than template ones: one compile serves the forward, the backward's recomputes
        and the solver."""
        substep_at(src, dst, n, x, v, C, F, plastic, material, E, nu, density, volume, aux, dFc, control_scale,
                   grid_mv, grid_m, grid_v, origin, inv_dx, dt, gravity, dx, wall_mode, wall_friction, colliders,
                   n_colliders, time, keep_grid, tiled, grid_m)

    @ti.kernel
    def substep_forward_quad(src: ti.i32, s1: ti.i32, s2: ti.i32, s3: ti.i32, dst: ti.i32, n: ti.i32,
                             x: steps_vec, v: steps_vec, C: steps_mat, F: steps_mat, plastic: steps_scalar,
                             material: per_particle_int, E: per_particle, nu: per_particle, density: per_particle,
                             volume: per_particle, aux: table, dFc: per_particle_mat, control_scale: real,
                             dFc1: per_particle_mat, control_scale1: real, dFc2: per_particle_mat,
                             control_scale2: real, dFc3: per_particle_mat, control_scale3: real,
                             grid_mv: grid_vec, grid_m: grid_scalar, grid_v: grid_vec, grid_mv1: grid_vec,
                             grid_m1: grid_scalar, grid_v1: grid_vec, grid_mv2: grid_vec, grid_m2: grid_scalar,
                             grid_v2: grid_vec, grid_mv3: grid_vec, grid_m3: grid_scalar, grid_v3: grid_vec,
                             origin: vec3, inv_dx: real, dt: real, gravity: vec3, dx: real, wall_mode: ti.i32,
                             wall_friction: real, colliders: table, n_colliders: ti.template(), time: real,
                             time1: real, time2: real, time3: real, keep_grid: ti.i32, tiled: ti.template()):
        """Four substep_forward calls in one launch, src -> s1 -> s2 -> s3 -> dst, the i-th with
        its own control (dFc<i>, control_scale<i>; no suffix for the first), grid (mv<i>, m<i>,
        v<i>) and clock time<i>: a launch cost the rollout ~0.2 ms of host time at 100k particles
        (H200), more than a substep's GPU work (see GROUPED_ARCHES). With keep_grid 0 the four
        grids may be one scratch grid."""
        substep_at(src, s1, n, x, v, C, F, plastic, material, E, nu, density, volume, aux, dFc, control_scale,
                   grid_mv, grid_m, grid_v, origin, inv_dx, dt, gravity, dx, wall_mode, wall_friction, colliders,
                   n_colliders, time, keep_grid, tiled, grid_m)
        substep_at(s1, s2, n, x, v, C, F, plastic, material, E, nu, density, volume, aux, dFc1, control_scale1,
                   grid_mv1, grid_m1, grid_v1, origin, inv_dx, dt, gravity, dx, wall_mode, wall_friction, colliders,
                   n_colliders, time1, keep_grid, tiled, grid_m)
        substep_at(s2, s3, n, x, v, C, F, plastic, material, E, nu, density, volume, aux, dFc2, control_scale2,
                   grid_mv2, grid_m2, grid_v2, origin, inv_dx, dt, gravity, dx, wall_mode, wall_friction, colliders,
                   n_colliders, time2, keep_grid, tiled, grid_m)
        substep_at(s3, dst, n, x, v, C, F, plastic, material, E, nu, density, volume, aux, dFc3, control_scale3,
                   grid_mv3, grid_m3, grid_v3, origin, inv_dx, dt, gravity, dx, wall_mode, wall_friction, colliders,
                   n_colliders, time3, keep_grid, tiled, grid_m)

    @ti.func
    def adjoint_at(n: ti.template(), x: ti.template(), v: ti.template(), C: ti.template(), F: ti.template(),
                   plastic: ti.template(), material: ti.template(), E: ti.template(), nu: ti.template(),
                   density: ti.template(), volume: ti.template(), aux: ti.template(), dFc: ti.template(),
                   control_scale: ti.template(), grid_mv: ti.template(),
                   grid_m: ti.template(), grid_v: ti.template(), g_mv: ti.template(), g_m: ti.template(),
                   g_grid_v: ti.template(), g_x: ti.template(), g_v: ti.template(), g_C: ti.template(),
                   g_F: ti.template(), g_plastic: ti.template(), g_E: ti.template(), g_nu: ti.template(),
                   g_dFc: ti.template(), origin: ti.template(), inv_dx: ti.template(),
                   dt: ti.template(), gravity: ti.template(), dx: ti.template(), wall_mode: ti.template(),
                   wall_friction: ti.template(), colliders: ti.template(), n_colliders: ti.template(),
                   time: ti.template()):
        """The loops of substep_adjoint (see there; parameters as substep_at's)."""
        for p in range(n):
            g2p_grad_at(p, 0, 1, x, grid_v, g_x, g_v, g_C, g_grid_v, origin, inv_dx, dt)
        # over g_m's shape (grid_m's): a pair's two substeps share g_m, so its range is computed once
        for I in ti.grouped(g_m):
            grid_update_grad_at(I, grid_mv, grid_m, g_grid_v, g_mv, g_m, dt, gravity, origin, dx, wall_mode,
                                wall_friction, colliders, n_colliders, time)
        # the particle's stress again, p2g's adjoint and the stress's in registers: the affine
        # matrix and its adjoint never go through memory
        for p in range(n):
            _, _, tau = updated_stress(p, 0, C, F, plastic, material, E, nu, aux, dFc, control_scale, dt)
            affine = affine_of(p, 0, tau, C, density, volume, inv_dx, dt)
            g_affine = p2g_grad_at(p, 0, x, v, density, volume, affine, g_mv, g_m, g_x, g_v, origin, inv_dx)
            particle_stress_grad_at(p, 0, 1, C, F, material, E, nu, density, volume, dFc, control_scale,
                                    g_affine, g_C, g_F, g_plastic, g_E, g_nu, g_dFc, inv_dx, dt)
        for f in range(9 * n):
            advance_adjoint_at(f, n, g_x, g_v, g_C, g_F, g_plastic)

    @ti.kernel
    def substep_adjoint(n: ti.i32, x: steps_vec, v: steps_vec, C: steps_mat, F: steps_mat, plastic: steps_scalar,
                        material: per_particle_int, E: per_particle, nu: per_particle, density: per_particle,
                        volume: per_particle, aux: table, dFc: per_particle_mat, control_scale: real,
                        grid_mv: grid_vec, grid_m: grid_scalar, grid_v: grid_vec,
                        g_mv: grid_vec, g_m: grid_scalar, g_grid_v: grid_vec, g_x: steps_vec, g_v: steps_vec,
                        g_C: steps_mat, g_F: steps_mat, g_plastic: steps_scalar, g_E: per_particle,
                        g_nu: per_particle, g_dFc: per_particle_mat, origin: vec3,
                        inv_dx: real, dt: real, gravity: vec3, dx: real, wall_mode: ti.i32, wall_friction: real,
                        colliders: table, n_colliders: ti.template(), time: real):
        """The reverse of the elastic substep from slot 0 to 1 of x .. plastic, on its grid (mv, m,
        v as its forward left them), then the adjoint step to the previous substep: g2p_grad,
        grid_update_grad, then one particle loop (the stress again for the affine matrix, which no
        forward keeps, p2g_grad and particle_stress_grad, the affine and its adjoint in registers),
        advance_adjoint. The state adjoints g_* [2, N, ...] hold the incoming ones in slot 1 and
        leave with them in slot 1."""
        adjoint_at(n, x, v, C, F, plastic, material, E, nu, density, volume, aux, dFc, control_scale,
                   grid_mv, grid_m, grid_v, g_mv, g_m, g_grid_v, g_x, g_v, g_C, g_F, g_plastic, g_E, g_nu, g_dFc,
                   origin, inv_dx, dt, gravity, dx, wall_mode, wall_friction, colliders, n_colliders, time)

    @ti.kernel
    def substep_adjoint_pair(n: ti.i32, x: steps_vec, v: steps_vec, C: steps_mat, F: steps_mat,
                             plastic: steps_scalar, x1: steps_vec, v1: steps_vec, C1: steps_mat, F1: steps_mat,
                             plastic1: steps_scalar, material: per_particle_int, E: per_particle, nu: per_particle,
                             density: per_particle, volume: per_particle, aux: table, dFc: per_particle_mat,
                             control_scale: real, dFc1: per_particle_mat, control_scale1: real,
                             grid_mv: grid_vec, grid_m: grid_scalar, grid_v: grid_vec,
                             grid_mv1: grid_vec, grid_m1: grid_scalar, grid_v1: grid_vec, g_mv: grid_vec,
                             g_m: grid_scalar, g_grid_v: grid_vec, g_x: steps_vec, g_v: steps_vec, g_C: steps_mat,
                             g_F: steps_mat, g_plastic: steps_scalar, g_E: per_particle, g_nu: per_particle,
                             g_dFc: per_particle_mat, g_dFc1: per_particle_mat, origin: vec3, inv_dx: real, dt: real, gravity: vec3, dx: real, wall_mode: ti.i32,
                             wall_friction: real, colliders: table, n_colliders: ti.template(), time: real,
                             time1: real):
        """substep_adjoint of two consecutive substeps in one launch, the later first: the one on
        the states x1 .. plastic1 (2 slots each; its control dFc1, scale1 with adjoint g_dFc1, its
        grid (mv1, m1, v1), clock time1), then the one on x .. plastic (dFc, scale, g_dFc, grid
        (mv, m, v), time). Both run on the same 2-slot state adjoints: the first one's advance
        leaves its result where the second reads its input. For a backward where no loss gradient
        lands on the state between the two."""
        adjoint_at(n, x1, v1, C1, F1, plastic1, material, E, nu, density, volume, aux, dFc1, control_scale1,
                   grid_mv1, grid_m1, grid_v1, g_mv, g_m, g_grid_v, g_x, g_v, g_C, g_F, g_plastic, g_E, g_nu,
                   g_dFc1, origin, inv_dx, dt, gravity, dx, wall_mode, wall_friction, colliders,
                   n_colliders, time1)
        adjoint_at(n, x, v, C, F, plastic, material, E, nu, density, volume, aux, dFc, control_scale,
                   grid_mv, grid_m, grid_v, g_mv, g_m, g_grid_v, g_x, g_v, g_C, g_F, g_plastic, g_E, g_nu, g_dFc,
                   origin, inv_dx, dt, gravity, dx, wall_mode, wall_friction, colliders, n_colliders, time)

    return SimpleNamespace(particle_stress=particle_stress, advance_adjoint=advance_adjoint,
                           particle_stress_grad=particle_stress_grad, p2g=p2g, stress_p2g=stress_p2g,
                           grid_update=grid_update, grid_update_grad=grid_update_grad, g2p=g2p, trial_svd=trial_svd,
                           particle_stress_svd=particle_stress_svd, plastic_stress_grad=plastic_stress_grad,
                           trial_svd_grad=trial_svd_grad,
                           p2g_grad=p2g_grad, g2p_grad=g2p_grad, substep_forward=substep_forward,
                           substep_forward_quad=substep_forward_quad,
                           substep_adjoint=substep_adjoint,
                           substep_adjoint_pair=substep_adjoint_pair)


# Taichi's control-flow-graph optimisation pass grows faster than linearly with a kernel's size: with
# it the three whole-substep kernels took 24 s to compile on a 2-core CPU (float64), without it 12 s,
# while LLVM still optimises each loop (store forwarding, dead stores). Render kernels keep it: some
# of them abort Taichi's code generation without it (taichi 1.7.4, measured 2026-11-27).
FAST_COMPILE = {"cfg_optimization": False}


@lru_cache(maxsize=None)
def substep_launchers(real, plastic_models: bool = True) -> SimpleNamespace:
    """substep_kernels behind TorchKernel launchers (~2 us of host time per tensor argument instead
    of ~20 us: an MPM substep passes ~40 over five launches, so this is the difference between a
    host-bound and a GPU-bound substep at 100k particles): every kernel under its own name, compiled
    with FAST_COMPILE and remembering their arguments (a rollout passes the same buffers to every substep)."""
    kernels = substep_kernels(real, plastic_models)
    launchers = {name: TorchKernel(kernel, compile_config=FAST_COMPILE, remember=True)
                 for name, kernel in vars(kernels).items()}
    return SimpleNamespace(**launchers)


# The large-scene kernels (shared-memory P2G, unrolled stencils) compile several times longer than
# the small-scene ones (float64 forward substep, H200: 9.9 s tiled against 1.1 s), so a new user's
# small first scene, launch-bound anyway, should not wait for them. At 1M particles they take 0.77
# ms a substep against 1.55 ms (2026-11-27). Since the rollout runs two substeps a launch, 100k
# particles are GPU-bound enough for them to pay: bench/e2e_step.py's step (100k particles, one
# Gaussian a particle, H200, 2026-11-28, two runs each interleaved) took 130 and 156 ms without
# them, 104 and 105 ms with them; the forward pairs' GPU time 45.2 -> 30.5 ms a step. 2^16 is a
# guess below that measurement (not measured between 2^16 and 100k).
TILED_P2G_MIN_PARTICLES = 1 << 16


def tiled_p2g(n_particles: int) -> bool:
    """Whether P2G goes through shared-memory tiles: on CUDA (where shared memory exists) for scenes
    of at least TILED_P2G_MIN_PARTICLES particles. TAICHI_MPM_TILED_P2G=0 turns it off, =1 on at
    any size (comparisons, tests)."""
    from taichi.lang import impl
    if impl.current_cfg().arch != ti.cuda:
        return False
    setting = os.environ.get("TAICHI_MPM_TILED_P2G", "")
    if setting in ("0", "1"):
        return setting == "1"
    return n_particles >= TILED_P2G_MIN_PARTICLES


# On CUDA a rollout runs its elastic substeps several a launch: four forward (substep_forward_quad),
# two adjoint (substep_adjoint_pair). At 100k particles a launch cost ~0.11 ms of Taichi's C++ launch
# path and 0.11-0.23 ms of argument setting on the H200 machine, more than a substep's GPU work: two
# a launch took an optimisation step of bench/e2e_step.py from 202 to 146 ms (2026-11-28, one call),
# four forward a launch its median from 103 to 95 ms (the same day, 20 interleaved steps each, one
# process). The price is compile time where the scene is large enough for the shared-memory kernels
# (tiled_p2g): that step's first run on an empty cache took 99 s against 35-55 s with two a launch
# (H200 machines, 2026-11-28); small scenes' untiled kernels compile several times faster. Not on the CPU:
# there a 40-substep rollout took as long either way, and the grouped kernels cost compile time on 2
# cores. Short rollouts (under GROUPED_MIN_SUBSTEPS) keep the single kernels: little to gain, a
# compile to pay.
GROUPED_ARCHES = ("cuda",)
GROUPED_MIN_SUBSTEPS = 16
FORWARD_GROUP = 4  # substeps of one substep_forward_quad launch


def grouped_substeps(n_substeps: int) -> bool:
    """Whether a rollout of n_substeps runs its elastic substeps several a launch (forward four,
    adjoint two): on GROUPED_ARCHES for n_substeps >= GROUPED_MIN_SUBSTEPS.
    TAICHI_MPM_GROUPED_SUBSTEPS=0 turns it off, =1 on at any arch and length (comparisons, tests)."""
    from taichi.lang import impl
    setting = os.environ.get("TAICHI_MPM_GROUPED_SUBSTEPS", "")
    if setting in ("0", "1"):
        return setting == "1"
    return impl.current_cfg().arch.name in GROUPED_ARCHES and n_substeps >= GROUPED_MIN_SUBSTEPS


@dataclass(frozen=True)
class GridSetup:
    """Everything grid_update and the transfers read besides arrays: node 0 at ``origin``
    (ti.Vector), spacing ``dx``, ``gravity`` (ti.Vector), walls, packed colliders (a [rows, width]
    array) and how many are in use."""

    origin: Any
    dx: float
    gravity: Any
    wall_mode: int
    wall_friction: float
    colliders: Any
    n_colliders: int

    @property
    def inv_dx(self) -> float:
        return 1.0 / self.dx

    def boundary(self, time: float) -> tuple:
        """(wall_mode, wall_friction, colliders, n_colliders, time): the arguments that end every
        grid-update kernel's list (grid_update, grid_update_grad, substep_forward, substep_adjoint;
        the grouped kernels add the later substeps' times after them)."""
        return self.wall_mode, self.wall_friction, self.colliders, self.n_colliders, time


def run_substep(k, src: int, dst: int, n: int, state: Mapping[str, Any], constants: Mapping[str, Any],
                grid: Tuple[Any, Any, Any], affine, control: Tuple[Any, float], setup: GridSetup,
                dt: float, time: float = 0.0, svd: Optional[Tuple[Any, Any, Any]] = None,
                move_particles: bool = True, svd_separation: float = 0.0, keep_grid: bool = True,
                tiled: bool = False) -> None:
    """The substep sequence, written once for the solver and the differentiable rollout:
    particle stress (with ``svd`` = (U, sig, V) buffers: trial_svd then
    particle_stress_svd, the differentiable form of the plastic models), p2g, grid_update, g2p.

    k: the kernels of :func:`substep_kernels` (or launchers with the same signatures); state:
    x, v, C, F, plastic [S, N, ...]; constants: material, E, nu, density, volume, aux [N, ...];
    grid: (grid_mv, grid_m, grid_v); control: (dFc, control_scale). ``move_particles=False`` stops
    after grid_update (a backward recomputing the grid of a substep); ``svd_separation``: see
    trial_svd (the backward's recompute passes constitutive.svd_separation, the forward 0).
    Without ``svd`` the whole substep is one kernel call (substep_forward), which writes no
    ``affine`` (substep_adjoint recomputes it in registers) and moves the particles even with
    ``move_particles=False``: the destination slot must be one the caller may overwrite.
    The grid's mv and m must be clear on entry. ``keep_grid=False`` is the forward-only form: it is
    left clear (grid_update zeroes mv and m once read); ``keep_grid=True`` keeps it for the
    substep's adjoint, whose grid_update_grad clears it. ``tiled``: the large-scene kernels
    (shared-memory P2G, unrolled stencils; :func:`tiled_p2g`).
    """
    grid_mv, grid_m, grid_v = grid
    dFc, scale = control
    x, v, C, F, plastic = state["x"], state["v"], state["C"], state["F"], state["plastic"]
    material, E, nu, aux = constants["material"], constants["E"], constants["nu"], constants["aux"]
    density, volume = constants["density"], constants["volume"]
    inv_dx = 1.0 / setup.dx
    if svd is None:
        k.substep_forward(src, dst, n, x, v, C, F, plastic, material, E, nu, density, volume, aux, dFc, scale,
                          grid_mv, grid_m, grid_v, setup.origin, inv_dx, dt, setup.gravity, setup.dx,
                          *setup.boundary(time), int(keep_grid), tiled)
        return
    U, sig, V = svd
    k.trial_svd(src, n, C, F, material, dFc, scale, U, sig, V, dt, svd_separation)
    k.particle_stress_svd(src, dst, n, C, F, plastic, material, E, nu, density, volume, aux, dFc, scale,
                          U, sig, V, affine, inv_dx, dt)
    k.p2g(src, n, x, v, density, volume, affine, grid_mv, grid_m, setup.origin, inv_dx, tiled)
    k.grid_update(grid_mv, grid_m, grid_v, dt, setup.gravity, setup.origin, setup.dx, *setup.boundary(time),
                  int(not keep_grid))
    if move_particles:
        k.g2p(src, dst, n, x, v, C, grid_v, setup.origin, inv_dx, dt, tiled)


def run_substep_quad(k, slots: Tuple[int, int, int, int, int], n: int, state: Mapping[str, Any],
                     constants: Mapping[str, Any], grids: Tuple[Tuple[Any, Any, Any], ...],
                     controls: Tuple[Tuple[Any, float], ...], setup: GridSetup, dt: float,
                     times: Tuple[float, ...], keep_grid: bool, tiled: bool = False) -> None:
    """Four elastic substeps through slots[0] -> ... -> slots[4] in one launch
    (substep_forward_quad): run_substep without ``svd`` four times, the i-th with ``grids[i]``,
    ``controls[i]`` and ``times[i]``. With ``keep_grid=False`` the grids may be one clear scratch grid."""
    x, v, C, F, plastic = state["x"], state["v"], state["C"], state["F"], state["plastic"]
    material, E, nu, aux = constants["material"], constants["E"], constants["nu"], constants["aux"]
    density, volume = constants["density"], constants["volume"]
    (dFc, scale), (dFc1, scale1), (dFc2, scale2), (dFc3, scale3) = controls
    k.substep_forward_quad(*slots, n, x, v, C, F, plastic, material, E, nu, density, volume, aux, dFc, scale, dFc1,
                           scale1, dFc2, scale2, dFc3, scale3, *grids[0], *grids[1], *grids[2], *grids[3],
                           setup.origin, 1.0 / setup.dx, dt, setup.gravity, setup.dx, *setup.boundary(times[0]),
                           times[1], times[2], times[3], int(keep_grid), tiled)
