"""bridge.rasterize (Taichi kernels, float32) against the dense float64 pure-torch reference
(render/reference.py) on the test device: images to IMAGE_ATOL, each input's gradient on its own to
GRAD_RTOL of that gradient's scale (tests/render_scenes.py argues both numbers), via torch autograd
of the reference. Random scenes, SH degrees 0-3, all render modes, batches of cameras."""
import pytest
import torch

from bridge.rasterization import rasterize
from conftest import assert_grads_close
from render.reference import covariance, project, reference_rasterize
from render_scenes import GRAD_RTOL, HEIGHT, IMAGE_ATOL, WIDTH, camera_tensors, loss_weights, random_scene


def render_both(inputs: dict, device, n_cameras: int = 1, **kwargs):
    """Render with both rasterizers; return [(image, alpha, grads)] for ours then the reference."""
    out = []
    for dtype, fn in ((torch.float32, rasterize), (torch.float64, reference_rasterize)):
        leaves = {k: None if v is None else v.to(dtype).clone().requires_grad_(True) for k, v in inputs.items()}
        viewmats, Ks = camera_tensors(n_cameras, dtype, device)
        extra = {k: (v.to(device, dtype).clone().requires_grad_(True) if isinstance(v, torch.Tensor) else v)
                 for k, v in kwargs.items()}
        if "backgrounds" in extra:
            leaves["backgrounds"] = extra["backgrounds"]
        image, alpha = fn(**{k: v for k, v in leaves.items() if k != "backgrounds"}, viewmats=viewmats, Ks=Ks,
                          width=WIDTH, height=HEIGHT, **extra)[:2]
        loss = ((image * loss_weights(image.shape, device=device, dtype=dtype)).sum()
                + (alpha * loss_weights(alpha.shape, 8, device=device, dtype=dtype)).sum())
        loss.backward()
        out.append((image.detach().double(), alpha.detach().double(),
                    {k: v.grad for k, v in leaves.items() if v is not None}))
    return out


def check(inputs, device, n_cameras=1, **kwargs):
    (image, alpha, grads), (ref_image, ref_alpha, ref_grads) = render_both(inputs, device, n_cameras, **kwargs)
    assert image.shape == ref_image.shape and alpha.shape == ref_alpha.shape
    assert ref_alpha.max() > 0.5, "the scene should cover part of the image"
    depth_channels = 1 if kwargs.get("render_mode", "RGB") != "RGB" else 0
    n_color = image.shape[-1] - depth_channels
    torch.testing.assert_close(image[..., :n_color], ref_image[..., :n_color], rtol=0, atol=IMAGE_ATOL)
    # depths are ~3 (and ED divides by alpha): relative IMAGE_ATOL, float32's reach at that magnitude
    torch.testing.assert_close(image[..., n_color:], ref_image[..., n_color:], rtol=IMAGE_ATOL, atol=IMAGE_ATOL)
    torch.testing.assert_close(alpha, ref_alpha, rtol=0, atol=IMAGE_ATOL)
    assert_grads_close(grads, ref_grads, GRAD_RTOL)


@pytest.fixture(scope="module")
def scene(device):
    return random_scene(device=device)


def sh_inputs(scene, degree):
    return dict(means=scene["means"], quats=scene["quats"], scales=scene["scales"], opacities=scene["opacities"],
                colors=scene["sh"][:, :(degree + 1) ** 2])


@pytest.mark.parametrize("degree", [0, 1, 2, 3])
def test_sh_degrees_match_reference(scene, device, degree):
    """Mutation-tested, each caught here: projection backward with the quaternion, scale, rotation
    (v_w), mean2D, conic, opacity gradient halved, the frustum clamp ignored, the view-direction
    gradient dropped (degrees >= 1), unused SH rows left unwritten; SH coefficient gradient halved,
    SH direction tangent projection dropped; blending's opacity / mean2D gradient halved, conic
    gradient zeroed, feature gradient halved, output-alpha term halved, the 'behind' colour term
    dropped."""
    check(sh_inputs(scene, degree), device, sh_degree=degree, backgrounds=torch.tensor([[0.2, 0.5, 0.9]]))


def test_extra_sh_coefficients_are_ignored(scene, device):
    """The 3DGS schedule keeps 16 coefficients while the active degree grows: coefficients above the
    active degree must get exactly zero gradient. Mutation-tested: caught the one-camera backward
    leaving unused SH rows unwritten (torch.empty garbage), and every mutation listed above."""
    check(sh_inputs(scene, 3), device, sh_degree=1)


