"""Fit 3D Gaussians to confocal NLOS histograms through the differentiable transient renderer.

    python -m scenes.fit_nlos                       # synthetic: a hidden mesh, noisy histograms, fit, compare
    python -m scenes.fit_nlos --data capture.mat    # a real capture (f-k .mat or Zaragoza .hdf5)

Synthetic (default): the mesh (--obj) is scaled to --size metres, placed --distance in front of the
relay wall (wall z = 0, hidden side +z), its surface sampled into Gaussians (ground truth); their
histograms on a --scan x --scan confocal grid get Gaussian noise (--noise, relative to the peak).
A GaussianModel starts from random Gaussians in the hidden volume and is fitted with Adam on
mini-batches of scan points (MSE of peak-normalised histograms, a learnt global gain). Reports the
histogram loss and the depth error (mean |depth - true depth| over the scan cells where the true
surface exists; missed cells counted apart) of the fit and of filtered back-projection, and saves
``result.png`` (rows: ground truth, fit, back-projection; columns: depth, max intensity),
``loss.png``, ``depth.npz`` and the fitted ``model.pt`` (GaussianModel state dict). A scan cell
holds a surface where its column's peak (fitted density, or filtered back-projection) reaches 0.25
times the 95th percentile of all columns' peaks; the fit's depth is the first z at half its peak.

With --data: the capture is pooled to at most --scan x --scan points and --bins time bins over the
radii where it has signal (or --r-min/--r-max), fitted the same way (no ground truth needed), and
``depth.npz`` holds ``depth`` and ``depth_backprojection`` [x, y] on the file's own scan grid and
x/y order (distance from the wall in metres, NaN where nothing is found) plus ``x``, ``y``.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from bridge.gaussian_model import GaussianModel
from bridge.transient import SPEED_OF_LIGHT, transient_gaussians
from render.backprojection import backproject, depth_from_volume, found_mask, gaussian_density
from render.transient import TransientGrid
from scenes.cli import UserError, run, scene_parser
from scenes.plots import plot_loss

ASSETS = Path(__file__).resolve().parent / "assets"


def build_parser():
    p = scene_parser("fit_nlos", __doc__, obj=ASSETS / "bunny_like.obj")
    p.add_argument("--data", type=Path, default=None, help="fit this capture (.mat f-k release or .hdf5 Zaragoza)")
    p.add_argument("--iters", type=int, default=200, help="optimisation steps")
    p.add_argument("--gaussians", type=int, default=300, help="Gaussians fitted")
    p.add_argument("--scan", type=int, default=16, help="scan grid side (points per side)")
    p.add_argument("--batch", type=int, default=24, help="scan points a step")
    p.add_argument("--bins", type=int, default=64, help="time bins used")
    p.add_argument("--directions", type=int, nargs=2, default=(16, 24), metavar=("THETA", "PHI"),
                   help="ray grid per scan point")
    p.add_argument("--lr", type=float, default=0.01, help="Adam learning rate of the means (others scaled)")
    p.add_argument("--size", type=float, default=0.5, help="synthetic: mesh size (m)")
    p.add_argument("--distance", type=float, default=0.6, help="synthetic: mesh front distance from the wall (m)")
    p.add_argument("--wall", type=float, default=1.0, help="synthetic: wall side (m)")
    p.add_argument("--noise", type=float, default=0.02, help="synthetic: noise std relative to the peak")
    p.add_argument("--r-min", type=float, default=None, help="first radius (m) fitted (default: from the data)")
    p.add_argument("--r-max", type=float, default=None, help="last radius (m) fitted (default: from the data)")
    return p


def colormap(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Values -> RGB uint8 (dark blue .. yellow); NaN -> grey."""
    t = np.clip((values - lo) / max(hi - lo, 1e-12), 0, 1)
    rgb = np.stack([0.2 + 0.8 * t, 0.1 + 0.8 * t ** 0.7, 0.5 * (1 - t) + 0.1], -1)
    rgb[np.isnan(values)] = 0.5
    return (rgb * 255).astype(np.uint8)


def save_panels(path: Path, rows, z_range) -> None:
    from PIL import Image, ImageDraw

    cell = 160
    img = Image.new("RGB", (2 * cell + 110, len(rows) * (cell + 18) + 4), "white")
    draw = ImageDraw.Draw(img)
    for r, (name, depth, intensity) in enumerate(rows):
        y = r * (cell + 18) + 16
        draw.text((4, y - 14), name, fill="black")
        for c, (arr, lo, hi) in enumerate(((depth, *z_range), (intensity, 0.0, np.nanmax(intensity) or 1.0))):
            tile = Image.fromarray(colormap(arr.T[::-1], lo, hi)).resize((cell, cell), Image.NEAREST)  # y up
            img.paste(tile, (c * (cell + 4), y))
    draw.text((2 * cell + 12, 20), "depth", fill="black")
    draw.text((2 * cell + 12, 36), f"{z_range[0]:.2f}..{z_range[1]:.2f} m", fill="black")
    draw.text((2 * cell + 12, 60), "max intensity", fill="black")
    img.save(path)


