"""GPU kernel time of the rasterizer's forward+backward, all kernels and the blend kernels alone, from
torch.profiler: the figure for kernel A/Bs, free of the host time that moves CUDA-event timings of
small calls from run to run.

    python bench/raster_kernel_time.py [--code DIR] [--calls 10]

``--code DIR``: time the code of DIR instead of this tree (e.g. ``git archive <rev> taichi_mpm bridge
render bench | tar -x -C DIR``); run once per tree, interleaved, and compare the rows. Rows: batches
of cameras people render (100k random Gaussians on 8 HD cameras and on one 640x480 camera, 1M
trained-like on 4 cameras at 640x480, 1M random on one HD camera in RGB+ED), SH degree 3.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROWS = ((100_000, "random", 8, (1920, 1080), "RGB"), (100_000, "random", 1, (640, 480), "RGB"),
        (1_000_000, "trained_like", 4, (640, 480), "RGB"), (1_000_000, "random", 1, (1920, 1080), "RGB+ED"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--code", default=str(Path(__file__).resolve().parents[1]), help="project tree to time")
    ap.add_argument("--calls", type=int, default=10)
    args = ap.parse_args()
    sys.path[:0] = [args.code, args.code + "/bench"]
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    import raster as R
    if R.ensure_init() != "cuda":
        raise SystemExit("this benchmark needs CUDA")
    dev = torch.device("cuda")
    for n, dist, count, (w, h), mode in ROWS:
        leaves = {k: v.to(dev).requires_grad_(True) for k, v in R.grid_scene(n, dist).items()}
        viewmats, Ks = R.ring_cameras(count, w, h, dev)
        weights = torch.randn(count, h, w, 4 if mode == "RGB+ED" else 3, device=dev)

        def step():
            img = R.rasterize(leaves["means"], leaves["quats"], leaves["scales"], leaves["opacities"], leaves["sh"],
                              viewmats, Ks, w, h, sh_degree=3, render_mode=mode)[0]
            (img * weights).sum().backward()
        for _ in range(3):  # compile, warm the allocator
            step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(args.calls):
                step()
            torch.cuda.synchronize()
        kernels = [e for e in prof.key_averages() if e.device_type == DeviceType.CUDA]

        def ms(prefix: str = "") -> float:
            return sum(e.self_device_time_total for e in kernels if e.key.startswith(prefix)) / args.calls / 1e3
        print(f"{n:>9,} {dist:<12} {count} cam {w}x{h} {mode:<6} all kernels {ms():7.3f} ms, blend forward "
              f"{ms('forward_cuda'):6.3f} ms, blend backward {ms('backward_cuda'):6.3f} ms", flush=True)


if __name__ == "__main__":
    main()
