"""The plain reference substep: textbook dense 3D MLS-MPM (the "88-line" structure) with Taichi
fields, one kernel per stage, fixed-corotated elasticity through ti.svd, sticky walls, gravity.

It is the peer that bench/mpm_forward.py times beside taichi_mpm, on the same particles.
"""

import numpy as np
import taichi as ti


@ti.data_oriented
class ReferenceMPM:
    """Fields are allocated in their own SNode tree, freed by :meth:`destroy`."""

    def __init__(self, positions: np.ndarray, res: int, E: float, nu: float, density: float,
                 volume: float, velocity=(0.0, 0.0, 0.0), gravity=(0.0, -9.8, 0.0)):
        n = len(positions)
        self.n, self.res = n, res
        self.dx, self.inv_dx = 1.0 / res, float(res)
        self.mu = E / (2 * (1 + nu))
        self.lam = E * nu / ((1 + nu) * (1 - 2 * nu))
        self.p_vol, self.p_mass = volume, volume * density
        self.gravity = ti.Vector(list(gravity))
        builder = ti.FieldsBuilder()
        self.x = ti.Vector.field(3, ti.f32)
        self.v = ti.Vector.field(3, ti.f32)
        self.C = ti.Matrix.field(3, 3, ti.f32)
        self.F = ti.Matrix.field(3, 3, ti.f32)
        self.grid_v = ti.Vector.field(3, ti.f32)
        self.grid_m = ti.field(ti.f32)
        builder.dense(ti.i, n).place(self.x, self.v, self.C, self.F)
        builder.dense(ti.ijk, (res + 1,) * 3).place(self.grid_v, self.grid_m)
        self._tree = builder.finalize()
        self.x.from_numpy(positions.astype(np.float32))
        self.v.from_numpy(np.tile(np.asarray(velocity, np.float32), (n, 1)))
        self.F.from_numpy(np.tile(np.eye(3, dtype=np.float32), (n, 1, 1)))

    def destroy(self):
        self._tree.destroy()

    @ti.kernel
    def clear_grid(self):
        for I in ti.grouped(self.grid_m):
            self.grid_v[I] = ti.Vector.zero(ti.f32, 3)
            self.grid_m[I] = 0.0

    @ti.kernel
    def p2g(self, dt: ti.f32):
        for p in self.x:
            Xp = self.x[p] * self.inv_dx
            base = ti.cast(Xp - 0.5, ti.i32)
            fx = Xp - base
            w = [0.5 * (1.5 - fx) ** 2, 0.75 - (fx - 1) ** 2, 0.5 * (fx - 0.5) ** 2]
            F = (ti.Matrix.identity(ti.f32, 3) + dt * self.C[p]) @ self.F[p]
            self.F[p] = F
            U, sig, V = ti.svd(F)
            J = sig[0, 0] * sig[1, 1] * sig[2, 2]
            stress = 2 * self.mu * (F - U @ V.transpose()) @ F.transpose() \
                + ti.Matrix.identity(ti.f32, 3) * self.lam * J * (J - 1)
            stress = (-dt * self.p_vol * 4 * self.inv_dx * self.inv_dx) * stress
            affine = stress + self.p_mass * self.C[p]
            for i, j, k in ti.static(ti.ndrange(3, 3, 3)):
                offset = ti.Vector([i, j, k])
                dpos = (offset - fx) * self.dx
                weight = w[i][0] * w[j][1] * w[k][2]
                self.grid_v[base + offset] += weight * (self.p_mass * self.v[p] + affine @ dpos)
                self.grid_m[base + offset] += weight * self.p_mass

    @ti.kernel
    def grid_op(self, dt: ti.f32):
        for I in ti.grouped(self.grid_m):
            if self.grid_m[I] > 0:
                v = self.grid_v[I] / self.grid_m[I] + dt * self.gravity
                for d in ti.static(range(3)):
                    if I[d] < 3 and v[d] < 0 or I[d] > self.res - 3 and v[d] > 0:
                        v[d] = 0
                self.grid_v[I] = v

    @ti.kernel
    def g2p(self, dt: ti.f32):
        for p in self.x:
            Xp = self.x[p] * self.inv_dx
            base = ti.cast(Xp - 0.5, ti.i32)
            fx = Xp - base
            w = [0.5 * (1.5 - fx) ** 2, 0.75 - (fx - 1.0) ** 2, 0.5 * (fx - 0.5) ** 2]
            new_v = ti.Vector.zero(ti.f32, 3)
            new_C = ti.Matrix.zero(ti.f32, 3, 3)
            for i, j, k in ti.static(ti.ndrange(3, 3, 3)):
                offset = ti.Vector([i, j, k])
                dpos = offset - fx
                g_v = self.grid_v[base + offset]
                weight = w[i][0] * w[j][1] * w[k][2]
                new_v += weight * g_v
                new_C += 4 * self.inv_dx * weight * g_v.outer_product(dpos)
            self.v[p], self.C[p] = new_v, new_C
            self.x[p] += dt * new_v

    def substep(self, dt: float):
        self.clear_grid()
        self.p2g(dt)
        self.grid_op(dt)
        self.g2p(dt)
