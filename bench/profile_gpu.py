"""Where the time of a small call goes: torch.profiler (CPU ops and every CUDA kernel, Taichi's
included) over the workloads where host cost may dominate.

    python bench/profile_gpu.py [--only splat2d raster rollout] [--out profile.txt]

Workloads: ``splat2d`` 10k 2D Gaussians at 512x512, alpha mode, forward+backward; ``raster`` 10k 3D
Gaussians, one 256x256 camera, SH3, forward+backward; ``rollout`` 100k particles (8 per cell, 128^3
grid, float32), 40 substeps forward without grad, then forward+backward. For each: the wall time of
one call (synchronised, median of the profiled calls), the summed GPU kernel time, and the kernels
and CPU ops that take the most time. On a CPU-only machine only the CPU tables are meaningful.
"""
from __future__ import annotations

import argparse
import io
import math
import statistics
import sys
import time
from contextlib import redirect_stdout
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from taichi_mpm.runtime import device, ensure_init  # noqa: E402


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def splat2d_call():
    from bridge.splat2d import splat2d
    g = torch.Generator().manual_seed(0)
    n, w, h = 10_000, 512, 512
    dev = device()
    sigma = (w * h / n) ** 0.5 * 0.7
    leaves = [t.to(dev).requires_grad_(True) for t in (
        torch.rand(n, 2, generator=g) * torch.tensor([w, h], dtype=torch.float32),
        torch.stack([sigma * (0.5 + torch.rand(n, generator=g)), sigma * 0.3 * torch.randn(n, generator=g),
                     sigma * (0.5 + torch.rand(n, generator=g))], 1),
        torch.rand(n, 3, generator=g), 0.2 + 0.8 * torch.rand(n, generator=g))]
    weights = torch.randn(h, w, 3, generator=g).to(dev)

    def call():
        image, _ = splat2d(leaves[0], leaves[1], leaves[2], w, h, leaves[3], mode="alpha", validate=False)
        (image * weights).sum().backward()
    return call


def raster_call():
    from bridge.rasterization import rasterize
    from render.camera import Camera, stack_cameras
    g = torch.Generator().manual_seed(0)
    n, w, h = 10_000, 256, 256
    dev = device()
    scene = dict(means=torch.rand(n, 3, generator=g) * 2 - 1, quats=torch.randn(n, 4, generator=g),
                 scales=torch.exp(torch.randn(n, 3, generator=g) * 0.5 + math.log(0.01)),
                 opacities=torch.rand(n, generator=g), sh=torch.randn(n, 16, 3, generator=g) * 0.2)
    leaves = {k: v.to(dev).requires_grad_(True) for k, v in scene.items()}
    cam = Camera.look_at((0, -3.2, 0.8), (0, 0, 0), (0, 0, 1), w, h, 60)
    viewmats, Ks = (t.to(dev) for t in stack_cameras([cam]))
    weights = torch.randn(1, h, w, 3, generator=g).to(dev)

    def call():
        img, _, _ = rasterize(leaves["means"], leaves["quats"], leaves["scales"], leaves["opacities"], leaves["sh"],
                              viewmats, Ks, w, h, sh_degree=3, validate=False)
        (img * weights).sum().backward()
    return call


def rollout_calls():
    from bridge.rollout import RolloutScene, simulate
    from taichi_mpm import Elastic, MPMSolver
    solver = MPMSolver(res=128, dtype="float32")
    side = (100_000 / 8) ** (1 / 3) / 128
    solver.add_cube((0.5 - side / 2, 0.3, 0.5 - side / 2), (side,) * 3, Elastic(E=1e5, nu=0.3, density=1000.0),
                    particles_per_cell=8)
    scene = RolloutScene.from_solver(solver, dt=1e-4)
    x0 = solver.positions(as_torch=True).clone()
    n, T = x0.shape[0], 40
    E = torch.full((n,), 1e5, device=x0.device)
    nu = torch.full((n,), 0.3, device=x0.device)

    def forward():
        with torch.no_grad():
            simulate(scene, x0, torch.zeros_like(x0), {"E": E, "nu": nu}, T, [T])

    def fwd_bwd():
        leaves = [t.clone().requires_grad_(True) for t in (x0, E)]
        traj = simulate(scene, leaves[0], torch.zeros_like(x0), {"E": leaves[1], "nu": nu}, T, [T])
        traj.x[-1].sum().backward()
    return {f"rollout forward ({n} particles, {T} substeps)": forward,
            f"rollout forward+backward ({n} particles, {T} substeps)": fwd_bwd}


def report(name: str, fn, calls: int, rows: int) -> str:
    for _ in range(3):  # compile, warm caches
        fn()
    sync()
    walls = []
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        for _ in range(calls):
            t0 = time.perf_counter()
            fn()
            sync()
            walls.append((time.perf_counter() - t0) * 1e3)
    events = prof.key_averages()
    # kernel rows only: an op's row also counts the kernels launched under it
    gpu_us = (sum(e.self_device_time_total for e in events if e.device_type == DeviceType.CUDA) / calls
              if torch.cuda.is_available() else float("nan"))
    out = io.StringIO()
    with redirect_stdout(out):
        print(f"\n##### {name}: wall {statistics.median(walls):.3f} ms a call (median of {calls}, "
              f"profiler on), GPU kernels {gpu_us / 1e3:.3f} ms a call")
        if torch.cuda.is_available():
            print(events.table(sort_by="self_device_time_total", row_limit=rows, max_name_column_width=60))
        print(events.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=60))
    return out.getvalue()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", choices=("splat2d", "raster", "rollout"),
                    default=["splat2d", "raster", "rollout"])
    ap.add_argument("--calls", type=int, default=10)
    ap.add_argument("--rows", type=int, default=18)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    ensure_init()
    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    text = f"profile_gpu on {name}\n"
    workloads = {}
    if "splat2d" in args.only:
        workloads["splat2d 10k 512x512 alpha fwd+bwd"] = splat2d_call()
    if "raster" in args.only:
        workloads["raster 10k 256x256 1 camera SH3 fwd+bwd"] = raster_call()
    if "rollout" in args.only:
        workloads.update(rollout_calls())
    for key, fn in workloads.items():
        part = report(key, fn, args.calls if "rollout" not in key else 3, args.rows)
        print(part, flush=True)
        text += part
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
