"""Torch face of the transient NLOS renderer (render/transient.py): autograd Function, module, reference.

    model = GaussianModel(means, scales)
    transient, histogram = render_transient(model, camera_pos, (0, pi/2), (-pi, pi), (0.5, 1.5),
                                            64, 64, 256, c=SPEED_OF_LIGHT, deltaT=2 * 1.0 / 256 / SPEED_OF_LIGHT)
    # one scan point (3,): transient (num_r, num_theta, num_phi), histogram (num_r,)
    # P scan points (P, 3): (P, num_r, num_theta, num_phi) and (P, num_r); return_transient=False
    # skips the per-direction output (the confocal-scan case).

Stages: GaussianModel -> activated tensors -> precision matrices Q = R diag(1/s^2) R^T (torch autograd,
N-sized) -> [_Transient: tile binning + Taichi forward; hand-written Taichi backward]. Gradients reach
means, log-scales, quaternions, opacity logits and features_dc. Time convention: bin k is the
round-trip time t_k = 2 r_k / c of radius r_k = r_min + (k + 1/2) dr, so r_range must be
(r_min, r_min + num_r * c * deltaT / 2).

:func:`transient_reference` is the same renderer in plain torch (autograd, any dtype): the tests'
reference and the benchmark's peer.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from render.binning import DEFAULT_MAX_PAIRS
from render.transient import SPEED_OF_LIGHT, TransientGrid, bin_gaussians, transient_backward, transient_forward
from taichi_mpm.runtime import device as runtime_device
from taichi_mpm.validation import check_finite, check_int, check_number, check_positive, check_tensor

from .gaussian_model import GaussianModel

DEFAULT_CHUNK_BYTES = 1 << 29  # scratch of one chunk of scan points (two [Pc, num_r, H, W] buffers)


def precision_upper(scales: torch.Tensor, quats: torch.Tensor) -> torch.Tensor:
    """(N, 6) upper triangle (xx, xy, xz, yy, yz, zz) of Sigma^-1 = R diag(1 / s^2) R^T."""
    w, x, y, z = nn.functional.normalize(quats, dim=-1).unbind(-1)
    R = torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
                     2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
                     2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1).view(-1, 3, 3)
    Q = (R / scales[:, None, :] ** 2) @ R.transpose(1, 2)
    i, j = torch.triu_indices(3, 3, device=Q.device)
    return Q[:, i, j]


def _chunks(num_points: int, grid: TransientGrid, itemsize: int, chunk_bytes: int):
    per_point = 2 * grid.num_r * grid.num_theta * grid.num_phi * itemsize
    size = max(1, min(num_points, chunk_bytes // per_point))
    return [(a, min(a + size, num_points)) for a in range(0, num_points, size)]


class _Transient(torch.autograd.Function):
    """(means, prec, opacities, albedo) -> (histogram (P, num_r), transient (P, num_r, H, W) or empty)."""

    @staticmethod
    def forward(ctx, means, prec, opacities, albedo, scan_points, radii, grid: TransientGrid,
                return_transient: bool, chunk_bytes: int, max_pairs: int):
        means, prec, opacities, albedo = (t.detach().contiguous() for t in (means, prec, opacities, albedo))
        scale_like = radii[:, None] / grid.sigma_threshold  # bin_gaussians takes scales
        hists, transients, binnings = [], [], []
        for a, b in _chunks(scan_points.shape[0], grid, means.element_size(), chunk_bytes):
            scan = scan_points[a:b].contiguous()
            binning = bin_gaussians(means, scale_like, scan, grid, max_pairs)
            out = transient_forward(means, prec, opacities, albedo, scan, grid, binning)
            hists.append(out.sum((2, 3)))
            if return_transient:
                transients.append(out)
            binnings.append(binning)
        ctx.grid, ctx.binnings, ctx.chunk_bytes = grid, binnings, chunk_bytes
        ctx.save_for_backward(means, prec, opacities, albedo, scan_points)
        transient = torch.cat(transients) if return_transient else means.new_zeros(0)
        return torch.cat(hists), transient

    @staticmethod
    def backward(ctx, v_hist, v_transient):
        means, prec, opacities, albedo, scan_points = ctx.saved_tensors
        grads = tuple(torch.zeros_like(t) for t in (means, prec, opacities, albedo))
        v_hist = torch.zeros(scan_points.shape[0], ctx.grid.num_r, dtype=means.dtype, device=means.device) \
            if v_hist is None else v_hist
        if v_transient is not None and v_transient.numel() == 0:
            v_transient = None
        chunks = _chunks(scan_points.shape[0], ctx.grid, means.element_size(), ctx.chunk_bytes)
        for (a, b), binning in zip(chunks, ctx.binnings):
            transient_backward(means, prec, opacities, albedo, scan_points[a:b].contiguous(), ctx.grid, binning,
                               v_hist[a:b], None if v_transient is None else v_transient[a:b], grads)
        return (*grads, None, None, None, None, None, None)


def transient_gaussians(means: torch.Tensor, scales: torch.Tensor, quats: torch.Tensor, opacities: torch.Tensor,
                        albedo: torch.Tensor, scan_points: torch.Tensor, grid: TransientGrid,
                        return_transient: bool = True, max_pairs: int = DEFAULT_MAX_PAIRS,
                        chunk_bytes: int = DEFAULT_CHUNK_BYTES, validate: bool = True
                        ) -> Tuple[Optional[torch.Tensor], torch.Tensor]:
    """Render activated Gaussians for P confocal scan points.

    Args:
        means (N, 3), scales (N, 3) > 0, quats (N, 4) wxyz (normalized inside), opacities (N,),
        albedo (N,): one dtype (float32 or float64: the kernels run in it), on the Taichi device.
        scan_points: (P, 3) wall points (or (3,) for one).
        grid: direction / radius sampling and model options (render.transient.TransientGrid).
        return_transient: also return the per-direction transients (P x num_r x H x W memory).
    Returns:
        transient (P, num_r, num_theta, num_phi) or None, histogram (P, num_r); a (3,) scan point
        drops the leading P.
    """
    single = scan_points.dim() == 1
    if validate:
        dev = runtime_device()
        means = check_tensor("means", means, (None, 3), (torch.float32, torch.float64), dev)
        n, dtype = means.shape[0], means.dtype
        if n == 0:
            raise ValueError("the Gaussian set is empty (N = 0): nothing to render")
        check_tensor("scales", scales, (n, 3), dtype, dev)
        check_tensor("quats", quats, (n, 4), dtype, dev)
        check_tensor("opacities", opacities, (n,), dtype, dev)
        check_tensor("albedo", albedo, (n,), dtype, dev)
        check_tensor("scan_points", scan_points, (3,) if single else (None, 3), dtype, dev)
        if not single and scan_points.shape[0] == 0:
            raise ValueError("scan_points is empty (P = 0)")
        if not isinstance(grid, TransientGrid):
            raise TypeError(f"grid must be a render.transient.TransientGrid, got {type(grid).__name__}")
        check_finite(means=means, scales=scales, quats=quats, opacities=opacities, albedo=albedo,
                     scan_points=scan_points)
        if bool((scales <= 0).any()):
            raise ValueError("scales must be > 0")
        if bool((quats.detach().norm(dim=-1) == 0).any()):
            raise ValueError("quats must be non-zero")
    scan = scan_points.detach().reshape(-1, 3).contiguous()
    radii = grid.sigma_threshold * scales.detach().max(dim=-1).values
    prec = precision_upper(scales, quats)
    hist, transient = _Transient.apply(means, prec, opacities, albedo, scan, radii, grid, return_transient,
                                       chunk_bytes, max_pairs)
    transient = transient if return_transient else None
    if single:
        return (None if transient is None else transient[0]), hist[0]
    return transient, hist


def transient_grid(theta_range: Sequence[float], phi_range: Sequence[float], r_range: Sequence[float],
                   num_theta: int, num_phi: int, num_r: int, c: float, deltaT: float,
                   falloff_power: float = 2.0, sigma_threshold: float = 3.0) -> TransientGrid:
    """The TransientGrid of render_transient's arguments; checks r_range against the time bins."""
    num_r = check_int("num_r", num_r, 1)
    c = check_positive("c", c)
    deltaT = check_positive("deltaT", deltaT)
    if len(r_range) != 2:
        raise ValueError(f"r_range must be (r_min, r_max), got {r_range!r}")
    r_min = check_number("r_range[0] (r_min)", r_range[0], low=0.0, low_open=True)
    r_max = check_number("r_range[1] (r_max)", r_range[1])
    if not r_max > r_min:
        raise ValueError(f"r_range must have r_max > r_min, got {tuple(r_range)}")
    dr = (r_max - r_min) / num_r
    if abs(dr - 0.5 * c * deltaT) > 1e-3 * dr:
        raise ValueError(f"r_range / num_r = {dr:.6g} m disagrees with the bin width c * deltaT / 2 = "
                         f"{0.5 * c * deltaT:.6g} m (bins are round trips: t = 2 r / c); use "
                         f"r_range = (r_min, r_min + num_r * c * deltaT / 2)")
    return TransientGrid(tuple(theta_range), tuple(phi_range), num_theta, num_phi, r_min, dr, num_r,
                         falloff_power, sigma_threshold)


