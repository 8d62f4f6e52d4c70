"""GPU benchmark of the Taichi 3DGS rasterizer against gsplat on the same Gaussians, same run.

    python bench/raster.py [--iters 10] [--out bench/results/raster.json]
    python bench/raster.py --host-overhead     (any arch: host time of a tiny render, outside kernel launches)
    python bench/raster.py --grid [--quick]    (the camera-batch grid below; --quick: tiny, any arch, no gsplat)

Scenes at 1920x1080, SH degree 3: random 100k and 1M Gaussians, and a trained-scene-like set
(clustered on surfaces, log-normal scales, mostly opaque) written to and read back from a 3DGS PLY.
Before timing it checks the CUDA kernels against the float64 dense reference on a small scene, and
for every scene compares our image with gsplat's. Prints a table and writes JSON (device, date).

``--grid`` times the workloads people run, each row beside gsplat in the same run: 1, 4 and 8
cameras (a ring around the scene, one batched call) x 256x256, 640x480, 1920x1080 x 10k, 100k, 1M, 3M
Gaussians x random and trained-like x RGB and RGB+ED; forward+backward, the two renderers' calls
interleaved (median of --iters rounds or more: see time_calls).
``gpu_ms`` is CUDA-event time; ``wall_ms`` is perf_counter time of a call followed by a sync;
``host_ms`` is the time until the call returns to Python without a sync (the Python, launches and
whatever waiting on the GPU the call itself forces). Writes raster_grid.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.host_overhead import host_overhead as measure_host  # noqa: E402
from bridge.rasterization import rasterize  # noqa: E402
from taichi_mpm.runtime import ensure_init  # noqa: E402
from render.camera import Camera, stack_cameras  # noqa: E402
from render.ply import GaussianPly, read_ply, write_ply  # noqa: E402
from render.reference import reference_rasterize  # noqa: E402

W, H = 1920, 1080


def random_scene(n: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(means=torch.rand(n, 3, generator=g) * 2 - 1, quats=torch.randn(n, 4, generator=g),
                scales=torch.exp(torch.randn(n, 3, generator=g) * 0.5 + math.log(0.01)),
                opacities=torch.rand(n, generator=g), sh=torch.randn(n, 16, 3, generator=g) * 0.2)


def trained_like_ply(path: Path, n: int, seed: int = 0) -> None:
    """Gaussians clustered on a few surfaces (spheres and a ground plane), as training leaves them."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform(-0.8, 0.8, (12, 3))
    radii = rng.uniform(0.1, 0.4, 12)
    on_sphere = rng.integers(0, 12, n)
    d = rng.normal(size=(n, 3))
    means = centres[on_sphere] + radii[on_sphere, None] * d / np.linalg.norm(d, axis=1, keepdims=True)
    ground = rng.random(n) < 0.3
    means[ground] = np.c_[rng.uniform(-2, 2, (ground.sum(), 2)), np.full(ground.sum(), -1.0)]
    means += rng.normal(scale=0.005, size=means.shape)
    log_scales = rng.normal(math.log(0.006), 0.7, (n, 3))
    log_scales[:, 2] -= 1.5  # flat, surface-aligned splats
    sh = np.concatenate([rng.normal(0, 0.6, (n, 1, 3)), rng.normal(0, 0.05, (n, 15, 3))], 1)
    write_ply(path, GaussianPly(means.astype(np.float32), sh.astype(np.float32),
                                rng.normal(2.0, 2.0, n).astype(np.float32), log_scales.astype(np.float32),
                                rng.normal(size=(n, 4)).astype(np.float32)))


def scene_from_ply(path: Path) -> dict:
    a = read_ply(path).activated()
    return dict(means=torch.from_numpy(a["means"]), quats=torch.from_numpy(a["quats"]),
                scales=torch.from_numpy(a["scales"]), opacities=torch.from_numpy(a["opacities"]),
                sh=torch.from_numpy(a["sh"]))


