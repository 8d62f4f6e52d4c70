"""Particle sampling: volumes, open meshes, transforms, errors, determinism, shipped assets."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import trimesh

from taichi_mpm.sampling import (
    MAX_POINTS,
    EmptyVolumeError,
    MeshFit,
    fit_transform,
    load_mesh,
    sample_box,
    sample_mesh,
    sample_sphere,
)
from taichi_mpm.sampling import _winding_number as winding_number  # the exact sum is the reference

ASSETS = Path(__file__).resolve().parents[1] / "scenes" / "assets"
SPACING = 0.03


def rotation_about(axis, angle: float) -> np.ndarray:
    return trimesh.transformations.rotation_matrix(angle, axis)[:3, :3]


@pytest.fixture(scope="module")
def sphere() -> trimesh.Trimesh:
    return trimesh.creation.icosphere(subdivisions=3, radius=0.5)


@pytest.fixture(scope="module")
def box() -> trimesh.Trimesh:
    return trimesh.creation.box(extents=(0.4, 0.2, 0.3))


# --------------------------------------------------------------------------- winding number


def test_tree_winding_number_matches_exact_sum():
    """The tree (dipole far field) against the exact solid-angle sum, on random and near-surface points."""
    mesh = trimesh.creation.torus(major_radius=0.35, minor_radius=0.15, major_sections=48, minor_sections=24)
    rng = np.random.default_rng(3)
    near, _ = trimesh.sample.sample_surface(mesh, 500, seed=3)
    points = np.vstack([rng.uniform(-0.6, 0.6, (1500, 3)), near + rng.normal(0.0, 0.01, near.shape)])
    exact = winding_number(mesh.triangles, points, exact=True)
    approx = winding_number(mesh.triangles, points)
    assert np.abs(approx - exact).max() < 0.1
    # closed mesh: the exact winding number is 0 or 1 away from the surface
    assert np.all(np.minimum(np.abs(exact), np.abs(exact - 1.0)) < 1e-6)


# --------------------------------------------------------------------------- volumes


@pytest.mark.parametrize(
    "make",
    [
        lambda: trimesh.creation.icosphere(subdivisions=3, radius=0.5),
        lambda: trimesh.creation.torus(major_radius=0.35, minor_radius=0.15, major_sections=48, minor_sections=24),
        lambda: trimesh.creation.box(extents=(0.4, 0.2, 0.3)),
    ],
    ids=["sphere", "torus", "box"],
)
def test_sampled_volume_matches_watertight_mesh(make):
    mesh = make()
    points = sample_mesh(mesh, SPACING)
    assert points.dtype == np.float64 and points.shape[1] == 3
    assert len(points) * SPACING**3 == pytest.approx(mesh.volume, rel=0.02)
    lower, upper = mesh.bounds
    assert np.all(points >= lower - 1e-12) and np.all(points <= upper + 1e-12)


def test_inverted_mesh_is_filled_too(sphere):
    inverted = sphere.copy()
    inverted.invert()
    assert len(sample_mesh(inverted, SPACING)) == len(sample_mesh(sphere, SPACING))


def test_overlapping_parts_count_once():
    first = trimesh.creation.box(extents=(0.4, 0.4, 0.4))
    second = first.copy()
    second.apply_translation([0.2, 0.0, 0.0])
    union = trimesh.util.concatenate([first, second])  # winding number 2 where they overlap
    points = sample_mesh(union, 0.04)
    assert len(points) * 0.04**3 == pytest.approx(0.6 * 0.4 * 0.4, rel=0.02)


def test_box_and_sphere_primitives():
    points = sample_box((0.1, 0.2, 0.3), (0.5, 0.4, 0.45), 0.02)
    assert len(points) * 0.02**3 == pytest.approx(0.4 * 0.2 * 0.15, rel=0.02)
    assert np.all(points >= (0.1, 0.2, 0.3)) and np.all(points < (0.5, 0.4, 0.45))
    center = np.array([0.5, 0.5, 0.5])
    ball = sample_sphere(center, 0.2, 0.02)
    assert len(ball) * 0.02**3 == pytest.approx(4.0 / 3.0 * np.pi * 0.2**3, rel=0.02)
    assert np.all(np.linalg.norm(ball - center, axis=1) < 0.2)


def test_shapes_share_the_world_lattice():
    """Without jitter every point is a cell centre (i + 0.5) * spacing, whatever the shape."""
    h = 0.05
    for points in (sample_box((0.03, 0.0, 0.0), (0.5, 0.3, 0.2), h, jitter=False),
                   sample_sphere((0.31, 0.2, 0.1), 0.2, h, jitter=False),
                   sample_mesh(trimesh.creation.icosphere(2, 0.3), h, translation=(0.1, 0.2, 0.3), jitter=False)):
        cells = points / h - 0.5
        assert np.allclose(cells, np.round(cells), atol=1e-9)


# --------------------------------------------------------------------------- open meshes


def test_open_sphere_is_filled_as_its_ball():
    mesh = load_mesh(ASSETS / "open_sphere.obj")
    assert not mesh.is_watertight
    points = sample_mesh(mesh, SPACING)
    assert np.all(np.linalg.norm(points, axis=1) < 0.5)
    closed_volume = trimesh.creation.icosphere(subdivisions=4, radius=0.5).volume
    assert len(points) * SPACING**3 == pytest.approx(closed_volume, rel=0.05)
    # a ray-parity test would leave it empty or full of holes; the centre region must be solid
    core = np.linalg.norm(points, axis=1) < 0.3
    assert core.sum() * SPACING**3 == pytest.approx(4.0 / 3.0 * np.pi * 0.3**3, rel=0.05)


def test_open_sheet_raises_empty_volume():
    triangle = trimesh.Trimesh([[0, 0, 0], [1, 0, 0], [0, 1, 0.2]], [[0, 1, 2]], process=False)
    with pytest.raises(EmptyVolumeError, match="winding number"):
        sample_mesh(triangle, 0.05)
    # (a curved open cap is not empty: its winding number passes 0.5 in the lens under it)


def test_flat_and_degenerate_meshes_raise_empty_volume():
    plane = trimesh.Trimesh([[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0]], [[0, 1, 2], [0, 2, 3]], process=False)
    with pytest.raises(EmptyVolumeError, match="flat"):
        sample_mesh(plane, 0.05)
    degenerate = trimesh.Trimesh([[0, 0, 0], [1, 1, 1], [2, 2, 2]], [[0, 1, 2]], process=False)
    with pytest.raises(EmptyVolumeError, match="zero area"):
        sample_mesh(degenerate, 0.05)


def test_mesh_thinner_than_spacing_raises_empty_volume(box):
    with pytest.raises(EmptyVolumeError, match="thinner"):
        sample_mesh(box, 1.0, translation=(0.5, 0.5, 0.5))


# --------------------------------------------------------------------------- transforms


def test_scale_rotation_translation_are_applied(box):
    scale = np.array([2.0, 1.0, 0.5])
    rotation = rotation_about([1.0, 2.0, 3.0], 0.7)
    translation = np.array([5.0, -2.0, 1.0])
    points = sample_mesh(box, 0.02, scale=scale, rotation=rotation, translation=translation)
    local = (points - translation) @ rotation / scale  # back into the mesh frame
    half = np.array([0.2, 0.1, 0.15])
    assert np.all(np.abs(local) <= half + 1e-9)
    assert len(points) * 0.02**3 == pytest.approx(np.prod(2 * half * scale), rel=0.03)


def test_uniform_scale_and_quarter_turn(box):
    points = sample_mesh(box, 0.02, scale=2.0, rotation=rotation_about([0, 0, 1], np.pi / 2))
    extent = points.max(axis=0) - points.min(axis=0)
    assert np.allclose(extent, [0.4, 0.8, 0.6], atol=0.04)  # x and y swapped by the turn


# --------------------------------------------------------------------------- determinism


def test_same_seed_same_points_other_seed_other_points(sphere):
    first = sample_mesh(sphere, 0.05, seed=4)
    assert np.array_equal(first, sample_mesh(sphere, 0.05, seed=4))
    assert not np.array_equal(first, sample_mesh(sphere, 0.05, seed=5))
    assert np.array_equal(sample_box((0, 0, 0), (1, 1, 1), 0.1, seed=2), sample_box((0, 0, 0), (1, 1, 1), 0.1, seed=2))


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"spacing": 0.0}, ValueError, "spacing"),
        ({"spacing": -0.1}, ValueError, "spacing"),
        ({"spacing": float("nan")}, ValueError, "spacing"),
        ({"spacing": float("inf")}, ValueError, "spacing"),
        ({"spacing": "0.1"}, TypeError, "spacing"),
        ({"spacing": True}, TypeError, "spacing"),
        ({"scale": 0.0}, ValueError, "scale"),
        ({"scale": (1.0, -1.0, 1.0)}, ValueError, "scale"),
        ({"scale": (1.0, 1.0)}, ValueError, "scale"),
        ({"scale": (1.0, np.nan, 1.0)}, ValueError, "scale"),
        ({"rotation": np.eye(2)}, ValueError, "rotation"),
        ({"rotation": 2.0 * np.eye(3)}, ValueError, "rotation"),
        ({"rotation": np.diag([1.0, 1.0, -1.0])}, ValueError, "rotation.*reflection"),
        ({"rotation": np.full((3, 3), np.nan)}, ValueError, "rotation"),
        ({"translation": (0.0, 1.0)}, ValueError, "translation"),
        ({"translation": (0.0, np.inf, 0.0)}, ValueError, "translation"),
        ({"translation": "abc"}, TypeError, "translation"),
        ({"seed": 1.5}, TypeError, "seed"),
        ({"spacing": 1e-5}, ValueError, "limit of 50,000,000"),
    ],
)
def test_invalid_arguments_are_named(sphere, kwargs, error, message):
    arguments = {"spacing": 0.1, **kwargs}
    with pytest.raises(error, match=message):
        sample_mesh(sphere, **arguments)


def test_point_limit_is_checked_before_allocating():
    assert MAX_POINTS == 50_000_000
    with pytest.raises(ValueError, match="larger spacing"):
        sample_box((0, 0, 0), (1, 1, 1), 1e-3 / 2)  # 8e9 cells: would need ~190 GB


def test_bad_sources_are_reported(tmp_path, sphere):
    with pytest.raises(FileNotFoundError, match="not found"):
        sample_mesh(tmp_path / "missing.obj", 0.1)
    points_only = tmp_path / "points.obj"
    points_only.write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\n")
    with pytest.raises(ValueError, match="no triangle"):
        load_mesh(points_only)
    garbage = tmp_path / "garbage.stl"
    garbage.write_bytes(b"\x00\x01 not a mesh")
    with pytest.raises(ValueError):
        load_mesh(garbage)
    with pytest.raises(TypeError, match="source"):
        load_mesh(42)
    broken = sphere.copy()
    broken.vertices[0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        sample_mesh(broken, 0.1)


def test_primitive_arguments_are_validated():
    with pytest.raises(ValueError, match="upper must exceed lower"):
        sample_box((0, 0, 0), (1, 0, 1), 0.1)
    with pytest.raises(ValueError, match="lower"):
        sample_box((0, 0), (1, 1, 1), 0.1)
    with pytest.raises(ValueError, match="radius"):
        sample_sphere((0, 0, 0), -1.0, 0.1)
    with pytest.raises(ValueError, match="center"):
        sample_sphere((0, 0, np.nan), 1.0, 0.1)
    with pytest.raises(EmptyVolumeError):
        sample_sphere((0.5, 0.5, 0.5), 0.01, 1.0)


def test_scene_files_are_concatenated(tmp_path):
    scene = trimesh.Scene()
    scene.add_geometry(trimesh.creation.box(extents=(0.2, 0.2, 0.2)))
    scene.add_geometry(trimesh.creation.box(extents=(0.2, 0.2, 0.2)),
                       transform=trimesh.transformations.translation_matrix([1.0, 0.0, 0.0]))
    path = tmp_path / "two_boxes.glb"
    scene.export(path)
    mesh = load_mesh(path)
    assert len(mesh.faces) == 24
    assert mesh.bounds[1, 0] == pytest.approx(1.1)
    assert len(sample_mesh(path, 0.02)) * 0.02**3 == pytest.approx(2 * 0.2**3, rel=0.03)


# --------------------------------------------------------------------------- shipped assets


ASSET_NAMES = ["jelly", "torus", "open_sphere", "teapot_like", "morph_sphere", "morph_peanut", "checker_cube"]


@pytest.mark.parametrize("name", ASSET_NAMES)
def test_every_asset_loads_and_samples(name):
    path = ASSETS / f"{name}.obj"
    assert path.stat().st_size < 300_000
    mesh = load_mesh(path)
    points = sample_mesh(mesh, 0.04)
    assert len(points) > 100
    if name not in ("open_sphere", "teapot_like"):  # open; self-overlapping parts
        assert len(points) * 0.04**3 == pytest.approx(mesh.volume, rel=0.05)


def test_textured_cube_brings_its_texture():
    mesh = load_mesh(ASSETS / "checker_cube.obj")
    assert isinstance(mesh.visual, trimesh.visual.TextureVisuals)
    assert mesh.visual.uv.shape == (len(mesh.vertices), 2)
    assert mesh.visual.material.image.size == (192, 128)


def test_morph_pair_has_equal_volumes_and_one_genus():
    source = load_mesh(ASSETS / "morph_sphere.obj")
    target = load_mesh(ASSETS / "morph_peanut.obj")
    assert source.is_watertight and target.is_watertight
    assert source.euler_number == target.euler_number == 2
    assert target.volume == pytest.approx(source.volume, rel=0.01)
    assert len(sample_mesh(target, 0.02)) == pytest.approx(len(sample_mesh(source, 0.02)), rel=0.03)


def test_assets_are_reproducible(tmp_path):
    spec = importlib.util.spec_from_file_location("make_assets", ASSETS / "make_assets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(tmp_path)
    for path in sorted(tmp_path.iterdir()):
        assert path.read_bytes() == (ASSETS / path.name).read_bytes(), path.name


# --------------------------------------------------------------------------- bring your own mesh: fitting


DOWNLOADED_LIKE = ["bunny_like", "teapot_raw"]  # odd units, origin elsewhere, not watertight


def test_fit_transform_centres_and_sizes_the_bounding_box(box):
    """Shown to catch: centring on the lower corner instead of the box middle; dividing by the smallest side."""
    rotation = rotation_about([0.0, 0.0, 1.0], 0.3)
    vertices = box.vertices * 7.0 + (3.0, -2.0, 11.0)
    fit = MeshFit((0.4, 0.5, 0.6), 0.3)
    scale, translation = fit_transform(vertices, fit, rotation=rotation)
    placed = (vertices * scale) @ rotation.T + translation
    lower, upper = placed.min(axis=0), placed.max(axis=0)
    np.testing.assert_allclose((lower + upper) / 2, fit.center, atol=1e-12)
    assert np.max(upper - lower) == pytest.approx(0.3, rel=1e-12)
    # size None keeps the given scale and only moves the centre
    scale, translation = fit_transform(vertices, MeshFit((0.0, 0.0, 0.0)), scale=2.0)
    np.testing.assert_allclose(scale, 2.0)
    placed = vertices * 2.0 + translation
    np.testing.assert_allclose((placed.min(axis=0) + placed.max(axis=0)) / 2, 0.0, atol=1e-9)


@pytest.mark.parametrize("name", DOWNLOADED_LIKE)
def test_downloaded_like_assets_are_off_centre_odd_units_and_open(name):
    path = ASSETS / f"{name}.obj"
    assert path.stat().st_size < 60_000
    mesh = load_mesh(path)
    assert not mesh.is_watertight
    extent = np.max(mesh.bounds[1] - mesh.bounds[0])
    middle = mesh.bounds.mean(axis=0)
    assert not 0.5 < extent < 2.0  # not unit-sized
    assert np.linalg.norm(middle) > 0.05 * extent  # origin away from the middle


@pytest.mark.parametrize("name", DOWNLOADED_LIKE)
def test_sample_mesh_with_fit_lands_where_asked(name):
    """Shown to catch: fit ignored (points stay in the mesh's own units and origin)."""
    points = sample_mesh(ASSETS / f"{name}.obj", 0.02, fit=((0.5, 0.5, 0.5), 0.5))
    lower, upper = points.min(axis=0), points.max(axis=0)
    assert np.all(lower >= 0.25 - 1e-9) and np.all(upper <= 0.75 + 1e-9)
    assert np.max(upper - lower) > 0.8 * 0.5  # thin tips (the spout) hold no lattice point
    assert len(points) > 1000


@pytest.mark.parametrize("name", DOWNLOADED_LIKE)
def test_add_mesh_default_fit_puts_downloaded_meshes_in_the_domain(name, ti_arch):
    from taichi_mpm import Elastic, MPMSolver

    solver = MPMSolver(res=24)
    n = solver.add_mesh(ASSETS / f"{name}.obj", Elastic())
    assert n >= MPMSolver.MIN_MESH_PARTICLES
    x = solver.positions()
    assert np.all(x >= solver.valid_lower) and np.all(x <= solver.valid_upper)
    middle = (x.min(axis=0) + x.max(axis=0)) / 2
    np.testing.assert_allclose(middle, (solver.valid_lower + solver.valid_upper) / 2, atol=2 * solver.dx)


@pytest.mark.parametrize("suffix", [".stl", ".ply"])
def test_add_mesh_default_fit_reads_stl_and_ply_meshes(suffix, tmp_path, ti_arch):
    from taichi_mpm import Elastic, MPMSolver

    path = tmp_path / f"teapot{suffix}"
    load_mesh(ASSETS / "teapot_raw.obj").export(path)
    solver = MPMSolver(res=24)
    assert solver.add_mesh(path, Elastic()) >= MPMSolver.MIN_MESH_PARTICLES
    x = solver.positions()
    assert np.all(x >= solver.valid_lower) and np.all(x <= solver.valid_upper)


def test_add_mesh_in_raw_units_gives_a_clear_warning_or_error_with_the_fix(ti_arch):
    """The Stanford-bunny bug: metres placed with scale 1 give a handful of particles.
    Shown to catch: the check removed (the 30-particle bunny added silently)."""
    from taichi_mpm import Elastic, MPMSolver

    with pytest.raises(ValueError, match=r"only \d+ particles.*fit"):  # ~30 particles: certainly wrong
        MPMSolver(res=16).add_mesh(ASSETS / "bunny_like.obj", Elastic(), translation=(0.5, 0.4, 0.5))
    solver = MPMSolver(res=24)
    with pytest.warns(UserWarning, match=r"only \d+ particles.*fit"):  # ~100: probably wrong
        n = solver.add_mesh(ASSETS / "bunny_like.obj", Elastic(), translation=(0.5, 0.4, 0.5))
    assert 32 <= n < 256
    solver = MPMSolver(res=24)
    with pytest.raises(ValueError, match="translation or fit"):
        solver.add_mesh(ASSETS / "bunny_like.obj", Elastic(), translation=(0.5, 0.4, 0.5), fit=((0.5,) * 3, 0.3))
    assert solver.n_particles == 0
    # an explicit fit and the units-only placement both work
    assert solver.add_mesh(ASSETS / "bunny_like.obj", Elastic(), fit=((0.5, 0.4, 0.5), 0.4)) > 256
    assert solver.add_mesh(ASSETS / "teapot_raw.obj", Elastic(), scale=0.1) > 256


def test_forced_dt_error_reports_cells_per_substep_at_that_dt(ti_arch):
    """Shown to catch: the cells computed from the (shortened) substep h instead of the forced dt."""
    from taichi_mpm import Elastic, MPMSolver
    from taichi_mpm.solver import SimulationError

    solver = MPMSolver(res=16)
    solver.add_cube((0.4, 0.4, 0.4), (0.2, 0.2, 0.2), Elastic(E=1e3), velocity=(0.0, -8.0, 0.0))
    dt = 0.1  # larger than the frame: the only substep is shortened to the frame length 1/60
    with pytest.raises(SimulationError) as info:
        solver.step(1 / 60, dt=dt)
    cells = float(info.value.args[0].split(" cells per substep")[0].split()[-1])
    assert cells == pytest.approx(solver.last_max_speed * dt / solver.dx, rel=1e-2)
