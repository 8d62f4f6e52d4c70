"""bridge.rollout: checkpointed differentiable MPM rollout (float64, small scene, on the runtime's
device).

Every input's gradient is checked on its own against central finite differences of the same
float64 rollout along a random direction of that input only:
|<grad, d> - (L(p + h d) - L(p - h d)) / 2h| <= RTOL * |FD| + ATOL. Tolerance argument: with h
~1e-6 of the input's scale, the FD's truncation (h^2 |L^(3)|) and rounding (eps |L| / h ~ 1e-10 |L|)
errors stay below ~1e-8 of the derivative here, so RTOL = 1e-5 is margin, while each mutation
listed in the tests' docstrings moves the derivative by >= 1e-3.
"""
import numpy as np
import pytest
import torch

RTOL, ATOL = 1e-5, 1e-9
T = 20               # substeps
FRAMES = (0, 7, 13, 20)
K = 6                # checkpoint every 6 substeps: segments 0-6, 6-12, 12-18, 18-20 (uneven tail)
STRIDE = 5           # F controls on substeps 0, 5, 10, 15
# two schedules of the same float64 sums: equal up to the order CUDA's atomics add in (one gradient
# element of ~0.05 differed by 1e-12 between runs of one schedule on an H200, 2026-11-28)
SAME_SUMS = dict(rtol=1e-11, atol=1e-11)
f64 = torch.float64


@pytest.fixture(scope="module")
def setup(ti_arch, device):
    from taichi_mpm import Elastic, MPMSolver
    from bridge.rollout import RolloutScene

    solver = MPMSolver(res=16, dtype="float64", gravity=(0.0, -9.8, 0.0))
    solver.add_cube((0.30, 0.40, 0.40), (0.1875, 0.1875, 0.1875), Elastic(E=1e4, nu=0.3), particles_per_cell=4)
    solver.add_cube((0.52, 0.40, 0.40), (0.1875, 0.1875, 0.1875),
                    Elastic(E=2e4, nu=0.25, model="neo_hookean"), particles_per_cell=4, seed=1)
    scene = RolloutScene.from_solver(solver, dt=2e-3, control_stride=STRIDE)
    n = scene.n_particles
    dev = device
    g = torch.Generator().manual_seed(0)
    rnd = lambda *shape: torch.randn(shape, generator=g, dtype=f64).to(dev)  # noqa: E731
    data = dict(
        scene=scene,
        x0=solver.positions(as_torch=True).clone(),
        v0=0.5 * rnd(n, 3),
        C0=0.5 * rnd(n, 3, 3),
        F0=torch.eye(3, dtype=f64, device=dev) + 0.02 * rnd(n, 3, 3),
        E_body=torch.tensor([1e4, 2e4], dtype=f64, device=dev),
        nu_body=torch.tensor([0.3, 0.25], dtype=f64, device=dev),
        controls=0.02 * rnd(scene.n_controls(T), n, 3, 3),
        w_x=rnd(len(FRAMES), n, 3), w_v=rnd(len(FRAMES), n, 3), w_F=rnd(len(FRAMES), n, 3, 3),
        w_m=rnd(*scene.grid_shape),
        dirs=dict(x0=rnd(n, 3), v0=rnd(n, 3), C0=rnd(n, 3, 3), F0=rnd(n, 3, 3), E_body=rnd(2), nu_body=rnd(2), E=rnd(n), nu=rnd(n),
                  controls=rnd(scene.n_controls(T), n, 3, 3), lam=rnd(2), mu=rnd(2)),
    )
    assert scene.n_bodies == 2 and 150 < n < 400
    return data


def loss_of(setup, traj):
    """Positions, velocities and F at every frame, and the grid mass of frames 7 and 20."""
    from bridge.rollout import grid_mass

    d = setup
    loss = (traj.x * d["w_x"]).sum() + (traj.v * d["w_v"]).sum() + (traj.F * d["w_F"]).sum()
    for i in (1, 3):
        loss = loss + 1e3 * (grid_mass(traj.x[i], d["scene"]) * d["w_m"]).sum()
    return loss


