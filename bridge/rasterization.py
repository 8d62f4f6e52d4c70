"""gsplat-style 3D Gaussian splatting for batches of cameras, differentiable through Taichi kernels.

Staged like gsplat, one autograd Function per stage:
    _Project (render/projection.py)  Gaussians -> per-camera screen-space splats
    binning (render/binning.py)      tile/splat pairs sorted by (tile, depth), no gradient
    _Blend (render/blending.py)      splats -> images, alphas
Backgrounds, render modes and expected depth are plain torch on top, so autograd handles them.
"""
from __future__ import annotations

import functools
import math
from enum import Enum
from typing import Any, Optional

import torch

from render.binning import DEFAULT_MAX_PAIRS, TILE_SIZE, bin_unchecked, tile_grid
from render.blending import blend_kernels, split_record
from render.projection import ProjectionConfig, projection_kernels
from render.splat_record import CONIC, DEPTH, GEOMETRY, MEAN, OPACITY, PROJECTED, RGB

from taichi_mpm.runtime import device as taichi_device
from taichi_mpm.runtime import ensure_init
from taichi_mpm.validation import check_finite, check_int, check_number, check_tensor

RENDER_MODES = ("RGB", "D", "ED", "RGB+D", "RGB+ED")
RASTERIZE_MODES = ("classic", "antialiased")
TILE_THREADS = 256  # one CUDA thread per pixel of a 16x16 tile
MAX_CHANNELS = 32  # features per splat held in shared memory by the CUDA blending kernels


@functools.cache
def _projection(sh_degree: int, given_cov: bool, antialiased: bool, several_cameras: bool):
    """(forward kernel, backward kernel, which of means, quats, scales, covars, opacities, sh the
    kernels use), looked up once per call on plain arguments. The backward writes every gradient
    element (a thread per Gaussian sums its cameras): no zero-filled arrays for any camera count."""
    used = (True, not given_cov, not given_cov, given_cov, True, sh_degree >= 0)
    return (*projection_kernels(ProjectionConfig(sh_degree, given_cov, antialiased, accumulate=several_cameras)),
            used)


@functools.cache
def _device(arch: str) -> torch.device:
    """taichi_mpm.runtime.device() for the arch Taichi runs on, built once (a few us a call)."""
    return taichi_device()


def _device_index(dev: torch.device) -> int:
    """Tensor.get_device() of a tensor on dev (-1 for the CPU; "cuda" means the current GPU, as
    taichi_mpm.validation.same_device reads it): integers compare in well under a us, devices not."""
    if dev.type == "cpu":
        return -1
    return dev.index if dev.index is not None else torch.cuda.current_device()


def _is_f32(t, shape: tuple, device_index: int) -> bool:
    """t is a float32 tensor of this shape (None: any size) on the device of that index."""
    if not (isinstance(t, torch.Tensor) and t.dtype is torch.float32
            and (t.is_cpu if device_index < 0 else t.is_cuda and t.get_device() == device_index)):
        return False
    sizes = t.shape
    if len(sizes) != len(shape):
        return False
    for want, size in zip(shape, sizes):
        if want is not None and want != size:
            return False
    return True


@functools.cache
def _placeholder(shape: tuple, device: torch.device) -> torch.Tensor:
    """A tiny array standing in for an input (and its gradient) the compiled kernels never touch
    (quats/scales when cov3D is given, or the reverse; SH when colours are given): one per process."""
    return torch.empty(shape, device=device)


@functools.cache
def _no_items(device: torch.device) -> torch.Tensor:
    """The item_ids the blend kernels get when there are no pairs (no tile range reads it)."""
    return torch.zeros(1, dtype=torch.int32, device=device)


def _given(grads, ndims, device):
    """(arrays, bitmask) for a backward kernel: the output gradients the loss produced, contiguous, with
    bit k set for the k-th; a missing one (None) is a placeholder the kernel never reads, not zeros."""
    arrays, given = [], 0
    for k, (g, ndim) in enumerate(zip(grads, ndims)):
        if g is None:
            arrays.append(_placeholder((1,) * ndim, device))
        else:
            arrays.append(g.contiguous())
            given |= 1 << k
    return arrays, given