def render_transient(gaussian_model: GaussianModel, camera_pos: torch.Tensor, theta_range: Sequence[float],
                     phi_range: Sequence[float], r_range: Sequence[float], num_theta: int, num_phi: int,
                     num_r: int, c: float = SPEED_OF_LIGHT, deltaT: Optional[float] = None,
                     falloff_power: float = 2.0, sigma_threshold: float = 3.0, return_transient: bool = True,
                     ) -> Tuple[Optional[torch.Tensor], torch.Tensor]:
    """Transient and histogram of a GaussianModel seen from scan point(s) camera_pos ((3,) or (P, 3)).

    Bins: radius r_k = r_min + (k + 1/2) (r_max - r_min) / num_r is the round trip t_k = 2 r_k / c;
    deltaT (s) must equal 2 (r_max - r_min) / (num_r c) (None: take it from r_range).
    Returns transient (num_r, num_theta, num_phi) and histogram (num_r,) for one point, with a
    leading P for many (transient None when return_transient is False).
    """
    if not isinstance(gaussian_model, GaussianModel):
        raise TypeError(f"gaussian_model must be a bridge.GaussianModel, got {type(gaussian_model).__name__}")
    if deltaT is None:
        check_int("num_r", num_r, 1)
        deltaT = 2.0 * (float(r_range[1]) - float(r_range[0])) / (num_r * c)
    grid = transient_grid(theta_range, phi_range, r_range, num_theta, num_phi, num_r, c, deltaT,
                          falloff_power, sigma_threshold)
    a = gaussian_model.activated()
    camera_pos = torch.as_tensor(camera_pos, dtype=a["means"].dtype, device=a["means"].device)
    return transient_gaussians(a["means"], a["scales"], a["quats"], a["opacities"], gaussian_model.albedo(),
                               camera_pos, grid, return_transient)