def run(setup, x0, v0, params, controls=None, C0=None, F0=None, **options):
    from bridge.rollout import simulate

    return simulate(setup["scene"], x0, v0, params, T, FRAMES, controls=controls, C0=C0, F0=F0, **options)


def per_particle(setup, body_values):
    return body_values[setup["scene"].body]


def analytic(setup, per_particle_params: bool, checkpoint_every=K, **options):
    """Loss gradients w.r.t. x0, v0, material params and controls in one backward pass."""
    d = setup
    x0, v0 = d["x0"].clone().requires_grad_(), d["v0"].clone().requires_grad_()
    controls = d["controls"].clone().requires_grad_()
    C0, F0 = d["C0"].clone().requires_grad_(), d["F0"].clone().requires_grad_()
    if per_particle_params:
        E = per_particle(d, d["E_body"]).clone().requires_grad_()
        nu = per_particle(d, d["nu_body"]).clone().requires_grad_()
    else:
        E, nu = d["E_body"].clone().requires_grad_(), d["nu_body"].clone().requires_grad_()
    loss = loss_of(d, run(d, x0, v0, {"E": E, "nu": nu}, controls, C0, F0, checkpoint_every=checkpoint_every,
                          **options))
    loss.backward()
    return dict(x0=x0.grad, v0=v0.grad, C0=C0.grad, F0=F0.grad, E=E.grad, nu=nu.grad, controls=controls.grad,
                loss=loss.item())


@pytest.fixture(scope="module")
def grads_body(setup):
    return analytic(setup, per_particle_params=False)


@pytest.fixture(scope="module")
def grads_particle(setup):
    return analytic(setup, per_particle_params=True)


def fd(setup, name, direction, h, per_particle_params=False):
    """Central difference of the loss along direction for input name (no autograd)."""
    d = setup
    with torch.no_grad():
        def loss_at(sign):
            inputs = dict(x0=d["x0"], v0=d["v0"], C0=d["C0"], F0=d["F0"], controls=d["controls"])
            if per_particle_params:
                inputs["E"], inputs["nu"] = per_particle(d, d["E_body"]), per_particle(d, d["nu_body"])
            else:
                inputs["E"], inputs["nu"] = d["E_body"], d["nu_body"]
            inputs[name] = inputs[name] + sign * h * direction
            return loss_of(d, run(d, inputs["x0"], inputs["v0"], {"E": inputs["E"], "nu": inputs["nu"]},
                                  inputs["controls"], inputs["C0"], inputs["F0"], checkpoint_every=K)).item()
        return (loss_at(1) - loss_at(-1)) / (2 * h)


def assert_fd(analytic_dir, fd_dir):
    assert np.isfinite(analytic_dir)
    assert abs(analytic_dir - fd_dir) <= RTOL * abs(fd_dir) + ATOL, (analytic_dir, fd_dir)


@pytest.mark.parametrize("name,h", [("x0", 1e-6), ("v0", 1e-6), ("C0", 1e-6), ("F0", 1e-6), ("controls", 1e-6)])
def test_state_and_control_gradients_match_fd(setup, grads_body, name, h):
    """Each state input and the controls on their own. Shown to catch (each failed all five):
    p2g_grad's velocity adjoint halved, g2p_grad's position adjoint without dt, p2g_grad's weight
    gradient halved, the rollout's adjoint shift between substeps halved."""
    direction = setup["dirs"][name]
    assert_fd((grads_body[name] * direction).sum().item(), fd(setup, name, direction, h))