class _Project(torch.autograd.Function):
    """Gaussians -> (means2d, conics, depths, opacities, features) (C, N, ...): views of one array of
    splat records (C, N, PROJECTED) (render/splat_record.py; features: the columns the blend reads,
    from `columns`), the radii (C, N, 2) and, flat over the C*N items, the tile rectangles (C*N, 4)
    and pair counts (C*N,) that binning reads. The Gaussian arrays hold S scenes of N each (S*N
    rows) and the C cameras S groups, one a scene (render/projection.py)."""

    @staticmethod
    def forward(ctx, means, quats, scales, covars, opacities, sh, viewmats, Ks, plane: tuple, columns: tuple,
                kernels: tuple, N: int):
        # inputs pass as they are: TorchKernel's forward launch gives Taichi no gradient pointers
        C, dev = viewmats.shape[0], means.device
        width, height, near, far = plane
        splats = torch.empty(C, N, PROJECTED, device=dev)
        radii = torch.empty(C, N, 2, dtype=torch.int32, device=dev)
        rects = torch.empty(C * N, 4, dtype=torch.int32, device=dev)
        pair_counts = torch.empty(C * N, dtype=torch.int32, device=dev)
        kernels[0](means, quats, scales, covars, opacities, sh, viewmats, Ks, width, height, near, far,
                   splats, radii, rects, pair_counts)
        ctx.save_for_backward(means, quats, scales, covars, opacities, sh, viewmats, Ks, rects)
        ctx.plane, ctx.columns, ctx.kernel, ctx.used, ctx.N = plane, columns, kernels[1], kernels[2], N
        ctx.mark_non_differentiable(radii, rects, pair_counts)
        ctx.set_materialize_grads(False)  # no zero-filled gradients for outputs the loss does not use
        means2d, conics, opac, features = split_record(splats, *columns)
        return means2d, conics, splats[..., DEPTH], opac, features, radii, rects, pair_counts

    @staticmethod
    def backward(ctx, v_means2d, v_conics, v_depths, v_opac, v_features, _v_radii, _v_rects, _v_pair_counts):
        inputs = ctx.saved_tensors
        means, quats, scales, covars, opacities, sh, viewmats, Ks, rects = inputs
        # the kernel writes every gradient element (summing the cameras itself). An unused input is a
        # placeholder the kernel never touches: it stands in for its own gradient array
        grads = [torch.empty_like(t) if u else t for t, u in zip(inputs, ctx.used)]
        v_splats = _projected_grads(viewmats.shape[0], ctx.N, ctx.columns, v_means2d, v_conics, v_depths, v_opac,
                                    v_features)
        ctx.kernel(means, quats, scales, covars, opacities, sh, viewmats, Ks, ctx.plane[0], ctx.plane[1], rects,
                   v_splats, *grads)
        return (*(g if u else None for g, u in zip(grads, ctx.used)), None, None, None, None, None, None)


def _projected_grads(C, N, columns, v_means2d, v_conics, v_depths, v_opac, v_features):
    """The gradients of _Project's outputs as one array of its records' layout (C, N, PROJECTED).
    When the blend's backward gave them, they are views of such an array already (the blend read the
    projection's records in place): that array is taken as it is, with a depth gradient from another
    use added in; else the gradients given are summed into zeros, column by column."""
    record = getattr(v_means2d, "_base", None)
    if (record is not None and record.shape == (C, N, PROJECTED) and record.is_contiguous()
            and all(g is not None and g._base is record and g.storage_offset() - record.storage_offset() == column
                    for g, column in ((v_means2d, MEAN), (v_conics, CONIC), (v_opac, OPACITY),
                                      (v_features, columns[0])))):
        if v_depths is not None:
            record[..., DEPTH] += v_depths
        return record
    record = torch.zeros(C, N, PROJECTED, device=(v_means2d if v_means2d is not None else v_conics).device)
    means2d, conics, opac, features = split_record(record, *columns)
    for g, view in zip((v_means2d, v_conics, v_depths, v_opac, v_features),
                       (means2d, conics, record[..., DEPTH], opac, features)):
        if g is not None:
            view += g
    return record


