"""Drop-in for diff-gaussian-rasterization (the Inria 3DGS rasterizer), on the Taichi kernels.

    from bridge.inria import GaussianRasterizationSettings, GaussianRasterizer

Same settings and call as the original. The differences a user may notice:
- the call returns (color (3, H, W), radii (N,) int32, depth (1, H, W), alpha (1, H, W)); depth is
  the alpha-blended camera-space depth (sum of w_i z_i, not normalised by alpha);
- means2D (N, 3 or 2, zeros, requires_grad) receives dL/d(mean2D in NDC), as in the original, so
  densification thresholds carry over; its third component gets no gradient;
- SH view directions come from the camera centre of `viewmatrix` (Inria's `campos` is that point);
- `prefiltered` is accepted and ignored (the near plane at z = 0.2 is always applied, as the original
  does); `debug=True` saves the forward inputs to ``snapshot_fw.dump`` (torch.save) when it fails.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import nn

from .rasterization import rasterize

INRIA_NEAR = 0.2
DEBUG_DUMP = "snapshot_fw.dump"


class GaussianRasterizationSettings(NamedTuple):
    image_height: int
    image_width: int
    tanfovx: float
    tanfovy: float
    bg: torch.Tensor
    scale_modifier: float
    viewmatrix: torch.Tensor
    projmatrix: torch.Tensor
    sh_degree: int
    campos: torch.Tensor
    prefiltered: bool
    debug: bool
    antialiasing: bool = False


def settings_to_gsplat(s: GaussianRasterizationSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """(viewmats (1, 4, 4), Ks (1, 3, 3)) of Inria settings: focal lengths from tanfov (as Inria's
    Jacobian), principal point from the projection part of projmatrix (as Inria's mean projection)."""
    view = s.viewmatrix.detach().double().T
    proj = s.projmatrix.detach().double().T @ torch.linalg.inv(view)
    W, H = s.image_width, s.image_height
    K = torch.tensor([[W / (2 * s.tanfovx), 0.0, (float(proj[0, 2]) + 1) * W / 2],
                      [0.0, H / (2 * s.tanfovy), (float(proj[1, 2]) + 1) * H / 2],
                      [0.0, 0.0, 1.0]], dtype=torch.float32, device=s.viewmatrix.device)
    return view.float()[None].contiguous(), K[None]


class GaussianRasterizer(nn.Module):
    def __init__(self, raster_settings: GaussianRasterizationSettings):
        super().__init__()
        self.raster_settings = raster_settings

    def markVisible(self, positions: torch.Tensor) -> torch.Tensor:
        """(N,) bool: in front of the near plane (z > 0.2 in camera space), as the original."""
        with torch.no_grad():
            view = self.raster_settings.viewmatrix.T
            z = positions @ view[2, :3] + view[2, 3]
            return z > INRIA_NEAR

    def forward(self, means3D: torch.Tensor, means2D: torch.Tensor, opacities: torch.Tensor,
                shs: Optional[torch.Tensor] = None, colors_precomp: Optional[torch.Tensor] = None,
                scales: Optional[torch.Tensor] = None, rotations: Optional[torch.Tensor] = None,
                cov3D_precomp: Optional[torch.Tensor] = None):
        """means3D (N, 3); means2D (N, 3) zeros for screen-space gradients; opacities (N, 1) or (N,);
        shs (N, B, 3) or colors_precomp (N, 3); scales (N, 3) + rotations (N, 4, wxyz) or cov3D_precomp
        (N, 6). Returns (color (3, H, W), radii (N,), depth (1, H, W), alpha (1, H, W))."""
        s = self.raster_settings
        if (shs is None) == (colors_precomp is None):
            raise ValueError("Please provide exactly one of either SHs or precomputed colors!")
        if ((scales is None or rotations is None) and cov3D_precomp is None) or \
                ((scales is not None or rotations is not None) and cov3D_precomp is not None):
            raise ValueError("Please provide exactly one of either scale/rotation pair or precomputed 3D covariance!")
        if s.bg.shape != (3,):
            raise ValueError(f"bg must have shape (3,), got {tuple(s.bg.shape)}")
        N = means3D.shape[0]
        if means2D.dim() != 2 or means2D.shape[0] != N or means2D.shape[1] not in (2, 3):
            raise ValueError(f"means2D must be ({N}, 3) or ({N}, 2), got {tuple(means2D.shape)}")
        viewmats, Ks = settings_to_gsplat(s)
        ndc_to_pixels = means2D.new_tensor([s.image_width / 2, s.image_height / 2])
        offset = ((means2D[:, :2] - means2D[:, :2].detach()) * ndc_to_pixels)[None]
        kwargs = dict(means=means3D, quats=rotations, opacities=opacities.reshape(N),
                      scales=None if scales is None else scales * s.scale_modifier,
                      covars=cov3D_precomp, colors=shs if shs is not None else colors_precomp,
                      sh_degree=s.sh_degree if shs is not None else None, viewmats=viewmats, Ks=Ks,
                      width=s.image_width, height=s.image_height, near_plane=INRIA_NEAR,
                      backgrounds=s.bg[None], render_mode="RGB+D",
                      rasterize_mode="antialiased" if s.antialiasing else "classic", means2d_offset=offset)
        try:
            image, alpha, meta = rasterize(**kwargs)
        except Exception as err:
            if s.debug:
                torch.save({**kwargs, "settings": s._asdict()}, DEBUG_DUMP)
                raise RuntimeError(f"rasterizer forward failed ({err}); inputs saved to {DEBUG_DUMP}") from err
            raise
        color = image[0, ..., :3].permute(2, 0, 1)
        depth = image[0, ..., 3][None]
        radii = meta["radii"][0].amax(-1)
        return color, radii, depth, alpha[0].permute(2, 0, 1)