@pytest.mark.parametrize("name,key,h", [("E", "E_body", 1e-2), ("nu", "nu_body", 1e-6)])
def test_per_body_material_gradients_match_fd(setup, grads_body, name, key, h):
    """E and nu per body, each on its own. Shown to catch: the E gradient halved in the rollout's
    backward (E fails, nu passes); p2g_grad's velocity adjoint halved (both fail)."""
    direction = setup["dirs"][key]
    assert_fd((grads_body[name] * direction).sum().item(), fd(setup, name, direction, h))


@pytest.mark.parametrize("name,h", [("E", 1e-2), ("nu", 1e-6)])
def test_per_particle_material_gradients_match_fd(setup, grads_particle, name, h):
    """As the per-body test, one value per particle; caught the same two mutations."""
    direction = setup["dirs"][name]
    assert_fd((grads_particle[name] * direction).sum().item(), fd(setup, name, direction, h, True))


def test_per_body_gradient_is_sum_of_per_particle(setup, grads_body, grads_particle):
    body = setup["scene"].body
    for name in ("E", "nu"):
        summed = torch.zeros(2, dtype=f64, device=body.device).index_add_(0, body, grads_particle[name])
        torch.testing.assert_close(grads_body[name], summed, rtol=1e-10, atol=0)


def test_lame_parameters_match_fd(setup):
    """{"lam", "mu"} per body: gradient through the conversion to (E, nu), against FD. Shown to
    catch: the E gradient halved in the rollout's backward."""
    from taichi_mpm.materials import lame_parameters

    d = setup
    mu0, lam0 = (torch.tensor(v, dtype=f64, device=d["x0"].device)
                 for v in lame_parameters(d["E_body"].cpu().numpy(), d["nu_body"].cpu().numpy()))
    lam, mu = lam0.clone().requires_grad_(), mu0.clone().requires_grad_()
    loss = loss_of(d, run(d, d["x0"], d["v0"], {"lam": lam, "mu": mu}, checkpoint_every=K))
    loss.backward()
    with torch.no_grad():
        for name, grad in (("lam", lam.grad), ("mu", mu.grad)):
            direction, h = d["dirs"][name], 1e-2
            values = {"lam": lam0, "mu": mu0}
            plus = dict(values, **{name: values[name] + h * direction})
            minus = dict(values, **{name: values[name] - h * direction})
            fd_dir = (loss_of(d, run(d, d["x0"], d["v0"], plus, checkpoint_every=K))
                      - loss_of(d, run(d, d["x0"], d["v0"], minus, checkpoint_every=K))).item() / (2 * h)
            assert_fd((grad * direction).sum().item(), fd_dir)


def test_checkpointed_equals_store_everything(setup, grads_body):
    """K = T keeps every substep of the rollout in one segment (store everything)."""
    stored = analytic(setup, per_particle_params=False, checkpoint_every=T)
    assert stored["loss"] == pytest.approx(grads_body["loss"], rel=1e-13)
    for name in ("x0", "v0", "C0", "F0", "E", "nu", "controls"):
        torch.testing.assert_close(grads_body[name], stored[name], **SAME_SUMS)


def test_host_checkpoints_give_same_gradients(setup, grads_body):
    host = analytic(setup, per_particle_params=False, checkpoint_storage="host")
    for name in ("x0", "v0", "C0", "F0", "E", "nu", "controls"):
        torch.testing.assert_close(grads_body[name], host[name], **SAME_SUMS)


def test_two_calls_in_one_graph_count_each_gradient_once(setup):
    """Two rollouts of the same leaves in one graph: gradient = sum of the two separate ones."""
    d = setup

    def grads(use_first: bool, use_second: bool):
        x0, E = d["x0"].clone().requires_grad_(), d["E_body"].clone().requires_grad_()
        loss = 0.0
        if use_first:
            loss = loss + loss_of(d, run(d, x0, d["v0"], {"E": E, "nu": d["nu_body"]}))
        if use_second:
            traj = run(d, x0, 0.5 * d["v0"], {"E": 2 * E, "nu": d["nu_body"]})
            loss = loss + (traj.x[-1] ** 2).sum()
        loss.backward()
        return x0.grad, E.grad

    both, first, second = grads(True, True), grads(True, False), grads(False, True)
    for g_both, g_1, g_2 in zip(both, first, second):
        torch.testing.assert_close(g_both, g_1 + g_2, rtol=1e-12, atol=1e-12)


