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
        through it with :func:`svd_grad_funcs` (hand-written). The return maps are branch-free
        (ti.select / max), blended by id; the yield surface's kink takes the subgradient of
        max(overshoot, 0) that is zero on the surface.
    plastic_grad(material_id, U, sig, V, plastic, E, nu, aux, g_F_new, g_tau, g_plastic_new, models)
        -> (g_U, g_sig, g_V, g_plastic, g_E, g_nu, g_aux): the adjoint of a plastic particle's
        return map, written by hand (von Mises and sand through the Hencky output's adjoint,
        snow through its clamped singular values).

Gradients. The elastic models need no SVD: fixed-corotated takes its rotation from a scaled Newton
polar iteration (R <- (g R + R^-T / g) / 2). Its adjoint is the polar factor's, in closed
form: with F = R S, dR = R [w]x where (tr(S) I - S) w = axial(R^T dF - dF^T R), so a rotation
adjoint G_R sends G_F = R [y]x with y = (tr(S) I - S)^-1 axial(R^T G_R - G_R^T R). It divides by
sums s_i + s_j of singular values, never by differences, so it stays finite when they repeat.
Written by hand because Taichi's reverse of the unrolled iteration ran 19x slower than the forward
stress on an H200 (405 us against 21 us a call at 100k particles) and took most of the cold
first-gradient compile. Taichi 1.7 cannot differentiate ``ti.svd``
(``kernel.grad`` fails to compile: "auto_diff.cpp Not supported"), hence the SVD's own adjoint.
The return maps' adjoints are written by hand too, in principal space, because Taichi's reverse of
them compiled for 40 s on the 2-core CPU (float64; ~15 s for one model) and their PTX for 21 s
more on the first CUDA launch (2026-11-27). They carry the plastic models' parameters (``aux``:
yield stress, Drucker-Prager alpha, snow hardening and critical compression / stretch).
"""

from functools import lru_cache
from types import SimpleNamespace

import taichi as ti

from .materials import (FIXED_COROTATED_ID, FLUID_ID, NEO_HOOKEAN_ID, SAND_ID, SNOW_ID,
                        SNOW_MAX_HARDENING, VON_MISES_ID)

POLAR_ITERATIONS = 8  # at most
# polar_rotation stops when a Newton step moves no entry of R by more than this (the error left is
# about its square: below float32's and float64's rounding)
POLAR_TOLERANCE = {"f64": 1e-8, "f32": 1e-4}
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


@lru_cache(maxsize=None)
def constitutive_funcs(real, plastic_models: bool = True):
    vec3 = ti.types.vector(3, real)
    mat3 = ti.types.matrix(3, 3, real)
    tolerance = POLAR_TOLERANCE["f64" if real == ti.f64 else "f32"]

    @ti.func
    def identity():
        return ti.Matrix.identity(real, 3)

    @ti.func
    def lame(E, nu):
        return E / (2.0 * (1.0 + nu)), E * nu / ((1.0 + nu) * (1.0 - 2.0 * nu))

    @ti.func
    def lame_grad(E, nu, g_mu, g_lam):
        """Adjoint of lame: mu = E / (2 (1 + nu)), lam = E nu / ((1 + nu)(1 - 2 nu)) -> (g_E, g_nu)."""
        denominator = (1.0 + nu) * (1.0 - 2.0 * nu)
        return (g_mu / (2.0 * (1.0 + nu)) + g_lam * nu / denominator,
                -g_mu * E / (2.0 * (1.0 + nu) ** 2) + g_lam * E * (1.0 + 2.0 * nu * nu) / denominator ** 2)

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
    def polar_rotation(F):
        """Orthogonal polar factor of F by determinant-scaled Newton iteration: a run-time loop,
        which compiles in a fraction of the time straight-line code takes (no kernel
        differentiates the iteration: its adjoint is polar_rotation_grad). It stops once a step
        moves no entry by more than POLAR_TOLERANCE: Newton's error after that step is about the
        square of the move, below the float's rounding, where the mild deformations of most
        particles converge in 2-3 steps of the 8 it ran before."""
        R = F
        for _ in range(POLAR_ITERATIONS):
            step = polar_step(R)
            moved = ti.abs(step - R).max()
            R = step
            if moved <= tolerance:
                break
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
    def elastic_update(material_id, F, E, nu):
        """Elastic models and the fluid, blended by id (zero stress for plastic ids)."""
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
        return F_new, tau

    @ti.func
    def snow_return(s, plastic, aux):
        """Snow (Stomakhin 2013) on the floored singular values s: singular values clamped to the
        critical compression / stretch, hardened with the volume lost plastically. Returns
        (clamped, J = prod(clamped), S = prod(s), Jp, exponent before its clamp, hardening)."""
        clamped = ti.min(ti.max(s, 1.0 - aux[1]), 1.0 + aux[2])
        J = clamped[0] * clamped[1] * clamped[2]
        S = s[0] * s[1] * s[2]
        Jp = plastic * S / J
        exponent = aux[0] * (1.0 - Jp)
        hardening = ti.exp(ti.min(ti.max(exponent, ti.log(SNOW_MIN_HARDENING)), ti.log(SNOW_MAX_HARDENING)))
        return clamped, J, S, Jp, exponent, hardening

    @ti.func
    def von_mises_return(eps, mu, yield_stress):
        """von Mises on the Hencky strain eps: radial return of the deviator onto |dev| =
        yield / (2 mu). Returns (dev, |dev|, overshoot, k); the returned strain is eps - k dev,
        k = max(overshoot, 0) / |dev|."""
        dev = eps - eps.sum() / 3.0
        dev_norm = dev.norm(1e-20)
        overshoot = dev_norm - yield_stress / (2.0 * mu)
        return dev, dev_norm, overshoot, ti.max(overshoot, 0.0) / dev_norm

    @ti.func
    def sand_return(eps, plastic, mu, lam, alpha):
        """Drucker-Prager sand (Klar 2016), plastic = volume gained in tension (Tampubolon 2017): in
        tension (trace >= 0) the strain goes to the cone's tip (zero) and the volume is remembered,
        else it returns onto the cone, to eps - k dev. Returns (trace, dev, |dev|, c, overshoot, k),
        overshoot = |dev| + c trace alpha, c = (3 lam + 2 mu) / (2 mu), k = max(overshoot, 0) / |dev|."""
        trace = eps.sum() + plastic
        dev = eps - trace / 3.0
        dev_norm = dev.norm(1e-20)
        c = (3.0 * lam + 2.0 * mu) / (2.0 * mu)
        overshoot = dev_norm + c * trace * alpha
        return trace, dev, dev_norm, c, overshoot, ti.max(overshoot, 0.0) / dev_norm

    @ti.func
    def return_maps(material_id, U, sig, V, plastic, E, nu, aux):
        """von Mises, snow and sand on the SVD, branch-free, blended by id. Returns (weight, F_new,
        plastic_new, tau) with weight 1 for a plastic id (0 otherwise: the rest is then unused)."""
        mu, lam = lame(E, nu)
        is_von_mises = ti.cast(material_id == VON_MISES_ID, real)
        is_snow = ti.cast(material_id == SNOW_ID, real)
        is_sand = ti.cast(material_id == SAND_ID, real)
        sig = ti.max(ti.abs(sig), MIN_SINGULAR_VALUE)
        clamped, J_elastic, _, Jp_snow, _, hardening = snow_return(sig, plastic, aux)
        F_snow = U @ diag(clamped) @ V.transpose()
        tau_snow = corotated_tau(F_snow, U @ V.transpose(), J_elastic, mu * hardening, lam * hardening)
        eps = ti.log(sig)
        dev, _, _, k = von_mises_return(eps, mu, aux[0])
        eps_von_mises = eps - k * dev
        trace, sand_dev, _, _, _, sand_k = sand_return(eps, plastic, mu, lam, aux[0])
        in_tension = ti.cast(trace >= 0.0, real)
        eps_sand = (1.0 - in_tension) * (eps - sand_k * sand_dev)
        plastic_sand = in_tension * trace
        eps_hencky = is_von_mises * eps_von_mises + is_sand * eps_sand
        F_hencky = U @ diag(ti.exp(eps_hencky)) @ V.transpose()
        tau_hencky = hencky_tau(U, eps_hencky, mu, lam)
        is_hencky = is_von_mises + is_sand
        weight = is_hencky + is_snow
        F_new = is_snow * F_snow + is_hencky * F_hencky
        plastic_new = is_snow * Jp_snow + is_sand * plastic_sand + is_von_mises * plastic
        tau = is_snow * tau_snow + is_hencky * tau_hencky
        return weight, F_new, plastic_new, tau

    @ti.func
    def update_and_stress(material_id, F, plastic, E, nu, aux):
        F_new, tau = elastic_update(material_id, F, E, nu)
        plastic_new = plastic
        if ti.static(plastic_models):
            if material_id >= VON_MISES_ID and material_id <= SAND_ID:  # return maps on the SVD
                U, S, V = ti.svd(F, real)
                _, F_new, plastic_new, tau = return_maps(material_id, U, vec3(S[0, 0], S[1, 1], S[2, 2]), V,
                                                         plastic, E, nu, aux)
        return F_new, plastic_new, tau

    @ti.func
    def plastic_update(material_id, F, U, sig, V, plastic, E, nu, aux):
        F_elastic, tau_elastic = elastic_update(material_id, F, E, nu)
        weight, F_plastic, plastic_new, tau_plastic = return_maps(material_id, U, sig, V, plastic, E, nu, aux)
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
            R = polar_rotation(F)
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
        g_E_lame, g_nu = lame_grad(E, nu, g_mu, g_lam)
        return g_F, g_E + g_E_lame, g_nu

    @ti.func
    def hencky_grad(U, V, e, mu, lam, g_F_new, g_tau):
        """Adjoint of F_new = U diag(exp(e)) V^T, tau = U diag(2 mu e + lam tr(e)) U^T (the Hencky
        models' output) -> (g_U, g_V, g_e, g_mu, g_lam)."""
        d = ti.exp(e)
        principal = 2.0 * mu * e + lam * e.sum()
        A = U.transpose() @ g_F_new @ V
        B = U.transpose() @ g_tau @ U
        g_principal = vec3(B[0, 0], B[1, 1], B[2, 2])
        g_U = g_F_new @ V @ diag(d) + (g_tau + g_tau.transpose()) @ U @ diag(principal)
        g_V = g_F_new.transpose() @ U @ diag(d)
        g_e = vec3(A[0, 0], A[1, 1], A[2, 2]) * d + 2.0 * mu * g_principal + lam * g_principal.sum()
        return g_U, g_V, g_e, 2.0 * e.dot(g_principal), e.sum() * g_principal.sum()

    @ti.func
    def von_mises_grad(U, V, eps, plastic, mu, lam, aux, g_F_new, g_tau, g_plastic_new):
        """Adjoint of return_maps' von Mises branch -> (g_U, g_eps, g_V, g_plastic, g_mu, g_lam, g_aux)."""
        dev, dev_norm, overshoot, k = von_mises_return(eps, mu, aux[0])
        g_U, g_V, g_e, g_mu, g_lam = hencky_grad(U, V, eps - k * dev, mu, lam, g_F_new, g_tau)
        g_k = -dev.dot(g_e)
        g_dev = -k * g_e
        g_aux = ti.Vector.zero(real, 4)
        if overshoot > 0.0:  # k = 1 - yield / (2 mu |dev|)
            g_dev += (g_k * aux[0] / (2.0 * mu * dev_norm ** 3)) * dev
            g_aux[0] = -g_k / (2.0 * mu * dev_norm)
            g_mu += g_k * aux[0] / (2.0 * mu * mu * dev_norm)
        return g_U, g_e + g_dev - g_dev.sum() / 3.0, g_V, g_plastic_new, g_mu, g_lam, g_aux

    @ti.func
    def sand_grad(U, V, eps, plastic, mu, lam, aux, g_F_new, g_tau, g_plastic_new):
        """Adjoint of return_maps' Drucker-Prager branch -> (g_U, g_eps, g_V, g_plastic, g_mu, g_lam,
        g_aux) (see sand_return)."""
        trace, dev, dev_norm, c, overshoot, k = sand_return(eps, plastic, mu, lam, aux[0])
        compressed = trace < 0.0
        e = ti.Vector.zero(real, 3)
        if compressed:
            e = eps - k * dev
        g_U, g_V, g_e, g_mu, g_lam = hencky_grad(U, V, e, mu, lam, g_F_new, g_tau)
        g_eps = ti.Vector.zero(real, 3)
        g_trace = ti.cast(0.0, real)
        g_aux = ti.Vector.zero(real, 4)
        if compressed:
            g_k = -dev.dot(g_e)
            g_dev = -k * g_e
            g_eps = g_e
            if overshoot > 0.0:  # k = 1 + c trace alpha / |dev|
                g_dev += (-g_k * c * trace * aux[0] / dev_norm ** 3) * dev
                g_trace += g_k * c * aux[0] / dev_norm
                g_aux[0] = g_k * c * trace / dev_norm
                g_c = g_k * trace * aux[0] / dev_norm
                g_lam += g_c * 3.0 / (2.0 * mu)
                g_mu -= g_c * 3.0 * lam / (2.0 * mu * mu)
            g_eps += g_dev
            g_trace -= g_dev.sum() / 3.0
        else:
            g_trace += g_plastic_new
        return g_U, g_eps + g_trace, g_V, g_trace, g_mu, g_lam, g_aux

    @ti.func
    def snow_grad(U, s, V, plastic, mu, lam, aux, g_F_new, g_tau, g_plastic_new):
        """Adjoint of return_maps' snow branch -> (g_U, g_s, g_V, g_plastic, g_mu, g_lam, g_aux).
        With the clamped singular values c: F_new = U diag(c) V^T and tau = U diag(h q) U^T,
        q_i = 2 mu (c_i - 1) c_i + lam (J - 1) J, J = c0 c1 c2, h the hardening factor."""
        clamped, J, S, Jp, exponent, h = snow_return(s, plastic, aux)
        q = 2.0 * mu * (clamped - 1.0) * clamped + lam * (J - 1.0) * J
        A = U.transpose() @ g_F_new @ V
        B = U.transpose() @ g_tau @ U
        g_principal = vec3(B[0, 0], B[1, 1], B[2, 2])
        g_U = g_F_new @ V @ diag(clamped) + (g_tau + g_tau.transpose()) @ U @ diag(h * q)
        g_V = g_F_new.transpose() @ U @ diag(clamped)
        g_q = h * g_principal
        g_clamped = vec3(A[0, 0], A[1, 1], A[2, 2]) + g_q * 2.0 * mu * (2.0 * clamped - 1.0)
        g_J = g_q.sum() * lam * (2.0 * J - 1.0)
        g_mu = (g_q * 2.0 * (clamped - 1.0) * clamped).sum()
        g_lam = g_q.sum() * (J - 1.0) * J
        unclamped = (exponent > ti.log(SNOW_MIN_HARDENING)) & (exponent < ti.log(SNOW_MAX_HARDENING))
        g_exponent = ti.select(unclamped, g_principal.dot(q) * h, 0.0)
        g_aux = ti.Vector.zero(real, 4)
        g_aux[0] = g_exponent * (1.0 - Jp)
        g_Jp = g_plastic_new - aux[0] * g_exponent
        g_J -= g_Jp * Jp / J
        g_S = g_Jp * plastic / J
        g_clamped += g_J * vec3(clamped[1] * clamped[2], clamped[0] * clamped[2], clamped[0] * clamped[1])
        g_s = g_S * vec3(s[1] * s[2], s[0] * s[2], s[0] * s[1])
        for i in ti.static(range(3)):
            if s[i] < 1.0 - aux[1]:
                g_aux[1] -= g_clamped[i]
            elif s[i] > 1.0 + aux[2]:
                g_aux[2] += g_clamped[i]
            else:
                g_s[i] += g_clamped[i]
        return g_U, g_s, g_V, g_Jp * S / J, g_mu, g_lam, g_aux

    @ti.func
    def plastic_grad(material_id, U, sig, V, plastic, E, nu, aux, g_F_new, g_tau, g_plastic_new,
                     models: ti.template()):
        """Adjoint of return_maps for a plastic particle (hand-written): the adjoints of F_new, tau
        and plastic_new -> (g_U, g_sig, g_V, g_plastic, g_E, g_nu, g_aux). models: the bit set of
        the models to build (materials.plastic_model_set); a particle of another model gets zeros."""
        mu, lam = lame(E, nu)
        s = ti.max(ti.abs(sig), MIN_SINGULAR_VALUE)
        eps = ti.log(s)
        g_U, g_s, g_V = ti.Matrix.zero(real, 3, 3), ti.Vector.zero(real, 3), ti.Matrix.zero(real, 3, 3)
        g_plastic, g_mu, g_lam = ti.cast(0.0, real), ti.cast(0.0, real), ti.cast(0.0, real)
        g_aux = ti.Vector.zero(real, 4)
        # each model's adjoint compiles only where the scene has it: the three together were most
        # of a plastic scene's cold first gradient (H200, 2026-11-27)
        if ti.static(models >> VON_MISES_ID & 1):
            if material_id == VON_MISES_ID:
                g_U, g_eps, g_V, g_plastic, g_mu, g_lam, g_aux = von_mises_grad(U, V, eps, plastic, mu, lam, aux,
                                                                               g_F_new, g_tau, g_plastic_new)
                g_s = g_eps / s
        if ti.static(models >> SAND_ID & 1):
            if material_id == SAND_ID:
                g_U, g_eps, g_V, g_plastic, g_mu, g_lam, g_aux = sand_grad(U, V, eps, plastic, mu, lam, aux,
                                                                          g_F_new, g_tau, g_plastic_new)
                g_s = g_eps / s
        if ti.static(models >> SNOW_ID & 1):
            if material_id == SNOW_ID:
                g_U, g_s, g_V, g_plastic, g_mu, g_lam, g_aux = snow_grad(U, s, V, plastic, mu, lam, aux,
                                                                        g_F_new, g_tau, g_plastic_new)
        g_E, g_nu = lame_grad(E, nu, g_mu, g_lam)
        # s = max(|sig|, MIN_SINGULAR_VALUE)
        g_sig = ti.select(ti.abs(sig) > MIN_SINGULAR_VALUE, g_s * ti.math.sign(sig), 0.0)
        return g_U, g_sig, g_V, g_plastic, g_E, g_nu, g_aux

    return SimpleNamespace(update_and_stress=update_and_stress, plastic_update=plastic_update,
                           return_maps=return_maps, polar_rotation=polar_rotation,
                           elastic_update_grad=elastic_update_grad, plastic_grad=plastic_grad)


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
