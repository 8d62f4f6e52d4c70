"""Constitutive models as ti.funcs: Kirchhoff stress tau = P F^T per model, and plastic return maps.

``constitutive_funcs(real, plastic_models)`` builds them for one float type (cached) and returns
a namespace of ti.funcs:

    update_and_stress(material_id, F, plastic, E, nu, aux) -> (F_new, plastic_new, tau)
        the forward solver's per-particle model: elastic models and fluid blended by id; with
        ``plastic_models=True`` the plastic ones on ``ti.svd`` (forward only).
    elastic_update_grad(material_id, F, E, nu, g_tau, g_F_new) -> (g_F, g_E, g_nu)
        the adjoint of the elastic models and the fluid (what update_and_stress computes with
        ``plastic_models=False``), written by hand: the rotation's adjoint in closed form (below).
    plastic_update(material_id, F, U, sig, V, plastic, E, nu, aux) -> (F_new, plastic_new, tau)
        every model, with the plastic ones taking the SVD F = U diag(sig) V^T as inputs. The
        differentiable rollout computes the SVD in a kernel of its own (forward) and back-propagates
        through it with :func:`svd_grad_funcs` (hand-written); Taichi's autodiff differentiates the
        rest. The return maps are branch-free (ti.select / max), which keeps the reverse-mode compile
        short and makes the yield surface's kink a subgradient (max(overshoot, 0)).

Gradients. The elastic models need no SVD: fixed-corotated takes its rotation from a scaled Newton
polar iteration (R <- (g R + R^-T / g) / 2, unrolled). Its adjoint is the polar factor's, in closed
form: with F = R S, dR = R [w]x where (tr(S) I - S) w = axial(R^T dF - dF^T R), so a rotation
adjoint G_R sends G_F = R [y]x with y = (tr(S) I - S)^-1 axial(R^T G_R - G_R^T R). It divides by
sums s_i + s_j of singular values, never by differences, so it stays finite when they repeat.
Written by hand because Taichi's reverse of the unrolled iteration ran 19x slower than the forward
stress on an H200 (405 us against 21 us a call at 100k particles) and took most of the cold
first-gradient compile. Taichi 1.7 cannot differentiate ``ti.svd``
(``kernel.grad`` fails to compile: "auto_diff.cpp Not supported"), hence the split above. The
parameters of the plastic models (``aux``: yield stress, Drucker-Prager alpha, snow hardening and
critical compression / stretch) are differentiable through ``plastic_update``.
"""

from functools import lru_cache
from types import SimpleNamespace

import taichi as ti

from .materials import (FIXED_COROTATED_ID, FLUID_ID, NEO_HOOKEAN_ID, SAND_ID, SNOW_ID,
                        SNOW_MAX_HARDENING, VON_MISES_ID)