def test_grid_mass_matches_p2g_kernel(setup):
    """The torch grid_mass used by losses equals the mass the substep's p2g scatters."""
    from bridge.rollout import _Substeps, _alloc_state, grid_mass

    d, scene = setup, setup["scene"]
    dev = d["x0"].device
    substeps = _Substeps(scene)
    S = _alloc_state(2, scene.n_particles, f64, dev)
    S["x"][0] = d["x0"] + 0.01 * d["v0"]
    S["F"][0] = torch.eye(3, dtype=f64, device=dev)
    n = scene.n_particles
    constants = substeps.constants(torch.full((n,), 1e4, dtype=f64, device=dev),
                                   torch.full((n,), 0.3, dtype=f64, device=dev), scene.aux)
    substeps.forward(S, 0, constants, (substeps.no_control, 0.0), move_particles=False)
    grid_m = substeps.grid[1]
    torch.testing.assert_close(grid_mass(S["x"][0], scene), grid_m, rtol=1e-12, atol=1e-15)
    assert grid_m.sum().item() == pytest.approx(scene.mass.sum().item(), rel=1e-12)


def test_frames_hold_the_forward_states(setup):
    """Frame 0 is the input; the last frame equals a rollout asked for that frame only."""
    from bridge.rollout import simulate

    d = setup
    with torch.no_grad():
        traj = run(d, d["x0"], d["v0"], {"E": d["E_body"], "nu": d["nu_body"]})
        last = simulate(d["scene"], d["x0"], d["v0"], {"E": d["E_body"], "nu": d["nu_body"]}, T, [T])
    torch.testing.assert_close(traj.x[0], d["x0"], rtol=0, atol=0)
    torch.testing.assert_close(traj.F[0], torch.eye(3, dtype=f64, device=traj.F.device).expand_as(traj.F[0]),
                               rtol=0, atol=0)
    # bit for bit on the CPU; CUDA's atomic P2G adds in a varying order (a few float64 roundings)
    exact = traj.x.device.type == "cpu"
    torch.testing.assert_close(traj.x[-1], last.x[0], rtol=0, atol=0 if exact else 1e-13)
    assert (traj.x[-1] - traj.x[0]).abs().max() > 1e-3  # it moved


def test_recomputed_grids_give_same_gradients(setup, grads_body):
    """store_grids=False recomputes every substep's grid in the backward (DiffTaichi's rule)."""
    recomputed = analytic(setup, per_particle_params=False, store_grids=False)
    for name in ("x0", "v0", "C0", "F0", "E", "nu", "controls"):
        torch.testing.assert_close(grads_body[name], recomputed[name], **SAME_SUMS)


@pytest.mark.parametrize("store_grids, every", [(True, K), (False, K), (True, 8)])
def test_grouped_substeps_equal_single_ones(setup, monkeypatch, store_grids, every):
    """Several substeps a launch (substep_forward_quad, substep_adjoint_pair; CUDA's default) give
    the gradients of one a launch. The schedule mixes them with single launches: frames 7 and 13
    split adjoint pairs, segments of 6 end in single substeps (and the refill without stored grids
    runs 5 of them), and the controls act on every 5th substep: with segments of 8 on the first,
    second, third and fourth substep of a quad in turn. Seen to fail with the adjoint pair's g_E
    given g_nu, with the second substep of a pair (forward or adjoint) run at the first one's
    clock, with the pairs' controls swapped, and with a quad's third substep given its second's
    control."""
    grads = {}
    for setting in ("0", "1"):
        monkeypatch.setenv("TAICHI_MPM_GROUPED_SUBSTEPS", setting)
        grads[setting] = analytic(setup, per_particle_params=False, checkpoint_every=every, store_grids=store_grids)
    assert grads["1"]["loss"] == pytest.approx(grads["0"]["loss"], rel=1e-13)
    for name in ("x0", "v0", "C0", "F0", "E", "nu", "controls"):
        torch.testing.assert_close(grads["1"][name], grads["0"][name], **SAME_SUMS)


