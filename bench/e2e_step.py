"""One optimisation step of the whole chain: MPM rollout -> surface upsampling -> 4-view rendering
-> image loss -> full backward, with the time split and peak memory.

Workload (default, the issue's): an elastic cube of ~100k particles (8 per cell, float32), 200
substeps, 4 frames rendered (substeps 50, 100, 150, 200), each from 4 cameras at 512x512, 180k
surface Gaussians (``bridge.synthesize_surface``); loss = MSE against a fixed target image stack;
backward reaches E, nu, v0, sigma0 and thickness.

Peer in the same run: the previous API on the same rollout, one Gaussian per particle
(``bridge.particles_to_gaussians``, cov = r^2 F F^T) rendered the same way.

Each variant is timed ``--repeats`` times after a warm-up step (compiles every kernel); the table
shows the median. Split: simulation forward (``bridge.simulate``), upsampling forward, rendering
forward (rasterize + loss), backward through rendering and upsampling (``torch.autograd.grad`` to
the trajectory), simulation backward (the rollout's checkpointed backward). ``step_ms`` is a plain
forward + ``loss.backward()`` measured separately (no split). Peak memory: torch's max allocated
during the plain step. The warm-up step compiles every kernel (on a fresh CUDA machine ~2 minutes,
mostly the rollout's reverse kernels): give a GPU run 5 minutes.

    python bench/e2e_step.py [--quick] [--out bench/results/e2e_step_cuda.json]

``--compare SETTING [SETTING ...]`` times rollout settings against each other instead: steps of the
first variant under each setting, interleaved in one process with the order alternating each round
(``--rounds``), so that the host's drift, which moves a step by tens of milliseconds within minutes
on the GPU machines, lands on every setting alike. A setting is ``default`` or comma-separated
``grouped=0|1`` (TAICHI_MPM_GROUPED_SUBSTEPS), ``batched=0|1`` (the frames upsampled and rendered
in one call, or a call each), ``keep=0|1`` (simulate's keep_last_segment) and ``every=K``
(simulate's checkpoint_every). Reports each setting's median, range and peak memory, the median
over rounds of its difference to the first setting's step of the same round, and a host probe
(a fixed Python loop timed each round: the host's own drift):

    python bench/e2e_step.py --compare default grouped=0 every=16 --rounds 20
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import trimesh

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bridge.rasterization import rasterize  # noqa: E402
from bridge.rollout import RolloutScene, simulate  # noqa: E402
from bridge.surface import Gaussians, particles_to_gaussians  # noqa: E402
from bridge.upsampling import SurfaceConfig, bind_surface, synthesize_surface  # noqa: E402
from render.camera import Camera, stack_cameras  # noqa: E402
from taichi_mpm import Elastic, MPMSolver  # noqa: E402
from taichi_mpm.runtime import ensure_init  # noqa: E402


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Clock:
    def __init__(self):
        self.times = {}

    def lap(self, name, t0):
        sync()
        now = time.perf_counter()
        self.times[name] = self.times.get(name, 0.0) + (now - t0) * 1e3
        return now


def build(args):
    solver = MPMSolver(res=args.res)
    side = (args.particles / 8) ** (1 / 3) / args.res
    lower = np.array([0.5 - side / 2, 0.2, 0.5 - side / 2])
    solver.add_cube(tuple(lower), (side, side, side), Elastic(E=1e5, nu=0.3), particles_per_cell=8)
    scene = RolloutScene.from_solver(solver, dt=min(1e-4, solver.stable_dt(2.0)))
    x0 = solver.positions(as_torch=True).clone()
    binding = bind_surface(trimesh.creation.box(extents=(side, side, side)), x0,
                           SurfaceConfig(n_gaussians=args.gaussians, neighbours=1, flatten=0.5),
                           translation=lower + side / 2, band=solver.dx)
    cams = [Camera.look_at((0.5 + 1.2 * np.cos(a), 0.6, 0.5 + 1.2 * np.sin(a)), (0.5, 0.3, 0.5), up=(0.0, 1.0, 0.0),
                           width=args.size, height=args.size, fov_y_degrees=40.0) for a in np.radians([0, 90, 180, 270])]
    viewmats, Ks = stack_cameras(cams[:args.views], x0.device)
    return solver, scene, x0, binding, viewmats, Ks


def step(args, scene, x0, binding, viewmats, Ks, target, variant, clock=None, checkpoint_every=None,
         batched=True, keep_last_segment=True):
    """One forward + backward. With a clock: timed in stages; returns (loss, leaves). batched: every
    frame is upsampled in one pass and rendered in one rasterize call (the frames as a batch of
    scenes), else a call of each a frame."""
    dev, real = x0.device, x0.dtype
    leaves = {"log_E": torch.tensor(np.log(1e5), dtype=real, device=dev, requires_grad=True),
              "nu": torch.tensor(0.3, dtype=real, device=dev, requires_grad=True),
              "v0": torch.tensor([0.5, -0.5, 0.2], dtype=real, device=dev, requires_grad=True),
              "log_sigma0": torch.tensor(np.log(0.5 * args.spacing), dtype=real, device=dev, requires_grad=True),
              "log_thickness": torch.tensor(np.log(args.spacing), dtype=real, device=dev, requires_grad=True)}
    frames = [args.substeps * (i + 1) // args.frames for i in range(args.frames)]
    t = time.perf_counter()
    traj = simulate(scene, x0, leaves["v0"].expand(len(x0), 3), {"E": leaves["log_E"].exp(), "nu": leaves["nu"]},
                    args.substeps, frames, checkpoint_every=checkpoint_every, keep_last_segment=keep_last_segment)
    if clock:
        t = clock.lap("sim_fwd_ms", t)
        xs, Fs = traj.x.detach().requires_grad_(), traj.F.detach().requires_grad_()
    else:
        xs, Fs = traj.x, traj.F
    sigma0, thickness = leaves["log_sigma0"].exp(), leaves["log_thickness"].exp()
    if batched and variant == "surface":  # every frame's Gaussians in one pass: (T, M, ...)
        gaussians = synthesize_surface(xs, Fs, binding, sigma0, thickness)
    else:
        gaussians = [synthesize_surface(xs[f], Fs[f], binding, sigma0, thickness) if variant == "surface" else
                     particles_to_gaussians(xs[f], Fs[f], 0.5 * args.spacing, (0.8, 0.4, 0.3), 0.9)
                     for f in range(args.frames)]
    if clock:
        t = clock.lap("upsample_fwd_ms", t)
    if batched:
        T, C = args.frames, len(viewmats)
        g = gaussians if isinstance(gaussians, Gaussians) else Gaussians(
            *(torch.stack([getattr(f, k) for f in gaussians]) for k in ("means", "covars", "opacities", "colors")))
        images, _, _ = rasterize(g.means, None, None, g.opacities, g.colors, viewmats.expand(T, C, 4, 4),
                                 Ks.expand(T, C, 3, 3), args.size, args.size, covars=g.covars)
    else:
        images = torch.stack([rasterize(g.means, None, None, g.opacities, g.colors, viewmats, Ks, args.size,
                                        args.size, covars=g.covars)[0] for g in gaussians])
    loss = (images - target).square().mean()
    if not clock:
        loss.backward()
        return loss, leaves
    t = clock.lap("render_fwd_ms", t)
    wanted = [xs, Fs] + ([leaves["log_sigma0"], leaves["log_thickness"]] if variant == "surface" else [])
    grads = torch.autograd.grad(loss, wanted, allow_unused=True)
    t = clock.lap("render_upsample_bwd_ms", t)
    torch.autograd.backward([traj.x, traj.F], [grads[0], grads[1]])
    clock.lap("sim_bwd_ms", t)
    return loss, leaves


def run_variant(args, scene, x0, binding, viewmats, Ks, target, variant):
    sync()
    t = time.perf_counter()
    step(args, scene, x0, binding, viewmats, Ks, target, variant)  # warm-up: compiles everything
    sync()
    warmup_s = time.perf_counter() - t
    print(f"{variant}: warm-up step (kernel compiles included) {warmup_s:.1f} s", flush=True)
    splits, plain, peaks, probes = [], [], [], []
    for _ in range(args.repeats):
        probes.append(host_probe())
        clock = Clock()
        step(args, scene, x0, binding, viewmats, Ks, target, variant, clock)
        splits.append(clock.times)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        sync()
        t = time.perf_counter()
        _, leaves = step(args, scene, x0, binding, viewmats, Ks, target, variant)
        sync()
        plain.append((time.perf_counter() - t) * 1e3)
        peaks.append(torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else float("nan"))
    finite = all(bool(torch.isfinite(v.grad).all()) for v in leaves.values() if v.grad is not None)
    row = {"variant": variant, "step_ms": statistics.median(plain), "peak_GB": max(peaks), "grads_finite": finite,
           "warmup_s": warmup_s, "steps_ms": plain, "host_probe_ms": probes}
    for key in splits[0]:
        row[key] = statistics.median(s[key] for s in splits)
    row["split_total_ms"] = sum(row[k] for k in splits[0])
    return row


def profile_step(args, scene, x0, binding, viewmats, Ks, target, variant) -> str:
    """One plain step under torch.profiler: its wall time, the summed GPU kernel time and that time
    per kernel (Taichi's kernels grouped by name, each of their loops a launch; torch's by name), to
    tell a host-bound step from a GPU-bound one and which kernels hold the GPU."""
    import re
    from collections import defaultdict

    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        step(args, scene, x0, binding, viewmats, Ks, target, variant)
        sync()
        wall_ms = (time.perf_counter() - t) * 1e3
    kernels = defaultdict(lambda: [0, 0.0])  # name -> [launches, microseconds]
    spans = []
    for e in prof.events():
        if e.device_type == DeviceType.CUDA:
            name = re.sub(r"_c\d+_\d+_kernel_\d+_\w+$", "", e.name)[:70]  # a Taichi kernel's loops together
            kernels[name][0] += 1
            kernels[name][1] += e.self_device_time_total
            spans.append((e.time_range.start, e.time_range.end, name))
    gpu_ms = sum(us for _, us in kernels.values()) / 1e3
    if not kernels:
        return f"{variant}: wall {wall_ms:.1f} ms; no GPU kernel (a CPU run)"
    lines = [f"{variant}: wall {wall_ms:.1f} ms, GPU kernels {gpu_ms:.1f} ms (profiler on)",
             f"{'kernel':<72} {'launches':>8} {'ms':>8} {'share':>6}"]
    for name, (count, us) in sorted(kernels.items(), key=lambda kv: -kv[1][1])[:25]:
        lines.append(f"{name:<72} {count:>8} {us / 1e3:>8.2f} {us / 1e3 / gpu_ms:>6.1%}")
    return "\n".join(lines + [""] + idle_table(spans))


def idle_table(spans: list) -> list:
    """Where the GPU waited for the host: the idle time between consecutive kernels (and copies),
    summed by the one that ended each wait; a host-bound stage shows as waits before its kernels."""
    from collections import defaultdict

    spans.sort()
    waits = defaultdict(lambda: [0, 0.0])  # kernel that ended the wait -> [waits, microseconds]
    busy_until = spans[0][1]
    for start, end, name in spans[1:]:
        if start > busy_until:
            waits[name][0] += 1
            waits[name][1] += start - busy_until
        busy_until = max(busy_until, end)
    idle_ms = sum(us for _, us in waits.values()) / 1e3
    lines = [f"GPU idle between its first and last kernel: {idle_ms:.1f} ms of "
             f"{(busy_until - spans[0][0]) / 1e3:.1f} ms; the waits by the kernel that ended them:",
             f"{'kernel':<72} {'waits':>8} {'ms':>8}"]
    for name, (count, us) in sorted(waits.items(), key=lambda kv: -kv[1][1])[:15]:
        lines.append(f"{name:<72} {count:>8} {us / 1e3:>8.2f}")
    return lines


SETTING_KEYS = {"grouped": ("0", "1"), "batched": ("0", "1"), "keep": ("0", "1"), "every": None}


def parse_setting(text: str) -> dict:
    """"default" -> {}; "grouped=0,every=16" -> {"grouped": "0", "every": 16}. ValueError if malformed."""
    usage = "want 'default' or comma-separated grouped=0|1, batched=0|1, keep=0|1, every=K"
    if text == "default":
        return {}
    setting = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep or key not in SETTING_KEYS or key in setting:
            raise ValueError(f"setting {text!r}: {usage}")
        if key == "every":
            if not (value.isdigit() and int(value) >= 1):
                raise ValueError(f"setting {text!r}: every must be an int >= 1")
            setting[key] = int(value)
        elif value not in SETTING_KEYS[key]:
            raise ValueError(f"setting {text!r}: {key} must be 0 or 1")
        else:
            setting[key] = value
    return setting


@contextlib.contextmanager
def applied(setting: dict):
    """The environment of a setting while the block runs (taichi_mpm reads it at every rollout);
    yields its step options: checkpoint_every (None: the default plan), batched and
    keep_last_segment."""
    saved = os.environ.get("TAICHI_MPM_GROUPED_SUBSTEPS")
    if "grouped" in setting:
        os.environ["TAICHI_MPM_GROUPED_SUBSTEPS"] = setting["grouped"]
    try:
        yield dict(checkpoint_every=setting.get("every"), batched=setting.get("batched", "1") == "1",
                   keep_last_segment=setting.get("keep", "1") == "1")
    finally:
        if saved is None:
            os.environ.pop("TAICHI_MPM_GROUPED_SUBSTEPS", None)
        else:
            os.environ["TAICHI_MPM_GROUPED_SUBSTEPS"] = saved


def host_probe() -> float:
    """ms of a fixed pure-Python loop: the host's speed at this moment, which drifts on the GPU
    machines (a step that slows with it is host-bound, one that slows alone is not)."""
    t = time.perf_counter()
    total = 0
    for i in range(200_000):
        total += i & 7
    return (time.perf_counter() - t) * 1e3


def interleaved(run_step, settings: dict, rounds: int) -> tuple:
    """({name: [ms of each round]}, [host_probe() ms of each round]): run_step(**options) under each
    setting once per round, after two untimed steps each, the order alternating between rounds."""
    names = list(settings)
    for name in names:
        with applied(settings[name]) as options:
            run_step(**options)
            run_step(**options)
    times, probes = {name: [] for name in names}, []
    for r in range(rounds):
        probes.append(host_probe())
        for name in (names if r % 2 == 0 else names[::-1]):
            with applied(settings[name]) as options:
                sync()
                t = time.perf_counter()
                run_step(**options)
                sync()
                times[name].append((time.perf_counter() - t) * 1e3)
    return times, probes


def compare(args, scene, x0, binding, viewmats, Ks, target) -> dict:
    """--compare: the first variant's steps under each setting, interleaved; prints the table."""
    variant = args.variants[0]
    settings = {text: parse_setting(text) for text in args.compare}
    peaks = {}

    def run_step(**options):
        step(args, scene, x0, binding, viewmats, Ks, target, variant, **options)

    times, probes = interleaved(run_step, settings, args.rounds)
    for name, setting in settings.items():  # peak memory: one more step each, alone
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        with applied(setting) as options:
            run_step(**options)
        peaks[name] = torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else float("nan")
    first = args.compare[0]
    rows = [{"setting": name, "step_ms": statistics.median(t), "min_ms": min(t), "max_ms": max(t),
             "diff_vs_first_ms": statistics.median(a - b for a, b in zip(t, times[first])),
             "peak_GB": peaks[name], "steps_ms": t} for name, t in times.items()]
    print(f"{variant}, {args.rounds} interleaved rounds; difference: median over rounds against {first!r}")
    print(f"{'setting':>24} {'median ms':>10} {'min':>7} {'max':>7} {'difference':>11} {'peak GB':>8}")
    for r in rows:
        print(f"{r['setting']:>24} {r['step_ms']:>10.1f} {r['min_ms']:>7.1f} {r['max_ms']:>7.1f} "
              f"{r['diff_vs_first_ms']:>+11.1f} {r['peak_GB']:>8.2f}")
    print(f"host probe (a fixed Python loop) each round, ms: {' '.join(f'{p:.1f}' for p in probes)}")
    return {"variant": variant, "rounds": args.rounds, "rows": rows, "host_probe_ms": probes}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--particles", type=int, default=100_000)
    parser.add_argument("--res", type=int, default=64)
    parser.add_argument("--substeps", type=int, default=200)
    parser.add_argument("--gaussians", type=int, default=180_000)
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--variants", nargs="+", choices=("surface", "per_particle"),
                        default=["surface", "per_particle"], help="surface upsampling and/or the one-per-particle peer")
    parser.add_argument("--quick", action="store_true", help="tiny CPU-sized run")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--profile", type=Path, default=None,
                        help="also profile one step of each variant (torch.profiler) and write the kernel table here")
    parser.add_argument("--compare", nargs="+", metavar="SETTING", default=None,
                        help="time rollout settings against each other, interleaved (see above)")
    parser.add_argument("--rounds", type=int, default=20, help="--compare's rounds")
    args = parser.parse_args()
    if args.compare:
        try:
            for text in args.compare:
                parse_setting(text)
        except ValueError as error:
            parser.error(str(error))
        if len(set(args.compare)) != len(args.compare) or args.rounds < 1:
            parser.error("--compare needs distinct settings and --rounds >= 1")
    if args.quick:
        args.particles, args.res, args.substeps, args.gaussians = 2000, 24, 20, 2000
        args.views, args.frames, args.size, args.repeats = 2, 2, 64, 1
    arch = ensure_init()
    device_name = torch.cuda.get_device_name() if arch == "cuda" else platform.processor() or "cpu"
    solver, scene, x0, binding, viewmats, Ks = build(args)
    args.spacing = solver.dx / 2
    target = torch.full((args.frames, len(viewmats), args.size, args.size, 3), 0.5, device=x0.device)
    print(f"device: {device_name} ({arch}); {scene.n_particles} particles, {args.substeps} substeps, "
          f"{binding.n_gaussians} surface Gaussians, {args.frames} frames x {len(viewmats)} views at {args.size}^2",
          flush=True)
    if args.compare:
        result = compare(args, scene, x0, binding, viewmats, Ks, target)
        rows = result.pop("rows")
        print(f"wrote {write(args, rows, device_name, arch, scene, binding, viewmats, 'e2e_compare', result)}")
        return
    rows = []
    for variant in args.variants:  # the JSON is rewritten after each, so a timeout keeps the first
        rows.append(run_variant(args, scene, x0, binding, viewmats, Ks, target, variant))
        print(json.dumps(rows[-1]), flush=True)
        write(args, rows, device_name, arch, scene, binding, viewmats)
    keys = ["sim_fwd_ms", "upsample_fwd_ms", "render_fwd_ms", "render_upsample_bwd_ms", "sim_bwd_ms"]
    print(f"{'variant':>13} {'step ms':>8} {'peak GB':>8} " + " ".join(f"{k[:-3]:>22}" for k in keys))
    for r in rows:
        print(f"{r['variant']:>13} {r['step_ms']:>8.1f} {r['peak_GB']:>8.3f} " + " ".join(f"{r[k]:>22.1f}" for k in keys))
    print(f"wrote {write(args, rows, device_name, arch, scene, binding, viewmats)}")
    if args.profile:
        tables = [profile_step(args, scene, x0, binding, viewmats, Ks, target, v) for v in args.variants]
        args.profile.write_text(f"bench/e2e_step.py --profile on {device_name}\n\n" + "\n\n".join(tables) + "\n")
        print("\n\n".join(tables))


def write(args, rows, device_name, arch, scene, binding, viewmats, name="e2e_step", extra=None):
    result = {"benchmark": name, "device": device_name, "arch": arch,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "torch": torch.__version__, "command": " ".join(sys.argv),
              "workload": {"particles": scene.n_particles, "substeps": args.substeps, "dt": scene.dt,
                           "gaussians": binding.n_gaussians, "frames": args.frames, "views": len(viewmats),
                           "size": args.size, "repeats": args.repeats},
              **(extra or {}), "rows": rows}
    out = args.out or Path(__file__).resolve().parent / "results" / f"{name}_{arch}{'_quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    return out


if __name__ == "__main__":
    main()
