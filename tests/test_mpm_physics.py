"""Physics of the MLS-MPM solver on small CPU scenes (res 24-32, a few thousand particles).

All solvers share one float type, so the substep kernels compile once for the whole file.
"""
import numpy as np

from taichi_mpm import Box, Elastic, Fluid, MPMSolver, Plane, Sand, Snow, Sphere, VonMises

GROUND = 0.15  # above the 3-cell wall layer of a res-24 grid, so the plane collider acts
FRAME = 1 / 30


def lattice(lower, upper, spacing):
    axes = [np.arange(lo + spacing / 2, hi, spacing) for lo, hi in zip(lower, upper)]
    return np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)


def ground_solver(**kwargs):
    solver = MPMSolver(res=24, boundary="separate", friction=0.5, **kwargs)
    solver.add_collider(Plane(point=(0, GROUND, 0), normal=(0, 1, 0), friction=0.5, mode="separate"))
    return solver


def momentum(solver):
    return (solver.masses()[:, None] * solver.velocities().astype(np.float64)).sum(axis=0)


def test_momentum_conserved_in_free_flight(ti_arch):
    solver = MPMSolver(res=32, gravity=(0, 0, 0))
    x = lattice((0.4, 0.4, 0.4), (0.6, 0.6, 0.6), 1 / 64)
    center = x.mean(axis=0)
    spin = np.cross([0.0, 0.0, 4.0], x - center)  # rigid spin plus drift: stresses stay small
    stretch = 0.3 * (x - center) * [1, -1, 0]     # plus a shear flow that loads the material
    solver.add_particles(x, Elastic(E=2e4, nu=0.3), velocity=spin + stretch + [0.3, -0.2, 0.1],
                         volume=(1 / 64) ** 3)
    p0 = momentum(solver)
    for _ in range(6):
        solver.step(FRAME)
    p1 = momentum(solver)
    x1 = solver.positions()
    assert np.all(x1 > 0.15) and np.all(x1 < 0.85), "the body touched a wall; the test is not free flight"
    assert np.abs(solver.deformation_gradients() - np.eye(3)).max() > 1e-3, "no stress was exercised"
    np.testing.assert_allclose(p1, p0, atol=1e-5 * np.abs(p0).max())


def test_elastic_cube_bounces_and_settles_without_energy_growth(ti_arch):
    """A rubber-like cube (APIC dissipates little) bounces on the ground; each bounce must lose
    energy, the total energy must never exceed the initial one, and the cube must not sink."""
    solver = ground_solver()
    solver.add_particles(lattice((0.4, 0.3, 0.4), (0.6, 0.5, 0.6), 1 / 48), Elastic(E=3e4, nu=0.3),
                         volume=(1 / 48) ** 3)
    mass = solver.masses()
    rest_height = GROUND + 0.1  # center of mass of the cube resting on the ground

    def energy_above_rest():
        v = solver.velocities().astype(np.float64)
        height = solver.positions()[:, 1] - rest_height
        return (0.5 * (mass * (v ** 2).sum(axis=1)) + 9.8 * mass * height).sum()

    e0 = energy_above_rest()
    heights, energies = [], []
    for _ in range(75):
        solver.step(FRAME)
        heights.append(solver.positions()[:, 1].mean())
        energies.append(energy_above_rest())
        assert solver.positions()[:, 1].min() > GROUND - 1.5 * solver.dx, "cube sank into the ground"
    heights = np.asarray(heights)
    apexes = [heights[i] for i in range(1, len(heights) - 1) if heights[i - 1] < heights[i] >= heights[i + 1]]
    assert len(apexes) >= 3, f"expected at least 3 bounces, saw apexes {apexes}"
    assert np.all(np.diff(apexes) < 0), f"bounce heights do not decay: {apexes}"
    assert max(energies) < 1.01 * e0, "energy grew: the integration is unstable"
    assert energies[-1] < 0.6 * e0, f"energy above rest fell only from {e0:.4g} to {energies[-1]:.4g}"


def pile_after_collapse(material, seconds=1.0):
    solver = ground_solver()
    solver.add_particles(lattice((0.42, GROUND, 0.42), (0.58, 0.42, 0.58), 1 / 48), material,
                         volume=(1 / 48) ** 3)
    for _ in range(int(round(seconds / FRAME))):
        solver.step(FRAME)
    x = solver.positions()
    height = np.percentile(x[:, 1], 99) - GROUND
    radius = np.percentile(np.linalg.norm(x[:, [0, 2]] - 0.5, axis=1), 95)
    return height, radius, solver


