"""Dense float64 pure-torch 3DGS rasterizer: the ground truth the Taichi pipeline is tested against.

Every Gaussian is evaluated at every pixel (no tiles, no radii), with the same rules as the kernels:
0.3 px^2 dilation (or the antialiased opacity compensation), Jacobian built with x/z, y/z clamped to
1.3x the field of view, near/far cull, alpha = min(0.99, opacity * exp(power)) with power <= 0,
alpha < 1/255 skipped, stop before T would drop below 1e-4, front to back in (stable) depth order.
Gradients come from torch autograd. Meant for small images (it holds an (H*W, N) alpha matrix).
"""
from __future__ import annotations

from typing import Optional

import torch

from .sh import C0, C1, C2, C3


def sh_basis(dirs: torch.Tensor, degree: int) -> torch.Tensor:
    """(..., 3) unit directions -> (..., (degree+1)^2) real SH basis values (3DGS sign convention)."""
    x, y, z = dirs.unbind(-1)
    out = [torch.full_like(x, C0)]
    if degree >= 1:
        out += [-C1 * y, C1 * z, -C1 * x]
    if degree >= 2:
        xx, yy, zz = x * x, y * y, z * z
        out += [C2[0] * x * y, C2[1] * y * z, C2[2] * (2 * zz - xx - yy), C2[3] * x * z, C2[4] * (xx - yy)]
    if degree >= 3:
        out += [C3[0] * y * (3 * xx - yy), C3[1] * x * y * z, C3[2] * y * (4 * zz - xx - yy),
                C3[3] * z * (2 * zz - 3 * xx - 3 * yy), C3[4] * x * (4 * zz - xx - yy),
                C3[5] * z * (xx - yy), C3[6] * x * (xx - 3 * yy)]
    return torch.stack(out, -1)


def quat_to_rotmat(quats: torch.Tensor) -> torch.Tensor:
    w, x, y, z = torch.nn.functional.normalize(quats, dim=-1).unbind(-1)
    return torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1).reshape(*quats.shape[:-1], 3, 3)


def covariance(quats: Optional[torch.Tensor], scales: Optional[torch.Tensor],
               covars: Optional[torch.Tensor]) -> torch.Tensor:
    """(N, 3, 3) from quaternions (wxyz) and scales, or from (N, 6) upper triangles xx xy xz yy yz zz."""
    if covars is not None:
        a, b, c, d, e, f = covars.unbind(-1)
        return torch.stack([a, b, c, b, d, e, c, e, f], -1).reshape(-1, 3, 3)
    M = quat_to_rotmat(quats) * scales[:, None, :]
    return M @ M.transpose(1, 2)


def project(means, cov3, opacities, viewmat, K, width, height, near, far, antialiased):
    """One camera: (means2d (N,2), conics as (N,2,2), depths (N,), opacities (N,), valid (N,) bool)."""
    R, t = viewmat[:3, :3], viewmat[:3, 3]
    p = means @ R.T + t
    z = p[:, 2]
    fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
    tan_x, tan_y = 0.5 * width / fx, 0.5 * height / fy
    u = torch.minimum(torch.maximum(p[:, 0] / z, -(cx / fx + 0.3 * tan_x)), (width - cx) / fx + 0.3 * tan_x)
    v = torch.minimum(torch.maximum(p[:, 1] / z, -(cy / fy + 0.3 * tan_y)), (height - cy) / fy + 0.3 * tan_y)
    zero = torch.zeros_like(z)
    J = torch.stack([fx / z, zero, -fx * u / z, zero, fy / z, -fy * v / z], -1).reshape(-1, 2, 3)
    A = J @ R
    cov2 = A @ cov3 @ A.transpose(1, 2)
    dilated = cov2 + 0.3 * torch.eye(2, dtype=cov2.dtype, device=cov2.device)
    det = torch.linalg.det(dilated)
    valid = (z >= near) & (z <= far) & (det > 0)
    safe = torch.where(valid[:, None, None], dilated, torch.eye(2, dtype=cov2.dtype, device=cov2.device))
    conics = torch.linalg.inv(safe)
    op = opacities
    if antialiased:
        det_orig = cov2[:, 0, 0] * cov2[:, 1, 1] - cov2[:, 0, 1] ** 2
        op = op * torch.sqrt(torch.clamp_min(det_orig / torch.where(valid, det, torch.ones_like(det)), 0.0))
    valid = valid & (op >= 1.0 / 255.0)
    means2d = torch.stack([fx * p[:, 0] / z + cx, fy * p[:, 1] / z + cy], -1)
    return means2d, conics, z, op, valid


