"""bridge.splat2d (Taichi kernels, float32, hand-written backward) against the dense float64 torch
reference (render/reference2d.py) on a 37x29 image (not a multiple of the 16 px tile), both blend modes:
values to 1e-5, the gradient of every input on its own to 1e-4 of its largest entry (float32 sums of
~100 terms of size <= 1 keep ~1e-6 relative; 1e-4 leaves room for the exp/division chains).

Breakages seen caught (2026-11-27, on a scratch copy): halving dL/dL in the preprocess backward
(render/splat2d.py) fails all six test_matches_reference cases and the module test; dropping the
transmittance factor of the feature gradient in blending's alpha mode fails the three alpha-mode cases
and the module test; a sum-mode weight of alpha*T instead of alpha fails the three sum-mode cases.
"""
import numpy as np
import pytest
import torch

from bridge.splat2d import GaussianImage, splat2d
from render.reference2d import reference_splat2d
from taichi_mpm.runtime import device

W, H = 37, 29


def scene(n=48, seed=0, opaque=False):
    g = torch.Generator().manual_seed(seed)
    means = torch.rand(n, 2, generator=g, dtype=torch.float64) * torch.tensor([W + 8.0, H + 8.0]) - 4.0
    chol = torch.stack([torch.rand(n, generator=g, dtype=torch.float64) * 3 + 0.7,
                        torch.randn(n, generator=g, dtype=torch.float64) * 1.5,
                        torch.rand(n, generator=g, dtype=torch.float64) * 3 + 0.7], 1)
    colors = torch.rand(n, 3, generator=g, dtype=torch.float64)
    low = 0.9 if opaque else 0.05  # opaque: pixels reach T < 1e-4 and stop early
    opacities = low + (1 - low) * torch.rand(n, generator=g, dtype=torch.float64)
    if opaque:
        chol[:, 0] *= 3
        chol[:, 2] *= 3
    return dict(means=means, chol=chol, colors=colors, opacities=opacities)


def weights(shape, seed):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def render_and_grad(inputs, dtype, manual, mode, background=None):
    leaves = {k: v.to(dtype).to(device()).clone().requires_grad_(True) for k, v in inputs.items()}
    bg = None if background is None else background.to(dtype).to(device()).clone().requires_grad_(True)
    image, alpha = splat2d(leaves["means"], leaves["chol"], leaves["colors"], W, H, leaves.get("opacities"),
                           bg, mode=mode, use_manual_backward=manual)
    loss = (image * weights(image.shape, 1).to(image)).sum() + (alpha * weights(alpha.shape, 2).to(alpha)).sum()
    loss.backward()
    grads = {k: v.grad.double().cpu() for k, v in leaves.items()}
    if bg is not None:
        grads["background"] = bg.grad.double().cpu()
    return image.detach().double().cpu(), alpha.detach().double().cpu(), grads


def assert_grads_close(grads, ref):
    assert grads.keys() == ref.keys()
    for name in ref:
        scale = ref[name].abs().max().item()
        assert scale > 0, f"{name}: the reference gradient is zero, the test would prove nothing"
        err = (grads[name] - ref[name]).abs().max().item()
        assert err <= 1e-4 * scale, f"{name}: gradient off by {err:.3g} (largest entry {scale:.3g})"


@pytest.mark.parametrize("mode", ["sum", "alpha"])
@pytest.mark.parametrize("kind", ["plain", "opaque", "no_opacity"])
def test_matches_reference(mode, kind):
    inputs = scene(opaque=kind == "opaque", seed=1 if kind == "opaque" else 0)
    if kind == "no_opacity":
        del inputs["opacities"]
    background = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)
    image, alpha, grads = render_and_grad(inputs, torch.float32, True, mode, background)
    ref_image, ref_alpha, ref_grads = render_and_grad(inputs, torch.float64, False, mode, background)
    assert image.shape == (H, W, 3) and alpha.shape == (H, W)
    assert ref_alpha.max() > 0.5, "the scene should cover the image"
    if kind == "opaque" and mode == "alpha":
        assert ref_alpha.max() > 1 - 2e-4, "some pixels should saturate and stop early"
    torch.testing.assert_close(image, ref_image, rtol=0, atol=1e-5)
    torch.testing.assert_close(alpha, ref_alpha, rtol=0, atol=1e-5)
    assert_grads_close(grads, ref_grads)


