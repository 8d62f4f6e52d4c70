"""Differentiable plasticity: the hand-written SVD adjoint and the plastic return maps through
bridge.simulate, against float64 central finite differences.

Tolerance argument (float64). A central difference with step h has truncation error ~h^2 |L^(3)|
and noise ~NOISE / h, where NOISE is how reproducibly the forward evaluates L: ti.svd's iteration
is not smooth in F, so L carries ~5e-11 of non-smooth noise (measured: the FD of the von Mises
body moved by 3e-5 relative between h = 1e-6 and 1e-7, as 1 / h). With h ~1e-5 of each input's
scale (1e-3 for the yield stress, whose gradient is small in Pa) the FD agrees with the gradient to
<= 1.2e-6 relative (measured for every input), so RTOL = 1e-5 plus NOISE / h. The adjoint's own
error: the SVD spread at ties (constitutive.SVD_SEPARATION, 1e-8) moved no input's gradient by
more than 3e-8. A wrong factor anywhere (the mutations below) is off by >= 1e-3.
Each input is checked on its own (its own direction, its own assertion).
"""
import math

import numpy as np
import pytest
import torch

f64 = torch.float64
RTOL, NOISE = 1e-5, 1e-10
RTOL32 = 5e-2


# ----------------------------------------------------------------------------- the SVD adjoint
@pytest.fixture(scope="module")
def svd_kernels(ti_arch):
    import taichi as ti
    from taichi_mpm.substep import substep_kernels

    return substep_kernels(ti.f64, plastic_models=False)


def svd_adjoint(kernels, device, F, h_of_s, dh_of_s, W):
    """dL/dF of L(F) = <W, U diag(h(s)) V^T> through trial_svd + trial_svd_grad (dt = 0, no control:
    F_trial = F), the adjoints of U, s, V written out for this L."""
    import taichi as ti
    from taichi_mpm.constitutive import svd_separation
    from taichi_mpm.materials import VON_MISES_ID

    z = lambda *s: torch.zeros(s, dtype=f64, device=device)  # noqa: E731
    C, Fs = z(2, 1, 3, 3), z(2, 1, 3, 3)
    Fs[0, 0] = F
    material = torch.full((1,), VON_MISES_ID, dtype=torch.int32, device=device)
    U, sig, V = z(1, 3, 3), z(1, 3), z(1, 3, 3)
    kernels.trial_svd(0, 1, C, Fs, material, z(1, 3, 3), 0.0, U, sig, V, 0.0, svd_separation(ti.f64))
    u, s, v = U[0], sig[0], V[0]
    hs = h_of_s(s)
    g_U = (W @ v @ torch.diag(hs)).unsqueeze(0)
    g_V = (W.T @ u @ torch.diag(hs)).unsqueeze(0)
    g_sig = (dh_of_s(s) * torch.diagonal(u.T @ W @ v)).unsqueeze(0)
    g_C, g_F = z(2, 1, 3, 3), z(2, 1, 3, 3)
    kernels.trial_svd_grad(0, 1, C, Fs, material, z(1, 3, 3), 0.0, U, sig, V, g_U, g_sig, g_V, g_C, g_F,
                           z(1, 3, 3), 0.0)
    return g_F[0, 0].cpu()


def rotation(seed):
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(seed), dtype=f64))
    return q * torch.sign(torch.det(q))


