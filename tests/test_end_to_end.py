"""The whole chain against central finite differences, one parameter at a time:

    E, nu, v0 --bridge.simulate (float64 MPM, 30 substeps)--> x, F at 2 frames
      --synthesize_surface (150 Gaussians, sigma0, thickness)--> --bridge.rasterize (32x32, float32)--> loss

Each parameter's analytic gradient (log E, nu, v0_x, v0_y, v0_z, log sigma0, log thickness) is
compared with its own central difference; none is judged through a norm of the whole vector.

Why these settings and the 12% tolerance. The rasterizer drops alpha < 1/255, so the loss is only
piecewise smooth: whenever a Gaussian's 1/255 contour crosses a pixel centre, the image jumps by
~T/255. A finite difference therefore contains a systematic term (the contours grow with sigma0,
move with the body) that the exact gradient of the truncated function cannot have. Measured with
the dense float64 reference rasterizer (render.reference), the gap between autograd and central
differences is 13-17% for 300 heavily overlapping Gaussians of opacity 0.8 and falls to 3-5% for 150
Gaussians of opacity 0.95 at ~1.5 px, seen close up (these settings); the Taichi rasterizer gives
the same numbers to 6 digits. Float32 rounding of the loss (~1e3 * 6e-8) over 2h = 0.04 adds
~2e-3 against gradients of 30 to 700. Steps: 0.05 on log E, 0.01 on nu, 0.02 on the rest; the
central differences at h and 2.5 h agree to 1-4%. Free flight from a pre-stretched state keeps the
body off the walls (contact would add kinks of its own) while it vibrates, so E and nu shape the
images. Measured: every parameter within 4.6%; tolerance 12%.

Breakages this test was shown to catch (2026-11-27): F detached in the upsampler's
``deform_points`` -> log E off by 28%, nu by 48% (both fail); log E's gradient halved by a hook
-> log_E fails and only log_E (any parameter: its 4.6% margin becomes >= 47%); sigma0's gradient
through Sigma0 halved inside ``synthesize_surface`` -> log_sigma0 off by 48%, only it fails; the conic gradients zeroed in the CPU blending
backward (render/blending.py) -> 6 of the 7 parameters fail.
Runtime: 15 s with Taichi's kernel cache warm, ~30 s cold, on the 2-core CPU.
"""
import numpy as np
import pytest
import torch
import trimesh

from bridge.rasterization import rasterize
from bridge.rollout import RolloutScene, simulate
from bridge.upsampling import SurfaceConfig, bind_surface, synthesize_surface
from render.camera import Camera, stack_cameras
from taichi_mpm import Elastic, MPMSolver

N_SUBSTEPS = 30
NAMES = ("log_E", "nu", "v0_x", "v0_y", "v0_z", "log_sigma0", "log_thickness")
STEPS = (0.05, 0.01, 0.02, 0.02, 0.02, 0.02, 0.02)
TOLERANCE = 0.12


@pytest.fixture(scope="module")
def chain(ti_arch):
    solver = MPMSolver(res=16, dtype="float64")
    lower, size = np.array([0.38, 0.42, 0.4]), np.array([0.25, 0.2, 0.2])
    solver.add_cube(tuple(lower), tuple(size), Elastic(E=2e3, nu=0.3), particles_per_cell=2)
    scene = RolloutScene.from_solver(solver, dt=0.5 * solver.stable_dt(max_speed=3.0))
    x0 = solver.positions(as_torch=True).clone()
    dev = x0.device
    spacing = solver.dx / 2 ** (1 / 3)
    config = SurfaceConfig(n_gaussians=150, neighbours=2, flatten=0.5, opacity=0.95, color=(0.9, 0.5, 0.2))
    binding = bind_surface(trimesh.creation.box(extents=size), x0, config, translation=lower + size / 2,
                           band=0.5 * spacing)
    F0 = torch.diag(torch.tensor([1.15, 0.9, 1.0], dtype=torch.float64, device=dev)).expand(len(x0), 3, 3).contiguous()
    camera = Camera.look_at((0.9, 0.8, 1.3), (0.5, 0.5, 0.5), up=(0.0, 1.0, 0.0), width=32, height=32,
                            fov_y_degrees=24.0)
    viewmats, Ks = stack_cameras([camera], dev)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    weights = torch.stack([1 + 0.5 * xx, 1 - 0.3 * yy, 0.5 + 0.4 * xx * yy], -1)[None].double().to(dev)

    def loss(p: torch.Tensor) -> torch.Tensor:
        v0 = p[2:5].expand(len(x0), 3)
        traj = simulate(scene, x0, v0, {"E": p[0].exp(), "nu": p[1]}, N_SUBSTEPS, [N_SUBSTEPS // 2, N_SUBSTEPS],
                        F0=F0)
        total = 0.0
        for x, F in zip(traj.x, traj.F):
            g = synthesize_surface(x, F, binding, p[5].exp(), p[6].exp())
            image, _, _ = rasterize(g.means, None, None, g.opacities, g.colors, viewmats, Ks, 32, 32,
                                    covars=g.covars)
            total = total + (image.double() * weights).sum()
        return total

    p0 = torch.tensor([np.log(2e3), 0.3, 0.6, -0.4, 0.3, np.log(0.3 * spacing), np.log(0.5 * spacing)],
                      dtype=torch.float64, device=dev)
    p = p0.clone().requires_grad_(True)
    loss(p).backward()
    return loss, p0, p.grad.clone()


@pytest.mark.parametrize("index", range(len(NAMES)), ids=NAMES)
def test_each_parameter_gradient_matches_central_difference(chain, index):
    loss, p0, analytic = chain
    step = torch.zeros_like(p0)
    step[index] = STEPS[index]
    with torch.no_grad():
        fd = (loss(p0 + step) - loss(p0 - step)).item() / (2 * STEPS[index])
    a = analytic[index].item()
    assert abs(fd) > 10.0, f"{NAMES[index]} barely changes the images (fd {fd}): the test would be vacuous"
    assert abs(a - fd) <= TOLERANCE * abs(fd), f"{NAMES[index]}: analytic {a:.5g}, central difference {fd:.5g}"
