"""Where the host time of one small render call goes, section by section.

    python bench/host_sections.py [--calls 200] [--out FILE]

A 10k-Gaussian forward+backward (raster, one 256x256 camera) takes ~0.33 ms of kernels on an H200
but returns after ~2.2 ms, of which its five Taichi launches took 0.71 ms (0.32 ms of it in Taichi's
C++ launch_kernel) and the binning 0.59 ms (this script, 2026-11-28, code f15133c;
bench/results/host_sections_cuda.json). This times, with perf_counter and no
added sync, each stage the call runs through: the autograd Functions' forward and backward, the
binning, every TorchKernel launch by kernel name (Python argument setting and Taichi's launch
together), Taichi's C++ launch_kernel over all launches (so the argument setting is the launches'
sum less it), and the whole call; ``other`` is the call's time outside all of them (torch ops of the
bridge, autograd's engine, the loss). A stage that reads a GPU value to the host (binning's pair
count) also waits there for the kernels queued before it: its time is host work plus that wait.
Workloads: bench/profile_gpu.py's ``raster`` (10k 3D Gaussians, one 256x256 camera, SH3),
``splat2d`` (10k 2D Gaussians at 512x512, alpha mode) and its two rollouts (100k particles, 40
substeps, forward, and forward+backward; a tenth of ``--calls`` calls, at least 3). Prints
microseconds per call, median over the calls (nested stages are also inside their parents' time),
and how many launches of each kernel a call makes ("calls of ... (count)"), and writes them as JSON.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import functools
import importlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

from taichi_mpm.runtime import ensure_init  # noqa: E402


IN_STAGES = "in the outermost stages"  # per call, summed over them (not reported)
TAICHI_LAUNCH = "Taichi's launch_kernel (C++), all launches"  # inside the launches: the rest is argument setting
OUTSIDE = "other (outside every stage)"


@contextlib.contextmanager
def timed_stages(spent: dict):
    """Wraps the stages with timers adding microseconds into spent[name] while the block runs."""
    from taichi_mpm.launch import TorchKernel

    # the modules themselves: bridge's package namespace exports functions of the same names
    rasterization, splat2d = (importlib.import_module(f"bridge.{m}") for m in ("rasterization", "splat2d"))

    depth = [0]  # stages running now: only the outermost adds to OUTSIDE's complement

    def timer(name_of, fn):
        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            t0 = time.perf_counter()
            depth[0] += 1
            try:
                return fn(*args, **kwargs)
            finally:
                depth[0] -= 1
                us = (time.perf_counter() - t0) * 1e6
                name = name_of(args)
                spent[name] += us
                if name.startswith("launch "):  # a count, not microseconds
                    spent[f"calls of {name[len('launch '):]} (count)"] += 1
                if depth[0] == 0:
                    spent[IN_STAGES] += us
        return wrapped

    patches = [(TorchKernel, "__call__",
                lambda args: f"launch {args[0]._primal.func.__module__.split('.')[-1]}.{args[0]._name}"),
               (TorchKernel, "_launch", lambda args: TAICHI_LAUNCH)]
    for cls in (rasterization._Project, rasterization._Blend, splat2d._Splat2D):
        for method in ("forward", "backward"):
            patches.append((cls, method, lambda args, n=f"{cls.__name__}.{method}": n))
    for module in (rasterization, splat2d):
        patches.append((module, "bin_unchecked", lambda args: "binning (waits for the pair count)"))
    saved = [(owner, attr, owner.__dict__[attr]) for owner, attr, _ in patches]
    try:
        for owner, attr, name_of in patches:
            original = owner.__dict__[attr]
            fn = original.__func__ if isinstance(original, staticmethod) else original
            wrapped = timer(name_of, fn)
            setattr(owner, attr, staticmethod(wrapped) if isinstance(original, staticmethod) else wrapped)
        yield
    finally:
        for owner, attr, original in saved:
            setattr(owner, attr, original)


def sections(call, calls: int) -> dict:
    """Median microseconds a call of each stage, the whole call ("call", until it returns) and its
    wall time with the GPU's work finished ("call + sync")."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(5):
        call()
    sync()
    per_call = collections.defaultdict(list)
    with contextlib.ExitStack() as stack:
        spent = collections.defaultdict(float)
        stack.enter_context(timed_stages(spent))
        for _ in range(calls):
            spent.clear()
            t0 = time.perf_counter()
            call()
            t1 = time.perf_counter()
            sync()
            t2 = time.perf_counter()
            for name, us in spent.items():
                per_call[name].append(us)
            per_call["call"].append((t1 - t0) * 1e6)
            per_call["call + sync"].append((t2 - t0) * 1e6)
    outside = [c - s for c, s in zip(per_call["call"], per_call.pop(IN_STAGES))]
    medians = {name: statistics.median(values) for name, values in per_call.items()}
    medians[OUTSIDE] = statistics.median(outside)
    return medians


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    arch = ensure_init()
    import profile_gpu

    device = torch.cuda.get_device_name(0) if arch == "cuda" else "cpu"
    report = {"benchmark": "host_sections", "device": device, "arch": arch,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(), "calls": args.calls, "workloads": {}}
    rollouts = profile_gpu.rollout_calls()
    workloads = [("raster 10k 256x256 1 camera fwd+bwd", profile_gpu.raster_call(), args.calls),
                 ("splat2d 10k 512x512 alpha fwd+bwd", profile_gpu.splat2d_call(), args.calls)]
    workloads += [(name, call, max(args.calls // 10, 3)) for name, call in rollouts.items()]
    for name, call, calls in workloads:
        medians = sections(call, calls)
        report["workloads"][name] = medians
        print(f"\n{name} on {device} (us a call, median of {calls}):")
        for stage, us in sorted(medians.items(), key=lambda kv: -kv[1]):
            print(f"  {us:9.1f}  {stage}")
    out = args.out or Path(__file__).parent / "results" / f"host_sections_{arch}.json"
    out.write_text(json.dumps(report, indent=1))
    print("wrote", out)


if __name__ == "__main__":
    main()