@pytest.mark.parametrize("mode", ["D", "ED", "RGB+D", "RGB+ED"])
def test_depth_render_modes_match_reference(scene, device, mode):
    """Mutation-tested: caught the projection's depth gradient dropped (only these, the covariance
    test and the Inria face see it), and every mutation listed for the SH test."""
    check(sh_inputs(scene, 3), device, sh_degree=3, render_mode=mode)


def test_antialiased_mode_matches_reference(scene, device):
    """Mutation-tested: caught the antialiased compensation term of the covariance gradient halved
    (only this and the antialiased Inria face see it)."""
    check(sh_inputs(scene, 3), device, sh_degree=3, rasterize_mode="antialiased")


def test_batch_of_cameras_matches_reference(scene, device):
    """Several cameras see each Gaussian: the accumulating (atomic) backward. Mutation-tested: caught
    the accumulating backward storing instead of adding, its SH coefficient gradient halved, and the
    bridge choosing the one-camera (non-accumulating) backward for two cameras; only this test runs
    that path."""
    check(sh_inputs(scene, 3), device, n_cameras=2, sh_degree=3,
          backgrounds=torch.tensor([[0.1, 0.2, 0.3], [1.0, 0.0, 0.5]]))


@pytest.mark.parametrize("mode", ["RGB+D", "ED"])
def test_precomputed_colors_and_covariances_match_reference(scene, device, mode):
    """Mutation-tested: caught the off-diagonal cov3D gradient not symmetrised (only this test
    passes covars), and the depth / blending mutations. "ED" with colours given blends the
    projection's depth column in place, "RGB+D" packs the colours with the geometry."""
    cov = covariance(scene["quats"].double(), scene["scales"].double(), None)
    cov6 = torch.stack([cov[:, 0, 0], cov[:, 0, 1], cov[:, 0, 2], cov[:, 1, 1], cov[:, 1, 2], cov[:, 2, 2]], 1)
    check(dict(means=scene["means"], quats=None, scales=None, covars=cov6.float(), opacities=scene["opacities"],
               colors=torch.sigmoid(scene["sh"][:, 0])), device, render_mode=mode)


@pytest.mark.parametrize("channels", [1, 32])
def test_feature_channels_match_reference(scene, device, channels):
    """Plain features, 1 and 32 channels (the most one pass blends): the CUDA backward's warp
    reduction leaves each lane at most one gradient total up to 26 channels and two beyond. Mutation-
    tested on CUDA: caught the second total of a lane dropped (32 channels only)."""
    g = torch.Generator().manual_seed(1)
    colors = torch.rand(scene["means"].shape[0], channels, generator=g).to(device)
    check(dict(means=scene["means"], quats=scene["quats"], scales=scene["scales"], opacities=scene["opacities"],
               colors=colors), device)


def test_screen_space_gradient_matches_reference(scene, device):
    """meta['means2d'].grad (gsplat's densification signal) equals the reference's d loss / d mean2D.
    Mutation-tested: caught blending's mean2D gradient halved and its 'behind' term dropped."""
    inputs = sh_inputs(scene, 3)
    viewmats, Ks = camera_tensors(1, device=device)
    image, _, meta = rasterize(**{**inputs, "means": inputs["means"].clone().requires_grad_(True)},
                               viewmats=viewmats, Ks=Ks, width=WIDTH, height=HEIGHT, sh_degree=3)
    meta["means2d"].retain_grad()
    (image * loss_weights(image.shape, device=device, dtype=image.dtype)).sum().backward()

    offset = torch.zeros(1, scene["means"].shape[0], 2, dtype=torch.float64, device=device, requires_grad=True)
    ref, _ = reference_rasterize(**{k: v.double() for k, v in inputs.items()}, viewmats=viewmats.double(),
                                 Ks=Ks.double(), width=WIDTH, height=HEIGHT, sh_degree=3, means2d_offset=offset)
    (ref * loss_weights(ref.shape, device=device)).sum().backward()
    assert_grads_close({"means2d": meta["means2d"].grad}, {"means2d": offset.grad}, GRAD_RTOL)


def test_meta_radii_mark_visible_gaussians(scene, device):
    viewmats, Ks = camera_tensors(1, device=device)
    _, _, meta = rasterize(**sh_inputs(scene, 3), viewmats=viewmats, Ks=Ks, width=WIDTH, height=HEIGHT, sh_degree=3)
    radii = meta["radii"][0]
    assert radii.shape == (scene["means"].shape[0], 2) and radii.dtype == torch.int32
    assert (radii[:4] == 0).all(), "Gaussians behind the camera must get radius 0"
    assert (radii > 0).any(dim=1).sum() > 50


