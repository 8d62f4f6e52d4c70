"""The rollout's gradient through the boundaries: a ground plane, a sphere, a moving box and the
domain walls, each with Coulomb friction, in each contact mode (sticky, slip, separate).

The grid update's adjoint is hand-written (taichi_mpm.substep.grid_update_grad over the Jacobians
of taichi_mpm.boundary); these tests check it against central finite differences of the float64
rollout, each input on its own along a random direction (the test_rollout.py method), and check
that the float32 rollout gives the float64 gradients, which is what failed on CUDA when the
adjoint was Taichi's (all zeros in float32).

Tolerance: h = 1e-6 of each input's scale keeps truncation and rounding of the central difference
below 1e-8 of the derivative, except where a node crosses a kink of the contact response (the
friction cone's edge, v.n = 0) inside [p - h d, p + h d]; RTOL = 1e-5 is margin for the first,
and the scene keeps nodes away from kinks at this h (the test fails loudly if one is hit, it
does not hide it). Shown to catch: the friction term of d scale / dv dropped, the projection
(I - n n^T) replaced by I, the 1 / m^2 mass adjoint's sign flipped, the colliders' Jacobian not
carried into the walls (J reset to I per boundary).
"""
import pytest
import torch

from conftest import assert_grads_close

T = 4
RTOL, ATOL = 1e-5, 1e-9


def build(mode: str, dtype: str, device):
    from taichi_mpm import Elastic, MPMSolver
    from taichi_mpm.boundary import Box, Plane, Sphere
    from bridge.rollout import RolloutScene

    solver = MPMSolver(res=16, dtype=dtype, boundary="slip", friction=0.3)
    solver.add_collider(Plane(point=(0.0, 0.36, 0.0), normal=(0.05, 1.0, 0.0), friction=0.4, mode=mode))
    solver.add_collider(Sphere(center=(0.45, 0.47, 0.44), radius=0.07, friction=0.2, mode=mode))
    solver.add_collider(Box(lower=(0.6, 0.3, 0.3), upper=(0.7, 0.6, 0.6), velocity=(0.3, 0.0, -0.1),
                            friction=0.6, mode=mode))
    solver.add_cube((0.2, 0.3, 0.3), (0.45, 0.25, 0.3), Elastic(E=3e4, nu=0.3), particles_per_cell=1)
    scene = RolloutScene.from_solver(solver, dt=1e-3)
    torch_dtype = getattr(torch, dtype)
    n = scene.n_particles
    g = torch.Generator().manual_seed(3)
    rnd = lambda *s: torch.randn(s, generator=g, dtype=torch.float64).to(device, torch_dtype)  # noqa: E731
    return dict(scene=scene, x0=solver.positions(as_torch=True).clone(),
                v0=0.6 * rnd(n, 3) + torch.tensor([0.0, -1.0, 0.0], dtype=torch_dtype, device=device),
                E=torch.tensor([3e4], dtype=torch_dtype, device=device),
                nu=torch.tensor([0.3], dtype=torch_dtype, device=device),
                w_x=rnd(n, 3), w_v=rnd(n, 3),
                dirs=dict(x0=rnd(n, 3), v0=rnd(n, 3), E=rnd(1), nu=rnd(1)))


def loss_of(d, x0, v0, E, nu):
    from bridge.rollout import simulate

    traj = simulate(d["scene"], x0, v0, {"E": E, "nu": nu}, T, [T])
    return (traj.x[-1] * d["w_x"]).sum() + (traj.v[-1] * d["w_v"]).sum()


def gradients(d) -> dict:
    inputs = {k: d[k].clone().requires_grad_() for k in ("x0", "v0", "E", "nu")}
    loss_of(d, **inputs).backward()
    return {k: t.grad for k, t in inputs.items()}


