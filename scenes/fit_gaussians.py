"""Fit random 3D Gaussians to views of a ground-truth scene with L1 + D-SSIM (the 3DGS loss).

    python -m scenes.fit_gaussians [--gt scene.ply] [--views 12] [--width 128 --height 96]
                                   [--gaussians 3000] [--iters 300] [--out out/fit_gaussians]

The ground truth is a known Gaussian set: a PLY given with --gt, or else a built-in one (a rainbow
torus around a two-tone sphere). Target views come from an orbit of cameras; the fit starts from
random Gaussians in the scene's bounding box and trains means, scales, rotations, opacities and SH
with Adam, batching several cameras per step through bridge.rasterize. Writes targets.png,
renders.png (targets above, fit below), fit.ply (3DGS PLY), an orbit of the fit (frame_*.png,
orbit.mp4, orbit.gif), and prints PSNR.

Under ``torchrun --nproc_per_node=N -m scenes.fit_gaussians`` every rank draws the same camera batch,
renders only its share of it (bridge.distributed.shard), normalises its loss by the whole batch
size, and the gradients are summed in one all-reduce, so each step equals the one-process step;
progress and files come from rank 0.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from bridge import distributed
from bridge.rasterization import rasterize
from taichi_mpm.runtime import device as taichi_device
from render.camera import Camera, stack_cameras
from render.ply import GaussianPly, read_ply, write_ply
from render.sh import C0
from scenes.cli import check_readable_file, progress, run_distributed, scene_parser
from scenes.media import write_animation


def builtin_ground_truth(n: int = 4000, seed: int = 0) -> dict:
    """A rainbow torus (major radius 1, minor 0.25) around a sphere, SH degree 0."""
    g = torch.Generator().manual_seed(seed)
    n_torus = n * 3 // 4
    u, v = torch.rand(n_torus, generator=g) * 2 * math.pi, torch.rand(n_torus, generator=g) * 2 * math.pi
    torus = torch.stack([(1 + 0.25 * torch.cos(v)) * torch.cos(u), (1 + 0.25 * torch.cos(v)) * torch.sin(u),
                         0.25 * torch.sin(v)], 1)
    hue = u / (2 * math.pi)
    torus_rgb = torch.stack([0.5 + 0.5 * torch.cos(2 * math.pi * (hue + k / 3)) for k in range(3)], 1)
    d = torch.randn(n - n_torus, 3, generator=g)
    sphere = 0.45 * d / d.norm(dim=1, keepdim=True)
    sphere_rgb = torch.where(sphere[:, 2:] > 0, torch.tensor([0.95, 0.9, 0.8]), torch.tensor([0.2, 0.3, 0.8]))
    rgb = torch.cat([torus_rgb, sphere_rgb])
    return dict(means=torch.cat([torus, sphere]), quats=torch.randn(n, 4, generator=g),
                scales=torch.full((n, 3), 0.04), opacities=torch.full((n,), 0.9),
                sh=((rgb - 0.5) / C0)[:, None, :])


def ply_ground_truth(path: str) -> dict:
    a = read_ply(path).activated()
    return {k: torch.from_numpy(np.ascontiguousarray(a[k])) for k in ("means", "quats", "scales", "opacities", "sh")}


def render(params: dict, viewmats, Ks, width, height, sh_degree, background):
    image, _, _ = rasterize(params["means"], params["quats"], params["scales"], params["opacities"], params["sh"],
                            viewmats, Ks, width, height, sh_degree=sh_degree,
                            backgrounds=background.expand(viewmats.shape[0], 3))
    return image.clamp(0, 1)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(-10 * torch.log10(((a - b) ** 2).mean()))


def save_grid(path: Path, rows: list[torch.Tensor]) -> None:
    """rows: each (C, H, W, 3) in [0, 1] -> one PNG, a row per tensor."""
    import imageio.v2 as imageio
    grid = torch.cat([torch.cat(list(r), 1) for r in rows], 0)
    imageio.imwrite(path, (grid.detach().cpu().numpy() * 255).round().astype(np.uint8))


def parser():
    ap = scene_parser("fit_gaussians", __doc__, distributed=True)
    ap.add_argument("--gt", type=Path, help="ground-truth 3DGS PLY (default: built-in torus and sphere)")
    ap.add_argument("--views", type=int, default=12, help="target cameras on an orbit")
    ap.add_argument("--width", type=int, default=128, help="image width [px]")
    ap.add_argument("--height", type=int, default=96, help="image height [px]")
    ap.add_argument("--gaussians", type=int, default=3000, help="Gaussians in the fit")
    ap.add_argument("--iters", type=int, default=300, help="Adam steps")
    ap.add_argument("--batch", type=int, default=4, help="cameras per step")
    ap.add_argument("--sh-degree", type=int, default=1, choices=(0, 1, 2, 3), help="SH degree of the fit")
    ap.add_argument("--ssim-weight", type=float, default=0.2, help="weight of D-SSIM against L1")
    ap.add_argument("--orbit-frames", type=int, default=24, help="frames of the orbit video of the fit (0: none)")
    return ap


def main(argv=None) -> dict:
    """Run the fit; returns {"psnr_initial": dB, "psnr_final": dB} over all views (None on ranks > 0)."""
    return run_distributed(parser(), argv, body)


def body(args, info: distributed.DistInfo = distributed.DistInfo()) -> dict:
    from pytorch_msssim import ssim

    for name in ("views", "width", "height", "gaussians", "batch"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.iters < 0 or args.orbit_frames < 0:
        raise ValueError("--iters and --orbit-frames must be >= 0")
    if args.gt is not None:
        check_readable_file(args.gt, "ground-truth PLY")
    dev = taichi_device()
    gt = ply_ground_truth(args.gt) if args.gt else builtin_ground_truth()
    gt = {k: v.float().to(dev) for k, v in gt.items()}
    gt_degree = int(round(math.sqrt(gt["sh"].shape[1]))) - 1
    lo, hi = gt["means"].min(0).values, gt["means"].max(0).values
    centre, extent = (lo + hi) / 2, float((hi - lo).norm())
    cams = Camera.orbit(args.views, radius=0.8 * extent, elevation_degrees=25, target=centre.tolist(),
                        width=args.width, height=args.height, fov_y_degrees=45)
    viewmats, Ks = (t.to(dev) for t in stack_cameras(cams))
    background = torch.ones(1, 3, device=dev)
    with torch.no_grad():
        targets = render(gt, viewmats, Ks, args.width, args.height, gt_degree, background)

    n, bases = args.gaussians, (args.sh_degree + 1) ** 2
    spacing = extent / n ** (1 / 3)
    params = {"means": lo + torch.rand(n, 3, device=dev) * (hi - lo),
              "log_scales": torch.full((n, 3), math.log(0.5 * spacing), device=dev),
              "quats": torch.randn(n, 4, device=dev),
              "opacity_logits": torch.full((n,), math.log(0.1 / 0.9), device=dev),
              "sh": torch.cat([torch.randn(n, 1, 3, device=dev) * 0.1, torch.zeros(n, bases - 1, 3, device=dev)], 1)}
    for p in params.values():
        if info.active:  # same seed on every rank already; rank 0's start makes it certain
            torch.distributed.broadcast(p, src=0)
        p.requires_grad_(True)
    rates = {"means": 2e-3 * extent, "log_scales": 5e-3, "quats": 1e-3, "opacity_logits": 5e-2, "sh": 5e-3}
    optim = torch.optim.Adam([{"params": [params[k]], "lr": rates[k]} for k in params], eps=1e-15)

    def activated():
        return {"means": params["means"], "quats": params["quats"], "scales": params["log_scales"].exp(),
                "opacities": torch.sigmoid(params["opacity_logits"]), "sh": params["sh"]}

    with torch.no_grad():
        psnr_initial = psnr(render(activated(), viewmats, Ks, args.width, args.height, args.sh_degree, background),
                            targets)
    with progress(args.iters, "fitting", disable=not info.is_main) as bar:
        for it in range(args.iters):
            batch = torch.randperm(args.views, device=dev)[:args.batch]  # the same on every rank (same seed)
            views = batch[distributed.shard(range(len(batch)), info)]    # this rank's share of the batch
            optim.zero_grad(set_to_none=True)
            if len(views):
                image = render(activated(), viewmats[views], Ks[views], args.width, args.height, args.sh_degree,
                               background)
                target = targets[views]
                l1 = (image - target).abs().mean((1, 2, 3))
                d_ssim = 1 - ssim(image.permute(0, 3, 1, 2), target.permute(0, 3, 1, 2), data_range=1.0,
                                  size_average=False)
                # per-view losses summed over the share, / the whole batch: summed over ranks, the batch mean
                loss = ((1 - args.ssim_weight) * l1 + args.ssim_weight * d_ssim).sum() / len(batch)
                loss.backward()
            distributed.sum_gradients(params.values(), info)
            optim.step()
            if it % 10 == 0:
                total = distributed.all_sum(loss.detach() if len(views) else torch.zeros((), device=dev), info)
                shown = {} if info.active else {"psnr": f"{psnr(image.detach(), target):.2f} dB"}
                bar.set_postfix(loss=f"{total.item():.4f}", **shown)
            bar.update()
    if not info.is_main:
        return None

    with torch.no_grad():
        final = render(activated(), viewmats, Ks, args.width, args.height, args.sh_degree, background)
    out = args.out
    save_grid(out / "targets.png", [targets])
    save_grid(out / "renders.png", [targets, final])
    write_ply(out / "fit.ply", GaussianPly(
        means=params["means"].detach().cpu().numpy(), sh=params["sh"].detach().cpu().numpy(),
        opacity_logits=params["opacity_logits"].detach().cpu().numpy(),
        log_scales=params["log_scales"].detach().cpu().numpy(),
        quats=torch.nn.functional.normalize(params["quats"].detach(), dim=1).cpu().numpy()))
    if args.orbit_frames:
        orbit = Camera.orbit(args.orbit_frames, radius=0.8 * extent, elevation_degrees=25, target=centre.tolist(),
                             width=args.width, height=args.height, fov_y_degrees=45)
        om, oK = (t.to(dev) for t in stack_cameras(orbit))
        with torch.no_grad():
            views = render(activated(), om, oK, args.width, args.height, args.sh_degree, background)
        frames = list((views.cpu().numpy() * 255).round().astype(np.uint8))
        write_animation(frames, out, "orbit", fps=12, prefix="orbit")
    psnr_final = psnr(final, targets)
    print(f"PSNR over {args.views} views: {psnr_initial:.2f} dB at the start, {psnr_final:.2f} dB now; "
          f"wrote {out}/renders.png, {out}/fit.ply" + (f" and {out}/orbit.mp4, orbit.gif" if args.orbit_frames else ""))
    return {"psnr_initial": psnr_initial, "psnr_final": psnr_final}


if __name__ == "__main__":
    main()
