"""Constitutive models as ti.funcs: Kirchhoff stress tau = P F^T per model, and plastic return maps.

``constitutive_funcs(real, plastic_models)`` builds them for one float type (cached) and returns
``update_and_stress(material_id, F, plastic, E, nu, aux) -> (F_new, plastic_new, tau)``, which the
P2G kernel calls once per particle: it projects the trial deformation gradient F onto the yield
surface of the particle's model (plastic models only), updates the plastic state and returns the
Kirchhoff stress of the projected F.

Gradients. The elastic models need no SVD: fixed-corotated takes its rotation from a scaled Newton
polar iteration (R <- (g R + R^-T / g) / 2, unrolled), whose derivative is finite when singular
values repeat (its error terms divide by s_i + s_j, never by s_i - s_j), so Taichi's autodiff through
it is exact up to the iteration's convergence. The plastic models (von Mises, snow, sand) go through
``ti.svd``, which Taichi 1.7 cannot differentiate (``kernel.grad`` fails to compile: "auto_diff.cpp
Not supported"); so they are compiled in only with ``plastic_models=True`` (the forward solver).
Kernels built with ``plastic_models=False`` differentiate (elastic models and fluid) and leave
particles of plastic materials unstressed: callers must not give them such particles.
"""

from functools import lru_cache

import taichi as ti

from .materials import (FIXED_COROTATED_ID, FLUID_ID, NEO_HOOKEAN_ID, SAND_ID, SNOW_ID,
                        SNOW_MAX_HARDENING, VON_MISES_ID)

POLAR_ITERATIONS = 8
MIN_SINGULAR_VALUE = 1e-4  # floors singular values and det(F) before logs / inverses


@lru_cache(maxsize=None)
def constitutive_funcs(real, plastic_models: bool = True):
    vec3 = ti.types.vector(3, real)
    mat3 = ti.types.matrix(3, 3, real)

    @ti.func
    def identity():
        return ti.Matrix.identity(real, 3)

    @ti.func
    def lame(E, nu):
        return E / (2.0 * (1.0 + nu)), E * nu / ((1.0 + nu) * (1.0 - 2.0 * nu))

    @ti.func
    def polar_rotation(F):
        """Orthogonal polar factor of F by determinant-scaled Newton iteration."""
        R = F
        for _ in ti.static(range(POLAR_ITERATIONS)):
            c0, c1, c2 = R[:, 0], R[:, 1], R[:, 2]
            cof0, cof1, cof2 = c1.cross(c2), c2.cross(c0), c0.cross(c1)
            det = c0.dot(cof0)
            # keep the sign, bound the magnitude away from 0 (degenerate F)
            det = ti.select(det >= 0, ti.max(det, 1e-12), ti.min(det, -1e-12))
            inv_t = mat3([[cof0[0], cof1[0], cof2[0]],
                          [cof0[1], cof1[1], cof2[1]],
                          [cof0[2], cof1[2], cof2[2]]]) / det
            g = ti.pow(ti.abs(det), -1.0 / 3.0)
            R = 0.5 * (g * R + inv_t / g)
        return R

    @ti.func
    def corotated_tau(F, R, J, mu, lam):
        return 2.0 * mu * (F - R) @ F.transpose() + identity() * (lam * (J - 1.0) * J)

    @ti.func
    def hencky_tau(U, log_sig, mu, lam):
        principal = 2.0 * mu * log_sig + lam * log_sig.sum()
        return U @ ti.Matrix([[principal[0], 0, 0], [0, principal[1], 0], [0, 0, principal[2]]], real) \
            @ U.transpose()

    @ti.func
    def diag(d):
        return ti.Matrix([[d[0], 0, 0], [0, d[1], 0], [0, 0, d[2]]], real)

    @ti.func
    def update_and_stress(material_id, F, plastic, E, nu, aux):
        mu, lam = lame(E, nu)
        J = F.determinant()
        J_safe = ti.max(J, MIN_SINGULAR_VALUE)
        # The elastic models and the fluid are all evaluated and blended by material id: branches
        # that assign locals make Taichi's reverse-mode compile take minutes (65 s against 3 s,
        # measured), the extra arithmetic is cheap next to P2G's atomics, and each term stays finite.
        is_corotated = ti.cast(material_id == FIXED_COROTATED_ID, real)
        is_neo_hookean = ti.cast(material_id == NEO_HOOKEAN_ID, real)
        is_fluid = ti.cast(material_id == FLUID_ID, real)
        tau = is_corotated * corotated_tau(F, polar_rotation(F), J, mu, lam) \
            + is_neo_hookean * (mu * (F @ F.transpose() - identity()) + identity() * (lam * ti.log(J_safe))) \
            + is_fluid * identity() * (E * (J_safe - 1.0) * J_safe)
        # the fluid keeps only its volume change: F reset to J^(1/3) I stops it from drifting
        F_new = F + is_fluid * (identity() * ti.pow(J_safe, 1.0 / 3.0) - F)
        plastic_new = plastic
        if ti.static(plastic_models):
            if material_id >= VON_MISES_ID and material_id <= SAND_ID:  # return maps on the SVD
                U, S, V = ti.svd(F, real)
                sig = vec3(S[0, 0], S[1, 1], S[2, 2])
                sig = ti.max(ti.abs(sig), MIN_SINGULAR_VALUE)
                if material_id == SNOW_ID:
                    clamped = ti.min(ti.max(sig, 1.0 - aux[1]), 1.0 + aux[2])
                    plastic_new = plastic * (sig[0] * sig[1] * sig[2]) / (clamped[0] * clamped[1] * clamped[2])
                    hardening = ti.min(ti.max(ti.exp(aux[0] * (1.0 - plastic_new)), 0.1), SNOW_MAX_HARDENING)
                    F_new = U @ diag(clamped) @ V.transpose()
                    tau = corotated_tau(F_new, U @ V.transpose(), clamped[0] * clamped[1] * clamped[2],
                                        mu * hardening, lam * hardening)
                else:
                    eps = ti.log(sig)
                    if material_id == VON_MISES_ID:
                        dev = eps - eps.sum() / 3.0
                        dev_norm = dev.norm(1e-20)
                        overshoot = dev_norm - aux[0] / (2.0 * mu)
                        if overshoot > 0:
                            eps -= overshoot / dev_norm * dev
                    else:  # SAND_ID: Drucker-Prager return map; plastic = volume gained in tension
                        trace = eps.sum() + plastic
                        dev = eps - trace / 3.0
                        dev_norm = dev.norm(1e-20)
                        if trace >= 0:  # tension: project to the cone's tip, remember the volume
                            plastic_new = trace
                            eps = ti.Vector.zero(real, 3)
                        else:
                            plastic_new = 0.0
                            overshoot = dev_norm + (3.0 * lam + 2.0 * mu) / (2.0 * mu) * trace * aux[0]
                            if overshoot > 0:
                                eps -= overshoot / dev_norm * dev
                    F_new = U @ diag(ti.exp(eps)) @ V.transpose()
                    tau = hencky_tau(U, eps, mu, lam)
        return F_new, plastic_new, tau

    return update_and_stress, polar_rotation