class _Blend(torch.autograd.Function):
    """Screen-space splats + sorted tile pairs -> (features (C, H, W, K), alphas (C, H, W, 1)).
    `record`: the (C, N, width) splat records the other inputs are views of, with the features from
    column `first_feature` (the projection's, read in place), or None: the inputs are packed into
    records here."""

    @staticmethod
    def forward(ctx, means2d, conics, opacities, features, record, first_feature, item_ids, tile_ranges, width,
                height, variant_channels: tuple):
        C, K, dev = means2d.shape[0], features.shape[-1], means2d.device
        if record is None:
            record = torch.cat([means2d, conics, opacities[..., None], features], -1)
            first_feature = GEOMETRY
        image = torch.empty(C, height, width, K, device=dev)
        alpha = torch.empty(C, height, width, 1, device=dev)
        final_T = torch.empty(C, height, width, device=dev)
        last = torch.empty(C, height, width, dtype=torch.int32, device=dev)
        # tile_ranges' third column (binning's walked=True) takes the walked bound of each tile
        kernels = blend_kernels(*variant_channels, "alpha", first_feature)
        kernels[0](_items(record), item_ids, tile_ranges, width, height, image, alpha, final_T, last)
        ctx.save_for_backward(record, item_ids, tile_ranges, final_T, last)
        ctx.size, ctx.kernel, ctx.columns = (width, height), kernels[1], (first_feature, K)
        ctx.set_materialize_grads(False)  # the backward kernel skips a missing gradient
        return image, alpha

    @staticmethod
    def backward(ctx, v_image, v_alpha):
        record, item_ids, tile_ranges, final_T, last = ctx.saved_tensors
        (v_image, v_alpha), given = _given((v_image, v_alpha), (4, 4), record.device)  # GIVEN_IMAGE, _ALPHA
        v_record = torch.zeros_like(record)
        ctx.kernel(_items(record), item_ids, tile_ranges, *ctx.size, final_T, last, v_image, v_alpha, given,
                   _items(v_record))
        return (*split_record(v_record, *ctx.columns), None, None, None, None, None, None, None)


def _items(record):
    """(C, N, width) records as the flat (C*N, width) view the blend kernels index by item id."""
    return record.view(record.shape[0] * record.shape[1], record.shape[2])


def _render_nothing(C, width, height, channels, color_channels, backgrounds, grid, dev):
    """Zero Gaussians: the background (or zeros) everywhere, alpha 0."""
    image = torch.zeros(C, height, width, channels, device=dev)
    if backgrounds is not None:
        pad = channels - color_channels
        image = image + torch.cat([backgrounds, backgrounds.new_zeros(C, pad)], -1)[:, None, None, :]
    meta = dict(means2d=torch.zeros(C, 0, 2, device=dev), conics=torch.zeros(C, 0, 3, device=dev),
                depths=torch.zeros(C, 0, device=dev), opacities=torch.zeros(C, 0, device=dev),
                radii=torch.zeros(C, 0, 2, dtype=torch.int32, device=dev), gaussian_ids=None,
                tile_ranges=torch.zeros(C, grid.tiles_y, grid.tiles_x, 2, dtype=torch.int32, device=dev),
                item_ids=torch.zeros(0, dtype=torch.int32, device=dev), num_pairs=0, width=width,
                height=height, tile_size=grid.tile_size)
    return image, torch.zeros(C, height, width, 1, device=dev), meta


