"""PhysicsScene: shapes, gradients to every learnable parameter, fixed parameters, a PLY body,
cameras that see nothing, bad input."""
import math

import numpy as np
import pytest
import torch

from bridge.physics_scene import Body, PhysicsScene
from bridge.upsampling import SurfaceConfig
from render.camera import Camera
from render.ply import GaussianPly, write_ply
from scenes import ASSETS

W, H = 32, 24


def camera(eye=(0.5, 0.4, 1.3), target=(0.5, 0.25, 0.5)):
    return Camera.look_at(eye, target, up=(0.0, 1.0, 0.0), width=W, height=H, fov_y_degrees=45.0)


@pytest.fixture(scope="module")
def scene(ti_arch):
    body = Body(ASSETS / "checker_cube.obj", E=2e4, nu=0.3, velocity=(0.4, -0.5, 0.0), size=0.2,
                center=(0.45, 0.25, 0.5), surface=SurfaceConfig(n_gaussians=800, flatten=0.5))
    return PhysicsScene([body], res=16, particles_per_cell=2)


def test_forward_shapes_and_every_learnable_parameter_gets_a_gradient(scene):
    """Shown to catch: the initial velocity detached in PhysicsScene.initial_velocity."""
    images, alphas, depths = scene([camera(), camera(eye=(1.3, 0.4, 0.5))], [0, 2, 4])
    alphas = alphas.detach()
    assert images.shape == (3, 2, H, W, 3) and alphas.shape == (3, 2, H, W, 1) and depths.shape == (3, 2, H, W, 1)
    assert float(alphas.max()) > 0.9 and float(alphas.min()) < 0.01  # the body is in view, not filling it
    seen = alphas[..., 0] > 0.5
    d = depths.detach()[..., 0][seen]
    assert float(d.min()) > 0.4 and float(d.max()) < 1.2  # expected depth around the camera distance
    assert not torch.equal(images[0], images[-1])  # it moved
    (images.mean() + depths.mean()).backward()
    names = {n for n, _ in scene.named_parameters()}
    assert names == {"materials.0.log_E", "materials.0.nu_logit", "materials.0.velocity",
                     "renderers.0.log_sigma0", "renderers.0.log_thickness"}
    for name, p in scene.named_parameters():
        assert p.grad is not None and bool(torch.isfinite(p.grad).all()) and float(p.grad.abs().sum()) > 0, name
    scene.zero_grad()


def test_fixed_parameters_are_buffers_and_e_max_is_enforced(ti_arch):
    body = Body(ASSETS / "checker_cube.obj", E=1e4, nu=0.25, size=0.15, center=(0.5, 0.3, 0.5), learn=("velocity",),
                learn_surface=(), surface=SurfaceConfig(n_gaussians=100))
    s = PhysicsScene([body], res=16, particles_per_cell=1, E_max=2e4)
    assert [n for n, _ in s.named_parameters()] == ["materials.0.velocity"]
    assert math.isclose(s.materials[0].E.item(), 1e4, rel_tol=1e-6)
    assert math.isclose(s.materials[0].nu.item(), 0.25, rel_tol=1e-6)
    with torch.no_grad():
        s.materials[0].log_E.fill_(math.log(3e4))
    with pytest.raises(ValueError, match="E_max"):
        s([camera()], [1])


def test_cameras_that_see_nothing_give_the_background(scene):
    away = camera(eye=(0.5, 0.4, 1.3), target=(0.5, 0.4, 3.0))  # looking away from the body
    images, alphas, depths = scene([away], [0, 1])
    assert torch.all(alphas == 0) and torch.all(depths == 0)
    assert torch.allclose(images, torch.ones_like(images))


def test_a_3dgs_ply_body_renders_and_differentiates(tmp_path, ti_arch):
    rng = np.random.default_rng(0)
    n = 600
    normals = rng.normal(size=(n, 3))
    normals /= np.linalg.norm(normals, axis=1, keepdims=True)
    ply = GaussianPly(normals.astype(np.float32), rng.normal(scale=0.3, size=(n, 4, 3)).astype(np.float32),
                      np.full(n, 3.0, np.float32), np.full((n, 3), np.log(0.15), np.float32),
                      np.tile([1.0, 0, 0, 0], (n, 1)).astype(np.float32))
    write_ply(tmp_path / "ball.ply", ply)
    body = Body(tmp_path / "ball.ply", E=2e4, nu=0.3, size=0.2, center=(0.5, 0.25, 0.5), learn=("E", "velocity"))
    s = PhysicsScene([body], res=16, particles_per_cell=2)
    images, alphas, _ = s([camera()], [0, 3])
    assert float(alphas.detach().max()) > 0.9
    images.mean().backward()
    assert float(s.materials[0].velocity.grad.abs().sum()) > 0 and float(s.materials[0].log_E.grad.abs()) > 0