def test_module_manual_and_autograd_paths_agree():
    """GaussianImage with use_manual_backward True (kernels) and False (dense torch), same float32 params."""
    target = torch.rand(H, W, 3, generator=torch.Generator().manual_seed(3)).to(device())
    results = []
    for manual in (True, False):
        model = GaussianImage.from_image(target, 60, mode="alpha", opacity=True)
        loss = ((model(use_manual_backward=manual) - target) ** 2).mean()
        loss.backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss_k, grads_k), (loss_t, grads_t) = results
    assert abs(loss_k - loss_t) <= 1e-6 * loss_t
    assert_grads_close({k: v.double().cpu() for k, v in grads_k.items()},
                       {k: v.double().cpu() for k, v in grads_t.items()})


@pytest.fixture(scope="module")
def small():
    return {k: v.float().to(device()) for k, v in scene().items()}


@pytest.mark.parametrize("mode", ["sum", "alpha"])
def test_no_gaussians_gives_the_background(small, mode):
    bg = torch.tensor([0.1, 0.2, 0.3], device=device())
    empty = {k: v[:0] for k, v in small.items()}
    image, alpha = splat2d(empty["means"], empty["chol"], empty["colors"], W, H, empty["opacities"], bg, mode=mode)
    assert image.shape == (H, W, 3) and torch.equal(image, bg.expand(H, W, 3)) and not alpha.any()


def test_gaussians_outside_the_image_give_the_background(small):
    far = small["means"] + 1000.0
    image, alpha = splat2d(far, small["chol"], small["colors"], W, H, small["opacities"], mode="alpha")
    assert not image.any() and not alpha.any()


@pytest.mark.parametrize("change, match", [
    (dict(width=0), "width"),
    (dict(height=0), "height"),
    (dict(colors=lambda s: s["colors"][:, :0]), "channels"),
    (dict(colors=lambda s: s["colors"][:, :1].repeat(1, 33)), "channels"),
    (dict(background=lambda s: torch.zeros(2, device=device())), "background"),
    (dict(means=lambda s: s["means"][:, :1]), "means"),
    (dict(chol=lambda s: s["chol"][:-1]), "chol"),
    (dict(means=lambda s: s["means"].double()), "float32"),
    (dict(colors=lambda s: s["colors"].index_fill(0, torch.tensor([3], device=device()), float("nan"))), "colors"),
    (dict(chol=lambda s: s["chol"].index_fill(0, torch.tensor([3], device=device()), float("inf"))), "chol"),
    (dict(chol=lambda s: s["chol"].index_fill(1, torch.tensor([0], device=device()), 0.0)), "degenerate"),
    (dict(mode="over"), "mode"),
])
def test_bad_input_raises_before_launch(small, change, match):
    args = dict(means=small["means"], chol=small["chol"], colors=small["colors"], width=W, height=H,
                opacities=small["opacities"], background=None, mode="alpha")
    args.update({k: v(small) if callable(v) else v for k, v in change.items()})
    with pytest.raises((ValueError, TypeError), match=match):
        splat2d(**args)


def test_compact_file_round_trip_and_rescaled_render(tmp_path):
    target = torch.rand(H, W, 3, generator=torch.Generator().manual_seed(4)).to(device())
    model = GaussianImage.from_image(target, 50, mode="sum")
    path = tmp_path / "g.npz"
    model.save(path)
    loaded = GaussianImage.load(path, device=device())
    with torch.no_grad():
        original, again = model(), loaded()
        big = loaded(scale=2.0)
    # float16 colours / factors, 16-bit positions: about 1e-3 relative per number
    assert (original - again).abs().max().item() < 1e-2
    assert big.shape == (2 * H, 2 * W, 3)
    # twice the resolution, same picture: 2x2 block means are close to the original pixels
    pooled = big.reshape(H, 2, W, 2, 3).mean((1, 3))
    assert (pooled - again).abs().mean().item() < 0.02
    assert path.stat().st_size < 50 * 20 + 2000


def test_load_rejects_other_npz(tmp_path):
    path = tmp_path / "other.npz"
    np.savez(path, x=np.zeros(3))
    with pytest.raises(ValueError, match="not a GaussianImage"):
        GaussianImage.load(path)


def test_reference_alpha_mode_stops_like_the_kernels():
    """Two opaque Gaussians on one pixel: 0.99, 0.99 -> T = 1e-4 ... the third is never blended."""
    means = torch.full((3, 2), 0.5, dtype=torch.float64)
    chol = torch.tensor([[5.0, 0.0, 5.0]] * 3, dtype=torch.float64)
    colors = torch.eye(3, dtype=torch.float64)
    image, alpha = reference_splat2d(means, chol, colors, torch.ones(3, dtype=torch.float64), 1, 1, "alpha")
    assert image[0, 0, 2] == 0 and image[0, 0, 0] > 0.98
