"""bridge.upsampling: rest binding, the deformation formulas against a float64 loop, gradients of
every input on its own, texture colours, and bad input."""
import numpy as np
import pytest
import torch
import trimesh

from bridge.rasterization import rasterize
from bridge.surface import upper_triangle
from bridge.upsampling import SurfaceConfig, SurfaceUpsampler, bind_surface, synthesize_surface
from render.camera import Camera, stack_cameras
from scenes import ASSETS
from taichi_mpm.runtime import device
from taichi_mpm.sampling import sample_mesh

CHECKER = ASSETS / "checker_cube.obj"


@pytest.fixture(scope="module")
def cube(ti_arch):
    """Particles filling a 0.2-sized checker cube centred at (0.5, 0.3, 0.5), and a binding."""
    dev = device()
    x = torch.as_tensor(sample_mesh(CHECKER, 0.025, scale=0.2, translation=(0.5, 0.3, 0.5)), device=dev)
    config = SurfaceConfig(n_gaussians=400, neighbours=3, flatten=0.4, seed=1)
    binding = bind_surface(CHECKER, x, config, scale=0.2, translation=(0.5, 0.3, 0.5), band=0.01)
    return x, binding


def random_state(x, seed=0):
    g = torch.Generator().manual_seed(seed)
    F = torch.eye(3, dtype=x.dtype) + 0.2 * torch.randn(len(x), 3, 3, generator=g, dtype=x.dtype)
    return x + 0.01 * torch.randn(x.shape, generator=g, dtype=x.dtype).to(x.device), F.to(x.device)


def test_rest_binding_lies_on_the_surface_and_m_is_independent_of_n(cube):
    x, b = cube
    assert b.n_gaussians == 400 and b.particles.shape == (400, 3)
    assert torch.allclose(b.weights.sum(1), torch.ones(400, dtype=b.weights.dtype, device=b.weights.device))
    # every sample on a face of the cube [0.4, 0.6] x [0.2, 0.4] x [0.4, 0.6]
    rel = (b.surface - torch.tensor([0.5, 0.3, 0.5], dtype=x.dtype, device=x.device)).abs()
    assert torch.allclose(rel.max(1).values, torch.full((400,), 0.1, dtype=x.dtype, device=x.device), atol=1e-9)
    assert torch.allclose(b.normals.norm(dim=1), torch.ones(400, dtype=x.dtype, device=x.device))
    # outward: the normal points away from the centre
    assert bool(((b.surface - torch.tensor([0.5, 0.3, 0.5], dtype=x.dtype, device=x.device)) * b.normals).sum(1).gt(0).all())
    fewer = bind_surface(CHECKER, x[::3], SurfaceConfig(n_gaussians=400), scale=0.2, translation=(0.5, 0.3, 0.5))
    assert fewer.n_gaussians == 400 and fewer.n_particles == len(x[::3])
    # undeformed, thickness 0: each Gaussian sits on its surface sample
    eye = torch.eye(3, dtype=x.dtype, device=x.device).expand(len(x), 3, 3)
    g = synthesize_surface(x, eye, b, 0.01, 0.0, dtype=x.dtype)
    assert torch.allclose(g.means, b.surface, atol=1e-12)


