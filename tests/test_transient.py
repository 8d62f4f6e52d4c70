"""Transient NLOS renderer: Taichi kernels vs the pure-torch reference, gradcheck, culling, bad input.

Correctness strategy: the kernels have a float64 path, so torch.autograd.gradcheck runs on the
Taichi kernels themselves (CPU, float64); the float32 kernels are compared with the float64
reference at float32 tolerance. The gradcheck scene uses sigma_threshold = 7, where the cut-off
jump exp(-24.5) ~ 2e-11 is far below the finite-difference noise; at the default 3 a sample
crossing the cut-off under a 1e-6 step would make the numerical Jacobian meaningless.

Breakages seen caught (each once, then reverted): the dL/dopacity atomic halved in the backward
kernel (test_kernel_matches_reference_float64, the float32 comparison and test_gradcheck[opacity_logits] fail); the
phi half-width of the culling cone halved in direction_rects (test_culling_edges fails).
"""
import math

import pytest
import torch

from bridge.gaussian_model import GaussianModel
from bridge.transient import (TransientRenderer, precision_upper, render_transient, transient_gaussians,
                              transient_grid, transient_reference)
from render.transient import SPEED_OF_LIGHT, TransientGrid, bin_gaussians, direction_rects
from taichi_mpm.runtime import device

INPUTS = ("means", "scales", "quats", "opacities", "albedo")