POLAR_ITERATIONS = 8
MIN_SINGULAR_VALUE = 1e-4  # floors singular values and det(F) before logs / inverses
# Equal singular values. The SVD adjoint's off-diagonal terms are divided differences such as
# (f(s_j) - f(s_i)) / (s_j - s_i) of the model's response f: 0 / 0 where two singular values meet
# (F = I at rest, or any symmetric deformation), with a nonzero limit f'(s) that no clamp of the
# denominator recovers. So where two singular values are closer than SVD_SEPARATION (relative),
# the backward evaluates the stress stage's adjoint at singular values spread by the relative
# amounts (-1, 0, +3) * SVD_SEPARATION (the forward is never changed): the divided differences then
# come out of the model itself with relative accuracy eps / separation. The price is a bias of
# ~separation / (elastic strain) in those particles' gradient terms only (measured: spreading
# every particle by 1e-6 moved a yield-stress gradient by 9e-4, by 1e-8 6e-6, by 1e-10 2e-6 = the
# FD noise), so particles without a tie are left exact. float64 1e-8 (rounding ~2e-8), float32
# 1e-3 (float32 gradients at ties are good to ~0.1-1 %).
SVD_SEPARATION = {"f64": 1e-8, "f32": 1e-3}
# Guard of the adjoint's 1 / (s_j^2 - s_i^2) (degenerate F, an accidental cancellation of the
# spread): the gap is clamped to +-SVD_GAP * separation * max(s^2), sign kept.
SVD_GAP = 0.1
# Snow's hardening factor exp(xi (1 - Jp)) is clamped to [SNOW_MIN_HARDENING, SNOW_MAX_HARDENING];
# its exponent is clamped before exp so that neither exp nor its derivative overflows.
SNOW_MIN_HARDENING = 0.1
# return_maps' model flags: (von Mises, snow, sand)
ALL_PLASTIC_MODELS = (True, True, True)


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
    def polar_step(R):
        """One determinant-scaled Newton step R <- (g R + R^-T / g) / 2 towards the polar factor."""
        c0, c1, c2 = R[:, 0], R[:, 1], R[:, 2]
        cof0, cof1, cof2 = c1.cross(c2), c2.cross(c0), c0.cross(c1)
        det = c0.dot(cof0)
        # keep the sign, bound the magnitude away from 0 (degenerate F)
        det = ti.select(det >= 0, ti.max(det, 1e-12), ti.min(det, -1e-12))
        inv_t = mat3([[cof0[0], cof1[0], cof2[0]],
                      [cof0[1], cof1[1], cof2[1]],
                      [cof0[2], cof1[2], cof2[2]]]) / det
        g = ti.pow(ti.abs(det), -1.0 / 3.0)
        return 0.5 * (g * R + inv_t / g)

    @ti.func
    def polar_rotation(F, unrolled: ti.template()):
        """Orthogonal polar factor of F by determinant-scaled Newton iteration. unrolled: the
        iterations as straight-line code, for the kernels Taichi's reverse mode differentiates;
        otherwise a run-time loop, which compiles in a fraction of the time (the hand-written
        adjoints never differentiate the iteration)."""
        R = F
        if ti.static(unrolled):
            for _ in ti.static(range(POLAR_ITERATIONS)):
                R = polar_step(R)
        else:
            for _ in range(POLAR_ITERATIONS):
                R = polar_step(R)
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
    def elastic_update(material_id, F, E, nu, unrolled: ti.template()):
        """Elastic models and the fluid, blended by id (zero stress for plastic ids); unrolled: see
        polar_rotation."""
        mu, lam = lame(E, nu)
        J = F.determinant()
        J_safe = ti.max(J, MIN_SINGULAR_VALUE)
        # The elastic models and the fluid are all evaluated and blended by material id: branches
        # that assign locals make Taichi's reverse-mode compile take minutes (65 s against 3 s,
        # measured), the extra arithmetic is cheap next to P2G's atomics, and each term stays finite.
        is_corotated = ti.cast(material_id == FIXED_COROTATED_ID, real)
        is_neo_hookean = ti.cast(material_id == NEO_HOOKEAN_ID, real)
        is_fluid = ti.cast(material_id == FLUID_ID, real)
        tau = is_corotated * corotated_tau(F, polar_rotation(F, unrolled), J, mu, lam) \
            + is_neo_hookean * (mu * (F @ F.transpose() - identity()) + identity() * (lam * ti.log(J_safe))) \
            + is_fluid * identity() * (E * (J_safe - 1.0) * J_safe)
        # the fluid keeps only its volume change: F reset to J^(1/3) I stops it from drifting
        F_new = F + is_fluid * (identity() * ti.pow(J_safe, 1.0 / 3.0) - F)
        return F_new, tau

    @ti.func
    def return_maps(material_id, U, sig, V, plastic, E, nu, aux, models: ti.template()):
        """von Mises, snow and sand on the SVD, branch-free, blended by id. Returns (weight, F_new,
        plastic_new, tau) with weight 1 for a plastic id (0 otherwise: the rest is then unused).
        models: which of (von Mises, snow, sand) to build (compile-time flags); a particle of a
        model left out gets weight 0. Taichi's reverse-mode compile of all three took 40 s on the
        2-core CPU (float64), of von Mises alone 15 s, so the rollout's backward builds the ones
        its scene holds (2026-11-27)."""
        mu, lam = lame(E, nu)
        sig = ti.max(ti.abs(sig), MIN_SINGULAR_VALUE)
        zero = ti.cast(0.0, real)
        weight, plastic_new = zero, zero
        F_new, tau = ti.Matrix.zero(real, 3, 3), ti.Matrix.zero(real, 3, 3)
        if ti.static(models[1]):
            # snow (Stomakhin 2013): clamp the singular values, harden with the volume lost plastically
            is_snow = ti.cast(material_id == SNOW_ID, real)
            clamped = ti.min(ti.max(sig, 1.0 - aux[1]), 1.0 + aux[2])
            J_elastic = clamped[0] * clamped[1] * clamped[2]
            Jp_snow = plastic * (sig[0] * sig[1] * sig[2]) / J_elastic
            exponent = ti.min(ti.max(aux[0] * (1.0 - Jp_snow), ti.log(SNOW_MIN_HARDENING)),
                              ti.log(SNOW_MAX_HARDENING))
            hardening = ti.exp(exponent)
            F_snow = U @ diag(clamped) @ V.transpose()
            weight += is_snow
            F_new += is_snow * F_snow
            plastic_new += is_snow * Jp_snow
            tau += is_snow * corotated_tau(F_snow, U @ V.transpose(), J_elastic, mu * hardening, lam * hardening)
        if ti.static(models[0] or models[2]):
            eps = ti.log(sig)
            eps_hencky = ti.Vector.zero(real, 3)
            is_hencky = zero
            if ti.static(models[0]):
                # von Mises on the Hencky strain: radial return of the deviator onto |dev| = yield / (2 mu)
                is_von_mises = ti.cast(material_id == VON_MISES_ID, real)
                dev = eps - eps.sum() / 3.0
                dev_norm = dev.norm(1e-20)
                eps_hencky += is_von_mises * (eps - ti.max(dev_norm - aux[0] / (2.0 * mu), 0.0) / dev_norm * dev)
                plastic_new += is_von_mises * plastic
                is_hencky += is_von_mises
            if ti.static(models[2]):
                # Drucker-Prager sand (Klar 2016), plastic = volume gained in tension (Tampubolon 2017):
                # in tension project to the cone's tip and remember the volume, else return onto the cone
                is_sand = ti.cast(material_id == SAND_ID, real)
                trace = eps.sum() + plastic
                sand_dev = eps - trace / 3.0
                sand_dev_norm = sand_dev.norm(1e-20)
                overshoot = ti.max(sand_dev_norm + (3.0 * lam + 2.0 * mu) / (2.0 * mu) * trace * aux[0], 0.0)
                in_tension = ti.cast(trace >= 0.0, real)
                eps_hencky += is_sand * (1.0 - in_tension) * (eps - overshoot / sand_dev_norm * sand_dev)
                plastic_new += is_sand * in_tension * trace
                is_hencky += is_sand
            weight += is_hencky
            F_new += is_hencky * (U @ diag(ti.exp(eps_hencky)) @ V.transpose())
            tau += is_hencky * hencky_tau(U, eps_hencky, mu, lam)
        return weight, F_new, plastic_new, tau

    @ti.func
    def update_and_stress(material_id, F, plastic, E, nu, aux):
        F_new, tau = elastic_update(material_id, F, E, nu, False)
        plastic_new = plastic
        if ti.static(plastic_models):
            if material_id >= VON_MISES_ID and material_id <= SAND_ID:  # return maps on the SVD
                U, S, V = ti.svd(F, real)
                _, F_new, plastic_new, tau = return_maps(material_id, U, vec3(S[0, 0], S[1, 1], S[2, 2]), V,
                                                         plastic, E, nu, aux, ALL_PLASTIC_MODELS)
        return F_new, plastic_new, tau

    @ti.func
    def plastic_update(material_id, F, U, sig, V, plastic, E, nu, aux):
        F_elastic, tau_elastic = elastic_update(material_id, F, E, nu, True)  # Taichi differentiates it
        weight, F_plastic, plastic_new, tau_plastic = return_maps(material_id, U, sig, V, plastic, E, nu, aux,
                                                                  ALL_PLASTIC_MODELS)
        return (F_elastic + F_plastic - weight * F_elastic, plastic_new + (1.0 - weight) * plastic,
                tau_elastic + tau_plastic)

    @ti.func
    def skew(y):
        """[y]x: the matrix of v -> y x v."""
        return ti.Matrix([[0.0, -y[2], y[1]], [y[2], 0.0, -y[0]], [-y[1], y[0], 0.0]], real)

    @ti.func
    def axial(M):
        """y with [y]x = M - M^T (twice the axial vector of M's skew part)."""
        return ti.Vector([M[2, 1] - M[1, 2], M[0, 2] - M[2, 0], M[1, 0] - M[0, 1]], real)

    @ti.func
    def polar_rotation_grad(F, R, g_R):
        """Adjoint of R = polar_rotation(F): g_R -> g_F (closed form, see the module docstring)."""
        S = R.transpose() @ F
        S = 0.5 * (S + S.transpose())
        A = identity() * S.trace() - S  # eigenvalues s_i + s_j > 0 for a non-degenerate F
        det = ti.max(A.determinant(), 1e-30)
        A_inv = ti.Matrix([[A[1, 1] * A[2, 2] - A[1, 2] * A[2, 1], A[0, 2] * A[2, 1] - A[0, 1] * A[2, 2],
                            A[0, 1] * A[1, 2] - A[0, 2] * A[1, 1]],
                           [A[1, 2] * A[2, 0] - A[1, 0] * A[2, 2], A[0, 0] * A[2, 2] - A[0, 2] * A[2, 0],
                            A[0, 2] * A[1, 0] - A[0, 0] * A[1, 2]],
                           [A[1, 0] * A[2, 1] - A[1, 1] * A[2, 0], A[0, 1] * A[2, 0] - A[0, 0] * A[2, 1],
                            A[0, 0] * A[1, 1] - A[0, 1] * A[1, 0]]], real) / det
        return R @ skew(A_inv @ axial(R.transpose() @ g_R))

    @ti.func
    def cofactor(F):
        """d det(F) / dF."""
        c0, c1, c2 = F[:, 0], F[:, 1], F[:, 2]
        cof0, cof1, cof2 = c1.cross(c2), c2.cross(c0), c0.cross(c1)
        return ti.Matrix([[cof0[0], cof1[0], cof2[0]], [cof0[1], cof1[1], cof2[1]], [cof0[2], cof1[2], cof2[2]]],
                         real)

    @ti.func
    def elastic_update_grad(material_id, F, E, nu, g_tau, g_F_new):
        """Adjoint of elastic_update: the adjoints of tau and F_new -> those of F, E and nu."""
        mu, lam = lame(E, nu)
        J = F.determinant()
        J_safe = ti.max(J, MIN_SINGULAR_VALUE)
        tr_g = g_tau.trace()
        g_F = g_F_new
        zero = ti.cast(0.0, real)  # typed: a bare 0.0 would be the runtime's default float
        g_mu, g_lam, g_J, g_J_safe, g_E = zero, zero, zero, zero, zero
        if material_id == FIXED_COROTATED_ID:  # tau = 2 mu (F - R) F^T + lam (J - 1) J I
            R = polar_rotation(F, False)
            D = F - R
            g_D = 2.0 * mu * g_tau @ F
            g_F += g_D + 2.0 * mu * g_tau.transpose() @ D + polar_rotation_grad(F, R, -g_D)
            g_mu = 2.0 * (g_tau * (D @ F.transpose())).sum()
            g_lam = tr_g * (J - 1.0) * J
            g_J = lam * (2.0 * J - 1.0) * tr_g
        elif material_id == NEO_HOOKEAN_ID:  # tau = mu (F F^T - I) + lam log(J) I
            g_F += mu * (g_tau + g_tau.transpose()) @ F
            g_mu = (g_tau * (F @ F.transpose() - identity())).sum()
            g_lam = tr_g * ti.log(J_safe)
            g_J_safe = lam * tr_g / J_safe
        elif material_id == FLUID_ID:  # tau = E (J - 1) J I; F_new = J^(1/3) I
            g_F = ti.Matrix.zero(real, 3, 3)
            g_E = tr_g * (J_safe - 1.0) * J_safe
            g_J_safe = E * (2.0 * J_safe - 1.0) * tr_g + g_F_new.trace() / 3.0 * ti.pow(J_safe, -2.0 / 3.0)
        g_J += ti.select(J > MIN_SINGULAR_VALUE, g_J_safe, 0.0)
        g_F += g_J * cofactor(F)
        # mu = E / (2 (1 + nu)), lam = E nu / ((1 + nu)(1 - 2 nu))
        denominator = (1.0 + nu) * (1.0 - 2.0 * nu)
        g_E += g_mu / (2.0 * (1.0 + nu)) + g_lam * nu / denominator
        g_nu = -g_mu * E / (2.0 * (1.0 + nu) ** 2) + g_lam * E * (1.0 + 2.0 * nu * nu) / denominator ** 2
        return g_F, g_E, g_nu

    return SimpleNamespace(update_and_stress=update_and_stress, plastic_update=plastic_update,
                           return_maps=return_maps, polar_rotation=polar_rotation,
                           elastic_update_grad=elastic_update_grad)


