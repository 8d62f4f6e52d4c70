"""2D Gaussian splatting for image fitting (GaussianImage), differentiable through Taichi kernels.

One autograd Function runs the three stages the 3D rasterizer shares with it:
    preprocess (render/splat2d.py)        Cholesky factors -> splat records (render/splat_record.py), tiles
    binning (render/binning.py)           tile/Gaussian pairs in index order, no gradient
    blend (render/blending.py)            "sum" (order-free) or "alpha" (front to back) blending
and its backward runs the hand-written blend and preprocess backward kernels. With
use_manual_backward=False the same image comes from render/reference2d.py (dense pure torch,
autograd), the reference the tests compare the kernels against.
"""
from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch

from render.binning import DEFAULT_MAX_PAIRS, bin_unchecked, tile_grid
from render.blending import BLEND_MODES, blend_kernels, split_record
from render.reference2d import reference_splat2d
from render.splat2d import preprocess_kernels
from render.splat_record import GEOMETRY
from taichi_mpm.runtime import ensure_init
from taichi_mpm.validation import check_int, check_tensor

from .rasterization import (MAX_CHANNELS, _check_values, _device, _device_index, _given, _is_f32, _no_items,
                            _nonzero)


class _Splat2D(torch.autograd.Function):
    """(means (N, 2), chol (N, 3), opacities (N,), colors (N, K)) -> (colour (H, W, K), alpha (H, W))."""

    @staticmethod
    def forward(ctx, means, chol, opacities, colors, width, height, blend, max_pairs):
        # inputs pass as they are (TorchKernel's forward launch gives Taichi no gradient pointers);
        # one image: the blend kernels' items are the N Gaussians, whose records the preprocess writes
        N, K, dev = means.shape[0], colors.shape[1], means.device
        splats = torch.empty(N, GEOMETRY + K, device=dev)
        rects = torch.empty(N, 4, dtype=torch.int32, device=dev)
        counts = torch.empty(N, dtype=torch.int32, device=dev)
        preprocess_kernels()[0](means, chol, opacities, colors, width, height, splats, rects, counts)
        # no depths: pairs keep index order, Gaussian 0 in front; the third column of the tile ranges
        # is the blend kernels' walked bound (render.binning.bin_unchecked's walked=True)
        binning = bin_unchecked(rects, None, counts, 1, tile_grid(width, height), max_pairs, walked=True)
        item_ids = binning.item_ids if binning.num_pairs else _no_items(dev)
        image = torch.empty(1, height, width, K, device=dev)
        alpha = torch.empty(1, height, width, 1, device=dev)
        final_T = torch.empty(1, height, width, device=dev)
        last = torch.empty(1, height, width, dtype=torch.int32, device=dev)
        blend[0](splats, item_ids, binning.tile_ranges, width, height, image, alpha, final_T, last)
        ctx.save_for_backward(splats, chol, rects, item_ids, binning.tile_ranges, final_T, last)
        ctx.size, ctx.kernel = (width, height), blend[1]
        ctx.set_materialize_grads(False)  # the backward kernel skips a missing gradient
        return image[0], alpha.view(height, width)

    @staticmethod
    def backward(ctx, v_image, v_alpha):
        splats, chol, rects, item_ids, tile_ranges, final_T, last = ctx.saved_tensors
        width, height = ctx.size
        (v_image, v_alpha), given = _given((None if v_image is None else v_image[None],
                                            None if v_alpha is None else v_alpha.reshape(1, height, width, 1)),
                                           (4, 4), splats.device)
        v_splats = torch.zeros_like(splats)
        ctx.kernel(splats, item_ids, tile_ranges, width, height, final_T, last, v_image, v_alpha, given, v_splats)
        v_means, _, v_opac, v_colors = split_record(v_splats, GEOMETRY, splats.shape[1] - GEOMETRY)
        v_chol = torch.empty_like(chol)
        preprocess_kernels()[1](chol, rects, v_splats, v_chol)  # reads the conic columns
        return v_means, v_chol, v_opac, v_colors, None, None, None, None


@functools.lru_cache(maxsize=8)
def _unit_opacities(n: int, device: torch.device) -> torch.Tensor:
    """opacities=None (GaussianImage): ones, built once per size; the kernels only read them."""
    return torch.ones(n, device=device)


