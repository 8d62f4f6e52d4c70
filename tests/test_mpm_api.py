"""MPMSolver API: input guards, runtime failure detection, particle sources, state access, I/O."""
import numpy as np
import pytest
import torch
import trimesh

from taichi_mpm import Elastic, Fluid, MPMSolver, Plane, Sand, SimulationError, Snow, Sphere, VonMises
from taichi_mpm.sampling import EmptyVolumeError

CUBE = np.stack(np.meshgrid(*[np.arange(0.4, 0.6, 1 / 48)] * 3, indexing="ij"), -1).reshape(-1, 3)


@pytest.fixture(scope="module")
def solver(ti_arch):
    s = MPMSolver(res=24, boundary="slip")
    s.add_particles(CUBE, Elastic(E=2e4), velocity=(0.0, -0.5, 0.0), volume=(1 / 48) ** 3)
    return s


# ------------------------------------------------------------------ guards before running
@pytest.mark.parametrize("make, match", [
    (lambda: Elastic(E=0.0), "Elastic.E"),
    (lambda: Elastic(E=-1e4), "Elastic.E"),
    (lambda: Elastic(E=float("nan")), "Elastic.E"),
    (lambda: Elastic(nu=0.5), "Elastic.nu"),
    (lambda: Elastic(nu=-1.0), "Elastic.nu"),
    (lambda: Elastic(density=0.0), "Elastic.density"),
    (lambda: Elastic(model="linear"), "Elastic.model"),
    (lambda: VonMises(yield_stress=-1.0), "VonMises.yield_stress"),
    (lambda: Snow(critical_compression=1.5), "Snow.critical_compression"),
    (lambda: Sand(friction_angle=95.0), "Sand.friction_angle"),
    (lambda: Fluid(bulk_modulus=float("inf")), "Fluid.bulk_modulus"),
    (lambda: Plane(normal=(0, 0, 0)).row(), "Plane.normal"),
    (lambda: Sphere(radius=-0.1).row(), "Sphere.radius"),
    (lambda: Plane(mode="bouncy").row(), "Plane.mode"),
])
def test_material_and_collider_guards_name_the_input(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("kwargs, match", [
    (dict(boundary="bouncy"), "boundary"),
    (dict(dtype="float16"), "dtype"),
    (dict(res=4), "res"),
    (dict(domain=((0, 0, 0), (1, -1, 1))), "domain"),
    (dict(gravity=(0, float("nan"), 0)), "gravity"),
    (dict(friction=-0.1), "friction"),
])
def test_solver_settings_guards(ti_arch, kwargs, match):
    with pytest.raises(ValueError, match=match):
        MPMSolver(**kwargs)


def test_particle_guards_name_the_input(solver):
    n = solver.n_particles
    bad = CUBE.copy()
    bad[7, 1] = np.nan
    with pytest.raises(ValueError, match=r"positions contains NaN or Inf \(first at index 7"):
        solver.add_particles(bad, Elastic())
    bad[7, 1] = 0.99
    with pytest.raises(ValueError, match=r"positions\[7\].*outside the valid domain"):
        solver.add_particles(bad, Elastic())
    velocity = np.zeros_like(CUBE)
    velocity[3] = np.inf
    with pytest.raises(ValueError, match="velocity contains NaN or Inf"):
        solver.add_particles(CUBE, Elastic(), velocity=velocity)
    with pytest.raises(ValueError, match="positions must have shape"):
        solver.add_particles(CUBE[:, :2], Elastic())
    with pytest.raises(ValueError, match="E must be > 0"):
        solver.add_particles(CUBE, Elastic(), E=np.full(len(CUBE), -5.0))
    with pytest.raises(ValueError, match="nu must lie in"):
        solver.add_particles(CUBE, Elastic(), nu=0.7)
    with pytest.raises(TypeError, match="material"):
        solver.add_particles(CUBE, "rubber")
    with pytest.raises(ValueError, match="frame_dt"):
        solver.step(float("nan"))
    with pytest.raises(ValueError, match="dt must be"):
        solver.step(0.01, dt=-1.0)
    assert solver.n_particles == n, "a rejected call changed the solver"


def test_max_particles_is_enforced(ti_arch):
    s = MPMSolver(res=24, max_particles=10)
    with pytest.raises(ValueError, match="max_particles"):
        s.add_particles(CUBE, Elastic())


# ------------------------------------------------------------------ failures while running
def test_unstable_forced_dt_raises_simulation_error_naming_the_substep(ti_arch):
    s = MPMSolver(res=24)
    s.add_particles(CUBE, Elastic(E=1e8), velocity=(0.0, -1.0, 0.0), volume=(1 / 48) ** 3)
    assert s.stable_dt() < 1e-4
    with pytest.raises(SimulationError, match=r"substep \d+"):
        for _ in range(20):
            s.step(1 / 30, dt=2e-3)


def test_nan_state_is_detected(ti_arch):
    s = MPMSolver(res=24)
    s.add_particles(CUBE, Elastic(E=2e4), volume=(1 / 48) ** 3)
    s.state["v"][s.src, 5, 0] = float("nan")  # corrupt the state behind the solver's back
    with pytest.raises(SimulationError, match=r"substep 0 .*particle 5"):
        s.step(1 / 60)


@pytest.mark.parametrize("field,value", [("x", 2.0), ("x", float("nan")), ("v", float("inf")), ("v", -1e16)],
                         ids=["outside", "nan position", "inf velocity", "runaway velocity"])
def test_check_names_the_one_bad_particle(ti_arch, field, value):
    s = MPMSolver(res=24)
    s.add_particles(CUBE, Elastic(E=2e4), volume=(1 / 48) ** 3)
    assert s.check() == 0.0
    s.state[field][s.src, 7, 1] = value
    with pytest.raises(SimulationError, match=r"substep 0 .*: 1 particles have NaN/Inf state or left the valid "
                                              r"domain .* first is particle 7 "):
        s.check()


# ------------------------------------------------------------------ particle sources
def test_add_mesh_fills_a_watertight_mesh_with_its_volume(ti_arch):
    s = MPMSolver(res=24)
    mesh = trimesh.creation.icosphere(subdivisions=3, radius=1.0)
    n = s.add_mesh(mesh, Elastic(), particles_per_cell=8, scale=0.2, translation=(0.5, 0.5, 0.5))
    spacing = s.dx / 2
    assert n == s.n_particles
    np.testing.assert_allclose(n * spacing ** 3, mesh.volume * 0.2 ** 3, rtol=0.05)
    assert np.all(np.linalg.norm(s.positions() - 0.5, axis=1) < 0.2 + 1e-6)


def test_add_mesh_from_obj_file_and_empty_mesh_error(ti_arch, tmp_path):
    s = MPMSolver(res=24)
    path = tmp_path / "box.obj"
    trimesh.creation.box(extents=(0.2, 0.1, 0.2)).export(path)
    n = s.add_mesh(path, Sand(), translation=(0.5, 0.3, 0.5))
    np.testing.assert_allclose(n * (s.dx / 2) ** 3, 0.2 * 0.1 * 0.2, rtol=0.1)
    sheet = trimesh.Trimesh(vertices=[[0, 0, 0], [1, 0, 0], [0, 1, 0]], faces=[[0, 1, 2]])
    with pytest.raises(EmptyVolumeError):
        s.add_mesh(sheet, Elastic(), scale=0.2, translation=(0.4, 0.4, 0.4))
    assert s.n_particles == n


def test_add_cube_and_sphere(ti_arch):
    s = MPMSolver(res=24)
    n_cube = s.add_cube((0.3, 0.3, 0.3), (0.2, 0.2, 0.2), Elastic(), velocity=(1, 0, 0))
    n_ball = s.add_sphere((0.6, 0.6, 0.6), 0.1, Snow())
    spacing = s.dx / 2
    np.testing.assert_allclose(n_cube * spacing ** 3, 0.008, rtol=0.1)
    np.testing.assert_allclose(n_ball * spacing ** 3, 4 / 3 * np.pi * 0.1 ** 3, rtol=0.1)
    np.testing.assert_allclose(s.velocities()[:n_cube], np.tile([1.0, 0, 0], (n_cube, 1)))
    assert np.all(s.plastic_state()[n_cube:] == 1.0), "snow starts with Jp = 1"


# ------------------------------------------------------------------ state access and I/O
def test_torch_getters_are_zero_copy_views(solver):
    x = solver.positions(as_torch=True)
    assert isinstance(x, torch.Tensor) and x.shape == (solver.n_particles, 3)
    assert x.data_ptr() == solver.state["x"][solver.src].data_ptr()
    np.testing.assert_array_equal(x.cpu().numpy(), solver.positions())
    assert solver.deformation_gradients().shape == (solver.n_particles, 3, 3)
    assert solver.affine_velocities().shape == (solver.n_particles, 3, 3)
    assert solver.material_ids().dtype == np.int32


def test_save_load_roundtrip_continues_identically(solver, tmp_path):
    solver.step(1 / 60)
    path = solver.save_state(tmp_path / "state")
    solver.step(1 / 60)
    expected = solver.positions()[np.argsort(solver.particle_ids())]
    solver.load_state(path)
    solver.step(1 / 60)
    got = solver.positions()[np.argsort(solver.particle_ids())]  # storage order may change (sorting)
    np.testing.assert_allclose(got, expected, atol=1e-6)  # atomics may reorder sums


def test_load_state_after_a_failed_run_starts_from_a_clear_grid(solver, tmp_path):
    """The forward grid update leaves empty nodes alone, so what a blown-up run left in the grid
    must not survive load_state. Shown to catch load_state without its grid reset."""
    path = solver.save_state(tmp_path / "good")
    for t in (solver.grid_mv, solver.grid_m, solver.grid_v):
        t.fill_(float("nan"))
    solver.load_state(path)
    assert all(torch.equal(t, torch.zeros_like(t)) for t in (solver.grid_mv, solver.grid_m, solver.grid_v))
    solver.step(1 / 60)
    assert np.isfinite(solver.positions()).all()


def test_export_ply_is_readable(solver, tmp_path):
    path = solver.export_ply(tmp_path / "frames" / "0000.ply")
    cloud = trimesh.load(path)
    np.testing.assert_allclose(np.asarray(cloud.vertices), solver.positions(), rtol=1e-6)


def test_cfl_substeps_follow_the_wave_speed(ti_arch):
    soft, stiff = MPMSolver(res=24), MPMSolver(res=24)
    soft.add_particles(CUBE, Elastic(E=1e4), volume=(1 / 48) ** 3)
    stiff.add_particles(CUBE, Elastic(E=4e4), volume=(1 / 48) ** 3)
    n_soft, n_stiff = soft.step(1 / 60), stiff.step(1 / 60)
    assert n_stiff >= 2 * n_soft - 1  # wave speed doubles with 4x stiffness
    assert n_soft >= int(np.ceil(1 / 60 / soft.stable_dt(0.0)))
    assert soft.time == pytest.approx(1 / 60)


def test_sorting_by_cell_keeps_the_simulation_the_same(ti_arch):
    rng = np.random.default_rng(0)
    shuffled = CUBE[rng.permutation(len(CUBE))]
    runs = []
    for sort_every in (0, 4):
        s = MPMSolver(res=24, sort_every=sort_every)
        s.add_particles(shuffled, Elastic(E=2e4), velocity=(0.3, 0.0, 0.0), volume=(1 / 48) ** 3)
        s.step(1 / 30)
        order = np.argsort(s.particle_ids())
        runs.append(s.positions()[order])
    np.testing.assert_allclose(runs[0], runs[1], atol=1e-5)


def test_sorted_warps_hold_particles_of_distinct_cells(ti_arch):
    """After sort_particles, every run of 32 particles (a warp) inside the cube sits in 32 different
    stencil cells, whatever the input order; its cells lie within one SORT_BLOCK; shuffled and lattice
    input end in the same order. Shown to catch the stable sort by cell blocks alone (nearly every
    warp then repeats cells) and the rank in the cell taken in input order (the orders differ)."""
    from taichi_mpm.solver import SORT_BLOCK

    spacing = 1 / 128  # 2 particles a cell per axis: lowest stencil nodes 16..47, whole sort blocks
    axis = 16.5 / 64 + spacing * (np.arange(64) + 0.5)
    cube = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
    s = MPMSolver(res=64)
    s.add_particles(cube[np.random.default_rng(1).permutation(len(cube))], Elastic(), volume=spacing ** 3)
    s.sort_particles()
    base = np.floor(s.positions() / s.dx - 0.5).astype(np.int64)
    warps = base.reshape(-1, 32, 3)
    distinct = [len(np.unique(w, axis=0)) for w in warps]
    assert min(distinct) == 32
    assert all((np.ptp(w // np.asarray(SORT_BLOCK), axis=0) == 0).all() for w in warps)
    np.testing.assert_array_equal(np.sort(s.particle_ids()), np.arange(len(cube)))
    lattice = MPMSolver(res=64)  # the same particles in lattice order sort to the same sequence
    lattice.add_particles(cube, Elastic(), volume=spacing ** 3)
    lattice.sort_particles()
    np.testing.assert_array_equal(lattice.positions(), s.positions())


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_sort_particles_moves_every_field_with_its_particle(ti_arch, dtype):
    """Every per-particle array (state and constants, rows of 1 to 9 values) follows its particle
    through sort_particles. Shown to catch the 1-D gather of 16-byte rows (aux) with a wrong row
    stride, which the simulation test above misses (one material: every aux row alike)."""
    from taichi_mpm.solver import CONSTANT_KEYS, STATE_KEYS

    rng = np.random.default_rng(2)
    s = MPMSolver(res=24, dtype=dtype)
    s.add_particles(CUBE[rng.permutation(len(CUBE))], Elastic(), volume=(1 / 48) ** 3)
    for key in STATE_KEYS + CONSTANT_KEYS:
        if key not in ("x", "id"):  # x decides the order; id is how we find each particle again
            t = s.state[key][s.src] if key in STATE_KEYS else s.state[key]
            t.copy_(torch.as_tensor(rng.integers(0, 1000, t.shape), dtype=t.dtype))
    before = {key: s._get(key, False) for key in STATE_KEYS + CONSTANT_KEYS}
    s.sort_particles()
    ids = s.particle_ids()
    assert not np.array_equal(ids, before["id"])  # the order did change
    for key, values in before.items():
        np.testing.assert_array_equal(s._get(key, False), values[np.argsort(before["id"])][ids], err_msg=key)


def test_live_gravity_and_elastic_parameters(ti_arch):
    """set_gravity acts on the next substep; set_elastic_parameters changes the selected particles
    and recomputes the CFL wave speed over every particle (a softer body gives longer substeps).
    Shown to catch: a wave speed kept at its old maximum, and a gravity change that never reaches
    the kernels."""
    s = MPMSolver(res=16, gravity=(0.0, 0.0, 0.0))
    s.add_cube((0.3, 0.4, 0.3), (0.2, 0.2, 0.2), Elastic(E=1e5, nu=0.3), particles_per_cell=1)
    s.add_cube((0.6, 0.4, 0.6), (0.1, 0.1, 0.1), Elastic(E=1e4, nu=0.3), particles_per_cell=1, seed=1)
    stiff = s.state["E"] == 1e5
    before = s.max_wave_speed
    s.set_elastic_parameters(stiff, 2e3, 0.2)
    assert torch.all(s.state["E"][stiff] == 2e3) and torch.allclose(s.state["nu"][stiff], s.state["nu"].new_tensor(0.2))
    assert s.max_wave_speed == pytest.approx(Elastic(E=1e4, nu=0.3).wave_speed(), rel=1e-6)
    assert s.max_wave_speed < before
    s.set_gravity((0.0, -5.0, 0.0))
    s.step(0.02)
    assert s.velocities()[:, 1].mean() == pytest.approx(-0.1, rel=0.05)
    with pytest.raises(ValueError, match="bool mask"):
        s.set_elastic_parameters(torch.ones(3, dtype=torch.bool), 1e4, 0.3)
    with pytest.raises(ValueError, match="nu"):
        s.set_elastic_parameters(stiff, 1e4, 0.5)
    with pytest.raises(ValueError, match="gravity"):
        s.set_gravity((0.0, float("nan"), 0.0))