# gsplat 1.5.3 rasterization() keywords this rasterizer supports only at one value (or a few):
# keyword -> (accepted values, what they are). Anything else is a ValueError naming the keyword.
_GSPLAT_FIXED = {
    "radius_clip": ((0.0,), "Gaussians are never culled by screen radius"),
    "eps2d": ((0.3,), "the 0.3 px^2 dilation is compiled into the projection kernels"),
    "packed": ((False,), "outputs and meta are dense (C, N, ...)"),
    "tile_size": ((TILE_SIZE,), "square tiles of render.binning.TILE_SIZE pixels"),
    "sparse_grad": ((False,), "gradients are dense"),
    "absgrad": ((False,), "no absolute screen-space gradient"),
    "distributed": ((False,), "one process renders all cameras"),
    "camera_model": (("pinhole",), "pinhole intrinsics Ks only"),
    "with_ut": ((False,), "EWA projection, no unscented transform"),
    "with_eval3d": ((False,), "2D splat evaluation only"),
    "radial_coeffs": ((None,), "no lens distortion"),
    "tangential_coeffs": ((None,), "no lens distortion"),
    "thin_prism_coeffs": ((None,), "no lens distortion"),
    "ftheta_coeffs": ((None,), "no f-theta camera"),
    "rolling_shutter": (("GLOBAL",), "global shutter (gsplat's RollingShutterType.GLOBAL or the string)"),
    "viewmats_rs": ((None,), "global shutter: no second pose per camera"),
}


def _is_value(value, accepted) -> bool:
    if accepted is None or isinstance(accepted, bool):
        return value is accepted
    if isinstance(value, (bool, torch.Tensor)) or value is None:
        return False
    return value == accepted  # 0 and 0.0 alike; strings exactly


def _check_gsplat_options(options: dict) -> None:
    """ValueError naming the first gsplat keyword whose value this rasterizer does not support."""
    for name, value in options.items():
        accepted, meaning = _GSPLAT_FIXED[name]
        if isinstance(value, Enum):
            value = value.name  # gsplat's RollingShutterType, without importing gsplat
        if not any(_is_value(value, a) for a in accepted):
            shown = value if isinstance(value, (bool, int, float, str)) else type(value).__name__
            raise ValueError(f"{name}={shown!r} is not supported by bridge.rasterize; supported: "
                             f"{' or '.join(repr(a) for a in accepted)} ({meaning})")


def _check_values(tensors: dict, conditions: list) -> None:
    """validate=True's value checks with one device sync and a handful of torch ops: every tensor
    (None or empty skipped) finite, and every condition (0-d tensor, test on its float, message)
    true. The fast test reads one L1 norm per tensor (one fused _foreach_norm: finite exactly when
    every element is, or when huge values overflow it, which the exact check below then clears) and
    the conditions' values, in one stacked fetch. Only if something fails do the checks run one by
    one (check_finite names the non-finite tensors), so the error is the one a check at a time gives."""
    present = [t for t in tensors.values() if t is not None and t.numel()]
    with torch.no_grad():
        values = list(torch._foreach_norm(present, 1)) if present else []
        values += [value for value, _, _ in conditions]
        if not values:
            return
        if any(v.dtype != values[0].dtype for v in values):
            values = [v.double() for v in values]
        fetched = torch.stack(values).tolist()
    k = len(present)
    if (all(math.isfinite(x) for x in fetched[:k])
            and all(test(x) for x, (_, test, _) in zip(fetched[k:], conditions))):
        return
    check_finite(**tensors)
    for x, (_, test, message) in zip(fetched[k:], conditions):
        if not test(x):
            raise ValueError(message)


def _positive(x: float) -> bool:
    return x > 0.0


def _nonzero(x: float) -> bool:
    return x != 0.0


