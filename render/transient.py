"""Transient (time-resolved) NLOS rendering of 3D Gaussians: Taichi forward and hand-written backward.

Model (confocal: the laser and the detector look at the same relay-wall point s). From s, rays leave
on a spherical grid of directions; direction (theta, phi) is
``w = (sin t cos p, sin t sin p, cos t)`` in world axes, so theta is measured from +z (the wall
normal, the hidden side) and phi from +x towards +y. Pixel (i, j) of the direction "image" has its
centre at ``theta = theta0 + (i + 1/2) dtheta``, ``phi = phi0 + (j + 1/2) dphi`` (rows are theta).

Along a ray the samples sit at ``r_k = r0 + (k + 1/2) dr``; sample k is time bin k: light goes out
and back along the same ray, so it arrives at the round-trip time ``t_k = 2 r_k / c`` and one bin of
width deltaT spans ``dr = c deltaT / 2`` of radius.

Densities (each Gaussian i: mean mu_i, precision Q_i = Sigma_i^-1, opacity o_i, albedo a_i):
    G_i(x)  = exp(-M_i(x) / 2), M_i(x) = (x - mu_i)^T Q_i (x - mu_i), taken as 0 where M_i > sigma_threshold^2
    sigma(x) = sum_i o_i G_i(x)            (extinction)
    rho(x)   = sum_i o_i a_i G_i(x)        (albedo-weighted scattering density)
Transient of one ray, with the optical depth before the sample S_k = dr sum_{j<k} sigma(x_j):
    L_k = rho(x_k) exp(-2 S_k) dr sin(theta) dtheta dphi / r_k^falloff_power
(exp(-2 S): attenuated on the way out and on the way back; dr sin(theta) dtheta dphi: the volume
element without its r^2, so the default 1 / r^2 is the physical confocal falloff 1 / r^4 (out and
back) times the r^2 of the spherical shell's area, as in NeTF; falloff_power = 4 drops that r^2). The histogram of
a scan point is the sum of L_k over its directions.

Culling: Gaussians are binned into 16 x 16 tiles of the direction image by the shared
render/binning.py (one "image" per scan point), with the tile rectangle of the cone that holds the
sphere of radius sigma_threshold * max_scale around the mean. A ray then visits only its tile's
Gaussians, and of each only the bins where the ray passes within sigma_threshold (the radial window
around the ray's closest approach in the Gaussian's metric).

Kernels: the forward adds sigma and rho into per-ray rows of two [P, num_r, H, W] buffers (each
ray's tile list split over `parts` threads, atomics, so that a single scan point's few thousand rays
still fill a GPU), then turns rho into L in a per-ray scan. The backward recomputes them, runs the
scan forwards and backwards to get dL/drho_k and dL/dsigma_k, then loops over the tile's Gaussians
again and adds each Gaussian's gradient (mean, precision, opacity, albedo) with one set of atomics
per ray and Gaussian. The per-Gaussian covariance from scales and quaternions stays
in torch (bridge/transient.py): it is N-sized work whose autograd is exact.
"""

import functools
import math
from dataclasses import dataclass
from typing import Optional, Tuple

import taichi as ti
import torch

from taichi_mpm.launch import TorchKernel
from taichi_mpm.runtime import ensure_init
from taichi_mpm.validation import check_int, check_number, check_positive

from .binning import TILE_SIZE as TILE
from .binning import DEFAULT_MAX_PAIRS, Binning, TileGrid, bin_rects

nd = ti.types.ndarray
SPEED_OF_LIGHT = 299_792_458.0  # m/s
FORCE_PARTS = None  # tests set it to run the split-list path on the CPU