@pytest.mark.parametrize("every", [K, 8, T])
def test_kept_last_segment_equals_its_refill(setup, grads_body, every):
    """The forward keeps its last segment (states, grids) for the backward, which skips that
    segment's checkpoint and refill (CheckpointPlan.keep_last, the default with device checkpoints
    and stored grids): the gradients of keep_last_segment=False's refill. Segments of 6 end in a
    tail of 2, of 8 in one of 4 with frame 13 before it, of T are one kept segment. Seen to fail
    with the backward taking a fresh buffer for the kept segment."""
    from bridge.rollout import plan_for

    assert plan_for(setup["scene"], T, every).keeps_last_segment
    kept = grads_body if every == K else analytic(setup, per_particle_params=False, checkpoint_every=every)
    refilled = analytic(setup, per_particle_params=False, checkpoint_every=every, keep_last_segment=False)
    for name in ("x0", "v0", "C0", "F0", "E", "nu", "controls"):
        torch.testing.assert_close(kept[name], refilled[name], **SAME_SUMS)


def test_a_blow_up_raises_naming_its_first_bad_segment(setup):
    """A stiffness far past the CFL limit of dt blows the state up within the first segment:
    SimulationError names the end of that segment (substep K) and a particle, not a later
    segment's (on CUDA the check of a segment is read one segment later, check_later)."""
    from bridge.rollout import simulate
    from taichi_mpm import SimulationError

    d = setup
    E = torch.full_like(d["E_body"], 1e13)
    with pytest.raises(SimulationError, match=rf"^substep {K}: \d+ particles have NaN/Inf state .* first is particle "):
        simulate(d["scene"], d["x0"], d["v0"], {"E": E, "nu": d["nu_body"]}, T, FRAMES, checkpoint_every=K)