def random_model(n: int, box_lo, box_hi, dev, generator) -> GaussianModel:
    lo, hi = torch.tensor(box_lo, dtype=torch.float32), torch.tensor(box_hi, dtype=torch.float32)
    means = lo + (hi - lo) * torch.rand(n, 3, generator=generator)
    scales = torch.full((n, 3), 0.04)
    quats = torch.randn(n, 4, generator=generator)
    return GaussianModel(means.to(dev), scales.to(dev), quats.to(dev), torch.full((n,), 0.2, device=dev),
                         torch.ones(n, 3, device=dev))


def fit(model: GaussianModel, target: torch.Tensor, scan: torch.Tensor, grid: TransientGrid, args, box):
    """Adam on mini-batches of scan points; returns the loss history and the learnt gain."""
    log_gain = torch.zeros((), device=target.device, requires_grad=True)
    lr = args.lr
    opt = torch.optim.Adam([dict(params=[model.means], lr=lr), dict(params=[model.scaling], lr=2 * lr),
                            dict(params=[model.rotation], lr=lr), dict(params=[model.opacity], lr=5 * lr),
                            dict(params=[model.features_dc], lr=2 * lr), dict(params=[log_gain], lr=5 * lr)])
    lo, hi = (torch.tensor(b, dtype=torch.float32, device=target.device) for b in box)
    g = torch.Generator().manual_seed(args.seed)
    losses, P = [], scan.shape[0]
    for step in range(args.iters):
        idx = torch.randperm(P, generator=g)[:min(args.batch, P)].to(target.device)
        a = model.activated()
        _, hist = transient_gaussians(a["means"], a["scales"], a["quats"], a["opacities"], model.albedo(),
                                      scan[idx], grid, return_transient=False, validate=False)
        loss = (hist * log_gain.exp() - target[idx]).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():  # keep the Gaussians in the hidden volume, sizes sensible
            model.means.data = torch.maximum(torch.minimum(model.means, hi), lo)
            model.scaling.data.clamp_(math.log(0.005), math.log(0.15))
        losses.append(loss.item())
        if step % max(1, args.iters // 10) == 0 or step == args.iters - 1:
            print(f"step {step:4d}  histogram loss {loss.item():.3e}")
    return losses, log_gain.exp().item()


def full_loss(model, target, scan, grid, gain) -> float:
    with torch.no_grad():
        a = model.activated()
        _, hist = transient_gaussians(a["means"], a["scales"], a["quats"], a["opacities"], model.albedo(), scan,
                                      grid, return_transient=False)
        return (hist * gain - target).square().mean().item()


FOUND_THRESHOLD, FOUND_QUANTILE = 0.25, 0.95  # a column holds a surface if its peak >= 0.25 x the 95th percentile


def model_depth(model: GaussianModel, scan_xy: torch.Tensor, z: torch.Tensor):
    with torch.no_grad():
        a = model.activated()
        X, Y = scan_xy.shape[:2]
        pts = torch.cat([scan_xy[:, :, None, :].expand(X, Y, len(z), 2), z[None, None, :, None].expand(X, Y, len(z), 1)], -1)
        dens = gaussian_density(a["means"], a["scales"], a["quats"], a["opacities"], pts)
        # depth of the front surface: the first voxel where the column's density reaches half its peak
        peak = dens.max(-1, keepdim=True).values
        first = (dens >= 0.5 * peak).float().argmax(-1)
        depth = z[first]
        found = found_mask(peak[..., 0], FOUND_THRESHOLD, FOUND_QUANTILE)
        return torch.where(found, depth, torch.full_like(depth, float("nan"))), peak[..., 0]


def depth_error(depth: np.ndarray, truth: np.ndarray) -> dict:
    """Mean |depth - truth| where both exist, the cells missed / found where nothing is, and the IoU
    of the found and true masks."""
    has_truth, found = ~np.isnan(truth), ~np.isnan(depth)
    both = has_truth & found
    return dict(mean_abs_error_m=float(np.abs(depth[both] - truth[both]).mean()) if both.any() else float("nan"),
                missed_cells=int((has_truth & ~found).sum()), spurious_cells=int((~has_truth & found).sum()),
                truth_cells=int(has_truth.sum()), mask_iou=float(both.sum() / max(1, (has_truth | found).sum())))


def synthetic(args, dev):
    import trimesh

    mesh = trimesh.load(args.obj, force="mesh")
    if not isinstance(mesh, trimesh.Trimesh) or len(mesh.faces) == 0:
        raise UserError(f"{args.obj}: no triangles")
    lo, hi = mesh.bounds
    scale = args.size / float((hi - lo).max())
    pts, _ = trimesh.sample.sample_surface(mesh, 1500, seed=args.seed)
    pts = (pts - (lo + hi) / 2) * scale
    pts[:, 2] += args.distance - pts[:, 2].min()
    n = len(pts)
    gt = GaussianModel(torch.tensor(pts, dtype=torch.float32, device=dev), torch.full((n, 3), 0.015, device=dev),
                       opacities=torch.full((n,), 0.9, device=dev), colors=torch.ones(n, 3, device=dev))
    s = args.scan
    xs = -args.wall / 2 + (torch.arange(s) + 0.5) * args.wall / s
    scan_xy = torch.stack(torch.meshgrid(xs, xs, indexing="ij"), -1).to(dev)
    # Radii the hidden shape can reach from the scan points: its bounding box's nearest / farthest points.
    box_lo, box_hi = pts.min(0), pts.max(0)
    s_xy = scan_xy.reshape(-1, 2).cpu().numpy()
    near = np.clip(s_xy, box_lo[:2], box_hi[:2])
    r_min = float(np.sqrt(((near - s_xy) ** 2).sum(1) + box_lo[2] ** 2).min()) - 0.05
    far = np.maximum(np.abs(s_xy - box_lo[:2]), np.abs(s_xy - box_hi[:2]))
    r_max = float(np.sqrt((far ** 2).sum(1) + box_hi[2] ** 2).max()) + 0.05
    return gt, scan_xy, (r_min, r_max), pts


def real(args, dev):
    from render.nlos_io import load_capture

    cap = load_capture(args.data)
    X, Y, T = cap.meas.shape
    f = max(1, math.ceil(max(X, Y) / args.scan))
    Xc, Yc = X // f, Y // f
    if Xc == 0 or Yc == 0:
        raise UserError(f"scan grid {X}x{Y} too small")
    meas = cap.meas[:Xc * f, :Yc * f].reshape(Xc, f, Yc, f, T).sum((1, 3))
    pts = cap.scan_points[:Xc * f, :Yc * f].reshape(Xc, f, Yc, f, 3).mean((1, 3))
    radii = cap.bin_radius(np.arange(T))
    total = meas.sum((0, 1))
    late = radii > 0.15  # skip the wall's own direct return
    if args.r_min is None or args.r_max is None:
        if not (late & (total > 0)).any():
            raise UserError(f"{args.data}: no signal beyond 0.15 m")
        signal = total - np.median(total[late])  # above the ambient / dark-count floor
        strong = np.nonzero(late & (signal >= 0.05 * signal[late].max()))[0]
    r_min = args.r_min if args.r_min is not None else max(0.15, radii[strong[0]] - 0.1)
    r_max = args.r_max if args.r_max is not None else radii[strong[-1]] + 0.1
    return cap, meas, pts, (r_min, r_max), f


def rebin(meas: np.ndarray, radii: np.ndarray, r_min: float, r_max: float, bins: int) -> np.ndarray:
    """Sum capture bins into `bins` equal radius bins over [r_min, r_max)."""
    idx = np.floor((radii - r_min) / (r_max - r_min) * bins).astype(np.int64)
    ok = (idx >= 0) & (idx < bins)
    out = np.zeros(meas.shape[:2] + (bins,), np.float64)
    np.add.at(out, (slice(None), slice(None), idx[ok]), meas[..., ok].astype(np.float64))
    return out


def body(args):
    from taichi_mpm.runtime import device

    dev = device()
    for name in ("iters", "gaussians", "scan", "batch", "bins"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    gen = torch.Generator().manual_seed(args.seed)
    nt, nph = args.directions
    if args.data is None:
        gt, scan_xy, (r_min, r_max), surface = synthetic(args, dev)
    else:
        cap, meas_np, pts_np, (r_min, r_max), pool = real(args, dev)
        scan_xy = torch.tensor(pts_np[..., :2], dtype=torch.float32, device=dev)
    num_r = args.bins
    dr = (r_max - r_min) / num_r
    X, Y = scan_xy.shape[:2]
    half_wall = float(scan_xy.abs().max()) + 0.05
    theta_max = min(math.pi / 2, math.atan2(2 * half_wall + r_max, r_min) + 0.1)
    grid = TransientGrid((0.0, theta_max), (-math.pi, math.pi), nt, nph, r_min, dr, num_r)
    scan = torch.cat([scan_xy, torch.zeros(X, Y, 1, device=dev)], -1).reshape(-1, 3)
    if args.data is None:
        a = gt.activated()
        with torch.no_grad():
            _, clean = transient_gaussians(a["means"], a["scales"], a["quats"], a["opacities"], gt.albedo(), scan,
                                           grid, return_transient=False)
        target = clean + args.noise * clean.max() * torch.randn(clean.shape, generator=gen).to(dev)
    else:
        radii = cap.bin_radius(np.arange(cap.num_bins))
        target = torch.tensor(rebin(meas_np, radii, r_min, r_max, num_r), dtype=torch.float32, device=dev).reshape(-1, num_r)
    target = target / target.max()
    box = ((-half_wall, -half_wall, float(r_min)), (half_wall, half_wall, float(r_max) * 0.9))
    model = random_model(args.gaussians, *box, dev, gen)
    print(f"fitting {args.gaussians} Gaussians to {X}x{Y} scan points x {num_r} bins "
          f"(r {r_min:.2f}..{r_max:.2f} m, rays {nt}x{nph})")
    t0 = time.time()
    losses, gain = fit(model, target, scan, grid, args, box)
    seconds = time.time() - t0
    loss = full_loss(model, target, scan, grid, gain)
    z = torch.linspace(r_min, r_max, 2 * num_r, device=dev)
    depth, image = model_depth(model, scan_xy, z)
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, args.out / "model.pt")
    # Back-projection of the same histograms: bin k spans round trips [2 (r_min + k dr) / c, ...).
    vol = backproject(target.reshape(X, Y, num_r).double(), scan.reshape(X, Y, 3).double(), z.double(),
                      2 * r_min / SPEED_OF_LIGHT, 2 * dr / SPEED_OF_LIGHT)
    bp_depth, bp_image = depth_from_volume(vol, z.double(), FOUND_THRESHOLD, FOUND_QUANTILE)
    depth, image, bp_depth, bp_image = (t.float().cpu().numpy() for t in (depth, image, bp_depth, bp_image))
    print(f"histogram loss (all scan points) {loss:.3e}, {args.iters} steps in {seconds:.1f} s")
    plot_loss(losses, args.out / "loss.png", "histogram MSE (mini-batch)")
    z_range = (r_min, r_max)
    if args.data is None:
        z_range = (float(surface[:, 2].min()) - 0.05, float(surface[:, 2].max()) + 0.05)
        truth = np.full((X, Y), np.nan)
        cell = args.wall / X
        ij = np.floor((surface[:, :2] + args.wall / 2) / cell).astype(int)
        ok = (ij >= 0).all(1) & (ij < X).all(1)
        for (i, j), zz in zip(ij[ok], surface[ok, 2]):
            truth[i, j] = zz if np.isnan(truth[i, j]) else min(truth[i, j], zz)
        fit_err, bp_err = depth_error(depth, truth), depth_error(bp_depth, truth)
        print(f"depth error, fit:            {fit_err}")
        print(f"depth error, back-projection: {bp_err}")
        gt_image = (~np.isnan(truth)).astype(np.float32)
        save_panels(args.out / "result.png", [("ground truth", truth, gt_image), ("Gaussian fit", depth, image),
                                             ("back-projection", bp_depth, bp_image)], z_range)
        np.savez(args.out / "depth.npz", depth=depth, depth_backprojection=bp_depth, depth_truth=truth)
        return dict(loss=loss, fit=fit_err, backprojection=bp_err, seconds=seconds)
    save_panels(args.out / "result.png", [("Gaussian fit", depth, image), ("back-projection", bp_depth, bp_image)],
                z_range)
    up = lambda d: np.repeat(np.repeat(d, pool, 0), pool, 1)  # noqa: E731  back to the file's scan grid
    full = np.full(cap.meas.shape[:2], np.nan, np.float32)
    d_full, b_full = full.copy(), full.copy()
    d_full[:X * pool, :Y * pool], b_full[:X * pool, :Y * pool] = up(depth), up(bp_depth)
    np.savez(args.out / "depth.npz", depth=d_full, depth_backprojection=b_full,
             x=cap.scan_points[:, 0, 0], y=cap.scan_points[0, :, 1])
    print(f"wrote {args.out / 'depth.npz'} (depth [x, y] {d_full.shape}, metres from the wall)")
    return dict(loss=loss, seconds=seconds)


def main(argv=None):
    return run(build_parser(), argv, body)


if __name__ == "__main__":
    main()
