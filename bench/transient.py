"""Benchmark of the transient NLOS renderer (Taichi kernels) against its pure-torch autograd twin.

    python bench/transient.py [--iters 5] [--out bench/results/transient_cuda.json]
    python bench/transient.py --quick      (tiny sizes, any device: checks the script)

Cases (same Gaussians, same loss, same run):
  single: 10k Gaussians, one scan point, 64 x 64 directions, 256 bins: forward + backward of
          sum(W * transient) + sum(w * histogram), ours and bridge.transient.transient_reference.
  scan:   the same Gaussians seen from a 32 x 32 confocal scan grid (histograms only), ours; the
          reference on a 4 x 4 sub-grid (its memory grows with the scan points).
Before timing it compares our histogram and every gradient with the reference (float32 both).
Peak memory: torch's max_memory_allocated above the memory held before the call (Taichi works in
place on torch tensors; its own small runtime pool is outside and the same for every case).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bridge.transient import transient_gaussians, transient_reference  # noqa: E402
from render.transient import TransientGrid  # noqa: E402
from taichi_mpm.runtime import device, ensure_init  # noqa: E402

INPUTS = ("means", "scales", "quats", "opacities", "albedo")


def gaussians(n: int, dev, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    t = dict(means=torch.rand(n, 3, generator=g) * torch.tensor([1.0, 1.0, 1.0]) + torch.tensor([-0.5, -0.5, 0.5]),
             scales=torch.exp(torch.randn(n, 3, generator=g) * 0.3 + math.log(0.02)),
             quats=torch.randn(n, 4, generator=g), opacities=torch.rand(n, generator=g) * 0.8 + 0.1,
             albedo=torch.rand(n, generator=g) * 0.8 + 0.2)
    return {k: v.to(dev) for k, v in t.items()}


def scan_grid(side: int, dev, wall: float = 1.0) -> torch.Tensor:
    xs = -wall / 2 + (torch.arange(side) + 0.5) * wall / side
    xy = torch.stack(torch.meshgrid(xs, xs, indexing="ij"), -1).reshape(-1, 2)
    return torch.cat([xy, torch.zeros(len(xy), 1)], -1).to(dev)


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def step(fn, g, scan, grid, weights, with_transient=True):
    leaves = {k: v.clone().requires_grad_() for k, v in g.items()}
    if fn is transient_gaussians:
        transient, hist = fn(*(leaves[k] for k in INPUTS), scan, grid, return_transient=with_transient)
    else:
        transient, hist = fn(*(leaves[k] for k in INPUTS), scan, grid)
    loss = (hist * weights[1]).sum()
    if with_transient:
        loss = loss + (transient * weights[0]).sum()
    grads = torch.autograd.grad(loss, [leaves[k] for k in INPUTS])
    return hist.detach(), dict(zip(INPUTS, grads))


def measure(fn, g, scan, grid, weights, iters, dev, with_transient=True) -> dict:
    try:
        step(fn, g, scan, grid, weights, with_transient)  # warm-up (compiles)
        sync(dev)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            step(fn, g, scan, grid, weights, with_transient)
            sync(dev)
            times.append(time.perf_counter() - t0)
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if dev.type == "cuda" else None
        return dict(ms=1e3 * sorted(times)[len(times) // 2], peak_mib=peak)
    except torch.cuda.OutOfMemoryError as e:
        torch.cuda.empty_cache()
        return dict(ms=None, peak_mib=None, error=f"out of memory: {str(e).splitlines()[0]}")


def compare(g, scan, grid, weights) -> dict:
    ours = step(transient_gaussians, g, scan, grid, weights)
    ref = step(transient_reference, g, scan, grid, weights)
    rel = lambda a, b: ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()  # noqa: E731
    out = {"histogram": rel(ours[0], ref[0])}
    out.update({k: rel(ours[1][k], ref[1][k]) for k in INPUTS})
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes (CPU check)")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    ensure_init()
    dev = device()
    if args.quick:
        n, dirs, bins, side, sub = 300, 16, 32, 4, 2
    else:
        n, dirs, bins, side, sub = 10_000, 64, 256, 32, 4
    grid = TransientGrid((0.0, math.pi / 2), (-math.pi, math.pi), dirs, dirs, 0.3, 2.0 / bins, bins)
    g = gaussians(n, dev)
    gen = torch.Generator().manual_seed(1)
    one = torch.zeros(1, 3, device=dev)
    weights = (torch.rand(1, bins, dirs, dirs, generator=gen).to(dev), torch.rand(1, bins, generator=gen).to(dev))
    errors = compare(g, one, grid, weights)
    rows = {"single ours": measure(transient_gaussians, g, one, grid, weights, args.iters, dev),
            "single torch": measure(transient_reference, g, one, grid, weights, args.iters, dev)}
    scan, sub_scan = scan_grid(side, dev), scan_grid(sub, dev)
    w_scan = (None, torch.rand(side * side, bins, generator=gen).to(dev))
    w_sub = (None, torch.rand(sub * sub, bins, generator=gen).to(dev))
    rows[f"scan {side}x{side} ours"] = measure(transient_gaussians, g, scan, grid, w_scan, max(1, args.iters // 2),
                                               dev, with_transient=False)
    rows[f"scan {sub}x{sub} ours"] = measure(transient_gaussians, g, sub_scan, grid, w_sub, args.iters, dev,
                                             with_transient=False)
    rows[f"scan {sub}x{sub} torch"] = measure(transient_reference, g, sub_scan, grid, w_sub, args.iters, dev,
                                              with_transient=False)
    name = torch.cuda.get_device_name() if dev.type == "cuda" else platform.processor() or "cpu"
    print(f"device {name}; {n} Gaussians, {dirs}x{dirs} directions, {bins} bins; forward+backward")
    print("max relative error ours vs torch (float32): " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    print(f"{'case':24s} {'ms':>10s} {'peak MiB':>10s}")
    for k, v in rows.items():
        ms = "-" if v["ms"] is None else f"{v['ms']:.2f}"
        mem = "-" if v["peak_mib"] is None else f"{v['peak_mib']:.1f}"
        print(f"{k:24s} {ms:>10s} {mem:>10s} {v.get('error', '')}")
    ours, ref = rows["single ours"], rows["single torch"]
    ratios = {}
    if ours["ms"] and ref["ms"]:
        ratios["single_speedup"] = ref["ms"] / ours["ms"]
        if ours["peak_mib"] and ref["peak_mib"]:
            ratios["single_memory_ratio"] = ref["peak_mib"] / ours["peak_mib"]
    so, st = rows[f"scan {sub}x{sub} ours"], rows[f"scan {sub}x{sub} torch"]
    if so["ms"] and st["ms"]:
        ratios["scan_sub_speedup"] = st["ms"] / so["ms"]
        if so["peak_mib"] and st["peak_mib"]:
            ratios["scan_sub_memory_ratio"] = st["peak_mib"] / so["peak_mib"]
    print("ratios (torch / ours): " + ", ".join(f"{k} {v:.1f}x" for k, v in ratios.items()))
    result = dict(device=name, arch=dev.type, date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
                  torch=torch.__version__, gaussians=n, directions=[dirs, dirs], bins=bins, scan=[side, side],
                  iters=args.iters, quick=args.quick, max_rel_error_vs_torch=errors, rows=rows, ratios=ratios)
    out = args.out or Path(__file__).resolve().parent / "results" / (
        "transient_cpu_quick.json" if args.quick else f"transient_{dev.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
