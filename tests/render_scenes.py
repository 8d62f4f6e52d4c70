"""Shared helpers of the render tests: random scenes, cameras and loss weights on the test device,
and the tolerances of the float32 kernels against the float64 reference.

Random numbers come from a seeded CPU generator and are then moved, so a scene is the same on
every device.
"""
from __future__ import annotations

import torch

from conftest import tolerance
from render.camera import Camera, stack_cameras

WIDTH, HEIGHT = 45, 37  # deliberately not multiples of the 16-pixel tile

# Tolerances of the float32 kernels against the float64 reference (eps32 = 1.19e-7):
# - colours and alpha are sums of at most ~100 splat contributions, each a product of a handful of
#   float32 factors no larger than 1, so their error stays below ~100 roundings of 1: 84 eps = 1e-5.
IMAGE_ATOL = tolerance(torch.float32, 84)
# - a gradient element sums the contributions of every pixel a splat covers (hundreds) through the
#   blending backward (which rebuilds T by division) and a chain of ~10 projection steps, so its
#   error relative to that gradient's scale reaches several hundred roundings: 840 eps = 1e-4.
#   Every mutation of a backward term tried on these tests (a term halved or dropped) failed it.
GRAD_RTOL = tolerance(torch.float32, 840)


def random_scene(n: int = 120, seed: int = 0, sh_bases: int = 16, device=None) -> dict:
    """Gaussians in front of the cameras below, a few behind them and a few beyond the image edges."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(n, 3, generator=g) * torch.tensor([0.9, 0.7, 1.2]) + torch.tensor([0.0, 0.0, 3.0])
    means[:4, 2] = -1.0  # behind the camera
    scene = dict(means=means, quats=torch.randn(n, 4, generator=g),
                 scales=torch.exp(torch.randn(n, 3, generator=g) * 0.5 - 2.3),
                 opacities=torch.rand(n, generator=g) * 0.9 + 0.05,
                 sh=torch.randn(n, sh_bases, 3, generator=g) * 0.3)
    return {k: v.to(device) for k, v in scene.items()}


def cameras(width: int = WIDTH, height: int = HEIGHT) -> list[Camera]:
    front = Camera.look_at((0.0, 0.0, 0.0), (0.0, 0.0, 3.0), (0.0, -1.0, 0.0), width, height, 55.0)
    side = Camera.look_at((0.6, -0.3, 0.2), (0.0, 0.0, 3.0), (0.0, -1.0, 0.0), width, height, 45.0)
    side.cx += 3.0  # an off-centre principal point
    return [front, side]


def camera_tensors(n_cameras: int = 1, dtype=torch.float32, device=None):
    viewmats, Ks = stack_cameras(cameras()[:n_cameras])
    return viewmats.to(device, dtype), Ks.to(device, dtype)


def loss_weights(shape, seed: int = 7, device=None, dtype=torch.float64) -> torch.Tensor:
    """Fixed random weights so that the loss sum(w * image) has generic gradients."""
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return w.to(device, dtype)