def check_against_reference(dev) -> dict:
    """Max errors of the CUDA kernels vs the float64 dense reference (image, every gradient)."""
    g = torch.Generator().manual_seed(3)
    n, w, h = 150, 45, 37
    inputs = dict(means=torch.randn(n, 3, generator=g) * 0.5 + torch.tensor([0, 0, 3.0]),
                  quats=torch.randn(n, 4, generator=g), scales=torch.rand(n, 3, generator=g) * 0.2 + 0.02,
                  opacities=torch.rand(n, generator=g) * 0.9 + 0.05, colors=torch.randn(n, 16, 3, generator=g) * 0.3)
    cams = [Camera.look_at((0.3, -0.2, -0.5), (0, 0, 3), (0, -1, 0), w, h, 50), Camera.look_at((0, 0, 0), (0, 0, 3), (0, -1, 0), w, h, 40)]
    viewmats, Ks = stack_cameras(cams)
    out = {}
    for mode in ("RGB", "RGB+ED"):
        results = []
        for dtype, fn in ((torch.float32, rasterize), (torch.float64, reference_rasterize)):
            leaves = {k: v.to(dev, dtype).clone().requires_grad_(True) for k, v in inputs.items()}
            img, alpha = fn(**leaves, viewmats=viewmats.to(dev, dtype), Ks=Ks.to(dev, dtype), width=w, height=h,
                            sh_degree=3, render_mode=mode)[:2]
            wg = torch.Generator().manual_seed(5)
            weights = torch.randn(img.shape, generator=wg, dtype=torch.float64).to(dev, dtype)
            ((img * weights).sum() + alpha.sum()).backward()
            results.append((img.detach().double(), {k: v.grad.double() for k, v in leaves.items()}))
        (ours, ours_g), (ref, ref_g) = results
        out[mode] = {"image_max_abs": float((ours - ref).abs().max()),
                     **{f"grad_{k}_max_rel": float((ours_g[k] - ref_g[k]).abs().max() / ref_g[k].abs().max())
                        for k in ours_g}}
    return out


def cuda_time(fn, iters: int) -> float:
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return float(np.median(times))


def bench_one(render, scene: dict, viewmats, Ks, iters: int) -> dict:
    leaves = {k: v.clone().requires_grad_(True) for k, v in scene.items()}
    weights = torch.randn(1, H, W, 3, device=viewmats.device)

    def forward():
        return render(leaves, viewmats, Ks)

    def fwd_bwd():
        img = forward()
        (img * weights).sum().backward()

    for _ in range(3):
        fwd_bwd()
    torch.cuda.synchronize()
    t_fwd = cuda_time(forward, iters)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    t_total = cuda_time(fwd_bwd, iters)
    peak = torch.cuda.max_memory_allocated() - base
    img = forward().detach()
    return {"forward_ms": t_fwd, "backward_ms": t_total - t_fwd, "fwd_bwd_ms": t_total,
            "peak_mem_mb": peak / 2**20}, img


def kernel_profile(scene: dict, viewmats, Ks) -> str:
    """Per-kernel CUDA times of one forward+backward (torch profiler; Taichi kernels show by name)."""
    leaves = {k: v.clone().requires_grad_(True) for k, v in scene.items()}
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        ours(leaves, viewmats, Ks).sum().backward()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)


def ours(leaves, viewmats, Ks):
    img, _, _ = rasterize(leaves["means"], leaves["quats"], leaves["scales"], leaves["opacities"], leaves["sh"],
                          viewmats, Ks, W, H, sh_degree=3, validate=False)
    return img


def gsplat_render(leaves, viewmats, Ks):
    import gsplat
    img, _, _ = gsplat.rasterization(leaves["means"], leaves["quats"], leaves["scales"], leaves["opacities"],
                                     leaves["sh"], viewmats, Ks, W, H, sh_degree=3)
    return img