def _validate(means, quats, scales, covars, opacities, colors, viewmats, Ks, *, width, height, near_plane,
              far_plane, sh_degree, backgrounds, render_mode, rasterize_mode, means2d_offset, channel_chunk,
              validate, dev):
    """Clear Python errors for bad arguments; returns (batch shape, N, C, color channels, blended
    channels): S = prod(batch shape) scenes of N Gaussians, each seen by its own C cameras."""
    if render_mode not in RENDER_MODES:
        raise ValueError(f"render_mode must be one of {RENDER_MODES}, got {render_mode!r}")
    if rasterize_mode not in RASTERIZE_MODES:
        raise ValueError(f"rasterize_mode must be one of {RASTERIZE_MODES}, got {rasterize_mode!r}")
    check_int("width", width, low=1)
    check_int("height", height, low=1)
    check_int("channel_chunk", channel_chunk, low=1)
    near_plane = check_number("near_plane", near_plane, low=0.0, low_open=True)
    check_number("far_plane", far_plane, low=near_plane, low_open=True)

    on = _device_index(dev)  # means must be on the Taichi device; the other inputs on means' device
    if not _is_f32(means, (None, 3), on):
        leading = (None,) * (means.dim() - 1) if isinstance(means, torch.Tensor) and means.dim() > 2 else (None,)
        check_tensor("means", means, (*leading, 3), dtype=torch.float32, device=dev)  # (..., N, 3)
    batch, N = tuple(means.shape[:-2]), means.shape[-2]

    def tensor(name, t, shape):
        # float32 of this shape on means' device passes at once; otherwise check_tensor says what is
        # wrong (comparing the device with the Taichi device only for one not on means' device)
        if _is_f32(t, shape, on):
            return t
        same = isinstance(t, torch.Tensor) and t.device == means.device
        return check_tensor(name, t, shape, dtype=torch.float32, device=None if same else dev)

    C = tensor("viewmats", viewmats, (*batch, None, 4, 4)).shape[-3]
    if C == 0:
        raise ValueError("viewmats holds no camera")
    tensor("Ks", Ks, (*batch, C, 3, 3))
    tensor("opacities", opacities, (*batch, N))
    if covars is not None:
        tensor("covars", covars, (*batch, N, 6))
    else:
        if quats is None or scales is None:
            raise ValueError("give quats and scales, or covars")
        tensor("quats", quats, (*batch, N, 4))
        tensor("scales", scales, (*batch, N, 3))
    if sh_degree is not None:
        check_int("sh_degree", sh_degree, low=0, high=3)
        tensor("colors", colors, (*batch, N, None, 3))
        if colors.shape[-2] < (sh_degree + 1) ** 2:
            raise ValueError(f"sh_degree={sh_degree} needs {(sh_degree + 1) ** 2} SH coefficients per "
                             f"Gaussian, colors has {colors.shape[-2]}")
    elif isinstance(colors, torch.Tensor) and colors.dim() == len(batch) + 2:
        tensor("colors", colors, (*batch, N, None))
    else:
        tensor("colors", colors, (*batch, C, N, None))
    color_channels = 3 if sh_degree is not None else colors.shape[-1]
    channels = {"RGB": color_channels, "D": 1, "ED": 1}.get(render_mode, color_channels + 1)
    if not 1 <= channels <= MAX_CHANNELS:
        raise ValueError(f"{channels} channels to blend; between 1 and {MAX_CHANNELS} are supported "
                         f"(render wider features in chunks)")
    if means2d_offset is not None:
        tensor("means2d_offset", means2d_offset, (*batch, C, N, 2))
    if backgrounds is not None:
        if render_mode in ("D", "ED"):
            raise ValueError(f"backgrounds apply to colour channels; render_mode={render_mode!r} has none")
        tensor("backgrounds", backgrounds, (*batch, C, color_channels))
    if validate and N > 0:  # value checks cost one device sync
        with torch.no_grad():
            # the smallest focal length among fx, fy of every camera; the shortest quaternion
            conditions = [(torch.diagonal(Ks, dim1=-2, dim2=-1)[..., :2].amin(), _positive,
                           "Ks must have positive focal lengths fx, fy")]
            if covars is None:
                conditions.insert(0, (torch.linalg.vector_norm(quats, dim=-1).amin(), _nonzero,
                                      "quats contains a zero quaternion"))
        _check_values(dict(means=means, quats=quats, scales=scales, covars=covars, opacities=opacities,
                           colors=colors, viewmats=viewmats, Ks=Ks, backgrounds=backgrounds), conditions)

    return batch, N, C, color_channels, channels