def test_checkpoint_plan():
    from bridge.rollout import CheckpointPlan

    GiB = 1 << 30
    # small states: segments grow to SEGMENT_GROWTH sqrt(T) (fewer segments, less host work), in
    # whole groups of the launches' substeps; a segment within the budget when they are larger
    assert CheckpointPlan.choose(1000, 100, 10, on_cuda=True) == CheckpointPlan(128, "device", True)
    assert CheckpointPlan.choose(200, 100, 10, on_cuda=True, group=4) == CheckpointPlan(64, "device", True)
    assert CheckpointPlan.choose(30, 100, 10, on_cuda=True, group=4) == CheckpointPlan(30, "device", True)
    mid = CheckpointPlan.choose(200, 10 ** 7, 7 * 10 ** 6, on_cuda=True, group=4)
    assert mid.storage == "device" and mid.store_grids and mid.every % 4 == 0 and 16 < mid.every <= 64
    assert -(-200 // mid.every) * 10 ** 7 + (mid.every + 1) * 10 ** 7 + mid.every * 7 * 10 ** 6 <= GiB
    # 1M particles in float32 on a 129^3 grid: host checkpoints, grids kept, segment within 1 GiB
    state, grid = 10 ** 6 * 25 * 4, 129 ** 3 * 7 * 4
    big = CheckpointPlan.choose(1000, state, grid, on_cuda=True)
    assert big.storage == "host" and big.store_grids and (big.every + 1) * state + big.every * grid <= GiB
    assert big.every >= 32 // 8
    # off CUDA there is no host/device split: device checkpoints, grids only if they fit
    cpu = CheckpointPlan.choose(1000, state, grid, on_cuda=False)
    assert cpu.storage == "device" and not cpu.store_grids and cpu.every == 32
    assert CheckpointPlan.choose(10, 100, 10, on_cuda=False, every=3) == CheckpointPlan(3, "device", True)
    assert not CheckpointPlan.choose(10, 100, 10, on_cuda=False, store_grids=False).store_grids
    with pytest.raises(ValueError, match="checkpoint_every"):
        CheckpointPlan.choose(10, 100, 10, on_cuda=False, every=0)


def test_bad_input_raises_before_any_kernel(setup):
    from bridge.rollout import simulate

    d, scene = setup, setup["scene"]
    dev = d["x0"].device
    params = {"E": d["E_body"], "nu": d["nu_body"]}
    with pytest.raises(ValueError, match="outside the valid domain"):
        simulate(scene, d["x0"] + 0.5, d["v0"], params, T, [T])
    with pytest.raises(TypeError, match="float64"):
        simulate(scene, d["x0"].float(), d["v0"], params, T, [T])
    with pytest.raises(ValueError, match="frames"):
        simulate(scene, d["x0"], d["v0"], params, T, [5, 5])
    with pytest.raises(ValueError, match="nu must lie"):
        simulate(scene, d["x0"], d["v0"], {"E": d["E_body"], "nu": torch.tensor([0.3, 0.5], dtype=f64, device=dev)},
                 T, [T])
    with pytest.raises(ValueError, match="per body"):
        simulate(scene, d["x0"], d["v0"], {"E": torch.ones(3, dtype=f64, device=dev), "nu": d["nu_body"]}, T, [T])
    with pytest.raises(ValueError, match="controls"):
        simulate(scene, d["x0"], d["v0"], params, T, [T],
                 controls=torch.zeros(1, scene.n_particles, 3, 3, dtype=f64, device=dev))


def test_physical_parameters_module(setup):
    """The nn.Module's forward is simulate() with its parameters; log E gets E * dL/dE.

    The bodies start deformed (F0, C0 of the setup) so that E matters to the loss: with F0 = I and
    a uniform v0 the cubes fly rigidly and dL/dE is rounding noise, which no comparison can judge.
    Atomic P2G adds in a different order on CUDA, so there the two rollouts agree to float64
    roundings summed over the substeps (1e-9 relative), not bit for bit.
    Shown to catch: log E's gradient not multiplied by E (chain rule of the log parameterisation).
    """
    from bridge.modules import PhysicalParameters

    d = setup
    module = PhysicalParameters(d["scene"], E=d["E_body"], nu=d["nu_body"], velocity=(0.1, 0.0, 0.0))
    torch.testing.assert_close(module.E, d["E_body"])
    torch.testing.assert_close(module.nu, d["nu_body"])
    deformed = dict(C0=d["C0"], F0=d["F0"])
    traj = module(d["x0"], T, [T], checkpoint_every=K, **deformed)
    ((traj.x[-1] * d["w_x"][-1]).sum() + (traj.F[-1] * d["w_F"][-1]).sum()).backward()
    E = d["E_body"].clone().requires_grad_()
    v0 = torch.tensor([0.1, 0.0, 0.0], dtype=f64, device=d["x0"].device).expand(d["scene"].n_particles, 3)
    traj = run(d, d["x0"], v0, {"E": E, "nu": d["nu_body"]}, checkpoint_every=K, **deformed)
    ((traj.x[-1] * d["w_x"][-1]).sum() + (traj.F[-1] * d["w_F"][-1]).sum()).backward()
    assert float(E.grad.abs().min() * d["E_body"].min()) > 1e-6  # E matters: the comparison can fail
    rtol = 1e-10 if d["x0"].device.type == "cpu" else 1e-9
    torch.testing.assert_close(module.log_E.grad, E.grad * d["E_body"], rtol=rtol, atol=0)
    assert module.velocity.grad.shape == (2, 3) and torch.isfinite(module.velocity.grad).all()