class TransientRenderer(nn.Module):
    """nn.Module form: fixed sampling, forward(model, scan_points) -> (transient or None, histogram)."""

    def __init__(self, grid: TransientGrid, return_transient: bool = False, max_pairs: int = DEFAULT_MAX_PAIRS):
        super().__init__()
        if not isinstance(grid, TransientGrid):
            raise TypeError(f"grid must be a render.transient.TransientGrid, got {type(grid).__name__}")
        self.grid, self.return_transient, self.max_pairs = grid, return_transient, max_pairs

    def forward(self, model: GaussianModel, scan_points: torch.Tensor):
        a = model.activated()
        return transient_gaussians(a["means"], a["scales"], a["quats"], a["opacities"], model.albedo(),
                                   scan_points, self.grid, self.return_transient, self.max_pairs)

    def extra_repr(self) -> str:
        return f"{self.grid}"


def transient_reference(means: torch.Tensor, scales: torch.Tensor, quats: torch.Tensor, opacities: torch.Tensor,
                        albedo: torch.Tensor, scan_points: torch.Tensor, grid: TransientGrid
                        ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The same renderer in plain torch autograd: transient (P, num_r, H, W), histogram (P, num_r).

    Independent of the kernels' culling: every (scan point, ray, Gaussian) triple is tested densely
    for a sample within sigma_threshold (the closest approach), the surviving pairs are evaluated at
    every radius, and each sample keeps Gaussians with M <= sigma_threshold^2, as the kernels do.
    """
    dtype, dev = means.dtype, means.device
    scan_points = scan_points.reshape(-1, 3)
    P, H, W, R = scan_points.shape[0], grid.num_theta, grid.num_phi, grid.num_r
    w, theta, _ = grid.directions(dtype, dev)
    w = w.reshape(-1, 3)
    r = grid.radii(dtype, dev)
    k2 = grid.sigma_threshold ** 2
    q6 = precision_upper(scales, quats)
    Q = q6[:, [0, 1, 2, 1, 3, 4, 2, 4, 5]].view(-1, 3, 3)
    d = means[None] - scan_points[:, None]  # (P, N, 3)
    with torch.no_grad():
        Qw = torch.einsum("nij,aj->ani", Q, w)  # (rays, N, 3)
        a = (w[:, None, :] * Qw).sum(-1)  # (rays, N)
        m = torch.einsum("pni,ani->pan", d, Qw) / a  # (P, rays, N)
        em = m[..., None] * w[None, :, None, :] - d[:, None]
        c_min = torch.einsum("pani,nij,panj->pan", em, Q, em)
        p_idx, ray_idx, n_idx = torch.nonzero(c_min <= k2, as_tuple=True)
    e = r[None, :, None] * w[ray_idx][:, None, :] - d[p_idx, n_idx][:, None, :]  # (K, R, 3)
    M = torch.einsum("kri,kij,krj->kr", e, Q[n_idx], e)
    G = opacities[n_idx][:, None] * torch.exp(-0.5 * M) * (M <= k2)
    row = p_idx * (H * W) + ray_idx
    sigma = torch.zeros(P * H * W, R, dtype=dtype, device=dev).index_add(0, row, G)
    rho = torch.zeros(P * H * W, R, dtype=dtype, device=dev).index_add(0, row, G * albedo[n_idx][:, None])
    depth = grid.dr * (torch.cumsum(sigma, 1) - sigma)
    sin_t = theta.sin()[:, None].expand(H, W).reshape(-1).repeat(P)
    L = rho * torch.exp(-2 * depth) * (grid.dr * grid.dtheta * grid.dphi) * sin_t[:, None] * r ** (-grid.falloff_power)
    transient = L.view(P, H, W, R).permute(0, 3, 1, 2)
    return transient, transient.sum((2, 3))


def r_range_of_bins(t_start: float, deltaT: float, num_r: int, c: float = SPEED_OF_LIGHT) -> Tuple[float, float]:
    """(r_min, r_max) of num_r bins of width deltaT starting at round-trip time t_start (s)."""
    return 0.5 * c * t_start, 0.5 * c * (t_start + num_r * deltaT)


__all__ = ["GaussianModel", "TransientGrid", "TransientRenderer", "precision_upper", "r_range_of_bins",
           "render_transient", "transient_gaussians", "transient_grid", "transient_reference", "SPEED_OF_LIGHT"]
