"""Classical baseline for confocal NLOS: filtered back-projection, and volume -> depth map.

Back-projection (Velten et al. 2012): every voxel v sums, over the scan points s, the histogram bin
of its round trip t = 2 |v - s| / c; the Laplacian of that volume along depth ("filtered") sharpens
surfaces. Plain vectorised torch, chunked over voxels. Voxels sit on the scan grid in x, y (the
depth map comes out on the scan grid) and on ``z`` in depth.

``depth_from_volume`` turns any volume [X, Y, Z] (back-projection, or a Gaussian density) into a
depth map [X, Y]: the z of each column's maximum, NaN where that maximum is below
``threshold`` times the volume's maximum (or a quantile of the column maxima).
"""
from __future__ import annotations

from typing import Tuple

import torch

SPEED_OF_LIGHT = 299_792_458.0


def backproject(meas: torch.Tensor, scan_points: torch.Tensor, z: torch.Tensor, t0: float, deltaT: float,
                c: float = SPEED_OF_LIGHT, filtered: bool = True, chunk: int = 1 << 24) -> torch.Tensor:
    """(Filtered) back-projection volume [X, Y, Z].

    meas: [X, Y, T] confocal histograms; scan_points: [X, Y, 3] in the wall frame (wall z = 0);
    z: (Z,) depths of the voxel layers; bin k spans round-trip times [t0 + k deltaT, t0 + (k+1) deltaT).
    """
    X, Y, T = meas.shape
    flat = meas.reshape(X * Y, T)
    s = scan_points.reshape(X * Y, 3).to(meas)
    voxels = torch.cat([scan_points[..., :2].to(meas)[:, :, None, :].expand(X, Y, len(z), 2),
                        z.to(meas)[None, None, :, None].expand(X, Y, len(z), 1)], -1).reshape(-1, 3)
    out = torch.empty(voxels.shape[0], dtype=meas.dtype, device=meas.device)
    step = max(1, chunk // (X * Y))
    cols = torch.arange(X * Y, device=meas.device)[None, :]
    for a in range(0, voxels.shape[0], step):
        r = torch.cdist(voxels[a:a + step], s)  # (V, P)
        k = torch.floor((2 * r / c - t0) / deltaT).long()
        ok = (k >= 0) & (k < T)
        out[a:a + step] = (flat[cols.expand_as(k), k.clamp(0, T - 1)] * ok).sum(1)
    vol = out.view(X, Y, len(z))
    if filtered:
        vol = -laplacian_z(vol)
    return vol


def laplacian_z(vol: torch.Tensor) -> torch.Tensor:
    """Second difference along the last (depth) axis, edges replicated."""
    padded = torch.cat([vol[..., :1], vol, vol[..., -1:]], -1)
    return padded[..., 2:] - 2 * padded[..., 1:-1] + padded[..., :-2]


def found_mask(peaks: torch.Tensor, threshold: float, quantile: float = 1.0) -> torch.Tensor:
    """Columns whose peak reaches threshold times the given quantile of all column peaks (1.0: the
    maximum; a lower quantile keeps one hot spot from hiding the rest)."""
    ref = torch.quantile(peaks.reshape(-1).float(), quantile).to(peaks) if quantile < 1 else peaks.max()
    return peaks >= threshold * ref.clamp_min(1e-30)


def depth_from_volume(vol: torch.Tensor, z: torch.Tensor, threshold: float = 0.2,
                      quantile: float = 1.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Depth [X, Y] (z of each column's maximum, NaN where found_mask says no) and the max image [X, Y]."""
    vmax, idx = vol.clamp_min(0).max(-1)
    depth = z.to(vol)[idx]
    found = found_mask(vmax, threshold, quantile)
    return torch.where(found, depth, torch.full_like(depth, float("nan"))), vmax


def gaussian_density(means: torch.Tensor, scales: torch.Tensor, quats: torch.Tensor, opacities: torch.Tensor,
                     points: torch.Tensor, sigma_threshold: float = 3.0, chunk: int = 1 << 22) -> torch.Tensor:
    """Extinction sigma(x) = sum_i o_i exp(-M_i(x) / 2) (M <= sigma_threshold^2, as the renderer) at
    points (..., 3)."""
    w, x, y, zq = torch.nn.functional.normalize(quats, dim=-1).unbind(-1)
    R = torch.stack([1 - 2 * (y * y + zq * zq), 2 * (x * y - w * zq), 2 * (x * zq + w * y),
                     2 * (x * y + w * zq), 1 - 2 * (x * x + zq * zq), 2 * (y * zq - w * x),
                     2 * (x * zq - w * y), 2 * (y * zq + w * x), 1 - 2 * (x * x + y * y)], -1).view(-1, 3, 3)
    flat = points.reshape(-1, 3)
    out = torch.zeros(flat.shape[0], dtype=means.dtype, device=means.device)
    step = max(1, chunk // max(1, means.shape[0]))
    for a in range(0, flat.shape[0], step):
        local = torch.einsum("nji,pnj->pni", R, flat[a:a + step, None, :] - means[None]) / scales[None]
        M = local.square().sum(-1)
        out[a:a + step] = (opacities[None] * torch.exp(-0.5 * M) * (M <= sigma_threshold ** 2)).sum(1)
    return out.view(points.shape[:-1])