def _scenes_flat(batch: tuple, tensors: dict, per_gaussian_colors: bool) -> dict:
    """The batch's scenes laid end to end: Gaussian arrays (S*N, ...), camera arrays (S*C, ...) and
    per-camera arrays (S*C, N, ...); colours given per Gaussian become per camera (S*C, N, D), the
    form the blend packs. Views wherever the layout allows."""
    flat = {k: None if t is None else t.flatten(0, len(batch)) for k, t in tensors.items()}
    if per_gaussian_colors:
        colors = tensors["colors"]
        C = tensors["viewmats"].shape[-3]
        flat["colors"] = colors.unsqueeze(len(batch)).expand(*batch, C, *colors.shape[-2:]).flatten(0, len(batch))
    return flat


def rasterize(means: torch.Tensor, quats: Optional[torch.Tensor], scales: Optional[torch.Tensor],
              opacities: torch.Tensor, colors: torch.Tensor, viewmats: torch.Tensor, Ks: torch.Tensor,
              width: int, height: int, *, near_plane: float = 0.01, far_plane: float = 1e10,
              radius_clip: float = 0.0, eps2d: float = 0.3, sh_degree: Optional[int] = None, packed: bool = False,
              tile_size: int = 16, backgrounds: Optional[torch.Tensor] = None, render_mode: str = "RGB",
              sparse_grad: bool = False, absgrad: bool = False, rasterize_mode: str = "classic",
              channel_chunk: int = 32, distributed: bool = False, camera_model: str = "pinhole",
              segmented: bool = False, covars: Optional[torch.Tensor] = None, with_ut: bool = False,
              with_eval3d: bool = False, radial_coeffs: Optional[torch.Tensor] = None,
              tangential_coeffs: Optional[torch.Tensor] = None, thin_prism_coeffs: Optional[torch.Tensor] = None,
              ftheta_coeffs: Any = None, rolling_shutter: Any = "GLOBAL", viewmats_rs: Optional[torch.Tensor] = None,
              max_pairs: int = DEFAULT_MAX_PAIRS, validate: bool = True,
              means2d_offset: Optional[torch.Tensor] = None):
    """Render N Gaussians from C cameras: gsplat 1.5.3's ``rasterization`` signature, pinhole, dense.

    Every keyword of gsplat 1.5.3's ``rasterization`` is accepted, in its order and everything after
    ``height`` keyword-only. Those this rasterizer implements only at one value (radius_clip, eps2d,
    packed, tile_size, sparse_grad, absgrad, distributed, camera_model, with_ut, with_eval3d, the
    distortion coefficients, rolling_shutter, viewmats_rs) raise ValueError naming the keyword and
    the supported value for anything else. Note packed=False here where gsplat defaults to True:
    outputs are always dense.

    Batch dimensions (...) before N and C work as in gsplat: every input may lead with the same
    batch shape (a batch of scenes, say the frames of a simulation, each with its own Gaussians and
    its own C cameras), and everything renders in one call (one launch per stage). Shapes below
    without them; with them, each input and output gains them in front.

    Args:
        means: (N, 3) centres. quats: (N, 4) wxyz rotations (normalized inside). scales: (N, 3).
        opacities: (N,) in [0, 1].
        colors: (N, B, 3) SH coefficients with B >= (sh_degree+1)^2 when sh_degree is given, else
            (N, D) or (C, N, D) features.
        viewmats: (C, 4, 4) world-to-camera (OpenCV axes: x right, y down, z forward).
        Ks: (C, 3, 3) intrinsics (pixel centres at +0.5, as gsplat).
        width, height: image size in pixels.
        near_plane, far_plane: camera-space depth range kept.
        sh_degree: 0..3 (colors are SH coefficients) or None (colors are features).
        backgrounds: (C, D) added to the colour channels with weight 1 - alpha.
        render_mode: "RGB", "D" (accumulated depth), "ED" (depth / alpha), "RGB+D" or "RGB+ED".
        rasterize_mode: "classic" or "antialiased" (Mip-Splatting opacity compensation).
        channel_chunk: accepted for gsplat's callers; up to 32 channels blend in one pass here.
        segmented: accepted for gsplat's callers (a sort strategy); it changes nothing here.
        covars: (N, 6) upper-triangular cov3D (xx, xy, xz, yy, yz, zz) used instead of quats/scales.
    Beyond gsplat:
        max_pairs: cap on tile/Gaussian pairs; more raises render.binning.TooManyPairsError.
        validate: check finiteness of inputs (one device sync).
        means2d_offset: optional (C, N, 2) pixels added to the projected means before blending; its
            gradient is the screen-space gradient (the Inria face passes a zero-valued one).

    Returns:
        render_colors (C, H, W, D'), render_alphas (C, H, W, 1) and meta, a dict with means2d
        (C, N, 2; call retain_grad() for screen-space gradients), conics, depths, opacities, radii
        (C, N, 2) int32, tile_ranges (C, tiles_y, tiles_x, 2), item_ids, width, height, tile_size,
        n_cameras (C) and batch_shape. With batch dimensions, an item id indexes the S*C*N splats of
        the flattened batch (camera-major), as tile_ranges' ranges index item_ids.
        Gradients reach means, quats, scales (or covars), opacities, colors and backgrounds;
        viewmats and Ks get none.
    """
    gsplat_options = (radius_clip, eps2d, packed, tile_size, sparse_grad, absgrad, distributed, camera_model,
                      with_ut, with_eval3d, radial_coeffs, tangential_coeffs, thin_prism_coeffs, ftheta_coeffs,
                      rolling_shutter, viewmats_rs)
    if any(v is not d for v, d in zip(gsplat_options, _GSPLAT_DEFAULTS)):  # defaults pass without a look
        _check_gsplat_options(dict(zip(_GSPLAT_FIXED, gsplat_options)))
    del segmented  # a gsplat sort option with no effect on the result
    arch = ensure_init()
    dev = _device(arch)
    # CUDA blends a tile per thread block through shared memory; the per-pixel kernels serve the CPU
    blend_variant = "pixel" if arch == "cpu" else "block"
    batch, N, C, color_channels, channels = _validate(
        means, quats, scales, covars, opacities, colors, viewmats, Ks, width=width, height=height,
        near_plane=near_plane, far_plane=far_plane, sh_degree=sh_degree, backgrounds=backgrounds,
        render_mode=render_mode, rasterize_mode=rasterize_mode, means2d_offset=means2d_offset,
        channel_chunk=channel_chunk, validate=validate, dev=dev)
    S = math.prod(batch)
    if batch:
        flat = _scenes_flat(batch, dict(means=means, quats=quats, scales=scales, covars=covars,
                                        opacities=opacities, colors=colors, viewmats=viewmats, Ks=Ks,
                                        backgrounds=backgrounds),
                            per_gaussian_colors=sh_degree is None and colors.dim() == len(batch) + 2)
        means, quats, scales, covars, opacities, colors, viewmats, Ks, backgrounds = flat.values()
    grid = tile_grid(width, height)
    if not 0 < max_pairs < 2**31:  # render.binning's own check (its unchecked entry point is used)
        raise ValueError(f"max_pairs must be in [1, 2**31) (pair indices are int32), got {max_pairs}")
    if S * C * N >= 2**31 or S * C * grid.num_tiles * TILE_THREADS >= 2**31:
        raise ValueError(f"{S * C} cameras x {N} Gaussians at {width}x{height} overflow the kernels' int32 "
                         f"indices; render fewer cameras per call")
    sh_deg = -1 if sh_degree is None else sh_degree
    if N == 0 or S == 0:
        image, alpha, meta = _render_nothing(S * C, width, height, channels, color_channels, backgrounds, grid, dev)
        return _unflatten(batch, C, image, alpha, meta, ("means2d", "conics", "depths", "opacities", "radii"))
    given_cov = covars is not None
    kernels = _projection(sh_deg, given_cov, rasterize_mode == "antialiased", C > 1)
    given = (means, quats, scales, covars, opacities, colors)
    # .contiguous() returns a contiguous tensor itself; unused inputs get a cached placeholder
    # the projection's records hold rgb and then depth: the features the blend reads are columns of them
    columns = (DEPTH, 1) if render_mode in ("D", "ED") else (RGB, 3 if render_mode == "RGB" else 4)
    means2d, conics, depths, opac, features, radii, rects, pair_counts = _Project.apply(
        *(t.contiguous() if u else _placeholder(s, dev) for t, u, s in zip(given, kernels[2], _PLACEHOLDER_SHAPES)),
        viewmats.contiguous(), Ks.contiguous(), (width, height, float(near_plane), float(far_plane)), columns,
        kernels, N)
    C_all = S * C  # the batch's cameras, end to end
    record = means2d._base  # the records (S*C, N, PROJECTED), which the blend reads in place unless changed
    if batch:  # meta's arrays take the batch shape, and what follows reads flat views of them, so that
        # a gradient retained on meta["means2d"] (gsplat's densification signal) is the one the blend sends
        means2d, conics, depths, opac, radii = (t.unflatten(0, (*batch, C)) for t in (means2d, conics, depths, opac,
                                                                                    radii))
    if means2d_offset is not None:
        means2d, record = means2d + means2d_offset, None
    meta = dict(means2d=means2d, conics=conics, depths=depths, opacities=opac, radii=radii, gaussian_ids=None)
    if batch:
        means2d, conics, depths, opac = (t.flatten(0, len(batch)) for t in (means2d, conics, depths, opac))
    if sh_degree is None and render_mode not in ("D", "ED"):  # the caller's colours (and depth), packed
        rgb = colors.unsqueeze(0).expand(C_all, -1, -1) if colors.dim() == 2 else colors
        features, record = (rgb if render_mode == "RGB" else torch.cat([rgb, depths[..., None]], -1)), None
    binning = bin_unchecked(rects, depths.detach().view(-1), pair_counts, C_all, grid, max_pairs, walked=True)
    item_ids = binning.item_ids if binning.num_pairs else _no_items(dev)
    image, alpha = _Blend.apply(means2d, conics, opac, features, record, columns[0], item_ids, binning.tile_ranges,
                                width, height, (blend_variant, channels))
    if backgrounds is not None:
        pad = image.shape[-1] - color_channels
        bg = torch.cat([backgrounds, backgrounds.new_zeros(C_all, pad)], -1) if pad else backgrounds
        image = image + (1.0 - alpha) * bg[:, None, None, :]
    if render_mode in ("ED", "RGB+ED"):
        image = torch.cat([image[..., :-1], image[..., -1:] / alpha.clamp_min(1e-10)], -1)
    meta.update(tile_ranges=binning.tile_ranges[..., :2], item_ids=binning.item_ids, num_pairs=binning.num_pairs,
                width=width, height=height, tile_size=grid.tile_size)
    return _unflatten(batch, C, image, alpha, meta)


def _unflatten(batch: tuple, C: int, image, alpha, meta: dict, keys: tuple = ()):
    """The outputs of the flattened batch's S*C cameras given the batch shape back: (*batch, C, ...),
    for the images, the tile ranges and meta's `keys`."""
    if batch:
        image, alpha = image.unflatten(0, (*batch, C)), alpha.unflatten(0, (*batch, C))
        for key in ("tile_ranges",) + keys:
            meta[key] = meta[key].unflatten(0, (*batch, C))
    meta.update(n_cameras=C, batch_shape=batch)
    return image, alpha, meta


# the keyword defaults of the gsplat options rasterize supports at one value: the common call passes
# exactly these objects, so an identity test clears it before the full check
_GSPLAT_DEFAULTS = tuple(rasterize.__kwdefaults__[name] for name in _GSPLAT_FIXED)
# shapes of the placeholders for means, quats, scales, covars, opacities, sh when a kernel ignores them
_PLACEHOLDER_SHAPES = ((1, 3), (1, 4), (1, 3), (1, 6), (1,), (1, 1, 3))
