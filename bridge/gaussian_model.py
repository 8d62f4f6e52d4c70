"""GaussianModel: the learnable parameters of a set of 3D Gaussians, shared by every renderer.

Stored unconstrained, as 3DGS trains them: means, log-scales, quaternions (any norm), opacity
logits, SH coefficients (DC and the rest). ``activated()`` gives the tensors renderers take
(``bridge.rasterize(**model.activated(), ...)``-style names: means, quats, scales, opacities, colors),
``albedo()`` the scalar albedo the transient renderer uses.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn

from render.sh import num_sh_bases
from taichi_mpm.validation import check_int, check_tensor

SH_C0 = 0.28209479177387814  # the degree-0 SH basis constant: colour = C0 * dc + 0.5


class GaussianModel(nn.Module):
    """N Gaussians with learnable means (N, 3), scaling (N, 3) log-scales, rotation (N, 4) wxyz
    quaternions, opacity (N,) logits, features_dc (N, 3) and features_rest (N, B - 1, 3) SH coefficients
    (B = (sh_degree + 1)^2)."""

    def __init__(self, means: torch.Tensor, scales: torch.Tensor, quats: Optional[torch.Tensor] = None,
                 opacities: Optional[torch.Tensor] = None, colors: Optional[torch.Tensor] = None,
                 sh_degree: int = 0):
        """Initialise from activated values: scales > 0 (N, 3), opacities in (0, 1) (N,),
        colors (N, 3) RGB (the DC term; higher SH terms start at 0). Defaults: identity rotation,
        opacity 0.5, colour 0.5 grey."""
        super().__init__()
        means = check_tensor("means", means, (None, 3), (torch.float32, torch.float64), finite=True)
        n, dtype, dev = means.shape[0], means.dtype, means.device
        if n == 0:
            raise ValueError("a GaussianModel needs at least one Gaussian, got 0")
        self.sh_degree = check_int("sh_degree", sh_degree, 0, 4)
        scales = check_tensor("scales", scales, (n, 3), dtype, dev, finite=True)
        if bool((scales <= 0).any()):
            raise ValueError("scales must be > 0")
        if quats is None:
            quats = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=dtype, device=dev).expand(n, 4)
        quats = check_tensor("quats", quats, (n, 4), dtype, dev, finite=True)
        if bool((quats.norm(dim=-1) == 0).any()):
            raise ValueError("quats must be non-zero")
        if opacities is None:
            opacities = torch.full((n,), 0.5, dtype=dtype, device=dev)
        opacities = check_tensor("opacities", opacities, (n,), dtype, dev, finite=True)
        if bool(((opacities <= 0) | (opacities >= 1)).any()):
            raise ValueError("opacities must lie in (0, 1)")
        if colors is None:
            colors = torch.full((n, 3), 0.5, dtype=dtype, device=dev)
        colors = check_tensor("colors", colors, (n, 3), dtype, dev, finite=True)
        self.means = nn.Parameter(means.detach().clone())
        self.scaling = nn.Parameter(scales.detach().log())
        self.rotation = nn.Parameter(quats.detach().clone())
        self.opacity = nn.Parameter(torch.logit(opacities.detach()))
        self.features_dc = nn.Parameter((colors.detach() - 0.5) / SH_C0)
        self.features_rest = nn.Parameter(torch.zeros(n, num_sh_bases(self.sh_degree) - 1, 3, dtype=dtype, device=dev))

    def __len__(self) -> int:
        return self.means.shape[0]

    def activated(self) -> Dict[str, torch.Tensor]:
        """means (N, 3), quats (N, 4) unit, scales (N, 3), opacities (N,), colors (N, B, 3) SH coefficients."""
        return dict(means=self.means, quats=nn.functional.normalize(self.rotation, dim=-1),
                    scales=self.scaling.exp(), opacities=torch.sigmoid(self.opacity),
                    colors=torch.cat((self.features_dc[:, None, :], self.features_rest), 1))

    def albedo(self) -> torch.Tensor:
        """(N,) scalar albedo: the mean over RGB of the DC colour, C0 * features_dc + 0.5 (not clamped,
        so its gradient never vanishes)."""
        return (SH_C0 * self.features_dc + 0.5).mean(-1)

    def extra_repr(self) -> str:
        return f"n={len(self)}, sh_degree={self.sh_degree}"