@pytest.mark.parametrize("mode", ["sticky", "slip", "separate"])
def test_gradients_through_colliders_and_walls_match_finite_differences(device, mode):
    d = build(mode, "float64", device)
    grads = gradients(d)
    scales = {"x0": 1e-6, "v0": 1e-6, "E": 3e4 * 1e-6, "nu": 1e-6}
    for name, h in scales.items():
        direction = d["dirs"][name]
        with torch.no_grad():
            plus = {k: d[k] + (h * direction if k == name else 0) for k in ("x0", "v0", "E", "nu")}
            minus = {k: d[k] - (h * direction if k == name else 0) for k in ("x0", "v0", "E", "nu")}
            fd = float((loss_of(d, **plus) - loss_of(d, **minus)) / (2 * h))
        analytic = float((grads[name] * direction).sum())
        assert abs(fd) > 1e-6, f"{name}: the loss does not depend on it, the comparison could not fail"
        assert abs(analytic - fd) <= RTOL * abs(fd) + ATOL, f"{mode} {name}: analytic {analytic:.10g}, FD {fd:.10g}"


def test_float32_rollout_gives_the_float64_gradients(device):
    """Four substeps in float32 against float64 on the same scene: the per-substep roundings (1e-7
    relative) grow by the stiffness of the step (E dt / (rho dx^2) ~ 8 here) to ~1e-5 of each
    gradient's scale; 2e-4 is the margin. A zero or wrong float32 adjoint misses by 100%."""
    reference = gradients(build("separate", "float64", device))
    ours = gradients(build("separate", "float32", device))
    assert_grads_close(ours, reference, rtol=2e-4)



@pytest.mark.parametrize("grouped", ["0", "1"])
def test_moving_box_runs_on_the_solver_clock(device, monkeypatch, grouped):
    """A box sweeping into a body: a rollout started from a solver at t0 > 0 (RolloutScene.time0)
    ends where the solver's own substeps end, and its gradient (v0, along a random direction)
    matches central differences, so the backward runs on the forward's clock too. Seen to fail
    with the rollout's colliders frozen at time 0 (forward and backward: positions off by 1e-2),
    and with only the backward's clock at time 0 (the gradient off by 4%). Run with one substep a
    launch and several (substep_forward_quad, substep_adjoint_pair)."""
    monkeypatch.setenv("TAICHI_MPM_GROUPED_SUBSTEPS", grouped)
    from bridge.rollout import RolloutScene, simulate
    from taichi_mpm import Elastic, MPMSolver
    from taichi_mpm.boundary import Box

    dt, T = 1e-3, 40
    solver = MPMSolver(res=16, dtype="float64", boundary="slip")
    solver.add_collider(Box(lower=(0.15, 0.3, 0.3), upper=(0.25, 0.6, 0.6), velocity=(1.9, 0.0, 0.0),
                            friction=0.0))
    solver.add_cube((0.31, 0.3, 0.35), (0.3, 0.2, 0.3), Elastic(E=3e4, nu=0.3), particles_per_cell=1)
    solver.step(5 * dt, dt=dt)  # the clock at 5 ms, the box 9.5 mm along
    scene = RolloutScene.from_solver(solver, dt=dt)
    assert scene.time0 == pytest.approx(5 * dt)
    start = {key: solver.state[key][solver.src].clone() for key in ("x", "v", "C", "F")}
    params = {"E": torch.tensor([3e4], dtype=torch.float64, device=device),
              "nu": torch.tensor([0.3], dtype=torch.float64, device=device)}
    g = torch.Generator().manual_seed(5)
    w, direction = (torch.randn(start["x"].shape, generator=g, dtype=torch.float64).to(device) for _ in range(2))

    def loss(v0):
        traj = simulate(scene, start["x"], v0, params, T, [T], C0=start["C"], F0=start["F"])
        return (traj.x[-1] * w).sum(), traj.x[-1]

    v0 = start["v"].clone().requires_grad_()
    value, ours = loss(v0)
    value.backward()
    solver.step(T * dt, dt=dt)
    theirs = solver.positions(as_torch=True)
    assert (theirs - start["x"])[:, 0].max() > 0.03  # the box reached the body and pushed it along x
    torch.testing.assert_close(ours.detach(), theirs, rtol=0, atol=1e-10)
    h = 1e-6
    with torch.no_grad():
        fd = float((loss(start["v"] + h * direction)[0] - loss(start["v"] - h * direction)[0]) / (2 * h))
    analytic = float((v0.grad * direction).sum())
    assert abs(analytic - fd) <= RTOL * abs(fd) + ATOL, (analytic, fd)