def test_formulas_match_a_float64_loop(cube):
    """mu = sum w (x_p + F_p (X - X_p)); cov = F_g sigma0^2 (I - (1 - f^2) n n^T) F_g^T; X = S - u t n.
    Shown to catch: the flattening applied with f instead of f^2."""
    x, b = cube
    xt, F = random_state(x)
    sigma0, thickness = 0.004, 0.012
    g = synthesize_surface(xt, F, b, sigma0, thickness, dtype=torch.float64)
    to = lambda t: t.detach().cpu().double().numpy()  # noqa: E731
    S, n, u, W, X0 = (to(t) for t in (b.surface, b.normals, b.depth, b.weights, b.x_rest))
    P = b.particles.cpu().numpy()
    xs, Fs = to(xt), to(F)
    for m in range(0, b.n_gaussians, 37):
        X = S[m] - u[m] * thickness * n[m]
        mu = sum(W[m, j] * (xs[P[m, j]] + Fs[P[m, j]] @ (X - X0[P[m, j]])) for j in range(P.shape[1]))
        Fg = sum(W[m, j] * Fs[P[m, j]] for j in range(P.shape[1]))
        sigma = sigma0 ** 2 * (np.eye(3) - (1 - b.flatten ** 2) * np.outer(n[m], n[m]))
        cov = Fg @ sigma @ Fg.T
        np.testing.assert_allclose(to(g.means[m]), mu, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(to(g.covars[m]), cov[np.triu_indices(3)], rtol=1e-10, atol=1e-16)
    assert torch.equal(upper_triangle(torch.eye(3)), torch.tensor([1.0, 0, 0, 1, 0, 1]))


def test_a_batch_of_states_equals_one_call_a_state(cube):
    """x (T, N, 3), F (T, N, 3, 3) -> Gaussians (T, M, ...), each frame as its own call gives it,
    and the gradients reaching every frame's x and F and sigma0 alike."""
    x, b = cube
    states = [random_state(x, seed=s) for s in (3, 4, 5)]
    sigma0 = torch.tensor(0.004, dtype=x.dtype, device=x.device)

    def run(batched: bool):
        xs = torch.stack([s[0] for s in states]).requires_grad_(True)
        Fs = torch.stack([s[1] for s in states]).requires_grad_(True)
        s0 = sigma0.clone().requires_grad_(True)
        if batched:
            g = synthesize_surface(xs, Fs, b, s0, 0.012, dtype=torch.float64)
            fields = [g.means, g.covars, g.opacities, g.colors]
        else:
            parts = [synthesize_surface(xs[t], Fs[t], b, s0, 0.012, dtype=torch.float64) for t in range(len(states))]
            fields = [torch.stack([getattr(p, k) for p in parts]) for k in ("means", "covars", "opacities", "colors")]
        w = torch.Generator().manual_seed(9)
        sum(((f * torch.randn(f.shape, generator=w, dtype=f.dtype).to(f.device)).sum() for f in fields[:2])).backward()
        return fields, (xs.grad, Fs.grad, s0.grad)

    (fields, grads), (ref_fields, ref_grads) = run(True), run(False)
    assert fields[0].shape == (3, b.n_gaussians, 3) and fields[3].shape == (3, b.n_gaussians, 3)
    for f, r in zip(fields + list(grads), ref_fields + list(ref_grads)):
        torch.testing.assert_close(f, r, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("wrt", ["x", "F", "sigma0", "thickness"])
def test_gradient_of_each_input_matches_finite_differences(cube, wrt):
    """gradcheck (float64 central differences, each input on its own). Shown to catch: F detached in
    deform_points (the F case fails), thickness detached where it enters X (the thickness case fails)."""
    x, b = cube
    sub = bind_surface(CHECKER, x, SurfaceConfig(n_gaussians=12, neighbours=2, flatten=0.5),
                       scale=0.2, translation=(0.5, 0.3, 0.5), band=0.01)
    xt, F = random_state(x, seed=2)
    inputs = {"x": xt, "F": F, "sigma0": torch.tensor(0.01, dtype=x.dtype, device=x.device),
              "thickness": torch.tensor(0.02, dtype=x.dtype, device=x.device)}
    names = list(inputs)

    def fn(t):
        args = dict(inputs, **{wrt: t})
        g = synthesize_surface(args["x"], args["F"], sub, args["sigma0"], args["thickness"], dtype=torch.float64)
        return g.means, g.covars

    assert torch.autograd.gradcheck(fn, (inputs[wrt].clone().requires_grad_(True),)), names


def test_checker_cube_renders_checkered(cube):
    """Colours come from the texture at the samples' UVs: the checker cube shows white squares and
    coloured ones, in the image too (a constant colour or a wrong UV lookup would not)."""
    x, b = cube
    c = b.colors.cpu()
    white = (c.min(1).values > 0.85).float().mean()
    coloured = ((c.max(1).values - c.min(1).values) > 0.3).float().mean()
    assert 0.25 < white < 0.75 and 0.25 < coloured < 0.75, (white, coloured)
    dense = bind_surface(CHECKER, x, SurfaceConfig(n_gaussians=6000, flatten=0.3), scale=0.2,
                         translation=(0.5, 0.3, 0.5))
    eye = torch.eye(3, dtype=x.dtype, device=x.device).expand(len(x), 3, 3)
    g = synthesize_surface(x, eye, dense, 0.004, 0.0)
    cam = Camera.look_at((0.5, 0.3, 1.2), (0.5, 0.3, 0.5), up=(0.0, 1.0, 0.0), width=48, height=48, fov_y_degrees=20)
    image, alpha, _ = rasterize(g.means, None, None, g.opacities, g.colors, *stack_cameras([cam], x.device), 48, 48,
                                covars=g.covars)
    face = image[0, 8:40, 8:40].cpu()
    chroma = face.max(-1).values - face.min(-1).values
    assert (chroma > 0.3).float().mean() > 0.2 and (chroma < 0.1).float().mean() > 0.2


def test_vertex_colours_are_interpolated(ti_arch):
    mesh = trimesh.creation.box(extents=(0.2, 0.2, 0.2))
    mesh.visual.vertex_colors = np.where(mesh.vertices[:, :1] > 0, [255, 0, 0, 255], [0, 0, 255, 255]).astype(np.uint8)
    x = torch.as_tensor(sample_mesh(mesh, 0.03, translation=(0.5, 0.5, 0.5)), device=device())
    b = bind_surface(mesh, x, SurfaceConfig(n_gaussians=300), translation=(0.5, 0.5, 0.5))
    side = b.surface[:, 0] - 0.5
    c = b.colors
    assert bool((c[side > 0.0999, 0] > 0.99).all()) and bool((c[side < -0.0999, 2] > 0.99).all())
    assert torch.allclose(c[:, 0] + c[:, 2], torch.ones_like(c[:, 0]))  # linear blend between the two


def test_upsampler_module_learns_sigma0_and_thickness(cube):
    x, b = cube
    up = SurfaceUpsampler(b, sigma0=0.004, thickness=0.01)
    assert {n for n, _ in up.named_parameters()} == {"log_sigma0", "log_thickness"}
    assert abs(up.sigma0.item() - 0.004) < 1e-12 and abs(up.thickness.item() - 0.01) < 1e-12
    xt, F = random_state(x)
    g = up(xt, F)
    assert g.means.dtype == torch.float32 and g.means.device == x.device
    (g.means.sum() + g.covars.sum()).backward()
    assert up.log_sigma0.grad.abs() > 0 and up.log_thickness.grad.abs() > 0
    fixed = SurfaceUpsampler(b, 0.004, 0.01, learn=("sigma0",))
    assert [n for n, _ in fixed.named_parameters()] == ["log_sigma0"]


def test_bad_input_is_a_clear_error(cube):
    x, b = cube
    eye = torch.eye(3, dtype=x.dtype, device=x.device).expand(len(x), 3, 3)
    with pytest.raises(ValueError, match="n_gaussians"):
        SurfaceConfig(n_gaussians=0)
    with pytest.raises(ValueError, match="sigma0"):
        synthesize_surface(x, eye, b, 0.0, 0.01)
    with pytest.raises(ValueError, match="sigma0"):
        synthesize_surface(x, eye, b, -1.0, 0.01)
    with pytest.raises(ValueError, match="thickness"):
        synthesize_surface(x, eye, b, 0.01, -0.1)
    with pytest.raises(ValueError, match="sigma0"):
        synthesize_surface(x, eye, b, torch.tensor(-0.01, dtype=x.dtype, device=x.device), 0.01)
    with pytest.raises(ValueError, match="sigma0 must be a scalar"):
        synthesize_surface(x, eye, b, torch.ones(2, dtype=x.dtype, device=x.device), 0.01)
    with pytest.raises(ValueError, match="x must have shape"):
        synthesize_surface(x[:-1], eye, b, 0.01, 0.01)
    with pytest.raises(ValueError, match="sigma0"):
        SurfaceUpsampler(b, 0.0, 0.01)
    with pytest.raises(ValueError, match="no particles"):
        bind_surface(CHECKER, x[:0], SurfaceConfig(n_gaussians=10))
    with pytest.raises(ValueError, match="flatten"):
        SurfaceConfig(flatten=0.0)