def scene(dtype, n=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    dev = device()
    means = torch.randn(n, 3, generator=g, dtype=torch.float64) * 0.15 + torch.tensor([0.0, 0.0, 0.8], dtype=torch.float64)
    # Near the pole above scan point 0 and on both sides of the phi = +-pi seam.
    means[0] = torch.tensor([0.01, 0.0, 0.7])
    means[1] = torch.tensor([-0.35, 0.004, 0.6])
    means[2] = torch.tensor([-0.35, -0.004, 0.6])
    t = dict(means=means,
             scales=torch.rand(n, 3, generator=g, dtype=torch.float64) * 0.08 + 0.04,
             quats=torch.randn(n, 4, generator=g, dtype=torch.float64),
             opacities=torch.rand(n, generator=g, dtype=torch.float64) * 0.8 + 0.1,
             albedo=torch.rand(n, generator=g, dtype=torch.float64) + 0.2)
    scan = torch.tensor([[0.0, 0.0, 0.0], [0.2, -0.1, 0.0], [-0.15, 0.25, 0.0]], dtype=torch.float64)
    return {k: v.to(dtype=dtype, device=dev) for k, v in t.items()}, scan.to(dtype=dtype, device=dev)


GRID = TransientGrid((0.0, 1.3), (-math.pi, math.pi), 20, 18, 0.3, 0.04, 30)


def weights_like(t: torch.Tensor, seed: int) -> torch.Tensor:
    return torch.rand(t.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(t)


def loss_and_grads(fn, inputs, scan, grid):
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    transient, hist = fn(*(leaves[k] for k in INPUTS), scan, grid)
    loss = (transient * weights_like(transient, 1)).sum() + 50 * (hist * weights_like(hist, 2)).sum()
    grads = torch.autograd.grad(loss, [leaves[k] for k in INPUTS])
    return transient.detach(), hist.detach(), dict(zip(INPUTS, grads))


@pytest.fixture(scope="module")
def reference64():
    inputs, scan = scene(torch.float64)
    return loss_and_grads(transient_reference, inputs, scan, GRID)


def test_kernel_matches_reference_float64(ti_arch, reference64):
    """Taichi float64 kernels == torch reference: values and each input's gradient, to rounding."""
    inputs, scan = scene(torch.float64)
    transient, hist, grads = loss_and_grads(transient_gaussians, inputs, scan, GRID)
    ref_t, ref_h, ref_g = reference64
    assert ref_h.abs().max() > 1e-4  # the scene is seen
    torch.testing.assert_close(transient, ref_t, rtol=1e-9, atol=1e-12 * ref_t.abs().max().item())
    torch.testing.assert_close(hist, ref_h, rtol=1e-9, atol=1e-12 * ref_h.abs().max().item())
    for k in INPUTS:
        assert ref_g[k].abs().max() > 0, k
        torch.testing.assert_close(grads[k], ref_g[k], rtol=1e-8, atol=1e-10 * ref_g[k].abs().max().item(), msg=k)


def test_split_lists_match(ti_arch, reference64, monkeypatch):
    """Tile lists split over several threads per ray (the GPU path) give the same values and gradients."""
    import render.transient as rt

    monkeypatch.setattr(rt, "FORCE_PARTS", 3)
    inputs, scan = scene(torch.float64)
    transient, hist, grads = loss_and_grads(transient_gaussians, inputs, scan, GRID)
    ref_t, ref_h, ref_g = reference64
    torch.testing.assert_close(transient, ref_t, rtol=1e-9, atol=1e-12 * ref_t.abs().max().item())
    for k in INPUTS:
        torch.testing.assert_close(grads[k], ref_g[k], rtol=1e-8, atol=1e-10 * ref_g[k].abs().max().item(), msg=k)


def test_kernel_float32_matches_reference(ti_arch, reference64):
    """float32 kernels vs the float64 reference: a few float32 ulps of the largest value, relative to
    each tensor's scale (sums of up to ~100 terms over ~30 bins: ~1e-5 relative)."""
    inputs, scan = scene(torch.float32)
    transient, hist, grads = loss_and_grads(transient_gaussians, inputs, scan, GRID)
    ref_t, ref_h, ref_g = reference64
    torch.testing.assert_close(transient.double(), ref_t, rtol=1e-4, atol=2e-5 * ref_t.abs().max().item())
    torch.testing.assert_close(hist.double(), ref_h, rtol=1e-4, atol=2e-5 * ref_h.abs().max().item())
    for k in INPUTS:
        torch.testing.assert_close(grads[k].double(), ref_g[k], rtol=1e-3, atol=1e-4 * ref_g[k].abs().max().item(),
                                   msg=k)


@pytest.mark.parametrize("name", ["means", "log_scales", "quats", "opacity_logits", "features_dc"])
def test_gradcheck(ti_arch, name):
    """torch.autograd.gradcheck of the float64 Taichi path, one learnable input at a time, through
    the activations GaussianModel uses (log-scale, quaternion, opacity logit, SH DC features)."""
    inputs, scan = scene(torch.float64, n=5, seed=3)
    grid = TransientGrid((0.0, 1.3), (-math.pi, math.pi), 10, 12, 0.3, 0.05, 20, sigma_threshold=7.0)
    raw = dict(means=inputs["means"], log_scales=inputs["scales"].log(), quats=inputs["quats"],
               opacity_logits=torch.logit(inputs["opacities"]),
               features_dc=torch.randn(5, 3, dtype=torch.float64, device=scan.device))

    def render(x):
        r = dict(raw, **{name: x})
        albedo = (0.28209479177387814 * r["features_dc"] + 0.5).mean(-1)
        transient, hist = transient_gaussians(r["means"], r["log_scales"].exp(), r["quats"],
                                              torch.sigmoid(r["opacity_logits"]), albedo, scan[:2], grid)
        return hist, transient

    x = raw[name].clone().requires_grad_()
    # nondet_tol: atomics add per-ray terms in any order (float64 rounding ~1e-17 differences).
    assert torch.autograd.gradcheck(lambda v: render(v)[0], (x,), eps=1e-6, atol=1e-7, rtol=1e-4, nondet_tol=1e-12)
    assert torch.autograd.gradcheck(lambda v: render(v)[1], (x,), eps=1e-6, atol=1e-7, rtol=1e-4, nondet_tol=1e-12,
                                    fast_mode=True)


def test_culling_edges(ti_arch):
    """Every (scan point, ray, Gaussian) with a sample within the threshold lies in a binned tile:
    pole, phi seam, a partial phi range and a scan point inside a Gaussian included."""
    inputs, scan = scene(torch.float64)
    inputs["means"][3] = scan[1] + torch.tensor([0.01, 0.0, 0.02], dtype=scan.dtype, device=scan.device)
    for grid in (GRID, TransientGrid((0.2, 1.5), (2.0, 4.5), 33, 35, 0.3, 0.04, 30),
                 TransientGrid((0.0, 1.0), (-3.0, -0.5), 17, 40, 0.2, 0.05, 24)):
        t, h = transient_gaussians(*(inputs[k] for k in INPUTS), scan, grid)
        rt, rh = transient_reference(*(inputs[k] for k in INPUTS), scan, grid)
        assert rh.abs().max() > 0
        torch.testing.assert_close(t, rt, rtol=1e-9, atol=1e-12 * rt.abs().max().item())


def test_binning_culls(ti_arch):
    """The tile lists are far shorter than every Gaussian for every tile (culling happens)."""
    inputs, scan = scene(torch.float32, n=40)
    inputs["scales"] = inputs["scales"] * 0.3
    grid = TransientGrid((0.0, 1.5), (-math.pi, math.pi), 64, 64, 0.3, 0.04, 30)
    binning = bin_gaussians(inputs["means"], inputs["scales"], scan, grid)
    full = scan.shape[0] * 40 * grid.tiles.num_tiles
    assert 0 < binning.num_pairs < full / 4
    rects, _ = direction_rects(inputs["means"], inputs["scales"].max(-1).values * 3, scan, grid)
    assert rects.shape == (scan.shape[0] * 40, 4) and rects.dtype == torch.int32


def test_render_transient_model_and_module(ti_arch):
    """render_transient on a GaussianModel: shapes, one point == the batch's row, chunking changes
    nothing, the module gives the same histograms, gradients reach every parameter."""
    inputs, scan = scene(torch.float32)
    model = GaussianModel(inputs["means"], inputs["scales"], inputs["quats"], inputs["opacities"].clamp(0.05, 0.95))
    dT = 2 * 0.04 / SPEED_OF_LIGHT
    args = ((0.0, 1.3), (-math.pi, math.pi), (0.3, 0.3 + 30 * 0.04), 20, 18, 30, SPEED_OF_LIGHT, dT)
    t1, h1 = render_transient(model, scan[1], *args)
    assert t1.shape == (30, 20, 18) and h1.shape == (30,)
    tb, hb = render_transient(model, scan, *args)
    assert tb.shape == (3, 30, 20, 18) and hb.shape == (3, 30)
    torch.testing.assert_close(t1, tb[1])
    grid = transient_grid(*args)
    tc, hc = transient_gaussians(*(v for v in (model.activated()[k] for k in ("means", "scales", "quats", "opacities"))),
                                 model.albedo(), scan, grid, chunk_bytes=1)  # one scan point a chunk
    torch.testing.assert_close(hc, hb)
    torch.testing.assert_close(tc, tb)
    none, hm = TransientRenderer(grid)(model, scan)
    assert none is None
    torch.testing.assert_close(hm, hb)
    hm.square().sum().backward()
    for name, p in model.named_parameters():
        if name != "features_rest":
            assert p.grad is not None and p.grad.abs().max() > 0, name


def test_bad_input(ti_arch):
    inputs, scan = scene(torch.float32)
    args = [inputs[k] for k in INPUTS]
    with pytest.raises(ValueError, match="empty"):
        transient_gaussians(*(a[:0] for a in args), scan, GRID)
    with pytest.raises(ValueError, match="N = 0|at least one"):
        GaussianModel(inputs["means"][:0], inputs["scales"][:0])
    dT = 2 * 0.04 / SPEED_OF_LIGHT
    base = dict(theta_range=(0, 1), phi_range=(-3, 3), r_range=(0.3, 1.5), num_theta=8, num_phi=8, num_r=30,
                c=SPEED_OF_LIGHT, deltaT=dT)
    for change, message in [(dict(r_range=(0.0, 1.2)), "r_min"), (dict(r_range=(-0.1, 1.1)), "r_min"),
                            (dict(num_r=0), "num_r"), (dict(deltaT=0.0), "deltaT"), (dict(deltaT=-1e-12), "deltaT"),
                            (dict(r_range=(0.3, 2.0)), "bin width"), (dict(c=0), "c must")]:
        with pytest.raises(ValueError, match=message):
            transient_grid(**dict(base, **change))
    with pytest.raises(ValueError, match="theta_range"):
        TransientGrid((1.0, 0.5), (0, 1), 4, 4, 0.3, 0.1, 4)
    with pytest.raises(TypeError, match="float32 or float64"):
        transient_gaussians(*(a.half() for a in args), scan.half(), GRID)
    with pytest.raises(ValueError, match="scales must be > 0"):
        transient_gaussians(*(a if k != "scales" else -a for k, a in zip(INPUTS, args)), scan, GRID)
    with pytest.raises(ValueError, match="nan"):
        transient_gaussians(*(a if k != "means" else a * float("nan") for k, a in zip(INPUTS, args)), scan, GRID)
    with pytest.raises(ValueError, match="scan_points"):
        transient_gaussians(*args, scan[:, :2], GRID)


def test_precision_upper():
    s = torch.tensor([[0.1, 0.2, 0.3]], dtype=torch.float64)
    q = torch.tensor([[0.3, -0.2, 0.5, 0.7]], dtype=torch.float64)
    q6 = precision_upper(s, q)
    Q = q6[:, [0, 1, 2, 1, 3, 4, 2, 4, 5]].view(3, 3)
    w, x, y, z = torch.nn.functional.normalize(q, dim=-1)[0]
    R = torch.tensor([[1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
                      [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
                      [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)]], dtype=torch.float64)
    cov = R @ torch.diag(s[0] ** 2) @ R.T
    torch.testing.assert_close(Q @ cov, torch.eye(3, dtype=torch.float64))


def test_gaussian_model_feeds_rasterizer(ti_arch):
    """The same GaussianModel renders through the 3DGS rasterizer (activated() uses its argument names)."""
    from bridge.rasterization import rasterize
    from render.camera import Camera, stack_cameras

    inputs, _ = scene(torch.float32)
    model = GaussianModel(inputs["means"], inputs["scales"], inputs["quats"], inputs["opacities"].clamp(0.05, 0.95),
                          sh_degree=1)
    viewmats, Ks = stack_cameras([Camera.look_at((0, 0, -1.0), (0, 0, 0.8), (0, -1, 0), 24, 20, 30)])
    image, alpha, _ = rasterize(**model.activated(), viewmats=viewmats.to(device()), Ks=Ks.to(device()),
                                width=24, height=20, sh_degree=model.sh_degree)
    assert image.shape == (1, 20, 24, 3) and alpha.max() > 0.05
    image.sum().backward()
    assert model.means.grad.abs().max() > 0 and model.features_dc.grad.abs().max() > 0
