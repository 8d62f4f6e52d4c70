"""Benchmark of 2D Gaussian splatting (image fitting) against gsplat's rasterize_to_pixels, same run.

    python bench/image2d.py [--out bench/results/image2d.json]     (GPU: the full table)
    python bench/image2d.py --quick                                 (any arch: tiny sizes, no gsplat)
    python bench/image2d.py --host-overhead    (any arch: host time of a tiny render outside kernel launches)

1. Forward+backward time of one render for 10k and 100k random 2D Gaussians at 512x512 and 1920x1080:
   ours (bridge.splat2d: preprocess from Cholesky factors, binning, blending, both backward kernels)
   in "alpha" mode (gsplat's semantics) and "sum" mode (GaussianImage's), beside gsplat 1.5.3's
   isect_tiles + isect_offset_encode + rasterize_to_pixels on the same means/conics/colours/opacities
   in two forms: ``gsplat`` with its conics and radii computed once outside the timed region (the
   issue's peer: gsplat timed on less work than ours), and ``gsplat + preprocess`` doing the same job
   as ours, the conics and radii computed from the Cholesky factors in torch inside each call with
   the gradient reaching the factors (what a gsplat user fitting these parameters runs each step).
   The renderers' calls are interleaved, one of each per round, so that the host's drift (its speed
   halves for minutes at a time on the GPU machines) weighs on all of them alike.
   Our alpha-mode image is compared with gsplat's (max abs difference reported).
2. Time to reach 30 dB PSNR fitting bench/assets/astronaut_512.png (skimage's astronaut, public
   domain) with 20k Gaussians, l2 loss, sum mode (scenes.fit_image.fit), from 20k random Gaussians
   and grown from 5k; a warm-up fit compiles the kernels first, so no compilation is inside the time.
Prints a table and writes JSON (device, date).
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.host_overhead import host_overhead as measure_host  # noqa: E402
from bridge.splat2d import GaussianImage, splat2d  # noqa: E402
from scenes.fit_image import fit, load_image  # noqa: E402
from taichi_mpm.runtime import device, ensure_init  # noqa: E402

ASSET = Path(__file__).parent / "assets" / "astronaut_512.png"


def random_gaussians(n: int, width: int, height: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    sigma = (width * height / n) ** 0.5 * 0.7  # a few Gaussians over each pixel
    l0 = sigma * (0.5 + torch.rand(n, generator=g))
    l2 = sigma * (0.5 + torch.rand(n, generator=g))
    l1 = sigma * 0.5 * torch.randn(n, generator=g)
    return dict(means=torch.rand(n, 2, generator=g) * torch.tensor([width, height], dtype=torch.float32),
                chol=torch.stack([l0, l1, l2], 1), colors=torch.rand(n, 3, generator=g),
                opacities=0.2 + 0.8 * torch.rand(n, generator=g))


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fns: dict, iters: int) -> dict:
    """Median milliseconds of each fn() over iters rounds, each round calling every fn once (after 2
    warm-up rounds), so that a slow phase of the host falls on all of them."""
    times = {name: [] for name in fns}
    for round_ in range(iters + 2):
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            if round_ >= 2:
                times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def conics_and_radii(chol: torch.Tensor, opacities: torch.Tensor):
    """gsplat's inputs from our factors: conic (xx, xy, yy) and the same 1/255 extent as ours."""
    l0, l1, l2 = chol.unbind(-1)
    a, b, c = l0 * l0, l0 * l1, l1 * l1 + l2 * l2
    det = a * c - b * b
    extent = torch.sqrt(2 * torch.log((255 * opacities).clamp_min(1)))
    radii = torch.stack([torch.ceil(extent * a.sqrt()), torch.ceil(extent * c.sqrt())], -1).int()
    return torch.stack([c / det, -b / det, a / det], -1), radii