def svd_separation(real) -> float:
    return SVD_SEPARATION["f64" if real == ti.f64 else "f32"]


@lru_cache(maxsize=None)
def svd_grad_funcs(real):
    """``svd_grad(U, sig, V, gU, gsig, gV) -> gF``: the adjoint of F = U diag(sig) V^T (Townsend,
    "Differentiating the singular value decomposition", square case):

        gF = U [diag(gsig) + (K o (U^T gU - gU^T U)) S + S (K o (V^T gV - gV^T V))] V^T,
        K_ij = 1 / (s_j^2 - s_i^2) (i != j), 0 on the diagonal,

    the gap s_j^2 - s_i^2 clamped to +-SVD_GAP * separation * max(s^2) (sign kept, + where it is
    0); the singular values passed in are the spread ones (see SVD_SEPARATION). Written by hand
    because Taichi 1.7 cannot differentiate ti.svd."""
    relative_floor = SVD_GAP * svd_separation(real)

    @ti.func
    def svd_grad(U, sig, V, gU, gsig, gV):
        s2 = sig * sig
        floor = relative_floor * ti.max(ti.max(s2[0], s2[1]), ti.max(s2[2], 1e-30))
        UtgU = U.transpose() @ gU
        VtgV = V.transpose() @ gV
        inner = ti.Matrix.zero(real, 3, 3)
        for i, j in ti.static(ti.ndrange(3, 3)):
            if ti.static(i == j):
                inner[i, i] = gsig[i]
            else:
                gap = s2[j] - s2[i]
                gap = ti.select(gap >= 0.0, ti.max(gap, floor), ti.min(gap, -floor))
                a = (UtgU[i, j] - UtgU[j, i]) / gap
                b = (VtgV[i, j] - VtgV[j, i]) / gap
                inner[i, j] = a * sig[j] + sig[i] * b
        return U @ inner @ V.transpose()

    return svd_grad
