"""bridge.rasterize (Taichi kernels, float32) against the dense float64 pure-torch reference
(render/reference.py): images to 1e-5, every gradient to 1e-4 relative, via torch autograd of the
reference. Random scenes, SH degrees 0-3, all render modes, batches of cameras, CPU."""
import pytest
import torch

from bridge.rasterization import rasterize
from render.reference import reference_rasterize
from render_scenes import HEIGHT, WIDTH, assert_grad_close, camera_tensors, loss_weights, random_scene


def render_both(inputs: dict, n_cameras: int = 1, **kwargs):
    """Render with both rasterizers; return [(image, alpha, grads)] for ours then the reference."""
    out = []
    for dtype, fn in ((torch.float32, rasterize), (torch.float64, reference_rasterize)):
        leaves = {k: None if v is None else v.to(dtype).clone().requires_grad_(True) for k, v in inputs.items()}
        viewmats, Ks = camera_tensors(n_cameras, dtype)
        extra = {k: (v.to(dtype) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
        image, alpha = fn(**leaves, viewmats=viewmats, Ks=Ks, width=WIDTH, height=HEIGHT, **extra)[:2]
        loss = (image * loss_weights(image.shape).to(dtype)).sum() + (alpha * loss_weights(alpha.shape, 8).to(dtype)).sum()
        loss.backward()
        out.append((image.detach().double(), alpha.detach().double(),
                    {k: v.grad for k, v in leaves.items() if v is not None}))
    return out


def check(inputs, n_cameras=1, **kwargs):
    (image, alpha, grads), (ref_image, ref_alpha, ref_grads) = render_both(inputs, n_cameras, **kwargs)
    assert image.shape == ref_image.shape and alpha.shape == ref_alpha.shape
    assert ref_alpha.max() > 0.5, "the scene should cover part of the image"
    depth_channels = 1 if kwargs.get("render_mode", "RGB") != "RGB" else 0
    n_color = image.shape[-1] - depth_channels
    torch.testing.assert_close(image[..., :n_color], ref_image[..., :n_color], rtol=0, atol=1e-5)
    # depths are ~3 (and ED divides by alpha): 1e-5 relative, float32's reach at that magnitude
    torch.testing.assert_close(image[..., n_color:], ref_image[..., n_color:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(alpha, ref_alpha, rtol=0, atol=1e-5)
    for name in ref_grads:
        if ref_grads[name] is None:  # an input the render mode does not use (colors in "D" mode)
            assert grads[name] is None or not grads[name].any(), name
        else:
            assert_grad_close(grads[name], ref_grads[name], name)


@pytest.fixture(scope="module")
def scene():
    return random_scene()


def sh_inputs(scene, degree):
    return dict(means=scene["means"], quats=scene["quats"], scales=scene["scales"], opacities=scene["opacities"],
                colors=scene["sh"][:, :(degree + 1) ** 2])


@pytest.mark.parametrize("degree", [0, 1, 2, 3])
def test_sh_degrees_match_reference(scene, degree):
    check(sh_inputs(scene, degree), sh_degree=degree, backgrounds=torch.tensor([[0.2, 0.5, 0.9]]))


def test_extra_sh_coefficients_are_ignored(scene):
    # the 3DGS schedule keeps 16 coefficients while the active degree grows
    check(sh_inputs(scene, 3), sh_degree=1)


@pytest.mark.parametrize("mode", ["D", "ED", "RGB+D", "RGB+ED"])
def test_depth_render_modes_match_reference(scene, mode):
    check(sh_inputs(scene, 3), sh_degree=3, render_mode=mode)


def test_antialiased_mode_matches_reference(scene):
    check(sh_inputs(scene, 3), sh_degree=3, rasterize_mode="antialiased")


def test_batch_of_cameras_matches_reference(scene):
    check(sh_inputs(scene, 3), n_cameras=2, sh_degree=3, backgrounds=torch.tensor([[0.1, 0.2, 0.3], [1.0, 0.0, 0.5]]))


def test_precomputed_colors_and_covariances_match_reference(scene):
    from render.reference import covariance
    cov = covariance(scene["quats"].double(), scene["scales"].double(), None)
    cov6 = torch.stack([cov[:, 0, 0], cov[:, 0, 1], cov[:, 0, 2], cov[:, 1, 1], cov[:, 1, 2], cov[:, 2, 2]], 1)
    check(dict(means=scene["means"], quats=None, scales=None, covars=cov6.float(), opacities=scene["opacities"],
               colors=torch.sigmoid(scene["sh"][:, 0])), render_mode="RGB+D")


def test_screen_space_gradient_matches_reference(scene):
    """meta['means2d'].grad (gsplat's densification signal) equals the reference's d loss / d mean2D."""
    inputs = sh_inputs(scene, 3)
    viewmats, Ks = camera_tensors(1)
    image, _, meta = rasterize(**{**inputs, "means": inputs["means"].clone().requires_grad_(True)}, viewmats=viewmats, Ks=Ks, width=WIDTH, height=HEIGHT, sh_degree=3)
    meta["means2d"].retain_grad()
    (image * loss_weights(image.shape).float()).sum().backward()

    offset = torch.zeros(1, scene["means"].shape[0], 2, dtype=torch.float64, requires_grad=True)
    ref, _ = reference_rasterize(**{k: v.double() for k, v in inputs.items()}, viewmats=viewmats.double(),
                                 Ks=Ks.double(), width=WIDTH, height=HEIGHT, sh_degree=3, means2d_offset=offset)
    (ref * loss_weights(ref.shape)).sum().backward()
    assert_grad_close(meta["means2d"].grad, offset.grad, "means2d")


def test_meta_radii_mark_visible_gaussians(scene):
    viewmats, Ks = camera_tensors(1)
    _, _, meta = rasterize(**sh_inputs(scene, 3), viewmats=viewmats, Ks=Ks, width=WIDTH, height=HEIGHT, sh_degree=3)
    radii = meta["radii"][0]
    assert radii.shape == (scene["means"].shape[0], 2) and radii.dtype == torch.int32
    assert (radii[:4] == 0).all(), "Gaussians behind the camera must get radius 0"
    assert (radii > 0).any(dim=1).sum() > 50


@pytest.mark.parametrize("rasterize_mode", ["classic", "antialiased"])
def test_projection_stage_matches_reference(scene, rasterize_mode):
    """The preprocess outputs in meta against render.reference.project, stage by stage."""
    from render.reference import covariance, project
    viewmats, Ks = camera_tensors(2)
    _, _, meta = rasterize(**sh_inputs(scene, 3), viewmats=viewmats, Ks=Ks, width=WIDTH, height=HEIGHT, sh_degree=3,
                           rasterize_mode=rasterize_mode)
    cov3 = covariance(scene["quats"].double(), scene["scales"].double(), None)
    for c in range(2):
        means2d, conics, depths, opac, valid = project(scene["means"].double(), cov3, scene["opacities"].double(),
                                                       viewmats[c].double(), Ks[c].double(), WIDTH, HEIGHT, 0.01,
                                                       1e10, rasterize_mode == "antialiased")
        visible = (meta["radii"][c] > 0).any(-1)
        assert visible.sum() > 50 and not (visible & ~valid).any()
        torch.testing.assert_close(meta["means2d"][c][visible].double(), means2d[visible], rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(meta["depths"][c][visible].double(), depths[visible], rtol=1e-6, atol=0)
        torch.testing.assert_close(meta["opacities"][c][visible].double(), opac[visible], rtol=1e-5, atol=1e-7)
        ref_conics = torch.stack([conics[:, 0, 0], conics[:, 0, 1], conics[:, 1, 1]], -1)
        torch.testing.assert_close(meta["conics"][c][visible].double(), ref_conics[visible], rtol=1e-4, atol=1e-7)
        assert not meta["radii"][c][~visible].any() and not meta["means2d"][c][~visible].any()