@dataclass(frozen=True)
class TransientGrid:
    """Sampling of one scan point's view: direction grid, radial samples (= time bins), model options.

    theta_range, phi_range: (low, high) radians; num_theta x num_phi pixel centres inside them.
    r_min, dr, num_r: radial samples r_k = r_min + (k + 1/2) dr, k < num_r (dr = c deltaT / 2).
    falloff_power: the radiometric falloff 1 / r^falloff_power (2: one bounce seen from the wall).
    sigma_threshold: Gaussians count only within this many standard deviations (Mahalanobis).
    """

    theta_range: Tuple[float, float]
    phi_range: Tuple[float, float]
    num_theta: int
    num_phi: int
    r_min: float
    dr: float
    num_r: int
    falloff_power: float = 2.0
    sigma_threshold: float = 3.0

    def __post_init__(self):
        for name in ("theta_range", "phi_range"):
            rng = getattr(self, name)
            if len(rng) != 2:
                raise ValueError(f"{name} must be (low, high), got {rng!r}")
            lo = check_number(f"{name}[0]", rng[0])
            hi = check_number(f"{name}[1]", rng[1])
            if not hi > lo:
                raise ValueError(f"{name} must have high > low, got {rng!r}")
            object.__setattr__(self, name, (lo, hi))
        if self.theta_range[0] < 0 or self.theta_range[1] > math.pi:
            raise ValueError(f"theta_range must lie in [0, pi], got {self.theta_range}")
        if self.phi_range[1] - self.phi_range[0] > 2 * math.pi + 1e-9:
            raise ValueError(f"phi_range must span at most 2 pi, got {self.phi_range}")
        check_int("num_theta", self.num_theta, 1)
        check_int("num_phi", self.num_phi, 1)
        check_int("num_r", self.num_r, 1)
        check_number("r_min", self.r_min, low=0.0, low_open=True)
        check_positive("dr", self.dr)
        check_number("falloff_power", self.falloff_power)
        check_positive("sigma_threshold", self.sigma_threshold)

    @property
    def dtheta(self) -> float:
        return (self.theta_range[1] - self.theta_range[0]) / self.num_theta

    @property
    def dphi(self) -> float:
        return (self.phi_range[1] - self.phi_range[0]) / self.num_phi

    @property
    def r_max(self) -> float:
        return self.r_min + self.num_r * self.dr

    @property
    def tiles(self) -> TileGrid:
        return TileGrid(width=self.num_phi, height=self.num_theta)

    def radii(self, dtype=torch.float64, device=None) -> torch.Tensor:
        """(num_r,) sample radii r_k."""
        return self.r_min + (torch.arange(self.num_r, dtype=dtype, device=device) + 0.5) * self.dr

    def directions(self, dtype=torch.float64, device=None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Unit directions (H, W, 3), theta (H,), phi (W,) of the pixel centres."""
        theta = self.theta_range[0] + (torch.arange(self.num_theta, dtype=dtype, device=device) + 0.5) * self.dtheta
        phi = self.phi_range[0] + (torch.arange(self.num_phi, dtype=dtype, device=device) + 0.5) * self.dphi
        t, p = theta[:, None], phi[None, :]
        w = torch.stack(torch.broadcast_tensors(t.sin() * p.cos(), t.sin() * p.sin(), t.cos()), -1)
        return w, theta, phi


def _pixel_span(lo: torch.Tensor, hi: torch.Tensor, start: float, step: float, count: int):
    """Inclusive pixel index range whose centres may lie in [lo, hi], padded by one pixel."""
    a = torch.floor((lo - start) / step - 0.5).clamp(-1, count)
    b = torch.ceil((hi - start) / step - 0.5).clamp(-1, count)
    return a.clamp_min(0).to(torch.int32), b.clamp_max(count - 1).to(torch.int32), (b < 0) | (a > count - 1)


@torch.no_grad()
def direction_rects(means: torch.Tensor, radii: torch.Tensor, scan_points: torch.Tensor,
                    grid: TransientGrid) -> Tuple[torch.Tensor, torch.Tensor]:
    """Tile rectangles of every (scan point, Gaussian) on the direction image, scan-point-major.

    The ball of radius ``radii`` (N,) around each mean is seen from scan point s within the cone of
    half-angle beta = asin(R / D) around its direction (theta_c, phi_c): theta within beta, and
    phi within asin(sin beta / sin theta_c) unless the cone holds a pole or wraps around the phi
    range, where every phi is kept; a ball that no sample radius in [r_min, r_max] reaches gets an
    empty rectangle. Returns rects (P*N, 4) int32 and distances
    (P*N,) float32 (the sort key).
    """
    d = (means[None, :, :] - scan_points[:, None, :]).float()  # (P, N, 3)
    radii = radii.float()[None, :]
    dist = d.norm(dim=-1).clamp_min(1e-30)
    theta_c = torch.acos((d[..., 2] / dist).clamp(-1, 1))
    phi_c = torch.atan2(d[..., 1], d[..., 0])
    inside = dist <= radii * 1.0001
    beta = torch.asin((radii / dist).clamp(max=1.0))
    t_lo, t_hi = theta_c - beta, theta_c + beta
    ratio = torch.sin(beta) / torch.sin(theta_c).clamp_min(1e-30)
    half_phi = torch.asin(ratio.clamp(max=1.0))
    mid = 0.5 * (grid.phi_range[0] + grid.phi_range[1])
    phi_c = mid + torch.remainder(phi_c - mid + math.pi, 2 * math.pi) - math.pi  # nearest copy to the range
    p_lo, p_hi = phi_c - half_phi, phi_c + half_phi
    full_phi = inside | (t_lo <= 0) | (t_hi >= math.pi) | (ratio >= 1) | (p_lo < mid - math.pi) | (p_hi > mid + math.pi)
    t_lo = torch.where(inside, torch.full_like(t_lo, -10.0), t_lo)
    t_hi = torch.where(inside, torch.full_like(t_hi, 10.0), t_hi)
    p_lo = torch.where(full_phi, torch.full_like(p_lo, -100.0), p_lo)
    p_hi = torch.where(full_phi, torch.full_like(p_hi, 100.0), p_hi)
    i0, i1, i_out = _pixel_span(t_lo, t_hi, grid.theta_range[0], grid.dtheta, grid.num_theta)
    j0, j1, j_out = _pixel_span(p_lo, p_hi, grid.phi_range[0], grid.dphi, grid.num_phi)
    # No sample within the ball: every sample radius lies in [r_min, r_max].
    unreachable = (dist - radii > grid.r_max) | (dist + radii < grid.r_min)
    empty = i_out | j_out | unreachable
    rects = torch.stack((j0 // TILE, i0 // TILE, j1 // TILE + 1, i1 // TILE + 1), -1)
    rects = torch.where(empty[..., None], torch.zeros_like(rects), rects)
    return rects.reshape(-1, 4).contiguous(), dist.reshape(-1).contiguous()


def bin_gaussians(means: torch.Tensor, scales: torch.Tensor, scan_points: torch.Tensor, grid: TransientGrid,
                  max_pairs: int = DEFAULT_MAX_PAIRS) -> Binning:
    """Shared tile binning of N Gaussians for P scan points (items p * N + i)."""
    radii = grid.sigma_threshold * scales.detach().max(dim=-1).values
    rects, dist = direction_rects(means.detach(), radii, scan_points.detach(), grid)
    return bin_rects(rects, dist, scan_points.shape[0], grid.tiles, max_pairs)


@ti.func
def _direction(i, j, theta0, dtheta, phi0, dphi):
    theta = theta0 + (i + 0.5) * dtheta
    phi = phi0 + (j + 0.5) * dphi
    return ti.Vector([ti.sin(theta) * ti.cos(phi), ti.sin(theta) * ti.sin(phi), ti.cos(theta)]), theta


@ti.func
def _quad(Q, e):
    """e^T Q e for the symmetric Q stored as (xx, xy, xz, yy, yz, zz)."""
    return (Q[0] * e[0] * e[0] + Q[3] * e[1] * e[1] + Q[5] * e[2] * e[2]
            + 2.0 * (Q[1] * e[0] * e[1] + Q[2] * e[0] * e[2] + Q[4] * e[1] * e[2]))


@ti.func
def _qmul(Q, v):
    return ti.Vector([Q[0] * v[0] + Q[1] * v[1] + Q[2] * v[2],
                      Q[1] * v[0] + Q[3] * v[1] + Q[4] * v[2],
                      Q[2] * v[0] + Q[4] * v[1] + Q[5] * v[2]])


def _kernels(real):
    """Forward and backward kernels for one float type (f32 for speed, f64 for gradcheck)."""
    vec3 = ti.types.vector(3, real)
    vec6 = ti.types.vector(6, real)

    @ti.func
    def load(means: ti.template(), prec: ti.template(), g):
        mu = vec3(means[g, 0], means[g, 1], means[g, 2])
        Q = vec6(prec[g, 0], prec[g, 1], prec[g, 2], prec[g, 3], prec[g, 4], prec[g, 5])
        return mu, Q

    @ti.func
    def window(w, d, Q, r0, dr, num_r, k2):
        """Bins [k0, k1) where the ray may pass within the threshold (padded by one bin)."""
        Qw = _qmul(Q, w)
        a = w.dot(Qw)
        m = d.dot(Qw) / a  # closest approach in the Gaussian's metric
        em = m * w - d
        c_min = _quad(Q, em)  # accurate: em is small near the Gaussian (no c - b^2/a cancellation)
        k0, k1 = 0, 0
        if c_min <= k2:
            h = ti.sqrt((k2 - c_min) / a)
            lo = ti.math.clamp((m - h - r0) / dr - 0.5, -2.0, num_r + 2.0)
            hi = ti.math.clamp((m + h - r0) / dr - 0.5, -2.0, num_r + 2.0)
            k0 = ti.max(ti.cast(ti.floor(lo), ti.i32), 0)
            k1 = ti.min(ti.cast(ti.ceil(hi), ti.i32) + 1, num_r)
        return k0, k1

    @ti.func
    def accumulate(p, i, j, part, parts, w, s, means: ti.template(), prec: ti.template(), opac: ti.template(),
                   albedo: ti.template(), item_ids: ti.template(), ranges: ti.template(), r0, dr, k2,
                   sigma: ti.template(), rho: ti.template()):
        """Adds (atomically) sigma / rho of ray (p, i, j) from every parts-th Gaussian of its tile list,
        starting at the part-th, into the (zeroed) buffers."""
        num_r = sigma.shape[1]
        n = means.shape[0]
        start, end = ranges[p, i // TILE, j // TILE, 0], ranges[p, i // TILE, j // TILE, 1]
        for t in range((end - start - part + parts - 1) // parts):
            g = item_ids[start + part + t * parts] % n
            mu, Q = load(means, prec, g)
            d = mu - s
            k0, k1 = window(w, d, Q, r0, dr, num_r, k2)
            o, alb = opac[g], albedo[g]
            for k in range(k0, k1):
                e = (r0 + (k + 0.5) * dr) * w - d
                M = _quad(Q, e)
                if M <= k2:
                    G = o * ti.exp(-0.5 * M)
                    sigma[p, k, i, j] += G
                    rho[p, k, i, j] += G * alb

    @ti.kernel
    def forward(means: nd(real, 2), prec: nd(real, 2), opac: nd(real, 1), albedo: nd(real, 1),
                scan: nd(real, 2), item_ids: nd(ti.i32, 1), ranges: nd(ti.i32, 4),
                theta0: real, dtheta: real, phi0: real, dphi: real, r0: real, dr: real, power: real, k2: real,
                parts: ti.i32, sigma: nd(real, 4), out: nd(real, 4)):
        P, num_r, H, W = out.shape[0], out.shape[1], out.shape[2], out.shape[3]
        # Loop 1: each ray's tile list split over `parts` threads (occupancy when rays are few).
        for p, i, j, part in ti.ndrange(P, H, W, parts):
            w, _ = _direction(i, j, theta0, dtheta, phi0, dphi)
            s = vec3(scan[p, 0], scan[p, 1], scan[p, 2])
            accumulate(p, i, j, part, parts, w, s, means, prec, opac, albedo, item_ids, ranges, r0, dr, k2,
                       sigma, out)
        # Loop 2: attenuation scan along each ray.
        for p, i, j in ti.ndrange(P, H, W):
            _, theta = _direction(i, j, theta0, dtheta, phi0, dphi)
            weight = dr * ti.sin(theta) * dtheta * dphi
            depth = ti.cast(0.0, real)  # optical depth before sample k
            for k in range(num_r):
                r = r0 + (k + 0.5) * dr
                out[p, k, i, j] *= weight * ti.pow(r, -power) * ti.exp(-2.0 * depth)
                depth += dr * sigma[p, k, i, j]

    @ti.kernel
    def backward(means: nd(real, 2), prec: nd(real, 2), opac: nd(real, 1), albedo: nd(real, 1),
                 scan: nd(real, 2), item_ids: nd(ti.i32, 1), ranges: nd(ti.i32, 4),
                 theta0: real, dtheta: real, phi0: real, dphi: real, r0: real, dr: real, power: real, k2: real,
                 g_hist: nd(real, 2), g_dir: nd(real, 4), has_dir: ti.i32, parts: ti.i32,
                 buf_a: nd(real, 4), buf_b: nd(real, 4),
                 v_means: nd(real, 2), v_prec: nd(real, 2), v_opac: nd(real, 1), v_albedo: nd(real, 1)):
        P, num_r, H, W = buf_a.shape[0], buf_a.shape[1], buf_a.shape[2], buf_a.shape[3]
        n = means.shape[0]
        # Loop 1: recompute sigma (buf_a) and rho (buf_b), as the forward.
        for p, i, j, part in ti.ndrange(P, H, W, parts):
            w, _ = _direction(i, j, theta0, dtheta, phi0, dphi)
            s = vec3(scan[p, 0], scan[p, 1], scan[p, 2])
            accumulate(p, i, j, part, parts, w, s, means, prec, opac, albedo, item_ids, ranges, r0, dr, k2,
                       buf_a, buf_b)
        # Loop 2: per ray, dL/drho_k into buf_b and dL/dsigma_k into buf_a.
        for p, i, j in ti.ndrange(P, H, W):
            _, theta = _direction(i, j, theta0, dtheta, phi0, dphi)
            weight = dr * ti.sin(theta) * dtheta * dphi
            # Scan forwards: u_k = dL/drho_k into buf_b, prefix sums of g_k L_k into buf_a.
            depth = ti.cast(0.0, real)
            prefix = ti.cast(0.0, real)
            for k in range(num_r):
                r = r0 + (k + 0.5) * dr
                v_out = g_hist[p, k]
                if has_dir:
                    v_out += g_dir[p, k, i, j]
                att = weight * ti.pow(r, -power) * ti.exp(-2.0 * depth)
                prefix += v_out * att * buf_b[p, k, i, j]
                depth += dr * buf_a[p, k, i, j]
                buf_b[p, k, i, j] = v_out * att
                buf_a[p, k, i, j] = prefix
            # dL/dsigma_k = -2 dr sum_{k' > k} g_k' L_k' (sigma_k dims every later sample twice).
            for k in range(num_r):
                buf_a[p, k, i, j] = -2.0 * dr * (prefix - buf_a[p, k, i, j])
        # Loop 3: each Gaussian's gradient from this ray, one set of atomics per (ray, Gaussian).
        for p, i, j, part in ti.ndrange(P, H, W, parts):
            w, _ = _direction(i, j, theta0, dtheta, phi0, dphi)
            s = vec3(scan[p, 0], scan[p, 1], scan[p, 2])
            start, end = ranges[p, i // TILE, j // TILE, 0], ranges[p, i // TILE, j // TILE, 1]
            for t in range((end - start - part + parts - 1) // parts):
                gi = item_ids[start + part + t * parts] % n
                mu, Q = load(means, prec, gi)
                d = mu - s
                k0, k1 = window(w, d, Q, r0, dr, num_r, k2)
                if k1 > k0:
                    o, alb = opac[gi], albedo[gi]
                    v_o = ti.cast(0.0, real)
                    v_a = ti.cast(0.0, real)
                    ge = vec3(0.0, 0.0, 0.0)   # sum dL/dM e
                    gee = vec6(0.0, 0.0, 0.0, 0.0, 0.0, 0.0)  # sum dL/dM e e^T (upper triangle)
                    for k in range(k0, k1):
                        e = (r0 + (k + 0.5) * dr) * w - d
                        M = _quad(Q, e)
                        if M <= k2:
                            G = ti.exp(-0.5 * M)
                            u, v = buf_b[p, k, i, j], buf_a[p, k, i, j]
                            v_o += G * (v + alb * u)
                            v_a += o * G * u
                            gm = -0.5 * o * G * (v + alb * u)  # dL/dM
                            ge += gm * e
                            gee += gm * vec6(e[0] * e[0], 2.0 * e[0] * e[1], 2.0 * e[0] * e[2],
                                             e[1] * e[1], 2.0 * e[1] * e[2], e[2] * e[2])
                    v_mu = -2.0 * _qmul(Q, ge)  # dM/dmu = -2 Q e
                    for c in ti.static(range(3)):
                        ti.atomic_add(v_means[gi, c], v_mu[c])
                    for c in ti.static(range(6)):
                        ti.atomic_add(v_prec[gi, c], gee[c])
                    ti.atomic_add(v_opac[gi], v_o)
                    ti.atomic_add(v_albedo[gi], v_a)

    return TorchKernel(forward), TorchKernel(backward)


@functools.cache
def _kernels_for(dtype: torch.dtype):
    ensure_init()
    if dtype == torch.float32:
        return _kernels(ti.f32)
    if dtype == torch.float64:
        return _kernels(ti.f64)
    raise TypeError(f"transient kernels run in float32 or float64, got {dtype}")


def _parts(shape: tuple, dev: torch.device) -> int:
    """Threads a ray's tile list is split over: enough for ~2^18 threads on a GPU, 1 on the CPU."""
    if FORCE_PARTS is not None:
        return FORCE_PARTS
    if dev.type != "cuda":
        return 1
    rays = shape[0] * shape[2] * shape[3]
    return int(min(32, max(1, (1 << 18) // rays)))


def _scalars(grid: TransientGrid) -> tuple:
    return (grid.theta_range[0], grid.dtheta, grid.phi_range[0], grid.dphi, grid.r_min, grid.dr,
            float(grid.falloff_power), float(grid.sigma_threshold) ** 2)


def transient_forward(means: torch.Tensor, prec: torch.Tensor, opacities: torch.Tensor, albedo: torch.Tensor,
                      scan_points: torch.Tensor, grid: TransientGrid, binning: Binning) -> torch.Tensor:
    """Per-direction transients (P, num_r, num_theta, num_phi) of the binned Gaussians.

    means (N, 3), prec (N, 6) precision upper triangle (xx, xy, xz, yy, yz, zz), opacities (N,),
    albedo (N,), scan_points (P, 3): one dtype (float32 or float64), contiguous, on the Taichi device.
    """
    forward, _ = _kernels_for(means.dtype)
    shape = (scan_points.shape[0], grid.num_r, grid.num_theta, grid.num_phi)
    sigma = torch.zeros(shape, dtype=means.dtype, device=means.device)
    out = torch.zeros(shape, dtype=means.dtype, device=means.device)
    forward(means, prec, opacities, albedo, scan_points, binning.item_ids, binning.tile_ranges, *_scalars(grid),
            _parts(shape, means.device), sigma, out)
    return out


def transient_backward(means: torch.Tensor, prec: torch.Tensor, opacities: torch.Tensor, albedo: torch.Tensor,
                       scan_points: torch.Tensor, grid: TransientGrid, binning: Binning, g_hist: torch.Tensor,
                       g_dir: Optional[torch.Tensor], grads: Tuple[torch.Tensor, ...]) -> None:
    """Add dL/d(means, prec, opacities, albedo) into ``grads`` (four zero-initialised tensors).

    g_hist (P, num_r): gradient of the histograms; g_dir (P, num_r, H, W) or None: of the transients.
    """
    _, backward = _kernels_for(means.dtype)
    shape = (scan_points.shape[0], grid.num_r, grid.num_theta, grid.num_phi)
    buf_a = torch.zeros(shape, dtype=means.dtype, device=means.device)
    buf_b = torch.zeros(shape, dtype=means.dtype, device=means.device)
    has_dir = g_dir is not None
    if g_dir is None:
        g_dir = torch.zeros((1, 1, 1, 1), dtype=means.dtype, device=means.device)
    backward(means, prec, opacities, albedo, scan_points, binning.item_ids, binning.tile_ranges, *_scalars(grid),
             g_hist.contiguous(), g_dir.contiguous(), int(has_dir), _parts(shape, means.device), buf_a, buf_b, *grads)
