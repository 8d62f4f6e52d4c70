"""bridge.surface: particles -> Gaussians, and image gradients reaching particle state."""
import pytest
import torch

from bridge.rasterization import rasterize
from bridge.surface import particles_to_gaussians, upper_triangle
from render.camera import Camera, stack_cameras


def random_particles(n, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, generator=g, dtype=dtype) * 0.4 - 0.2
    F = torch.eye(3, dtype=dtype) + 0.3 * torch.randn(n, 3, 3, generator=g, dtype=dtype)
    return x, F


def test_covariance_is_deformed_rest_shape():
    x, F = random_particles(5)
    g = particles_to_gaussians(x, F, radius=0.05, dtype=torch.float64)
    full = 0.05 ** 2 * F @ F.transpose(1, 2)
    assert torch.allclose(g.covars, upper_triangle(full))
    assert torch.allclose(g.covars[:, [0, 1, 2, 3, 4, 5]],
                          torch.stack([full[:, 0, 0], full[:, 0, 1], full[:, 0, 2],
                                       full[:, 1, 1], full[:, 1, 2], full[:, 2, 2]], 1))
    rest = particles_to_gaussians(x, None, radius=0.05, dtype=torch.float64)
    assert torch.allclose(rest.covars, upper_triangle(0.05 ** 2 * torch.eye(3, dtype=torch.float64).expand(5, 3, 3)))


def test_surface_gradient_matches_finite_differences():
    x, F = random_particles(4)
    x.requires_grad_(True)
    F.requires_grad_(True)

    def fn(x, F):
        g = particles_to_gaussians(x, F, radius=0.1, colors=(0.2, 0.5, 0.9), dtype=torch.float64)
        return g.means, g.covars

    assert torch.autograd.gradcheck(fn, (x, F))  # float64 central differences


@pytest.mark.parametrize("bad", ["positions", "deformation", "colors", "radius"])
def test_bad_input_is_a_clear_error(bad):
    x, F = random_particles(3)
    kwargs = dict(positions=x, deformation=F, radius=0.1, colors=(1.0, 0.0, 0.0))
    kwargs[bad] = {"positions": x[:, :2], "deformation": F[:2], "colors": torch.ones(2, 3), "radius": -1.0}[bad]
    with pytest.raises(ValueError, match=bad if bad != "positions" else "positions"):
        particles_to_gaussians(**kwargs)


def test_float64_particles_give_float32_gaussians():
    x, F = random_particles(3, dtype=torch.float64)
    g = particles_to_gaussians(x, F, radius=0.1)
    assert all(t.dtype == torch.float32 for t in (g.means, g.covars, g.opacities, g.colors))


def test_image_loss_reaches_positions_and_deformation(device):
    """A torch loss on a rendered image gives the finite-difference gradient on particle state."""
    camera = Camera.look_at(eye=(0.0, -1.5, 0.3), target=(0.0, 0.0, 0.0), width=40, height=30)
    viewmats, Ks = stack_cameras([camera], device)
    x, F = (t.to(device) for t in random_particles(6, dtype=torch.float32, seed=1))
    weights = torch.rand(1, 30, 40, 3, generator=torch.Generator().manual_seed(2)).to(device)

    def loss_of(x, F):
        g = particles_to_gaussians(x, F, radius=0.08, colors=(0.9, 0.4, 0.2), opacity=0.7)
        image, _, _ = rasterize(g.means, None, None, g.opacities, g.colors, viewmats, Ks, 40, 30, covars=g.covars)
        return (image * weights).sum()

    x.requires_grad_(True)
    F.requires_grad_(True)
    loss_of(x, F).backward()
    assert x.grad.abs().sum() > 0 and F.grad.abs().sum() > 0
    eps = 1e-3
    for tensor, grad, index in ((x, x.grad, (2, 0)), (x, x.grad, (4, 2)), (F, F.grad, (1, 0, 0)), (F, F.grad, (3, 1, 2))):
        with torch.no_grad():
            plus, minus = tensor.clone(), tensor.clone()
            plus[index] += eps
            minus[index] -= eps
            args_p = (plus, F) if tensor is x else (x, plus)
            args_m = (minus, F) if tensor is x else (x, minus)
            fd = (loss_of(*args_p) - loss_of(*args_m)) / (2 * eps)
        assert abs(fd - grad[index]) <= 0.05 * abs(fd) + 1e-2, (index, float(fd), float(grad[index]))