def host_overhead(repeats: int = 5, calls: int = 100, batch: int = 4) -> dict:
    """Host time of one render of a tiny scene (200 Gaussians, 32x32, SH3) outside Taichi's launch
    calls, forward and forward+backward from one camera, and forward+backward from a batch of
    `batch` cameras in one call (``batch_fwd_bwd``), all with validate=False, and the one-camera
    forward with validate=True (the default: ``validated_forward``), with their torch-op and launch
    counts (bench/host_overhead.py). Median of `repeats` runs of `calls` renders, in microseconds."""
    g = torch.Generator().manual_seed(0)
    n, w, h = 200, 32, 32
    dev = torch.device("cuda" if ensure_init() == "cuda" else "cpu")
    scene = dict(means=torch.randn(n, 3, generator=g) * 0.5 + torch.tensor([0, 0, 3.0]),
                 quats=torch.randn(n, 4, generator=g), scales=torch.rand(n, 3, generator=g) * 0.05 + 0.01,
                 opacities=torch.rand(n, generator=g), sh=torch.randn(n, 16, 3, generator=g) * 0.3)
    leaves = {k: v.to(dev).requires_grad_(True) for k, v in scene.items()}
    cameras = [Camera.look_at((0.2 * k, 0, 0), (0, 0, 3), (0, -1, 0), w, h, 50) for k in range(batch)]
    one, several = ((t.to(dev) for t in stack_cameras(cams)) for cams in (cameras[:1], cameras))
    (viewmats, Ks), (batch_viewmats, batch_Ks) = tuple(one), tuple(several)
    weights = torch.randn(batch, h, w, 3, generator=g).to(dev)
    weights_one = weights[:1].clone()

    def forward(viewmats=viewmats, Ks=Ks, validate=False):
        return rasterize(leaves["means"], leaves["quats"], leaves["scales"], leaves["opacities"], leaves["sh"],
                         viewmats, Ks, w, h, sh_degree=3, validate=validate)[0]

    def validated_forward():
        return forward(validate=True)

    def fwd_bwd():
        (forward() * weights_one).sum().backward()

    def batch_fwd_bwd():
        (forward(batch_viewmats, batch_Ks) * weights).sum().backward()

    fwd_bwd()
    batch_fwd_bwd()
    return {"arch": dev.type, "scene": f"{n} Gaussians, {w}x{h}, SH3; batch: {batch} cameras",
            **measure_host({"forward": forward, "fwd_bwd": fwd_bwd, "batch_fwd_bwd": batch_fwd_bwd,
                            "validated_forward": validated_forward}, repeats, calls)}


GRID_CAMERAS = (1, 4, 8)
GRID_SIZES = ((256, 256), (640, 480), (1920, 1080))
GRID_GAUSSIANS = (10_000, 100_000, 1_000_000, 3_000_000)
GRID_MODES = ("RGB", "RGB+ED")


def grid_scene(n: int, distribution: str) -> dict:
    """n Gaussians of the grid's "random" or "trained_like" distribution (the latter through a PLY,
    as a trained scene arrives)."""
    if distribution == "random":
        return random_scene(n)
    with tempfile.TemporaryDirectory() as tmp:
        trained_like_ply(Path(tmp) / "scene.ply", n)
        return scene_from_ply(Path(tmp) / "scene.ply")


def ring_cameras(count: int, width: int, height: int, dev):
    """``count`` cameras on a ring around the origin, looking at it (z up), stacked for one call."""
    cams = [Camera.look_at((3.2 * math.sin(a), -3.2 * math.cos(a), 0.8), (0, 0, 0), (0, 0, 1), width, height, 60)
            for a in np.linspace(0, 2 * math.pi, count, endpoint=False)]
    return tuple(t.to(dev) for t in stack_cameras(cams))


ROW_SECONDS = 0.2  # each renderer's least total time a grid row (small rows get more calls)


def time_calls(fns: dict, iters: int, dev) -> dict:
    """Median gpu_ms / wall_ms / host_ms of each fn() (see the module docstring), the renderers'
    calls interleaved, with the order alternating each round, so that a drift of the host's speed
    during a row reaches every renderer alike. At least ``iters`` rounds, more (up to 10x) until the
    slowest renderer has spent ROW_SECONDS: small rows are host-bound, and 5 calls left their ratios
    10-20% apart from one run to the next (2026-11-28)."""
    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def one(fn):
        if dev.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        if dev.type == "cuda":
            end.record()
        sync()
        t2 = time.perf_counter()
        gpu = start.elapsed_time(end) if dev.type == "cuda" else (t2 - t0) * 1e3
        return gpu, (t2 - t0) * 1e3, (t1 - t0) * 1e3

    names = list(fns)
    for name in names:  # compile, warm the allocator; the second call estimates the row's cost
        fns[name]()
        sync()
    slowest = max(one(fns[name])[1] for name in names) / 1e3
    rounds = min(10 * iters, max(iters, math.ceil(ROW_SECONDS / max(slowest, 1e-6))))
    samples = {name: [] for name in names}
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            samples[name].append(one(fns[name]))
    return {name: dict(zip(("gpu_ms", "wall_ms", "host_ms"), (float(x) for x in np.median(np.array(v), 0))),
                       calls=rounds) for name, v in samples.items()}