def _common_case(means, chol, colors, opacities, background, width, height, mode, dev) -> bool:
    """True when the arguments are what the Taichi path takes as they are (float32 on the Taichi
    device, the right shapes, 1..32 channels, int sizes): a few us in place of the checks one by one,
    which run only when it is False, so that every error stays theirs."""
    on = _device_index(dev)
    if not (type(width) is int and type(height) is int and width >= 1 and height >= 1 and mode in BLEND_MODES
            and _is_f32(means, (None, 2), on) and isinstance(colors, torch.Tensor) and colors.dim() == 2):
        return False
    N, K = means.shape[0], colors.shape[1]
    return (1 <= K <= MAX_CHANNELS and _is_f32(chol, (N, 3), on) and _is_f32(colors, (N, K), on)
            and (opacities is None or _is_f32(opacities, (N,), on))
            and (background is None or _is_f32(background, (K,), on)))


def _validate(means, chol, colors, opacities, background, width, height, mode, validate, dev, manual):
    if not (manual and _common_case(means, chol, colors, opacities, background, width, height, mode, dev)):
        width, height = check_int("width", width, 1), check_int("height", height, 1)
        if mode not in BLEND_MODES:
            raise ValueError(f"mode must be one of {BLEND_MODES}, got {mode!r}")
        dtypes = torch.float32 if manual else (torch.float32, torch.float64)
        check_tensor("means", means, (None, 2), dtypes, dev if manual else None)
        N = means.shape[0]
        for name, t, shape in (("chol", chol, (N, 3)), ("colors", colors, (N, None)),
                               ("opacities", opacities, (N,))):
            if t is not None:
                check_tensor(name, t, shape, means.dtype, means.device)
        K = colors.shape[1]
        if not 1 <= K <= MAX_CHANNELS:
            raise ValueError(f"colors has {K} channels; between 1 and {MAX_CHANNELS} are supported")
        if background is not None:
            check_tensor("background", background, (K,), means.dtype, means.device)
    N, K = means.shape[0], colors.shape[1]
    if validate:  # one device sync
        with torch.no_grad():  # the smallest |l0 * l2|: zero for a degenerate factor
            conditions = [(torch.linalg.vector_norm(torch.prod(chol[:, ::2], 1), ord=-math.inf), _nonzero,
                           "chol has a zero diagonal entry (l0 * l2 == 0): a degenerate covariance")] if N else []
        _check_values(dict(means=means, chol=chol, colors=colors, opacities=opacities, background=background),
                      conditions)
    return width, height, N, K


def splat2d(means: torch.Tensor, chol: torch.Tensor, colors: torch.Tensor, width: int, height: int,
            opacities: Optional[torch.Tensor] = None, background: Optional[torch.Tensor] = None,
            mode: str = "sum", use_manual_backward: bool = True, validate: bool = True,
            max_pairs: int = DEFAULT_MAX_PAIRS) -> Tuple[torch.Tensor, torch.Tensor]:
    """Render N 2D Gaussians into a width x height image.

    Args:
        means: (N, 2) centres in pixels (pixel (px, py) covers [px, px+1) x [py, py+1)).
        chol: (N, 3) Cholesky factor (l0, l1, l2) of each covariance, cov = [[l0, 0], [l1, l2]] @ its
            transpose; l0 and l2 must be non-zero.
        colors: (N, K) features, 1 <= K <= 32.
        opacities: (N,) or None (GaussianImage: all 1).
        background: (K,) colour; "alpha" mode adds (1 - alpha) * background, "sum" mode adds it as is.
        mode: "sum" (order-free accumulated sum, GaussianImage) or "alpha" (front-to-back compositing
            in index order, Gaussian 0 in front).
        use_manual_backward: True runs the Taichi kernels with their hand-written backward (float32);
            False the dense pure-torch renderer with autograd (any float dtype, small images only).
        validate: check finiteness and non-degenerate factors (one device sync).
        max_pairs: cap on tile/Gaussian pairs (render.binning.TooManyPairsError above it).

    Returns:
        colour (H, W, K) and alpha (H, W) (1 - transmittance in "alpha" mode, the sum of the Gaussians'
        weights in "sum" mode). Gradients reach means, chol, colors, opacities and background.
    """
    dev = _device(ensure_init()) if use_manual_backward else None
    width, height, N, K = _validate(means, chol, colors, opacities, background, width, height, mode, validate,
                                    dev, use_manual_backward)
    if N == 0:  # nothing to blend: the background (or zeros) everywhere
        zeros = means.new_zeros(height, width, K)
        image = zeros if background is None else zeros + background
        return image, means.new_zeros(height, width)
    if use_manual_backward:
        if not 0 < max_pairs < 2**31:  # render.binning's own check (its unchecked entry point is used)
            raise ValueError(f"max_pairs must be in [1, 2**31) (pair indices are int32), got {max_pairs}")
        if opacities is None:
            opacities = _unit_opacities(N, dev)
        variant = "pixel" if dev.type == "cpu" else "block"
        image, alpha = _Splat2D.apply(means.contiguous(), chol.contiguous(), opacities.contiguous(),
                                      colors.contiguous(), width, height, blend_kernels(variant, K, mode), max_pairs)
    else:
        if opacities is None:
            opacities = torch.ones(N, dtype=means.dtype, device=means.device)
        image, alpha = reference_splat2d(means, chol, colors, opacities, width, height, mode)
    if background is not None:
        image = image + (background if mode == "sum" else (1.0 - alpha)[..., None] * background)
    return image, alpha