def blend(means2d, conics, opacities, features, depths, valid, width, height):
    """Dense front-to-back blending of one image -> (features (H, W, D), alpha (H, W))."""
    ys, xs = torch.meshgrid(torch.arange(height, dtype=means2d.dtype, device=means2d.device) + 0.5,
                            torch.arange(width, dtype=means2d.dtype, device=means2d.device) + 0.5, indexing="ij")
    pixels = torch.stack([xs.reshape(-1), ys.reshape(-1)], -1)
    T = torch.ones(pixels.shape[0], dtype=means2d.dtype, device=means2d.device)
    acc = torch.zeros(pixels.shape[0], features.shape[-1], dtype=means2d.dtype, device=means2d.device)
    done = torch.zeros_like(T, dtype=torch.bool)
    order = torch.argsort(depths.detach().to(torch.float32), stable=True)
    for n in order[valid[order]].tolist():
        d = means2d[n] - pixels
        Q = conics[n]
        power = -0.5 * (Q[0, 0] * d[:, 0] ** 2 + Q[1, 1] * d[:, 1] ** 2) - Q[0, 1] * d[:, 0] * d[:, 1]
        raw = opacities[n] * torch.exp(torch.clamp_max(power, 0.0))
        alpha = torch.where(power <= 0, torch.clamp_max(raw, 0.99), torch.zeros_like(raw))
        blended = (alpha >= 1.0 / 255.0) & ~done
        next_T = T * (1 - alpha)
        stop = blended & (next_T < 1e-4)
        done = done | stop
        use = blended & ~stop
        acc = acc + torch.where(use, alpha * T, torch.zeros_like(T))[:, None] * features[n]
        T = torch.where(use, next_T, T)
    return acc.reshape(height, width, -1), (1 - T).reshape(height, width)


def reference_rasterize(means, quats, scales, opacities, colors, viewmats, Ks, width: int, height: int,
                        near_plane: float = 0.01, far_plane: float = 1e10, sh_degree: Optional[int] = None,
                        backgrounds=None, render_mode: str = "RGB", covars=None, rasterize_mode: str = "classic",
                        means2d_offset=None):
    """Same contract as bridge.rasterize (without meta), computed densely in the inputs' dtype.

    Returns (render_colors (C, H, W, D), render_alphas (C, H, W, 1)).
    """
    antialiased = rasterize_mode == "antialiased"
    cov3 = covariance(quats, scales, covars)
    images, alphas = [], []
    for c in range(viewmats.shape[0]):
        viewmat, K = viewmats[c], Ks[c]
        means2d, conics, depths, op, valid = project(means, cov3, opacities, viewmat, K, width, height,
                                                     near_plane, far_plane, antialiased)
        if means2d_offset is not None:
            means2d = means2d + means2d_offset[c]
        if sh_degree is not None:
            campos = -viewmat[:3, :3].T @ viewmat[:3, 3]
            dirs = torch.nn.functional.normalize(means - campos, dim=-1)
            basis = sh_basis(dirs, sh_degree)
            rgb = torch.clamp_min((basis[:, :, None] * colors[:, :basis.shape[1], :]).sum(1) + 0.5, 0.0)
        else:
            rgb = colors if colors.dim() == 2 else colors[c]
        feats = {"RGB": [rgb], "D": [depths[:, None]], "ED": [depths[:, None]],
                 "RGB+D": [rgb, depths[:, None]], "RGB+ED": [rgb, depths[:, None]]}[render_mode]
        image, alpha = blend(means2d, conics, op, torch.cat(feats, -1), depths, valid, width, height)
        if backgrounds is not None:
            bg = backgrounds[c]
            pad = image.shape[-1] - bg.shape[-1]
            image = image + (1 - alpha)[..., None] * torch.cat([bg, bg.new_zeros(pad)])
        if render_mode in ("ED", "RGB+ED"):
            image = torch.cat([image[..., :-1], image[..., -1:] / alpha[..., None].clamp_min(1e-10)], -1)
        images.append(image)
        alphas.append(alpha[..., None])
    return torch.stack(images), torch.stack(alphas)