def test_frames_batched_gaussians_equal_each_frames(tmp_path, ti_arch):
    """PhysicsScene.gaussians on all frames' states at once (what forward renders in one call)
    equals one state at a time, for a scene of a surface body and a 3DGS body."""
    rng = np.random.default_rng(1)
    n = 200
    normals = rng.normal(size=(n, 3))
    normals /= np.linalg.norm(normals, axis=1, keepdims=True)
    write_ply(tmp_path / "ball.ply", GaussianPly(
        normals.astype(np.float32), rng.normal(scale=0.3, size=(n, 4, 3)).astype(np.float32),
        np.full(n, 3.0, np.float32), np.full((n, 3), np.log(0.15), np.float32),
        np.tile([1.0, 0, 0, 0], (n, 1)).astype(np.float32)))
    s = PhysicsScene([Body(ASSETS / "checker_cube.obj", size=0.15, center=(0.35, 0.25, 0.5),
                           surface=SurfaceConfig(n_gaussians=300)),
                      Body(tmp_path / "ball.ply", size=0.15, center=(0.65, 0.25, 0.5))], res=16, particles_per_cell=2)
    traj = s.simulate([1, 3])
    batched = s.gaussians(traj.x, traj.F)
    frames = [s.gaussians(x, F) for x, F in zip(traj.x, traj.F)]
    assert batched[4] == frames[0][4] and batched[0].shape == (2, 300 + n, 3)
    for k in range(4):
        torch.testing.assert_close(batched[k], torch.stack([f[k] for f in frames]), rtol=1e-6, atol=1e-7)


def test_frames_past_the_pair_cap_render_in_parts(scene):
    """forward renders all frames in one call; where that call's tile/splat pairs pass max_pairs,
    the frames go in halves (down to one frame a call) with the same images and gradients, and a
    single frame past the cap is the renderer's TooManyPairsError."""
    from render.binning import TooManyPairsError

    def run(max_pairs):
        scene.max_pairs = max_pairs
        scene.materials[0].zero_grad()
        try:
            images, alphas, depths = scene([camera()], [1, 2, 3])
        finally:
            del scene.max_pairs  # the class default again
        (images.square().mean() + depths.mean()).backward()
        return images.detach(), alphas.detach(), scene.materials[0].velocity.grad.clone()

    whole = run(1 << 27)
    most = max(rasterize_one_frame(scene, f)[2]["num_pairs"] for f in (1, 2, 3))
    parts = run(most + 1)  # one frame fits, two do not: the halves split again
    for a, b in zip(whole, parts):
        torch.testing.assert_close(a, b)
    with pytest.raises(TooManyPairsError):
        run(1)


def rasterize_one_frame(scene, frame: int):
    from bridge.rasterization import rasterize
    from render.camera import stack_cameras

    traj = scene.simulate([frame])
    means, covars, opacities, sh, degree = scene.gaussians(traj.x[0], traj.F[0])
    viewmats, Ks = stack_cameras([camera()], means.device)
    return rasterize(means.detach(), None, None, opacities.detach(), sh.detach(), viewmats, Ks, camera().width,
                     camera().height, sh_degree=degree, covars=covars.detach())


def test_bad_input_is_a_clear_error(scene, tmp_path, ti_arch):
    with pytest.raises(ValueError, match="at least one body"):
        PhysicsScene([])
    with pytest.raises(ValueError, match="nu"):
        PhysicsScene([Body(ASSETS / "checker_cube.obj", nu=0.6, size=0.15)], res=16)
    with pytest.raises(ValueError, match="frames"):
        scene([camera()], [3, 1])
    with pytest.raises(ValueError, match="camera"):
        scene([], [1])
    sheet = tmp_path / "sheet.obj"
    sheet.write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n")
    with pytest.raises(ValueError, match="no volume"):
        PhysicsScene([Body(sheet, size=0.2)], res=16)


def test_externally_owned_material_is_shared_between_scenes(ti_arch):
    """Two scenes (two throws) reading one BodyMaterial: their losses' gradients on the shared E, nu
    and v0 add up, as in a multi-recording fit; the sum is checked against the two gradients taken
    one scene at a time (same float32 kernels, so only the final addition's rounding differs).
    Shown to catch: PhysicsScene ignoring ``materials`` (the shared module then gets no gradient)."""
    from bridge.physics_scene import BodyMaterial
    from taichi_mpm.runtime import device

    shared = BodyMaterial(2e4, 0.3, (0.4, -0.5, 0.0), ("E", "nu", "velocity"), torch.float32, device())
    scenes = [PhysicsScene([Body(ASSETS / "checker_cube.obj", size=0.2, center=c, learn=(),
                                 surface=SurfaceConfig(n_gaussians=800, flatten=0.5))],
                           res=16, particles_per_cell=2, E_max=8e4, max_speed=3.0, materials=[shared])
              for c in ((0.45, 0.25, 0.5), (0.5, 0.3, 0.45))]
    assert all(s.materials[0] is shared for s in scenes)
    alone = []
    for s in scenes:
        shared.zero_grad()
        s([camera()], [2])[0].mean().backward()
        alone.append({n: p.grad.clone() for n, p in shared.named_parameters()})
    shared.zero_grad()
    sum(s([camera()], [2])[0].mean() for s in scenes).backward()
    for name, p in shared.named_parameters():
        expected = alone[0][name] + alone[1][name]
        assert float(expected.abs().max()) > 0, name
        assert torch.allclose(p.grad, expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max())), name
    with pytest.raises(ValueError, match="one material module per body"):
        PhysicsScene([Body(ASSETS / "checker_cube.obj")], res=16, materials=[shared, shared])