MEANS_MARGIN = 0.5  # saved positions may lie this far (in image sizes) outside the image
CHOL_MIN = 0.3  # px: the smallest |l0|, |l2| a fitted Gaussian keeps (no degenerate covariances)


class GaussianImage(torch.nn.Module):
    """An image as N 2D Gaussians: means (N, 2) px, chol (N, 3), colors (N, K), optional opacity logits.

    forward(use_manual_backward=True, scale=1.0) -> (H*scale, W*scale, K) image; scale renders the
    same Gaussians at another resolution. save/load write a compact .npz: means as 16-bit fixed point
    over [-1/2, 3/2] of the image size (steps of 1/32768 of it), the rest float16 (16 bytes a Gaussian with 3 colours, 18 with opacity).
    """

    def __init__(self, means: torch.Tensor, chol: torch.Tensor, colors: torch.Tensor, width: int, height: int,
                 opacity_logits: Optional[torch.Tensor] = None, mode: str = "sum",
                 background: Optional[torch.Tensor] = None) -> None:
        super().__init__()
        if mode not in BLEND_MODES:
            raise ValueError(f"mode must be one of {BLEND_MODES}, got {mode!r}")
        self.width, self.height, self.mode = check_int("width", width, 1), check_int("height", height, 1), mode
        self.means = torch.nn.Parameter(means.detach().clone())
        self.chol = torch.nn.Parameter(chol.detach().clone())
        self.colors = torch.nn.Parameter(colors.detach().clone())
        self.opacity_logits = None if opacity_logits is None else torch.nn.Parameter(opacity_logits.detach().clone())
        self.register_buffer("background", background if background is not None else
                             torch.zeros(colors.shape[1], dtype=colors.dtype, device=colors.device))

    @classmethod
    def from_image(cls, image: torch.Tensor, num: int, mode: str = "sum", opacity: bool = False,
                   generator: Optional[torch.Generator] = None) -> "GaussianImage":
        """num Gaussians at random places of image (H, W, K), coloured from it, sized to tile it."""
        check_tensor("image", image, (None, None, None), torch.float32)
        H, W, K = image.shape
        num = check_int("num", num, 0)
        g = generator if generator is not None else torch.Generator().manual_seed(0)
        means = torch.rand(num, 2, generator=g) * torch.tensor([W, H], dtype=torch.float32)
        sigma = max((W * H / max(num, 1)) ** 0.5 * 0.6, 1.0)
        chol = torch.tensor([sigma, 0.0, sigma]).repeat(num, 1) * (1 + 0.1 * torch.rand(num, 3, generator=g))
        chol[:, 1] = 0.0
        px = means.long().clamp_min(0)
        colors = image.cpu()[px[:, 1].clamp_max(H - 1), px[:, 0].clamp_max(W - 1)]
        if mode == "sum":  # overlapping Gaussians add up: start each near its share of the pixel
            colors = colors / (2 * torch.pi * sigma * sigma * num / (W * H))
        logits = torch.full((num,), 2.0) if opacity else None
        dev = image.device
        return cls(means.to(dev), chol.to(dev), colors.to(dev), W, H,
                   None if logits is None else logits.to(dev), mode)

    def opacities(self) -> Optional[torch.Tensor]:
        return None if self.opacity_logits is None else torch.sigmoid(self.opacity_logits)

    def forward(self, use_manual_backward: bool = True, scale: float = 1.0, validate: bool = False) -> torch.Tensor:
        means, chol, width, height = self.means, self.chol, self.width, self.height
        if scale != 1.0:
            width, height = max(1, round(self.width * scale)), max(1, round(self.height * scale))
            sx, sy = width / self.width, height / self.height
            means = means * torch.tensor([sx, sy], dtype=means.dtype, device=means.device)
            chol = chol * torch.tensor([sx, sy, sy], dtype=chol.dtype, device=chol.device)
        image, _ = splat2d(means, chol, self.colors, width, height, self.opacities(), self.background,
                           self.mode, use_manual_backward, validate)
        return image

    @torch.no_grad()
    def clamp_(self) -> None:
        """Keep the factors away from degenerate (call after each optimiser step)."""
        diag = self.chol[:, 0::2]
        diag.copy_(torch.where(diag.abs() < CHOL_MIN, torch.copysign(torch.full_like(diag, CHOL_MIN), diag), diag))

    @torch.no_grad()
    def grow_(self, target: torch.Tensor, count: int) -> int:
        """Add up to `count` Gaussians at the pixels where |render - target| is largest; returns how many.

        New Gaussians are small (1 px) and carry the residual there ("sum" mode) or the target colour,
        placed behind the others ("alpha" mode appends them last). Rebuild the optimiser afterwards
        (scenes.fit_image.fit does, keeping the old Gaussians' Adam moments)."""
        H, W, K = target.shape
        residual = (target - self()).reshape(-1, K)
        error = residual.abs().sum(-1)
        count = min(check_int("count", count, 0), error.numel())
        if count == 0:
            return 0
        pixels = torch.topk(error, count).indices
        ys, xs = pixels // W, pixels % W
        means = torch.stack([xs, ys], -1).to(self.means.dtype) + 0.5
        chol = torch.tensor([1.0, 0.0, 1.0], dtype=self.chol.dtype, device=self.chol.device).repeat(count, 1)
        colors = residual[pixels] if self.mode == "sum" else target.reshape(-1, K)[pixels]
        self.means = torch.nn.Parameter(torch.cat([self.means, means]))
        self.chol = torch.nn.Parameter(torch.cat([self.chol, chol]))
        self.colors = torch.nn.Parameter(torch.cat([self.colors, colors.to(self.colors.dtype)]))
        if self.opacity_logits is not None:
            self.opacity_logits = torch.nn.Parameter(torch.cat([self.opacity_logits,
                                                                self.opacity_logits.new_full((count,), 2.0)]))
        return count

    def save(self, path: Path) -> None:
        size = torch.tensor([self.width, self.height], dtype=torch.float32, device=self.means.device)
        fixed = ((self.means.detach() / size + MEANS_MARGIN) / (1 + 2 * MEANS_MARGIN)).clamp(0, 1) * 65535
        arrays = dict(size=np.array([self.width, self.height], np.int32), mode=np.array(self.mode),
                      means=fixed.round().cpu().numpy().astype(np.uint16),
                      chol=self.chol.detach().cpu().numpy().astype(np.float16),
                      colors=self.colors.detach().cpu().numpy().astype(np.float16),
                      background=self.background.cpu().numpy().astype(np.float16))
        if self.opacity_logits is not None:
            arrays["opacity_logits"] = self.opacity_logits.detach().cpu().numpy().astype(np.float16)
        np.savez_compressed(path, **arrays)

    @classmethod
    def load(cls, path: Path, device: Optional[torch.device] = None) -> "GaussianImage":
        with np.load(path) as z:
            missing = {"size", "mode", "means", "chol", "colors", "background"} - set(z.files)
            if missing:
                raise ValueError(f"{path} is not a GaussianImage file (missing {sorted(missing)})")
            W, H = (int(v) for v in z["size"])
            f32 = lambda a: torch.from_numpy(a.astype(np.float32)).to(device)  # noqa: E731
            unit = f32(z["means"]) / 65535 * (1 + 2 * MEANS_MARGIN) - MEANS_MARGIN
            means = unit * torch.tensor([W, H], dtype=torch.float32, device=device)
            logits = f32(z["opacity_logits"]) if "opacity_logits" in z.files else None
            return cls(means, f32(z["chol"]), f32(z["colors"]), W, H, logits, str(z["mode"]), f32(z["background"]))
