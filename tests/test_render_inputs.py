"""Bad and edge-case input to bridge.rasterize: each gets a correct image (checked against the float64
reference to IMAGE_ATOL, see tests/render_scenes.py) or a clear Python error before any kernel runs;
and every keyword of gsplat 1.5.3's rasterization is accepted, unsupported values rejected by name."""
import enum

import pytest
import torch

from bridge.rasterization import rasterize
from render.binning import TooManyPairsError
from render.reference import reference_rasterize
from render_scenes import HEIGHT, IMAGE_ATOL, WIDTH, camera_tensors, random_scene


@pytest.fixture(scope="module")
def scene(device):
    s = random_scene(n=60, seed=3, sh_bases=1, device=device)
    return dict(means=s["means"], quats=s["quats"], scales=s["scales"], opacities=s["opacities"],
                colors=s["sh"], sh_degree=0)


def render(width=WIDTH, height=HEIGHT, **inputs):
    viewmats, Ks = camera_tensors(1, device=inputs["means"].device)
    return rasterize(**inputs, viewmats=viewmats, Ks=Ks, width=width, height=height)


def reference(width=WIDTH, height=HEIGHT, **inputs):
    viewmats, Ks = camera_tensors(1, torch.float64, inputs["means"].device)
    inputs = {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    return reference_rasterize(**inputs, viewmats=viewmats, Ks=Ks, width=width, height=height)


def assert_matches_reference(**inputs):
    image, alpha, meta = render(**inputs)
    ref_image, ref_alpha = reference(**inputs)
    torch.testing.assert_close(image.double(), ref_image, rtol=0, atol=IMAGE_ATOL)
    torch.testing.assert_close(alpha.double(), ref_alpha, rtol=0, atol=IMAGE_ATOL)
    return image, meta


def test_zero_gaussians_give_the_background(device):
    bg = torch.tensor([[0.1, 0.2, 0.3]], device=device)
    image, alpha, meta = render(means=torch.zeros(0, 3, device=device), quats=torch.zeros(0, 4, device=device),
                                scales=torch.zeros(0, 3, device=device), opacities=torch.zeros(0, device=device),
                                colors=torch.zeros(0, 1, 3, device=device), sh_degree=0, backgrounds=bg)
    assert image.shape == (1, HEIGHT, WIDTH, 3) and torch.equal(image, bg.expand(1, HEIGHT, WIDTH, 3))
    assert alpha.shape == (1, HEIGHT, WIDTH, 1) and not alpha.any()


def test_gaussians_behind_camera_and_on_near_plane(scene):
    """Mutation-tested: caught the near-plane test made strict (z > near drops the Gaussians on it)."""
    s = dict(scene)
    means = s["means"].clone()
    means[:10, 2] = -2.0   # behind
    means[10:15, 2] = 0.0  # in the camera plane
    means[15:20, 2] = 0.3  # exactly on the near plane below: kept, like the reference
    s["means"] = means
    image, meta = assert_matches_reference(**s, near_plane=0.3)
    assert not meta["radii"][0, :15].any()
    every_one_behind = dict(s, means=torch.cat([means[:, :2], -means[:, 2:].abs()], 1))
    image, alpha, _ = render(**every_one_behind)
    assert not image.any() and not alpha.any()


def test_huge_gaussian_covering_every_tile(scene):
    s = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in scene.items()}
    s["scales"][0] = 50.0
    s["means"][0] = torch.tensor([0.0, 0.0, 3.0], device=s["means"].device)
    image, meta = assert_matches_reference(**s)
    tiles = ((WIDTH + 15) // 16) * ((HEIGHT + 15) // 16)
    assert meta["num_pairs"] <= tiles * s["means"].shape[0]
    with pytest.raises(TooManyPairsError, match="max_pairs"):
        render(**s, max_pairs=tiles)


def test_odd_image_sizes(scene):
    for width, height in ((1, 1), (17, 5), (31, 33)):
        assert_matches_reference(**scene, width=width, height=height)


@pytest.mark.parametrize("name", ["means", "quats", "scales", "opacities", "colors"])
def test_non_finite_inputs_are_rejected(scene, name):
    bad = dict(scene)
    bad[name] = scene[name].clone()
    bad[name].view(-1)[3] = float("nan")
    with pytest.raises(ValueError, match=f"non-finite.*{name}"):
        render(**bad)


def test_value_checks_name_the_first_failure(scene):
    """validate=True checks all values with one device sync, then reports as a check at a time would:
    non-finite inputs first, then a zero quaternion, then the focal lengths."""
    viewmats, Ks = camera_tensors(1, device=scene["means"].device)
    for fx, fy in ((0.0, 50.0), (50.0, -1.0)):
        bad_Ks = Ks.clone()
        bad_Ks[0, 0, 0], bad_Ks[0, 1, 1] = fx, fy
        with pytest.raises(ValueError, match="positive focal lengths"):
            rasterize(**scene, viewmats=viewmats, Ks=bad_Ks, width=WIDTH, height=HEIGHT)
    bad_Ks[0, 0, 2] = float("inf")
    quats = scene["quats"].clone()
    quats[2] = 0.0
    with pytest.raises(ValueError, match="non-finite.*Ks"):
        rasterize(**dict(scene, quats=quats), viewmats=viewmats, Ks=bad_Ks, width=WIDTH, height=HEIGHT)
    with pytest.raises(ValueError, match="zero quaternion"):
        rasterize(**dict(scene, quats=quats), viewmats=viewmats, Ks=Ks.clone().fill_(-1.0), width=WIDTH,
                  height=HEIGHT)


def test_wrong_shapes_dtypes_devices(scene):
    with pytest.raises(ValueError, match=r"means must have shape \(\*, 3\)"):
        render(**dict(scene, means=scene["means"][:, :2]))
    with pytest.raises(ValueError, match="quats must have shape"):
        render(**dict(scene, quats=scene["quats"][:-1]))
    with pytest.raises(TypeError, match="float32"):
        render(**dict(scene, opacities=scene["opacities"].double()))
    with pytest.raises(ValueError, match="is on meta"):
        render(**dict(scene, scales=scene["scales"].to("meta")))
    with pytest.raises(ValueError, match="SH coefficients"):
        render(**dict(scene, sh_degree=2))
    with pytest.raises(ValueError, match="zero quaternion"):
        render(**dict(scene, quats=torch.zeros_like(scene["quats"])))
    with pytest.raises(ValueError, match="render_mode"):
        render(**scene, render_mode="RGBD")
    with pytest.raises(ValueError, match="width"):
        render(**scene, width=0)
    with pytest.raises(ValueError, match="height must be an int"):
        render(**scene, height=20.5)
    with pytest.raises(ValueError, match="near_plane"):
        render(**scene, near_plane=0.0)
    with pytest.raises(ValueError, match="far_plane"):
        render(**scene, near_plane=2.0, far_plane=1.0)
    with pytest.raises(ValueError, match="backgrounds"):
        render(**scene, backgrounds=torch.zeros(1, 4, device=scene["means"].device))
    with pytest.raises(TypeError, match="positional"):  # everything after height is keyword-only
        viewmats, Ks = camera_tensors(1, device=scene["means"].device)
        rasterize(scene["means"], scene["quats"], scene["scales"], scene["opacities"], scene["colors"], viewmats,
                  Ks, WIDTH, HEIGHT, 0.01)


class RollingShutterType(enum.Enum):  # gsplat.cuda._wrapper.RollingShutterType's members, without gsplat
    ROLLING_TOP_TO_BOTTOM = 0
    GLOBAL = 4


def test_every_gsplat_keyword_at_its_supported_value_renders_the_same_image(scene):
    """gsplat 1.5.3 rasterization's keywords, each at the value supported here, change nothing."""
    plain, _, _ = render(**scene)
    dev = scene["means"].device
    same, _, meta = render(**scene, near_plane=0.01, far_plane=1e10, radius_clip=0, eps2d=0.3, packed=False,
                           tile_size=16, render_mode="RGB", sparse_grad=False, absgrad=False,
                           rasterize_mode="classic", channel_chunk=8, distributed=False, camera_model="pinhole",
                           segmented=True, covars=None, with_ut=False, with_eval3d=False, radial_coeffs=None,
                           tangential_coeffs=None, thin_prism_coeffs=None, ftheta_coeffs=None,
                           rolling_shutter=RollingShutterType.GLOBAL, viewmats_rs=None,
                           backgrounds=torch.zeros(1, 3, device=dev))
    assert torch.equal(plain, same) and meta["gaussian_ids"] is None


@pytest.mark.parametrize("keyword,value", [
    ("radius_clip", 1.0), ("eps2d", 0.1), ("packed", True), ("tile_size", 8), ("sparse_grad", True),
    ("absgrad", True), ("distributed", True), ("camera_model", "fisheye"), ("with_ut", True),
    ("with_eval3d", True), ("radial_coeffs", "tensor"), ("tangential_coeffs", "tensor"),
    ("thin_prism_coeffs", "tensor"), ("ftheta_coeffs", object()), ("rolling_shutter", "enum"),
    ("viewmats_rs", "tensor"),
])
def test_unsupported_gsplat_values_are_rejected_by_name(scene, keyword, value):
    if value == "tensor":
        value = torch.zeros(1, 4, device=scene["means"].device)
    elif value == "enum":
        value = RollingShutterType.ROLLING_TOP_TO_BOTTOM
    with pytest.raises(ValueError, match=rf"^{keyword}=.* is not supported by bridge.rasterize; supported: "):
        render(**scene, **{keyword: value})


def test_channel_chunk_must_be_a_positive_int(scene):
    with pytest.raises(ValueError, match="channel_chunk"):
        render(**scene, channel_chunk=0)
