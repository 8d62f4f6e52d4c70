"""Bad and edge-case input to bridge.rasterize: each gets a correct image (checked against the float64
reference) or a clear Python error before any kernel runs."""
import pytest
import torch

from bridge.rasterization import rasterize
from render.binning import TooManyPairsError
from render.reference import reference_rasterize
from render_scenes import HEIGHT, WIDTH, camera_tensors, random_scene


@pytest.fixture(scope="module")
def scene():
    s = random_scene(n=60, seed=3, sh_bases=1)
    return dict(means=s["means"], quats=s["quats"], scales=s["scales"], opacities=s["opacities"],
                colors=s["sh"], sh_degree=0)


def render(width=WIDTH, height=HEIGHT, **inputs):
    viewmats, Ks = camera_tensors(1)
    return rasterize(**inputs, viewmats=viewmats, Ks=Ks, width=width, height=height)


def reference(width=WIDTH, height=HEIGHT, **inputs):
    viewmats, Ks = camera_tensors(1, torch.float64)
    inputs = {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    return reference_rasterize(**inputs, viewmats=viewmats, Ks=Ks, width=width, height=height)


def assert_matches_reference(**inputs):
    image, alpha, meta = render(**inputs)
    ref_image, ref_alpha = reference(**inputs)
    torch.testing.assert_close(image.double(), ref_image, rtol=0, atol=1e-5)
    torch.testing.assert_close(alpha.double(), ref_alpha, rtol=0, atol=1e-5)
    return image, meta


def test_zero_gaussians_give_the_background():
    bg = torch.tensor([[0.1, 0.2, 0.3]])
    image, alpha, meta = render(means=torch.zeros(0, 3), quats=torch.zeros(0, 4), scales=torch.zeros(0, 3),
                                opacities=torch.zeros(0), colors=torch.zeros(0, 1, 3), sh_degree=0, backgrounds=bg)
    assert image.shape == (1, HEIGHT, WIDTH, 3) and torch.equal(image, bg.expand(1, HEIGHT, WIDTH, 3))
    assert alpha.shape == (1, HEIGHT, WIDTH, 1) and not alpha.any()


def test_gaussians_behind_camera_and_on_near_plane(scene):
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
    s["means"][0] = torch.tensor([0.0, 0.0, 3.0])
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
    with pytest.raises(ValueError, match="width and height"):
        render(**scene, width=0)
    with pytest.raises(ValueError, match="near_plane"):
        render(**scene, near_plane=0.0)
    with pytest.raises(ValueError, match="backgrounds"):
        render(**scene, backgrounds=torch.zeros(1, 4))


def test_gsplat_options(scene):
    dense, _, _ = render(**scene)
    packed, _, meta = render(**scene, packed=True)  # accepted; the layout stays dense
    assert torch.equal(dense, packed) and meta["gaussian_ids"] is None
    with pytest.raises(NotImplementedError, match="tile_size"):
        render(**scene, tile_size=8)
    with pytest.raises(NotImplementedError, match="absgrad"):
        render(**scene, absgrad=True)
