"""bridge.inria (the diff-gaussian-rasterization API) against the float64 dense reference on the test
device: colour, depth, alpha (IMAGE_ATOL), each input's gradient on its own and the NDC screen-space
gradient that densification reads (GRAD_RTOL; tests/render_scenes.py argues both numbers)."""
import pytest
import torch

from bridge.inria import GaussianRasterizationSettings, GaussianRasterizer
from conftest import assert_grads_close
from render.reference import reference_rasterize
from render_scenes import GRAD_RTOL, HEIGHT, IMAGE_ATOL, WIDTH, cameras, loss_weights, random_scene

BG = (0.3, 0.1, 0.6)


def settings(camera, device, sh_degree=3, scale_modifier=1.0, antialiasing=False, debug=False):
    return GaussianRasterizationSettings(
        image_height=camera.height, image_width=camera.width, tanfovx=camera.tanfovx, tanfovy=camera.tanfovy,
        bg=torch.tensor(BG, device=device), scale_modifier=scale_modifier,
        viewmatrix=camera.inria_viewmatrix.to(device), projmatrix=camera.inria_projmatrix.to(device),
        sh_degree=sh_degree, campos=camera.camera_center.to(device), prefiltered=False, debug=debug,
        antialiasing=antialiasing)


@pytest.fixture(scope="module")
def scene(device):
    return random_scene(n=100, seed=5, device=device)


def reference(scene, camera, scale_modifier=1.0, antialiasing=False):
    """Reference colour (3,H,W), depth, alpha, and grads of the same loss as `inria_loss`."""
    dev = scene["means"].device
    leaves = {k: v.double().clone().requires_grad_(True) for k, v in scene.items()}
    offset = torch.zeros(1, scene["means"].shape[0], 2, dtype=torch.float64, device=dev, requires_grad=True)
    image, alpha = reference_rasterize(
        leaves["means"], leaves["quats"], leaves["scales"] * scale_modifier, leaves["opacities"], leaves["sh"],
        camera.viewmat[None].to(dev, torch.float64), camera.K[None].to(dev, torch.float64), camera.width,
        camera.height, near_plane=0.2, sh_degree=3, backgrounds=torch.tensor([BG], dtype=torch.float64, device=dev),
        render_mode="RGB+D",
        rasterize_mode="antialiased" if antialiasing else "classic", means2d_offset=offset)
    color, depth, alpha = image[0, ..., :3].permute(2, 0, 1), image[0, ..., 3:].permute(2, 0, 1), alpha[0].permute(2, 0, 1)
    inria_loss(color, depth, alpha).backward()
    return color, depth, alpha, {k: v.grad for k, v in leaves.items()}, offset.grad[0]


def inria_loss(color, depth, alpha):
    def weights(x, seed):
        return loss_weights(x.shape, seed, device=x.device, dtype=x.dtype)
    return (color * weights(color, 7)).sum() + 0.1 * (depth * weights(depth, 9)).sum() + (alpha * weights(alpha, 10)).sum()


def run_inria(scene, camera, **kwargs):
    leaves = {k: v.clone().requires_grad_(True) for k, v in scene.items()}
    dev = scene["means"].device
    screenspace = torch.zeros(scene["means"].shape[0], 3, device=dev, requires_grad=True)
    rasterizer = GaussianRasterizer(settings(camera, dev, **kwargs))
    color, radii, depth, alpha = rasterizer(means3D=leaves["means"], means2D=screenspace,
                                            opacities=leaves["opacities"][:, None], shs=leaves["sh"],
                                            scales=leaves["scales"], rotations=leaves["quats"])
    inria_loss(color, depth, alpha).backward()
    return color, radii, depth, alpha, {k: v.grad for k, v in leaves.items()}, screenspace.grad


