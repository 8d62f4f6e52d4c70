"""One torch loss on rendered images reaches back through the rasterizer, the particle->Gaussian
surface and the checkpointed MPM rollout to the initial velocity and Young's modulus.
Checked against central finite differences of the whole pipeline (rollout float64, rasterizer float32).
The body starts pre-stretched in free flight, so it vibrates (E matters) and nothing touches a wall:
contact makes the trajectory piecewise smooth, and finite differences across the kinks disagree with
any exact derivative."""
import numpy as np
import pytest
import torch

from bridge.modules import PhysicalParameters
from bridge.rasterization import rasterize
from bridge.rollout import RolloutScene
from bridge.surface import particles_to_gaussians
from render.camera import Camera, stack_cameras
from taichi_mpm import Elastic, MPMSolver

N_SUBSTEPS = 40


@pytest.fixture(scope="module")
def pipeline(ti_arch):
    solver = MPMSolver(res=16, dtype="float64")
    solver.add_cube((0.38, 0.4, 0.4), (0.25, 0.2, 0.2), Elastic(E=2e3, nu=0.3), particles_per_cell=2)
    scene = RolloutScene.from_solver(solver, dt=0.5 * solver.stable_dt(max_speed=3.0))
    x0 = solver.positions(as_torch=True).clone()
    stretch = torch.diag(torch.tensor([1.15, 0.9, 1.0], dtype=x0.dtype, device=x0.device))
    F0 = stretch.expand(len(x0), 3, 3).contiguous()
    camera = Camera.look_at((0.5, 0.5, 1.4), (0.5, 0.45, 0.5), up=(0.0, 1.0, 0.0), width=40, height=30,
                            fov_y_degrees=40.0)
    viewmats, Ks = stack_cameras([camera], x0.device)
    weights = torch.randn(1, 30, 40, 3, generator=torch.Generator().manual_seed(0)).to(x0.device)
    radius = 0.6 * solver.dx / 2 ** (1 / 3)

    def loss(params: PhysicalParameters) -> torch.Tensor:
        traj = params(x0, N_SUBSTEPS, [N_SUBSTEPS // 2, N_SUBSTEPS], F0=F0)
        total = 0.0
        for x, F in zip(traj.x, traj.F):
            g = particles_to_gaussians(x, F, radius, (0.9, 0.5, 0.2), opacity=0.8)
            image, _, _ = rasterize(g.means, None, None, g.opacities, g.colors, viewmats, Ks, 40, 30,
                                    covars=g.covars)
            total = total + (image * weights).sum()
        return total

    return scene, loss


def test_image_loss_gradients_on_velocity_and_stiffness_match_finite_differences(pipeline):
    """The rasterizer skips alpha < 1/255, so the rendered loss jumps by ~1e-3 whenever a Gaussian's
    tail crosses that threshold at a pixel: single components of a finite difference carry that
    noise (~0.5 here). The whole gradient (v0 and log E) must match the central difference with
    step 0.05 to 10% in norm, which a dropped path, a wrong factor or a sign error would break."""
    scene, loss = pipeline
    velocity, log_E = np.array([0.6, -0.4, 0.3]), float(np.log(2e3))

    def make(v, logE, learn=("E", "velocity")):
        return PhysicalParameters(scene, E=float(np.exp(logE)), nu=0.3, velocity=tuple(v), learn=learn)

    params = make(velocity, log_E)
    loss(params).backward()
    analytic = np.append(params.velocity.grad[0].cpu().numpy(), float(params.log_E.grad[0]))

    h, fd = 0.05, []
    with torch.no_grad():
        for axis in range(4):
            step = np.eye(4)[axis] * h
            plus = loss(make(velocity + step[:3], log_E + step[3], ()))
            minus = loss(make(velocity - step[:3], log_E - step[3], ()))
            fd.append((plus - minus).item() / (2 * h))
    fd = np.array(fd)
    assert np.linalg.norm(analytic - fd) <= 0.1 * np.linalg.norm(fd), (analytic, fd)
    assert abs(fd[3]) > 1.0  # stiffness visibly changes the images: the E path is exercised
