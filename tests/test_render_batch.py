"""bridge.rasterize with batch dimensions (gsplat's `...`): a batch of scenes, each with its own
Gaussians and its own cameras, rendered in one call equals each scene rendered on its own (which
tests/test_render_pipeline.py checks against the float64 reference), in values and in every
input's gradient, element by element."""
import pytest
import torch

from bridge.rasterization import rasterize
from conftest import assert_grads_close
from render_scenes import GRAD_RTOL, HEIGHT, IMAGE_ATOL, WIDTH, camera_tensors, loss_weights, random_scene

N = 60


def scenes(device, count: int):
    """`count` different random scenes, each seen by the two test cameras in its own order."""
    out = []
    viewmats, Ks = camera_tensors(2, device=device)
    for k in range(count):
        s = random_scene(N, seed=10 + k, device=device)
        order = [k % 2, 1 - k % 2]
        out.append(dict(means=s["means"], quats=s["quats"], scales=s["scales"], opacities=s["opacities"],
                        sh=s["sh"], viewmats=viewmats[order], Ks=Ks[order]))
    return out


def render(inputs: dict, **kwargs):
    """(image, alpha, meta, grads of the loss w.r.t. every tensor input and meta's means2d) with
    fixed loss weights."""
    leaves = {k: v.clone().requires_grad_(v.is_floating_point() and k not in ("viewmats", "Ks"))
              for k, v in inputs.items()}
    image, alpha, meta = rasterize(**leaves, width=WIDTH, height=HEIGHT, **kwargs)
    meta["means2d"].retain_grad()  # gsplat's densification signal
    # one scene's weights, broadcast over the batch: every scene weighs as in its own call
    w_image = loss_weights(image.shape[-4:], device=image.device, dtype=image.dtype)
    w_alpha = loss_weights(alpha.shape[-4:], 8, device=image.device, dtype=image.dtype)
    ((image * w_image).sum() + (alpha * w_alpha).sum()).backward()
    grads = {k: v.grad for k, v in leaves.items() if v.requires_grad}
    return image.detach(), alpha.detach(), meta, dict(grads, means2d=meta["means2d"].grad)


def stack(parts: list, keys, shape=None):
    batched = {k: torch.stack([p[k] for p in parts]) for k in keys}
    return {k: v.unflatten(0, shape) for k, v in batched.items()} if shape else batched


def compare(parts: list, keys, shape, **kwargs):
    """The batch (shape `shape`, scenes in row-major order) against one call per scene."""
    batch = stack(parts, keys, shape)
    image, alpha, meta, grads = render(batch, **kwargs)
    flat = lambda t: t.flatten(0, len(shape) - 1)  # noqa: E731
    assert image.shape[:len(shape)] == shape and meta["batch_shape"] == shape and meta["n_cameras"] == 2
    for k, part in enumerate(parts):
        single = {key: part[key] for key in keys}
        ref_image, ref_alpha, ref_meta, ref_grads = render(single, **kwargs)
        torch.testing.assert_close(flat(image)[k], ref_image, rtol=0, atol=IMAGE_ATOL)
        torch.testing.assert_close(flat(alpha)[k], ref_alpha, rtol=0, atol=IMAGE_ATOL)
        assert torch.equal(flat(meta["radii"])[k], ref_meta["radii"])
        torch.testing.assert_close(flat(meta["means2d"])[k], ref_meta["means2d"])
        assert_grads_close({key: flat(g)[k] for key, g in grads.items()}, ref_grads, GRAD_RTOL)


@pytest.mark.parametrize("shape", [(3,), (2, 2)])
def test_batch_of_scenes_with_sh_and_backgrounds(device, shape):
    """Mutation-tested: the projection reading scene 0's Gaussians for every camera, and its
    backward summing every camera of the batch instead of its scene's, each fail here."""
    parts = scenes(device, shape[0] * (shape[1] if len(shape) > 1 else 1))
    for k, p in enumerate(parts):
        p["colors"] = p.pop("sh")[:, :16]
        p["backgrounds"] = torch.rand(2, 3, generator=torch.Generator().manual_seed(k)).to(device)
    compare(parts, ("means", "quats", "scales", "opacities", "colors", "viewmats", "Ks", "backgrounds"), shape,
            sh_degree=3, render_mode="RGB+ED")


def test_batch_of_covariances_with_features_per_gaussian(device):
    """Colours given per Gaussian (..., N, D) become per camera inside; cov3D given."""
    parts = scenes(device, 2)
    for p in parts:
        R = p["scales"][:, :, None] * torch.eye(3, device=device)
        cov = R @ R.transpose(1, 2)
        p["covars"] = cov.flatten(1)[:, [0, 1, 2, 4, 5, 8]].contiguous()
        p["colors"] = p["sh"][:, 0, :].sigmoid()
    compare(parts, ("means", "covars", "opacities", "colors", "viewmats", "Ks"), (2,), quats=None, scales=None)


def test_batch_with_one_camera_a_scene_and_screen_offsets(device):
    """One camera a scene takes the projection's non-accumulating backward; per-camera features
    and means2d_offset carry the camera axis inside the batch."""
    parts = scenes(device, 2)
    for k, p in enumerate(parts):
        p["viewmats"], p["Ks"] = p["viewmats"][:1], p["Ks"][:1]
        p["colors"] = p["sh"][None, :, 0, :].sigmoid()
        p["means2d_offset"] = torch.randn(1, N, 2, generator=torch.Generator().manual_seed(k)).to(device)
    batch = stack(parts, ("means", "quats", "scales", "opacities", "colors", "viewmats", "Ks", "means2d_offset"))
    image, alpha, meta, grads = render(batch)
    assert image.shape == (2, 1, HEIGHT, WIDTH, 3) and meta["n_cameras"] == 1
    for k, part in enumerate(parts):
        ref_image, ref_alpha, _, ref_grads = render({key: part[key] for key in batch})
        torch.testing.assert_close(image[k], ref_image, rtol=0, atol=IMAGE_ATOL)
        assert_grads_close({key: g[k] for key, g in grads.items()}, ref_grads, GRAD_RTOL)


def test_batch_shapes_must_agree(device):
    parts = scenes(device, 2)
    batch = stack(parts, ("means", "quats", "scales", "opacities", "viewmats", "Ks"))
    colors = torch.rand(2, N, 3, device=device)
    with pytest.raises(ValueError, match=r"viewmats must have shape \(2, \*, 4, 4\)"):
        rasterize(batch["means"], batch["quats"], batch["scales"], batch["opacities"], colors,
                  batch["viewmats"][0], batch["Ks"][0], WIDTH, HEIGHT)
    with pytest.raises(ValueError, match=r"opacities must have shape \(2, 60\)"):
        rasterize(batch["means"], batch["quats"], batch["scales"], batch["opacities"][:, :-1], colors,
                  batch["viewmats"], batch["Ks"], WIDTH, HEIGHT)
    empty = rasterize(batch["means"][:, :0], batch["quats"][:, :0], batch["scales"][:, :0],
                      batch["opacities"][:, :0], colors[:, :0], batch["viewmats"], batch["Ks"], WIDTH, HEIGHT)
    assert empty[0].shape == (2, 2, HEIGHT, WIDTH, 3) and not empty[1].any()
