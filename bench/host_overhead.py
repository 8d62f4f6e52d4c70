"""Host time of a render call outside Taichi's kernel launches, and its torch-op / launch counts.

Shared by bench/raster.py and bench/image2d.py (--host-overhead). On CPU Taichi's launch calls run
the kernels themselves, so timing everything but those calls isolates the Python/torch glue a call
costs; on CUDA they only enqueue, so it is everything but the launch calls themselves.
"""
from __future__ import annotations

import time
from typing import Callable, Dict

import numpy as np
import torch


def host_overhead(fns: Dict[str, Callable[[], None]], repeats: int = 5, calls: int = 100) -> dict:
    """For each named fn (already warmed up): median over `repeats` runs of `calls` calls of the host
    microseconds per call outside Taichi's launch_kernel (``<name>_us``), the Taichi launches per
    call (``<name>_taichi_launches``) and, from one profiled call, the torch ops it issues
    (``<name>_torch_ops``: aten ops called from outside another aten op, i.e. those the Python code
    or autograd asked for) and the aten ops in all (``<name>_aten_ops``, nested ones included)."""
    from taichi.lang import impl

    runtime = impl.get_runtime()
    program = runtime.prog
    inside = [0.0, 0]  # seconds in launch_kernel, launches

    class TimedProgram:  # the Taichi program with its kernel launches timed and counted
        def __getattr__(self, name):
            return getattr(program, name)

        def launch_kernel(self, *a):
            t0 = time.perf_counter()
            program.launch_kernel(*a)
            inside[0] += time.perf_counter() - t0
            inside[1] += 1

    out = {}
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    runtime.prog = TimedProgram()
    try:
        for name, fn in fns.items():
            runs = []
            for _ in range(repeats):
                inside[:] = [0.0, 0]
                t0 = time.perf_counter()
                for _ in range(calls):
                    fn()
                sync()
                runs.append((time.perf_counter() - t0 - inside[0]) / calls * 1e6)
            out[f"{name}_us"] = float(np.median(runs))
            out[f"{name}_taichi_launches"] = inside[1] / calls
            out[f"{name}_torch_ops"], out[f"{name}_aten_ops"] = torch_op_counts(fn)
    finally:
        runtime.prog = program
    return out


def torch_op_counts(fn: Callable[[], None]) -> tuple:
    """(top-level aten ops, all aten ops) of one call of fn, from the CPU torch profiler."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    aten = [e for e in prof.events() if e.name.startswith("aten::")]
    top = [e for e in aten if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")]
    return len(top), len(aten)