CASES = {
    "distinct": torch.diag(torch.tensor([1.3, 0.9, 0.7], dtype=f64)),
    "two equal": torch.diag(torch.tensor([1.1, 1.1, 0.8], dtype=f64)),
    "three equal": 0.9 * torch.eye(3, dtype=f64),
    "tiny": torch.diag(torch.tensor([1.2, 0.8, 1e-3], dtype=f64)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_svd_adjoint_cube_matches_exact_gradient(svd_kernels, device, case):
    """h(s) = s^3 makes U h(S) V^T = F F^T F, whose gradient is exact in torch, also where singular
    values are equal. Shown to catch: the U and V terms' sign swapped (K_ij = 1 / (s_i^2 - s_j^2));
    and, at equal singular values, the spread turned off (separation 0: the divided difference's
    limit is lost, errors ~1; "two equal" and "three equal" fail). Also caught: svd_grad's output
    halved (every case fails)."""
    F = rotation(1) @ CASES[case] @ rotation(2).T
    W = torch.randn(3, 3, generator=torch.Generator().manual_seed(3), dtype=f64)
    ours = svd_adjoint(svd_kernels, device, F.to(device), lambda s: s ** 3, lambda s: 3 * s ** 2, W.to(device))
    F_ref = F.clone().requires_grad_()
    ((F_ref @ F_ref.T @ F_ref) * W).sum().backward()
    # the adjoint is taken at singular values spread by ~1e-8 (SVD_SEPARATION): a relative bias of
    # a few 1e-8 and rounding of eps / 1e-8 ~ 2e-8; 1e-6 leaves margin, the mutations give >= 1e-2
    torch.testing.assert_close(ours, F_ref.grad, rtol=1e-6, atol=1e-6 * F_ref.grad.abs().max().item())


@pytest.mark.parametrize("case", ["distinct", "two equal"])
def test_svd_adjoint_log_matches_fd(svd_kernels, device, case):
    """h(s) = log s (the Hencky strain of von Mises and sand), against central differences of a
    numpy SVD. Shown to catch: the gap's sign swapped and svd_grad's output halved (both cases
    fail); the tie spread turned off ("two equal" fails)."""
    F = rotation(4) @ CASES[case] @ rotation(5).T
    W = torch.randn(3, 3, generator=torch.Generator().manual_seed(6), dtype=f64)
    ours = svd_adjoint(svd_kernels, device, F.to(device), torch.log, lambda s: 1 / s, W.to(device))

    def L(M):
        u, s, vt = np.linalg.svd(M)
        return float((W.numpy() * (u @ np.diag(np.log(s)) @ vt)).sum())

    h = 1e-6
    fd = np.zeros((3, 3))
    for i in range(3):
        for j in range(3):
            E = np.zeros((3, 3))
            E[i, j] = h
            fd[i, j] = (L(F.numpy() + E) - L(F.numpy() - E)) / (2 * h)
    np.testing.assert_allclose(ours.numpy(), fd, rtol=1e-6, atol=1e-7 * np.abs(fd).max())


# ----------------------------------------------------------------------------- rollouts
T = 12
FRAMES = (6, 12)
BODIES = ("von_mises", "sand", "snow", "corotated")


@pytest.fixture(scope="module")
def plastic_setup(ti_arch, device):
    """Four small cubes (von Mises, sand, snow, fixed-corotated) whose F0 puts them past their yield
    surfaces: von Mises sheared beyond its yield stress, sand half compressed-and-sheared (return to
    the cone) and half stretched (tension: cone tip), snow beyond critical compression / stretch.
    A fifth of each plastic body starts with two equal singular values (F0 = R diag(a, a, b) R^T)."""
    from taichi_mpm import Elastic, MPMSolver, Sand, Snow, VonMises
    from bridge.rollout import RolloutScene

    solver = MPMSolver(res=16, dtype="float64", gravity=(0.0, -9.8, 0.0))
    materials = [VonMises(E=2e4, nu=0.3, yield_stress=400.0), Sand(E=2e4, nu=0.3, friction_angle=30.0),
                 Snow(E=2e4, nu=0.2, hardening=10.0, critical_compression=0.03, critical_stretch=0.01),
                 Elastic(E=2e4, nu=0.3)]
    for i, m in enumerate(materials):
        solver.add_cube((0.3 + 0.22 * (i % 2), 0.3 + 0.22 * (i // 2), 0.4), (0.125, 0.125, 0.125), m,
                        particles_per_cell=2, seed=i)
    scene = RolloutScene.from_solver(solver, dt=1e-3)
    n = scene.n_particles
    g = torch.Generator().manual_seed(0)
    rnd = lambda *shape: torch.randn(shape, generator=g, dtype=f64)  # noqa: E731
    F0 = torch.eye(3, dtype=f64) + 0.06 * rnd(n, 3, 3)
    body = scene.body.cpu()
    sand = (body == 1).nonzero().flatten()
    F0[sand[: len(sand) // 2]] *= 1.05   # tension
    F0[sand[len(sand) // 2:]] *= 0.95    # compression
    for b in range(3):
        members = (body == b).nonzero().flatten()
        for k, p in enumerate(members[:: 5].tolist()):
            R = rotation(10 + k)
            F0[p] = R @ torch.diag(torch.tensor([1.04, 1.04, 0.93], dtype=f64)) @ R.T
    dev = device
    data = dict(
        scene=scene, x0=solver.positions(as_torch=True).clone().to(dev), v0=(0.3 * rnd(n, 3)).to(dev),
        F0=F0.to(dev),
        params={"E": torch.tensor([2e4, 2e4, 2e4, 2e4], dtype=f64, device=dev),
                "nu": torch.tensor([0.3, 0.3, 0.2, 0.3], dtype=f64, device=dev),
                "yield_stress": torch.tensor(400.0, dtype=f64, device=dev),
                "friction_angle": torch.tensor(30.0, dtype=f64, device=dev),
                "hardening": torch.tensor(10.0, dtype=f64, device=dev),
                "critical_compression": torch.tensor(0.03, dtype=f64, device=dev),
                "critical_stretch": torch.tensor(0.01, dtype=f64, device=dev)},
        w_x=rnd(len(FRAMES), n, 3).to(dev), w_v=rnd(len(FRAMES), n, 3).to(dev),
        w_F=rnd(len(FRAMES), n, 3, 3).to(dev),
    )
    data["dirs"] = {k: rnd(*v.shape).to(dev) for k, v in data["params"].items()}
    data["dirs"].update(x0=rnd(n, 3).to(dev), v0=rnd(n, 3).to(dev), F0=rnd(n, 3, 3).to(dev))
    assert scene.n_bodies == 4
    return data


def plastic_loss(d, x0, v0, F0, params):
    from bridge.rollout import simulate

    traj = simulate(d["scene"], x0, v0, params, T, FRAMES, F0=F0, checkpoint_every=5)
    return (traj.x * d["w_x"]).sum() + (traj.v * d["w_v"]).sum() + (traj.F * d["w_F"]).sum()


@pytest.fixture(scope="module")
def plastic_grads(plastic_setup):
    d = plastic_setup
    x0, v0, F0 = (d[k].clone().requires_grad_() for k in ("x0", "v0", "F0"))
    params = {k: v.clone().requires_grad_() for k, v in d["params"].items()}
    plastic_loss(d, x0, v0, F0, params).backward()
    return dict({k: v.grad for k, v in params.items()}, x0=x0.grad, v0=v0.grad, F0=F0.grad)


def plastic_fd(d, name, h):
    direction = d["dirs"][name]
    with torch.no_grad():
        def at(sign):
            inputs = {k: d[k] for k in ("x0", "v0", "F0")}
            params = dict(d["params"])
            if name in params:
                params[name] = params[name] + sign * h * direction
            else:
                inputs[name] = inputs[name] + sign * h * direction
            return plastic_loss(d, inputs["x0"], inputs["v0"], inputs["F0"], params).item()
        return (at(1) - at(-1)) / (2 * h)


# step sizes ~1e-5 of each input's scale (E 2e4, friction angle 30 degrees, F ~1, ...)
PLASTIC_INPUTS = [("yield_stress", 0.4), ("friction_angle", 3e-4), ("hardening", 1e-4),
                  ("critical_compression", 3e-7), ("critical_stretch", 1e-7), ("E", 0.2), ("nu", 3e-6),
                  ("x0", 1e-6), ("v0", 1e-5), ("F0", 1e-5)]


@pytest.mark.parametrize("name,h", PLASTIC_INPUTS)
def test_plastic_rollout_gradient_matches_fd(plastic_setup, plastic_grads, name, h):
    """Each input on its own: <dL/dp, d> against the central difference along d. The plastic
    parameters' FD is asserted non-negligible: the particles are actively yielding (a parameter of
    an inactive yield surface would have zero effect). Shown to catch (each run, 2026-11-27):
    svd_grad's output halved (all ten inputs fail); the plastic parameters detached in
    aux_per_particle (the five plastic parameters fail); the tie spread turned off
    (SVD_SEPARATION 0: F0 fails, through the particles started with equal singular values)."""
    d = plastic_setup
    analytic = (plastic_grads[name] * d["dirs"][name]).sum().item()
    fd = plastic_fd(d, name, h)
    assert math.isfinite(analytic)
    if name in d["params"] and name not in ("E", "nu"):
        assert abs(fd) > 1e-6, f"{name} has no effect: no particle is yielding"
    assert abs(analytic - fd) <= RTOL * abs(fd) + NOISE / h, (name, analytic, fd)


def test_equal_singular_values_give_finite_gradients(plastic_setup, plastic_grads):
    """The particles started with two equal singular values get finite F0 gradients (the clamped
    gap), and the directional check above covers them too."""
    for name, g in plastic_grads.items():
        assert bool(torch.isfinite(g).all()), name


ONE_MODEL = [("von_mises", "yield_stress", 0.4), ("sand", "friction_angle", 3e-4), ("snow", "critical_compression", 3e-7)]


@pytest.mark.parametrize("model,name,h", ONE_MODEL)
def test_a_scene_of_one_plastic_model_gets_its_adjoint(device, model, name, h):
    """A scene holding a single plastic model compiles only that model's adjoint (the bit set
    materials.plastic_model_set passes to plastic_stress_grad); its parameter's gradient and E's
    still match central differences. Shown to catch (2026-11-27): the bit set built from the wrong
    ids (the adjoint of the scene's model left out: its parameters' gradients are zero)."""
    from bridge.rollout import RolloutScene, simulate
    from taichi_mpm import MPMSolver, Sand, Snow, VonMises

    material = {"von_mises": VonMises(E=2e4, nu=0.3, yield_stress=400.0),
                "sand": Sand(E=2e4, nu=0.3, friction_angle=30.0),
                "snow": Snow(E=2e4, nu=0.2, hardening=10.0, critical_compression=0.03, critical_stretch=0.01)}[model]
    solver = MPMSolver(res=16, dtype="float64", gravity=(0.0, -9.8, 0.0))
    solver.add_cube((0.4, 0.4, 0.4), (0.125, 0.125, 0.125), material, particles_per_cell=2, seed=0)
    scene = RolloutScene.from_solver(solver, dt=1e-3)
    n = scene.n_particles
    g = torch.Generator().manual_seed(2)
    rnd = lambda *shape: torch.randn(shape, generator=g, dtype=f64).to(device)  # noqa: E731
    F0 = (torch.eye(3, dtype=f64, device=device) + 0.06 * rnd(n, 3, 3)) * (0.95 if model == "sand" else 1.0)
    if model == "snow":  # every singular value past a critical one: half stretched, half compressed
        F0 = (torch.eye(3, dtype=f64, device=device) + 0.01 * rnd(n, 3, 3)) * torch.where(
            torch.arange(n, device=device) < n // 2, 1.08, 0.92)[:, None, None]
    x0, v0, w_x, w_F = solver.positions(as_torch=True).clone(), 0.3 * rnd(n, 3), rnd(1, n, 3), rnd(1, n, 3, 3)
    value = getattr(material, name)

    def loss(E, parameter):
        traj = simulate(scene, x0, v0, {"E": E, "nu": material.nu, name: parameter}, 8, [8], F0=F0)
        return (traj.x * w_x).sum() + (traj.F * w_F).sum()

    E, parameter = (torch.tensor(v, dtype=f64, device=device, requires_grad=True) for v in (2e4, value))
    loss(E, parameter).backward()
    with torch.no_grad():
        fd = (loss(E, parameter + h) - loss(E, parameter - h)).item() / (2 * h)
        fd_E = (loss(E + 0.2, parameter) - loss(E - 0.2, parameter)).item() / 0.4
    assert abs(fd) > 1e-6, f"{name} has no effect: no particle is yielding"
    assert abs(parameter.grad.item() - fd) <= RTOL * abs(fd) + NOISE / h, (name, parameter.grad.item(), fd)
    assert abs(E.grad.item() - fd_E) <= RTOL * abs(fd_E) + NOISE / 0.2, ("E", E.grad.item(), fd_E)


def test_plastic_parameter_of_absent_material_is_refused(plastic_setup):
    from bridge.rollout import RolloutScene, simulate
    from taichi_mpm import Elastic, MPMSolver

    solver = MPMSolver(res=16, dtype="float64")
    solver.add_cube((0.4, 0.4, 0.4), (0.1, 0.1, 0.1), Elastic(), particles_per_cell=1)
    scene = RolloutScene.from_solver(solver, dt=1e-4)
    x0 = solver.positions(as_torch=True)
    with pytest.raises(ValueError, match="yield_stress"):
        simulate(scene, x0, torch.zeros_like(x0), {"E": 1e4, "nu": 0.3, "yield_stress": 100.0}, 2, [2])
    with pytest.raises(ValueError, match="unknown params"):
        simulate(scene, x0, torch.zeros_like(x0), {"E": 1e4, "nu": 0.3, "yeld_stress": 100.0}, 2, [2])


def test_float32_plastic_rollout_gives_the_float64_gradients(device):
    """The hand-written return-map and SVD adjoints in float32 against float64, on three plastic
    cubes past their yield surfaces (von Mises sheared, sand compressed, snow stretched and
    compressed; random F0, so no tied singular values) over 8 substeps: every parameter's gradient and v0's, each on
    its own. Singular values closer than float32's SVD_SEPARATION (1e-3, relative) are spread
    apart in the adjoint, which biases those particles' terms by ~separation / strain: measured on
    the CPU, up to 1.8% of an input's largest gradient (v0; hardening 1.1%, E 0.04%), so RTOL32 =
    5% of it. What it guards is the float32 build itself (the float64 FD tests above check the
    math): seen to fail with the stress's adjoint zeroed in float32 only, as Taichi's reverse of
    the grid update once was on CUDA."""
    from conftest import assert_grads_close
    from taichi_mpm import MPMSolver, Sand, Snow, VonMises
    from bridge.rollout import RolloutScene, simulate

    def gradients(dtype):
        solver = MPMSolver(res=16, dtype=dtype, gravity=(0.0, -9.8, 0.0))
        for i, m in enumerate([VonMises(E=2e4, nu=0.3, yield_stress=400.0), Sand(E=2e4, nu=0.3, friction_angle=30.0),
                               Snow(E=2e4, nu=0.2, hardening=10.0, critical_compression=0.03,
                                    critical_stretch=0.01)]):
            solver.add_cube((0.3 + 0.22 * (i % 2), 0.3 + 0.22 * (i // 2), 0.4), (0.125, 0.125, 0.125), m,
                            particles_per_cell=1, seed=i)
        scene = RolloutScene.from_solver(solver, dt=1e-3)
        n, t = scene.n_particles, getattr(torch, dtype)
        g = torch.Generator().manual_seed(1)
        rnd = lambda *s: torch.randn(s, generator=g, dtype=f64).to(device, t)  # noqa: E731
        F0 = torch.eye(3, dtype=t, device=device) + 0.06 * rnd(n, 3, 3)
        F0[scene.body == 1] *= 0.95  # sand compressed
        # snow half stretched, half compressed, every singular value well past its critical one, so
        # that no particle sits at a clamp's kink, where float32's rounding alone would pick the side
        snow = (scene.body == 2).nonzero().flatten()
        F0[snow] = torch.eye(3, dtype=t, device=device) + 0.01 * rnd(len(snow), 3, 3)
        F0[snow[: len(snow) // 2]] *= 1.08
        F0[snow[len(snow) // 2:]] *= 0.92
        v0 = (0.3 * rnd(n, 3)).requires_grad_()
        params = {k: torch.tensor(v, dtype=t, device=device, requires_grad=True) for k, v in
                  dict(E=[2e4, 2e4, 2e4], nu=[0.3, 0.3, 0.2], yield_stress=400.0, friction_angle=30.0,
                       hardening=10.0, critical_compression=0.03, critical_stretch=0.01).items()}
        w_x, w_F = rnd(1, n, 3), rnd(1, n, 3, 3)
        traj = simulate(scene, solver.positions(as_torch=True).clone(), v0, params, 8, [8], F0=F0)
        ((traj.x * w_x).sum() + (traj.F * w_F).sum()).backward()
        return dict({k: p.grad for k, p in params.items()}, v0=v0.grad)

    assert_grads_close(gradients("float32"), gradients("float64"), rtol=RTOL32)