def test_sand_column_settles_into_a_pile_with_a_finite_angle(ti_arch):
    height, radius, solver = pile_after_collapse(Sand(E=1e5, friction_angle=35.0))
    angle = np.degrees(np.arctan2(height, radius))
    assert height < 0.30, "the column did not collapse"
    assert 10.0 < angle < 60.0, f"pile angle {angle:.1f} deg"
    assert np.linalg.norm(solver.velocities(), axis=1).mean() < 0.05, "the pile is still flowing"
    low_height, low_radius, _ = pile_after_collapse(Sand(E=1e5, friction_angle=15.0))
    assert np.degrees(np.arctan2(low_height, low_radius)) < angle - 5.0, "friction angle has no effect"


def test_fluid_column_spreads_flat(ti_arch):
    height, radius, _ = pile_after_collapse(Fluid(bulk_modulus=2e4))
    assert height < 0.1, f"fluid still {height:.3f} m high"
    assert radius > 0.25, f"fluid spread only to radius {radius:.3f}"


def test_all_materials_together_stay_finite_and_inside(ti_arch):
    solver = ground_solver()
    block = lattice((0, 0, 0), (0.12, 0.12, 0.12), 1 / 48)
    materials = [Elastic(E=3e4), Elastic(E=3e4, model="neo_hookean"), VonMises(E=3e4, yield_stress=300.0),
                 Snow(E=3e4), Sand(E=5e4), Fluid(bulk_modulus=2e4)]
    for i, material in enumerate(materials):
        offset = [0.2 + 0.22 * (i % 3), 0.2 + 0.2 * (i // 3), 0.45]
        solver.add_particles(block + offset, material, volume=(1 / 48) ** 3)
    for _ in range(10):
        solver.step(FRAME)
    x = solver.positions()
    assert np.all(np.isfinite(x)) and np.all(np.isfinite(solver.deformation_gradients()))
    assert x[:, 1].min() > GROUND - 1.5 * solver.dx
    ids = solver.material_ids()
    plastic = solver.plastic_state()
    # snow hardened or softened somewhere, von Mises yielded (F is no longer a pure rotation-stretch of 1)
    assert np.abs(plastic[ids == 3] - 1.0).max() > 1e-4
    assert np.allclose(solver.deformation_gradients()[ids == 5], np.eye(3) * np.cbrt(
        np.linalg.det(solver.deformation_gradients()[ids == 5]))[:, None, None], atol=1e-5)


def test_sphere_collider_holds_particles_and_moving_box_pushes(ti_arch):
    solver = ground_solver()
    solver.add_collider(Sphere(center=(0.5, 0.3, 0.5), radius=0.1, friction=0.0))
    solver.add_collider(Box(lower=(0.1, GROUND - 0.1, 0.1), upper=(0.2, 0.3, 0.3), velocity=(0.5, 0, 0)))
    on_sphere = lattice((0.45, 0.45, 0.45), (0.55, 0.52, 0.55), 1 / 48)
    in_front_of_box = lattice((0.22, GROUND, 0.15), (0.3, GROUND + 0.06, 0.25), 1 / 48)
    solver.add_particles(on_sphere, Elastic(E=3e4), volume=(1 / 48) ** 3)
    n_first = len(on_sphere)
    solver.add_particles(in_front_of_box, Sand(E=5e4), volume=(1 / 48) ** 3)
    for _ in range(12):
        solver.step(FRAME)
    x = solver.positions()
    distance = np.linalg.norm(x[:n_first] - [0.5, 0.3, 0.5], axis=1)
    assert distance.min() > 0.1 - 1.5 * solver.dx, "particles went through the sphere"
    box_face = 0.2 + 0.5 * solver.time
    assert x[n_first:, 0].min() > box_face - 1.5 * solver.dx, "the moving box did not push the sand"


def test_float64_matches_float32(ti_arch):
    x = lattice((0.4, 0.4, 0.4), (0.6, 0.6, 0.6), 1 / 48)
    runs = []
    for dtype in ("float32", "float64"):
        solver = ground_solver(dtype=dtype)
        solver.add_particles(x, Elastic(E=3e4), velocity=(0, -1, 0), volume=(1 / 48) ** 3)
        solver.step(FRAME, dt=1e-3)
        runs.append(solver.positions())
    assert runs[1].dtype == np.float64
    np.testing.assert_allclose(runs[0], runs[1], atol=1e-5)
