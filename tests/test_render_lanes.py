"""The item kernels' CUDA loop form (a compile-time number of lanes striding over the items, see
render/lanes.py) gives what the plain loop gives: run here on the test device with 7 lanes, so that
every lane takes several items, against the device's own form, end to end through rasterize and
splat2d (forward outputs, then gradients)."""
import importlib

import pytest
import torch

import render.binning as binning
from bridge import rasterize
from bridge.splat2d import splat2d
from render.projection import ProjectionConfig, projection_kernels
from render.splat2d import preprocess_kernels
from render_scenes import GRAD_RTOL, HEIGHT, WIDTH, camera_tensors, random_scene

LANES = 7  # fewer than the items, and no divisor of their count
rasterization = importlib.import_module("bridge.rasterization")  # the modules, not the functions
bridge_splat2d = importlib.import_module("bridge.splat2d")  # bridge exports under the same names


@pytest.fixture
def seven_lanes(monkeypatch):
    def projection(sh_degree, given_cov, antialiased, several_cameras):
        used = (True, not given_cov, not given_cov, given_cov, True, sh_degree >= 0)
        config = ProjectionConfig(sh_degree, given_cov, antialiased, accumulate=several_cameras)
        return (*projection_kernels(config, lanes=LANES), used)

    def use():
        monkeypatch.setattr(rasterization, "_projection", projection)
        monkeypatch.setattr(binning, "item_lanes", lambda: LANES)
        monkeypatch.setattr(bridge_splat2d, "preprocess_kernels", lambda: preprocess_kernels(LANES))
    return use


def _render_3d(scene, cameras, sh_degree):
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in scene.items()}
    colors = leaves["sh"] if sh_degree is not None else leaves["sh"][:, 0]
    viewmats, Ks = camera_tensors(cameras, device=scene["means"].device)
    image, alpha, meta = rasterize(leaves["means"], leaves["quats"], leaves["scales"], leaves["opacities"], colors,
                                   viewmats, Ks, WIDTH, HEIGHT, sh_degree=sh_degree, render_mode="RGB+ED")
    weights = torch.linspace(-1.0, 1.0, image.numel(), device=image.device).view_as(image)
    ((image * weights).sum() + alpha.square().sum()).backward()
    return [image, alpha, meta["depths"], meta["radii"]], [leaves[k].grad for k in ("means", "quats", "scales",
                                                                                     "opacities", "sh")]


@pytest.mark.parametrize("cameras, sh_degree", [(1, 3), (2, None)])
def test_rasterize_with_lanes_matches(seven_lanes, device, cameras, sh_degree):
    scene = random_scene(60, device=device)
    outputs, grads = _render_3d(scene, cameras, sh_degree)
    seven_lanes()
    outputs_l, grads_l = _render_3d(scene, cameras, sh_degree)
    for a, b in zip(outputs, outputs_l):
        assert torch.equal(a, b)
    for a, b in zip(grads, grads_l):  # atomics add in another order
        torch.testing.assert_close(a, b, rtol=GRAD_RTOL, atol=1e-5)


def _render_2d(device):
    g = torch.Generator().manual_seed(3)
    n = 50
    scene = dict(means=torch.rand(n, 2, generator=g) * torch.tensor([40.0, 30.0]),
                 chol=torch.stack([2 + 3 * torch.rand(n, generator=g), torch.randn(n, generator=g),
                                   2 + 3 * torch.rand(n, generator=g)], 1),
                 colors=torch.rand(n, 3, generator=g), opacities=0.2 + 0.8 * torch.rand(n, generator=g))
    leaves = {k: v.to(device).requires_grad_(True) for k, v in scene.items()}
    image, alpha = splat2d(leaves["means"], leaves["chol"], leaves["colors"], 40, 30, leaves["opacities"],
                           mode="alpha")
    weights = torch.linspace(-1.0, 1.0, image.numel(), device=device).view_as(image)
    ((image * weights).sum() + alpha.sum()).backward()
    return [image, alpha], [leaves[k].grad for k in ("means", "chol", "colors", "opacities")]


def test_splat2d_with_lanes_matches(seven_lanes, device):
    outputs, grads = _render_2d(device)
    seven_lanes()
    outputs_l, grads_l = _render_2d(device)
    for a, b in zip(outputs, outputs_l):
        assert torch.equal(a, b)
    for a, b in zip(grads, grads_l):
        torch.testing.assert_close(a, b, rtol=GRAD_RTOL, atol=1e-5)
