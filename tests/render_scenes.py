"""Shared helpers of the render tests: random scenes and a float32-vs-float64 gradient comparison."""
from __future__ import annotations

import torch

from render.camera import Camera, stack_cameras

WIDTH, HEIGHT = 45, 37  # deliberately not multiples of the 16-pixel tile


def random_scene(n: int = 120, seed: int = 0, sh_bases: int = 16) -> dict:
    """Gaussians in front of the cameras below, a few behind them and a few beyond the image edges."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(n, 3, generator=g) * torch.tensor([0.9, 0.7, 1.2]) + torch.tensor([0.0, 0.0, 3.0])
    means[:4, 2] = -1.0  # behind the camera
    return dict(means=means, quats=torch.randn(n, 4, generator=g),
                scales=torch.exp(torch.randn(n, 3, generator=g) * 0.5 - 2.3),
                opacities=torch.rand(n, generator=g) * 0.9 + 0.05,
                sh=torch.randn(n, sh_bases, 3, generator=g) * 0.3)


def cameras(width: int = WIDTH, height: int = HEIGHT) -> list[Camera]:
    front = Camera.look_at((0.0, 0.0, 0.0), (0.0, 0.0, 3.0), (0.0, -1.0, 0.0), width, height, 55.0)
    side = Camera.look_at((0.6, -0.3, 0.2), (0.0, 0.0, 3.0), (0.0, -1.0, 0.0), width, height, 45.0)
    side.cx += 3.0  # an off-centre principal point
    return [front, side]


def camera_tensors(n_cameras: int = 1, dtype=torch.float32):
    viewmats, Ks = stack_cameras(cameras()[:n_cameras])
    return viewmats.to(dtype), Ks.to(dtype)


def loss_weights(shape, seed: int = 7) -> torch.Tensor:
    """Fixed random weights so that the loss sum(w * image) has generic gradients."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def assert_grad_close(ours: torch.Tensor, ref: torch.Tensor, name: str, rel: float = 1e-4) -> None:
    """Elementwise |ours - ref| <= rel * (|ref| + max|ref|): 1e-4 relative to the gradient's scale."""
    assert ours is not None and ref is not None, f"{name}: missing gradient"
    scale = ref.abs().max().item()
    assert scale > 0, f"{name}: reference gradient is all zero, the test would prove nothing"
    torch.testing.assert_close(ours.double(), ref, rtol=rel, atol=rel * scale, msg=lambda m: f"{name}: {m}")