@pytest.mark.parametrize("camera_index,antialiasing", [(0, False), (1, False), (1, True)])
def test_inria_face_matches_reference(scene, camera_index, antialiasing):
    """Mutation-tested: caught the NDC scale of the means2D gradient halved (only this test sees it),
    the antialiased compensation halved ([1-True]), the depth gradient dropped, and every
    projection / SH / blending mutation listed in test_render_pipeline's SH test."""
    camera = cameras()[camera_index]  # the second one has an off-centre principal point
    color, radii, depth, alpha, grads, screen_grad = run_inria(scene, camera, antialiasing=antialiasing)
    ref_color, ref_depth, ref_alpha, ref_grads, ref_offset_grad = reference(scene, camera, antialiasing=antialiasing)
    assert color.shape == (3, HEIGHT, WIDTH) and depth.shape == (1, HEIGHT, WIDTH) and alpha.shape == (1, HEIGHT, WIDTH)
    torch.testing.assert_close(color.double(), ref_color, rtol=0, atol=IMAGE_ATOL)
    torch.testing.assert_close(alpha.double(), ref_alpha, rtol=0, atol=IMAGE_ATOL)
    torch.testing.assert_close(depth.double(), ref_depth, rtol=IMAGE_ATOL, atol=IMAGE_ATOL)
    # means2D gets dL/d(NDC) = dL/dpixel * (W/2, H/2), as in the original rasterizer
    ndc_scale = torch.tensor([WIDTH / 2, HEIGHT / 2], dtype=torch.float64, device=ref_offset_grad.device)
    assert_grads_close({**grads, "means2D": screen_grad[:, :2]}, {**ref_grads, "means2D": ref_offset_grad * ndc_scale},
                       GRAD_RTOL)
    assert not screen_grad[:, 2].any()
    assert radii.shape == (scene["means"].shape[0],) and (radii[:4] == 0).all() and (radii > 0).sum() > 40


def test_scale_modifier_and_precomputed_inputs(scene):
    """Mutation-tested: caught the face dropping scale_modifier."""
    camera, dev = cameras()[0], scene["means"].device
    color, *_ = run_inria(scene, camera, scale_modifier=0.7)
    ref_color, *_ = reference(scene, camera, scale_modifier=0.7)
    torch.testing.assert_close(color.double(), ref_color, rtol=0, atol=IMAGE_ATOL)

    from render.reference import covariance
    cov = covariance(scene["quats"], scene["scales"], None)
    cov6 = torch.stack([cov[:, 0, 0], cov[:, 0, 1], cov[:, 0, 2], cov[:, 1, 1], cov[:, 1, 2], cov[:, 2, 2]], 1)
    rgb = torch.rand(scene["means"].shape[0], 3, generator=torch.Generator().manual_seed(2)).to(dev)
    rasterizer = GaussianRasterizer(settings(camera, dev))
    color, _, _, _ = rasterizer(scene["means"], torch.zeros_like(scene["means"]), scene["opacities"][:, None],
                                colors_precomp=rgb, cov3D_precomp=cov6)
    ref, _ = reference_rasterize(scene["means"].double(), None, None, scene["opacities"].double(), rgb.double(),
                                 camera.viewmat[None].to(dev, torch.float64), camera.K[None].to(dev, torch.float64),
                                 WIDTH, HEIGHT, near_plane=0.2,
                                 backgrounds=torch.tensor([BG], dtype=torch.float64, device=dev), covars=cov6.double())
    torch.testing.assert_close(color.double(), ref[0].permute(2, 0, 1), rtol=0, atol=IMAGE_ATOL)


def test_mark_visible(scene):
    visible = GaussianRasterizer(settings(cameras()[0], scene["means"].device)).markVisible(scene["means"])
    assert visible.dtype == torch.bool and not visible[:4].any() and visible[4:].float().mean() > 0.9


def test_argument_errors_and_debug_dump(scene, tmp_path, monkeypatch):
    dev = scene["means"].device
    rasterizer = GaussianRasterizer(settings(cameras()[0], dev))
    means2d = torch.zeros_like(scene["means"])
    with pytest.raises(ValueError, match="one of either SHs"):
        rasterizer(scene["means"], means2d, scene["opacities"], shs=scene["sh"], colors_precomp=scene["sh"][:, 0],
                   scales=scene["scales"], rotations=scene["quats"])
    with pytest.raises(ValueError, match="scale/rotation pair"):
        rasterizer(scene["means"], means2d, scene["opacities"], shs=scene["sh"], scales=scene["scales"])
    monkeypatch.chdir(tmp_path)
    bad = scene["means"].clone()
    bad[0, 0] = float("inf")
    debug = GaussianRasterizer(settings(cameras()[0], dev, debug=True))
    with pytest.raises(RuntimeError, match="snapshot_fw.dump"):
        debug(bad, means2d, scene["opacities"], shs=scene["sh"], scales=scene["scales"], rotations=scene["quats"])
    saved = torch.load(tmp_path / "snapshot_fw.dump", weights_only=False, map_location=dev)
    assert torch.equal(saved["means"], bad)