@pytest.mark.parametrize("rasterize_mode", ["classic", "antialiased"])
def test_projection_stage_matches_reference(scene, device, rasterize_mode):
    """The preprocess outputs in meta against render.reference.project, stage by stage; float32
    rounding of pixel coordinates ~50 (1e-5 relative) and of conics (1e-4: an inverse of a 2x2
    matrix whose determinant cancels). Mutation-tested: caught the x radius written as 0 (which the
    visibility checks alone let through)."""
    viewmats, Ks = camera_tensors(2, device=device)
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
        # radii: ceil of the 1/255-alpha extent along x and y; float32 may land one pixel off a ceil
        cov2 = torch.linalg.inv(conics[visible])
        extent = torch.sqrt(2.0 * torch.log(255.0 * opac[visible]))[:, None]
        expected = torch.ceil(extent * torch.sqrt(torch.stack([cov2[:, 0, 0], cov2[:, 1, 1]], -1)))
        off = (meta["radii"][c][visible].double() - expected).abs()
        assert off.max() <= 1 and (off == 0).double().mean() > 0.95, f"radii off by up to {off.max().item()}"


def test_gradient_helper_names_the_input_and_its_worst_element(device):
    """The per-input comparison itself: a small input's halved gradient element is found even beside
    a large input, the message names both; an all-zero reference is refused."""
    ref = {"big": torch.full((5,), 1e6, dtype=torch.float64, device=device),
           "small": torch.tensor([1e-3, 2e-3, -1e-3], dtype=torch.float64, device=device)}
    ours = {k: v.float().clone() for k, v in ref.items()}
    assert_grads_close(ours, ref, GRAD_RTOL)
    ours["small"][1] *= 0.5
    with pytest.raises(AssertionError, match=r"gradient of small: 1 of 3 elements off; worst at \(1,\)"):
        assert_grads_close(ours, ref, GRAD_RTOL)
    with pytest.raises(AssertionError, match="all zero"):
        assert_grads_close({"z": torch.zeros(3, device=device)}, {"z": torch.zeros(3, device=device)}, GRAD_RTOL)
    with pytest.raises(AssertionError, match="missing"):
        assert_grads_close({"z": None}, {"z": torch.ones(3, device=device)}, GRAD_RTOL)


@pytest.mark.parametrize("mode", ["RGB", "RGB+ED", "ED"])
def test_blend_reads_the_projections_records_in_place(scene, device, monkeypatch, mode):
    """With SH colours, the blend reads the projection's records (render/splat_record.py) as they
    are and the projection's backward takes the blend's gradient array as it is: no packing either
    way. A depth gradient from another use (the loss on meta's depths here) is added into that
    array: the gradients equal those of the column-by-column sum. A means2d_offset makes the blend
    pack its own records, whose gradients the projection then sums column by column, except in
    RGB+ED, where the packed records have the projection's layout and are taken as they are.
    Shown to catch the in-place path never taken (the record's width compared with 9) and the depth
    gradient of another use dropped on it."""
    from bridge import rasterization
    taken = []
    original = rasterization._projected_grads

    def in_place(C, N, columns, v_means2d, *rest):
        out = original(C, N, columns, v_means2d, *rest)
        taken.append(out is v_means2d._base)
        return out

    def column_by_column(C, N, columns, v_means2d, *rest):  # a copy has no _base: the general path
        return original(C, N, columns, v_means2d.clone(), *rest)

    viewmats, Ks = camera_tensors(1, torch.float32, device)
    grads = []
    for spy in (in_place, column_by_column):
        monkeypatch.setattr(rasterization, "_projected_grads", spy)
        leaves = {k: v.clone().requires_grad_(True) for k, v in sh_inputs(scene, 3).items()}
        image, alpha, meta = rasterize(**leaves, viewmats=viewmats, Ks=Ks, width=WIDTH, height=HEIGHT, sh_degree=3,
                                       render_mode=mode)
        ((image * loss_weights(image.shape, device=device)).sum() + meta["depths"].sum()).backward()
        grads.append({k: v.grad for k, v in leaves.items()})
    assert_grads_close(grads[0], grads[1], 1e-6, zero_ok=("colors",) if mode == "ED" else ())
    monkeypatch.setattr(rasterization, "_projected_grads", in_place)
    offset = torch.zeros(1, scene["means"].shape[0], 2, device=device, requires_grad=True)
    image, _, _ = rasterize(**leaves, viewmats=viewmats, Ks=Ks, width=WIDTH, height=HEIGHT, sh_degree=3,
                            render_mode=mode, means2d_offset=offset)
    image.sum().backward()
    assert taken == [True, mode == "RGB+ED"]