def grid_rows(args, dev, save) -> list:
    """Every row of the grid, ours and (unless --no-gsplat) gsplat's, forward+backward; save(rows)
    after each row, so that a run cut short by a time limit keeps what it measured."""
    renderers = {"ours": rasterize}
    if not args.no_gsplat:
        import gsplat  # fails here, before any timing, when the peer is missing

        renderers["gsplat"] = gsplat.rasterization
    cameras, sizes, counts = GRID_CAMERAS, GRID_SIZES, GRID_GAUSSIANS
    if args.quick:
        cameras, sizes, counts = (1, 4), ((64, 48),), (1_000,)
    rows = []
    for n in counts:
        for dist in ("random", "trained_like"):
            leaves = {k: v.to(dev).requires_grad_(True) for k, v in grid_scene(n, dist).items()}
            for count in cameras:
                for width, height in sizes:
                    for mode in GRID_MODES:
                        rows.append(grid_row(renderers, leaves, dist, count, width, height, mode, args.iters, dev))
                        save(rows)
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def grid_row(renderers: dict, leaves: dict, dist: str, count: int, width: int, height: int, mode: str,
             iters: int, dev) -> dict:
    viewmats, Ks = ring_cameras(count, width, height, dev)
    n = leaves["means"].shape[0]
    row = {"gaussians": n, "distribution": dist, "cameras": count, "width": width, "height": height, "mode": mode}
    weights = torch.randn(count, height, width, 4 if mode == "RGB+ED" else 3, device=dev)
    def step(render):
        img = render(leaves["means"], leaves["quats"], leaves["scales"], leaves["opacities"], leaves["sh"],
                     viewmats, Ks, width, height, sh_degree=3, render_mode=mode)[0]
        (img * weights).sum().backward()
    row.update(time_calls({name: (lambda r=render: step(r)) for name, render in renderers.items()}, iters, dev))
    if "gsplat" in row:
        row["ratio"] = row["ours"]["gpu_ms"] / row["gsplat"]["gpu_ms"]
        row["ratio_wall"] = row["ours"]["wall_ms"] / row["gsplat"]["wall_ms"]
    o, g = row["ours"], row.get("gsplat", {})
    nan = float("nan")
    print(f"{n:>9,} {dist:<12} {count} cam {width}x{height} {mode:<6} | ours gpu {o['gpu_ms']:7.2f} wall "
          f"{o['wall_ms']:7.2f} host {o['host_ms']:6.2f} | gsplat gpu {g.get('gpu_ms', nan):7.2f} wall "
          f"{g.get('wall_ms', nan):7.2f} | {row.get('ratio', nan):5.2f}x", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--out", help="JSON path (default bench/results/raster.json, or "
                                  "raster_host_overhead_<arch>.json with --host-overhead)")
    ap.add_argument("--scenes", default="random_100k,random_1M,trained_like")
    ap.add_argument("--no-gsplat", action="store_true")
    ap.add_argument("--grid", action="store_true", help="the camera-batch grid (see the module docstring)")
    ap.add_argument("--quick", action="store_true", help="with --grid: tiny sizes, any arch (checks the script)")
    ap.add_argument("--host-overhead", action="store_true",
                    help="only time the host glue of a tiny render (any arch) and write raster_host_overhead_<arch>.json")
    args = ap.parse_args()
    if args.host_overhead:
        result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(), **host_overhead()}
        print(json.dumps(result))
        out = Path(args.out or Path(__file__).parent / "results" / f"raster_host_overhead_{result['arch']}.json")
        out.write_text(json.dumps(result, indent=1))
        print("wrote", out)
        return
    if args.grid:
        arch = ensure_init()
        if arch != "cuda" and not args.quick:
            raise SystemExit("the grid needs CUDA (or --quick)")
        dev = torch.device(arch)
        report = {"benchmark": "raster_grid", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                  "device": torch.cuda.get_device_name(0) if arch == "cuda" else "cpu", "iters": args.iters,
                  "sh_degree": 3, "quick": args.quick, "rows": []}
        out = Path(args.out or Path(__file__).parent / "results" /
                   ("raster_grid_quick.json" if args.quick else "raster_grid.json"))

        def save(rows):
            out.write_text(json.dumps(dict(report, rows=rows), indent=1))
        grid_rows(args, dev, save)
        print("wrote", out)
        return
    if ensure_init() != "cuda":
        raise SystemExit("this benchmark needs CUDA")
    dev = torch.device("cuda")
    report = {"device": torch.cuda.get_device_name(0), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "resolution": [W, H], "sh_degree": 3, "iters": args.iters}
    t0 = time.time()
    report["reference_check"] = check_against_reference(dev)
    print("CUDA vs float64 reference:", json.dumps(report["reference_check"], indent=1), f"({time.time() - t0:.0f} s)")
    cam = Camera.look_at((0.0, -3.2, 0.8), (0, 0, 0), (0, 0, 1), W, H, 60)
    viewmats, Ks = (t.to(dev) for t in stack_cameras([cam]))
    report["scenes"] = {}
    for name in args.scenes.split(","):
        if name == "trained_like":
            with tempfile.TemporaryDirectory() as tmp:
                trained_like_ply(Path(tmp) / "scene.ply", 600_000)
                scene = scene_from_ply(Path(tmp) / "scene.ply")
        else:
            scene = random_scene({"random_100k": 100_000, "random_1M": 1_000_000}[name])
        scene = {k: v.to(dev) for k, v in scene.items()}
        row = {"num_gaussians": scene["means"].shape[0]}
        with torch.no_grad():
            _, _, meta = rasterize(scene["means"], scene["quats"], scene["scales"], scene["opacities"], scene["sh"],
                                   viewmats, Ks, W, H, sh_degree=3)
        row["tile_pairs"] = meta["num_pairs"]
        row["ours"], img_ours = bench_one(ours, scene, viewmats, Ks, args.iters)
        if not args.no_gsplat:
            row["gsplat"], img_gs = bench_one(gsplat_render, scene, viewmats, Ks, args.iters)
            diff = (img_ours - img_gs).abs()
            mse = float((diff ** 2).mean())
            row["image_vs_gsplat"] = {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()),
                                      "psnr_db": 10 * math.log10(1.0 / max(mse, 1e-20))}
            row["ratio_fwd_bwd"] = row["ours"]["fwd_bwd_ms"] / row["gsplat"]["fwd_bwd_ms"]
        report["scenes"][name] = row
        if name == "random_1M":
            print(kernel_profile(scene, viewmats, Ks))
        print(name, json.dumps(row), flush=True)
        del scene
        torch.cuda.empty_cache()

    print(f"\n{report['device']}, {W}x{H}, SH3, median of {args.iters}")
    print(f"{'scene':<14}{'N':>9}{'pairs':>11} | {'ours fwd':>9}{'bwd':>8}{'mem MB':>8} | "
          f"{'gsplat fwd':>10}{'bwd':>8}{'mem MB':>8} | {'ratio':>6} {'PSNR vs gsplat':>14}")
    for name, r in report["scenes"].items():
        o, gs = r["ours"], r.get("gsplat", {})
        print(f"{name:<14}{r['num_gaussians']:>9}{r['tile_pairs']:>11} | {o['forward_ms']:>9.2f}{o['backward_ms']:>8.2f}"
              f"{o['peak_mem_mb']:>8.0f} | {gs.get('forward_ms', float('nan')):>10.2f}{gs.get('backward_ms', float('nan')):>8.2f}"
              f"{gs.get('peak_mem_mb', float('nan')):>8.0f} | {r.get('ratio_fwd_bwd', float('nan')):>6.2f} "
              f"{r.get('image_vs_gsplat', {}).get('psnr_db', float('nan')):>14.1f}")
    out = Path(args.out or Path(__file__).parent / "results" / "raster.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print("wrote", out)


if __name__ == "__main__":
    main()
