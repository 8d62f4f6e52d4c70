"""Which lever moves the forward substep: the MPM forward benchmark's cube under variants of the
kernels' build constants and of the particle order, one fresh process a variant (each compiles its
own kernels), timed the way bench/mpm_forward.py times taichi_mpm (MPMSolver.step, then each stage
alone).

    python bench/mpm_forward_variants.py [--size 1M|8M|tiny] [--before DIR] [--out FILE] VARIANT...

A variant is a "+"-joined list of settings (an empty list, "base", is the code as it is):
    shuffled      particles in random order (else lattice order, as sampled)
    sorted        MPMSolver.sort_particles() once before timing
    tile=N        block_scatter.TILE_NODES (nodes a shared-memory tile holds)
    block=N       block_scatter.BLOCK (particles per CUDA block of the tiled kernels)
    sort_block=AxBxC  solver.SORT_BLOCK (the cells of a sort_particles block along x, y, z)
    polar=N       constitutive.POLAR_ITERATIONS
    before        the code of --before DIR (e.g. ``git worktree add /tmp/before <rev>``) instead of this tree
e.g. ``base before sorted sorted+before tile=2048``. Prints one row a variant and writes them as JSON.
These are the experiments of 2026-11-27 (block_scatter's channel-major tile came out of them).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIZES = {"tiny": (32, 20), "1M": (128, 100), "8M": (256, 200)}  # grid res, particles per cube edge
CONSTANTS = {"tile": ("taichi_mpm.block_scatter", "TILE_NODES"), "block": ("taichi_mpm.block_scatter", "BLOCK"),
             "sort_block": ("taichi_mpm.solver", "SORT_BLOCK"), "polar": ("taichi_mpm.constitutive", "POLAR_ITERATIONS")}
# modules that copy a constant at import ("from .block_scatter import BLOCK"): patched alike
COPIES = {"TILE_NODES": ("taichi_mpm.substep",), "BLOCK": ("taichi_mpm.substep",)}

CHILD = r"""
import importlib, json, sys
settings, res, side, code = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
sys.path[:0] = [code, code + "/bench"]
for module, name, value in settings["constants"]:
    setattr(importlib.import_module(module), name, value)
import numpy as np
import mpm_forward as mf
positions, spacing = mf.cube(res, side)
if settings["shuffled"]:
    positions = positions[np.random.default_rng(0).permutation(len(positions))]
solver = mf.cube_solver(res, positions, spacing)
if settings["sorted"]:
    solver.sort_particles()
dt = solver.stable_dt(2.0)
ms = 1e3 * mf.time_solver(solver, dt, 100)
print("RESULT " + json.dumps({"ms_per_substep": ms, "G_particle_steps_per_s": len(positions) / ms / 1e6,
                              "stage_ms": mf.stage_profile(solver, dt, 25)}))
"""


def parse(variant: str) -> dict:
    settings = {"shuffled": False, "sorted": False, "before": False, "constants": []}
    for item in variant.split("+"):
        name, _, value = item.partition("=")
        if item in ("base", ""):
            continue
        if name in ("shuffled", "sorted", "before") and not value:
            settings[name] = True
        elif name in CONSTANTS and all(v.isdigit() and int(v) > 0 for v in value.split("x")) and (
                value.count("x") == (2 if name == "sort_block" else 0)):
            module, constant = CONSTANTS[name]
            number = [int(v) for v in value.split("x")] if name == "sort_block" else int(value)
            for target in (module,) + COPIES.get(constant, ()):
                settings["constants"].append((target, constant, number))
        else:
            raise ValueError(f"unknown setting {item!r} in variant {variant!r} (see the module docstring)")
    return settings


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variants", nargs="+")
    parser.add_argument("--size", choices=sorted(SIZES), default="1M")
    parser.add_argument("--before", type=Path, default=None, help="checkout for the 'before' setting")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds a variant may take")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default: print only)")
    args = parser.parse_args(argv)
    try:
        settings = {v: parse(v) for v in args.variants}
    except ValueError as e:
        parser.error(str(e))
    if any(s["before"] for s in settings.values()) and (args.before is None or not args.before.is_dir()):
        parser.error("a 'before' variant needs --before DIR, a checkout of the code to compare against")
    res, side = SIZES[args.size]
    rows = []
    print(f"{side ** 3:,} particles, {res}^3 grid")
    for variant, s in settings.items():
        code = str((args.before if s["before"] else ROOT).resolve())
        try:
            proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(s), str(res), str(side), code],
                                  cwd=code, capture_output=True, text=True, timeout=args.timeout,
                                  env=dict(os.environ, PYTHONPATH=os.pathsep.join(
                                      [code] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])))
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            row = json.loads(lines[-1][7:]) if lines else {"failed": (proc.stderr.strip().splitlines() or ["?"])[-1]}
        except subprocess.TimeoutExpired:
            row = {"failed": f"timed out after {args.timeout:.0f} s"}
        rows.append({"variant": variant, **row})
        print(f"  {variant:40s} " + (f"{row['ms_per_substep']:.3f} ms/substep  {row['G_particle_steps_per_s']:.2f} "
                                     f"G/s  " + " ".join(f"{k} {v:.3f}" for k, v in row["stage_ms"].items())
                                     if "failed" not in row else f"FAILED: {row['failed']}"), flush=True)
    if args.out:
        import torch

        device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
        args.out.write_text(json.dumps({"benchmark": "mpm_forward_variants", "device": device, "size": args.size,
                                        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
                                            timespec="seconds"), "rows": rows}, indent=2) + "\n")
        print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