def bench_render(n: int, width: int, height: int, iters: int, with_gsplat: bool) -> dict:
    dev = device()
    scene = {k: v.to(dev) for k, v in random_gaussians(n, width, height).items()}
    leaves = {k: v.clone().requires_grad_(True) for k, v in scene.items()}
    v_image = torch.rand(height, width, 3, device=dev)
    row = {"n": n, "width": width, "height": height}

    def ours(mode):
        def run():
            image, _ = splat2d(leaves["means"], leaves["chol"], leaves["colors"], width, height,
                               leaves["opacities"], mode=mode, validate=False)
            image.backward(v_image)
            return image
        return run

    fns = {f"ours_{mode}_ms": ours(mode) for mode in ("alpha", "sum")}
    if with_gsplat:
        from gsplat.cuda._wrapper import isect_offset_encode, isect_tiles, rasterize_to_pixels

        conics, radii = conics_and_radii(scene["chol"], scene["opacities"])
        g_leaves = {"means2d": scene["means"].clone(), "conics": conics, "colors": scene["colors"].clone(),
                    "opacities": scene["opacities"].clone()}
        g_leaves = {k: v.contiguous().requires_grad_(True) for k, v in g_leaves.items()}
        depths = torch.zeros(n, device=dev)
        tw, th = (width + 15) // 16, (height + 15) // 16

        def gs_render(means2d, conics, colors, opacities, radii, backward=True):
            _, isect_ids, flatten_ids = isect_tiles(means2d[None].detach(), radii[None], depths[None], 16, tw, th)
            offsets = isect_offset_encode(isect_ids, 1, tw, th)
            image, _ = rasterize_to_pixels(means2d[None], conics[None], colors[None], opacities[None], width,
                                           height, 16, offsets, flatten_ids)
            if backward:
                image[0].backward(v_image)
            return image[0]

        def gs(backward=True):
            return gs_render(g_leaves["means2d"], g_leaves["conics"], g_leaves["colors"], g_leaves["opacities"],
                             radii, backward)

        def gs_preprocess():  # ours' job: conics and radii from the factors, gradients to the factors
            conics, radii = conics_and_radii(leaves["chol"], leaves["opacities"])
            gs_render(leaves["means"], conics, leaves["colors"], leaves["opacities"], radii)

        fns.update(gsplat_ms=gs, gsplat_preprocess_ms=gs_preprocess)
    row.update(timed(fns, iters))
    if with_gsplat:
        row["ours_alpha_vs_gsplat"] = row["ours_alpha_ms"] / row["gsplat_ms"]
        row["ours_alpha_vs_gsplat_preprocess"] = row["ours_alpha_ms"] / row["gsplat_preprocess_ms"]
        with torch.no_grad():
            ours_image = splat2d(scene["means"], scene["chol"], scene["colors"], width, height,
                                 scene["opacities"], mode="alpha")[0]
            row["max_abs_diff_vs_gsplat"] = (ours_image - gs(False)).abs().max().item()
    return row


def host_overhead(repeats: int = 5, calls: int = 100) -> dict:
    """Host time of one alpha-mode render of 200 Gaussians at 32x32 outside Taichi's launch calls,
    forward and forward+backward (validate=False), and the forward with validate=True (the default:
    ``validated_forward``), with their torch-op and launch counts (bench/host_overhead.py)."""
    n, w, h = 200, 32, 32
    dev = device()
    leaves = {k: v.to(dev).requires_grad_(True) for k, v in random_gaussians(n, w, h).items()}
    weights = torch.rand(h, w, 3, generator=torch.Generator().manual_seed(1)).to(dev)

    def forward(validate=False):
        return splat2d(leaves["means"], leaves["chol"], leaves["colors"], w, h, leaves["opacities"],
                       mode="alpha", validate=validate)[0]

    def validated_forward():
        return forward(validate=True)

    def fwd_bwd():
        (forward() * weights).sum().backward()

    fwd_bwd()
    return {"arch": dev.type, "scene": f"{n} Gaussians, {w}x{h}, alpha mode",
            **measure_host({"forward": forward, "fwd_bwd": fwd_bwd, "validated_forward": validated_forward},
                            repeats, calls)}


