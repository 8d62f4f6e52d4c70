"""Dense pure-torch 2D Gaussian splatting: the float64 test reference and the autograd fallback.

Every Gaussian is evaluated at every pixel (no tiles) with the rules of the Taichi kernels
(render/splat2d.py + render/blending.py): cov = L L^T, alpha = min(0.99, opacity * exp(power)) with
power = -0.5 d^T cov^-1 d <= 0, alpha < 1/255 skipped; "sum" mode adds alpha_i c_i in any order,
"alpha" mode composites front to back in index order (Gaussian 0 in front) and stops before T would
drop below 1e-4. Gradients come from torch autograd. It holds an (H*W, N) matrix: small images only.
"""
from __future__ import annotations

from typing import Tuple

import torch

ALPHA_MIN = 1.0 / 255.0
ALPHA_MAX = 0.99
T_MIN = 1e-4


def reference_splat2d(means: torch.Tensor, chol: torch.Tensor, colors: torch.Tensor, opacities: torch.Tensor,
                      width: int, height: int, mode: str = "sum") -> Tuple[torch.Tensor, torch.Tensor]:
    """means (N, 2) px, chol (N, 3) (l0, l1, l2), colors (N, K), opacities (N,)
    -> colour (H, W, K) (no background) and alpha (H, W): 1 - T in "alpha" mode, sum of alphas in "sum"."""
    l0, l1, l2 = chol.unbind(-1)
    a, b, c = l0 * l0, l0 * l1, l1 * l1 + l2 * l2
    det = a * c - b * b
    ys, xs = torch.meshgrid(torch.arange(height, dtype=means.dtype, device=means.device) + 0.5,
                            torch.arange(width, dtype=means.dtype, device=means.device) + 0.5, indexing="ij")
    dx = means[:, 0] - xs.reshape(-1, 1)  # (H*W, N)
    dy = means[:, 1] - ys.reshape(-1, 1)
    power = -0.5 * (c / det * dx * dx + a / det * dy * dy) + b / det * dx * dy
    raw = opacities * torch.exp(power.clamp_max(0.0))
    alpha = torch.where((power <= 0) & (raw.clamp_max(ALPHA_MAX) >= ALPHA_MIN), raw.clamp_max(ALPHA_MAX), 0.0)
    if mode == "sum":
        return (alpha @ colors).reshape(height, width, -1), alpha.sum(1).reshape(height, width)
    if mode != "alpha":
        raise ValueError(f"mode must be 'sum' or 'alpha', got {mode!r}")
    kept = torch.cumprod(1.0 - alpha, 1) >= T_MIN  # T after each splat; blending stops before it drops below
    alpha = alpha * kept
    T_after = torch.cumprod(1.0 - alpha, 1)
    T_before = torch.cat([torch.ones_like(T_after[:, :1]), T_after[:, :-1]], 1)
    image = (alpha * T_before) @ colors
    return image.reshape(height, width, -1), (1.0 - T_after[:, -1]).reshape(height, width) if alpha.shape[1] else \
        torch.zeros(height, width, dtype=means.dtype, device=means.device)