def bench_fit(num: int, max_iters: int, target_psnr: float, size: int, grow: bool) -> dict:
    """Seconds to reach target_psnr (checked every 10 steps); with grow, start from num / 4 Gaussians
    and add the rest where the error is largest in 20 batches over the first half of max_iters."""
    target = load_image(ASSET)
    if size != target.shape[0]:
        target = torch.nn.functional.interpolate(target.permute(2, 0, 1)[None], size=(size, size), mode="area")
        target = target[0].permute(1, 2, 0).contiguous()
    fit(GaussianImage.from_image(target, num, mode="sum"), target, 3, every=1)  # warm-up: compile, allocate
    model = GaussianImage.from_image(target, num // 4 if grow else num, mode="sum")
    sync()
    log = fit(model, target, max_iters, "l2", target_psnr=target_psnr, every=10,
              grow_to=num if grow else None)
    reached = log["psnr"][-1] >= target_psnr
    return {"image": f"{ASSET.name} at {size}x{size}", "num_gaussians": num, "grow": grow, "mode": "sum",
            "loss": "l2", "target_psnr": target_psnr, "reached": reached, "seconds": log["seconds"][-1],
            "iterations": log["iteration"][-1], "final_psnr": log["psnr"][-1],
            "gaussians_at_end": log["gaussians"][-1], "it_per_s": log["iteration"][-1] / log["seconds"][-1],
            "log": {k: v[::10] for k, v in log.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, no gsplat (checks the script on a CPU)")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--fit-iters", type=int, default=2000, help="fitting steps (the cosine schedule's length)")
    ap.add_argument("--no-gsplat", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--host-overhead", action="store_true",
                    help="only time the host glue of a tiny render (any arch); writes "
                         "image2d_host_overhead_<arch>.json")
    args = ap.parse_args()
    arch = ensure_init()
    if args.host_overhead:
        result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(), **host_overhead()}
        print(json.dumps(result))
        out = args.out or Path(__file__).parent / "results" / f"image2d_host_overhead_{arch}.json"
        out.write_text(json.dumps(result, indent=1))
        print("wrote", out)
        return
    with_gsplat = arch == "cuda" and not args.no_gsplat and not args.quick
    sizes = [(200, 64, 48)] if args.quick else [(n, w, h) for w, h in ((512, 512), (1920, 1080))
                                                  for n in (10_000, 100_000)]
    name = torch.cuda.get_device_name(0) if arch == "cuda" else "cpu"
    report = {"device": name, "arch": arch, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "quick": args.quick, "render": []}
    print(f"{'N':>7} {'size':>10} {'ours alpha':>11} {'ours sum':>9} {'gsplat':>8} {'ratio':>6} "
          f"{'gsplat+pre':>11} {'ratio':>6}  (ms, fwd+bwd)")
    for n, w, h in sizes:
        row = bench_render(n, w, h, 3 if args.quick else args.iters, with_gsplat)
        report["render"].append(row)
        print(f"{n:>7} {w:>4}x{h:<5} {row['ours_alpha_ms']:>11.3f} {row['ours_sum_ms']:>9.3f} "
              f"{row.get('gsplat_ms', float('nan')):>8.3f} {row.get('ours_alpha_vs_gsplat', float('nan')):>6.2f} "
              f"{row.get('gsplat_preprocess_ms', float('nan')):>11.3f} "
              f"{row.get('ours_alpha_vs_gsplat_preprocess', float('nan')):>6.2f}", flush=True)
    report["fit"] = []
    for grow in (False, True):
        row = bench_fit(200 if args.quick else 20_000, 20 if args.quick else args.fit_iters, 30.0,
                        64 if args.quick else 512, grow)
        report["fit"].append(row)
        print(f"fit {row['num_gaussians']} Gaussians{' (grown from 1/4)' if grow else ''}: "
              f"{row['final_psnr']:.2f} dB after {row['iterations']} steps, {row['seconds']:.2f} s "
              f"({row['it_per_s']:.0f} it/s){'' if row['reached'] else ' - 30 dB not reached'}", flush=True)
    out = args.out or Path(__file__).parent / "results" / f"image2d_{arch}{'_quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print("wrote", out)


if __name__ == "__main__":
    main()
