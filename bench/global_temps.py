"""Taichi's global temporaries of every kernel a workload compiles, read from its IR on the CPU: the
8-byte ones (float64, int64) at offsets that are not multiples of 8 are misaligned on CUDA.

    python bench/global_temps.py [--workload rollout solver plastic transient] [--out FILE]

A value a kernel computes at its top level (outside its parallel loops) and reads inside them, such
as a by-value argument of a ti.func called there, goes through a buffer of global temporaries, one
offset each. Taichi 1.7.4 can place a float64 temporary after an int32 one at an offset of 4 mod 8:
a CUDA kernel then fails with CUDA_ERROR_MISALIGNED_ADDRESS, and a CPU never shows it (x86 loads
need no alignment). It struck the first kernel running two MPM substeps (float64 rollouts on an
H200, 2026-11-28), whose float64 temporaries this finds at 156-172 B; the same error had struck loops
over ti.ndrange(flag * X, Y, Z) earlier that day (not checked with this). This runs float64
workloads on the CPU with Taichi's print_ir on, in a child process whose output (about 1 GB of IR
for the rollout) is read as a stream, and lists each kernel's temporaries as its last IR dump has
them; the exit status is 1 if any 8-byte temporary is misaligned. Workloads: ``rollout`` (an elastic
rollout of 20 substeps and its backward: the whole-substep kernels and their adjoints), ``solver``
(MPMSolver steps of elastic and plastic bodies), ``plastic`` (a rollout of a sand body: the SVD
path's kernels and adjoints) and ``transient`` (the NLOS transient renderer's float64 kernels,
forward and backward).
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, Iterable, List, Tuple

ROOT = Path(__file__).resolve().parents[1]
HEADER = re.compile(r"\[ir_printer\.cpp:[^\]]*\] \[([A-Za-z_]\w*?)(?:_c\d+_\d+)?(?:\.\w+)?\] ")
TEMP = re.compile(r"<\*(.+?)> \$\d+ = global tmp var \(offset = (\d+) B\)")
EIGHT_BYTE = re.compile(r"\b[fiu]64\b")

WORKLOADS = {
    "rollout": """
import os
os.environ["TAICHI_MPM_GROUPED_SUBSTEPS"] = "1"  # the grouped kernels CUDA runs, on the CPU too
import torch
import bridge.rollout as R
from taichi_mpm import Elastic, MPMSolver
solver = MPMSolver(res=16, dtype="float64")
solver.add_cube((0.3, 0.4, 0.4), (0.19, 0.19, 0.19), Elastic(E=1e4, nu=0.3), particles_per_cell=2)
scene = R.RolloutScene.from_solver(solver, dt=2e-3, control_stride=5)
x0 = solver.positions(as_torch=True).clone()
n = x0.shape[0]
E = torch.tensor(1e4, dtype=torch.float64, requires_grad=True)
controls = torch.zeros(scene.n_controls(20), n, 3, 3, dtype=torch.float64, requires_grad=True)
traj = R.simulate(scene, x0, torch.zeros_like(x0), {"E": E, "nu": torch.tensor(0.3, dtype=torch.float64)}, 20,
                  [7, 20], controls=controls)
(traj.x.sum() + traj.F.sum()).backward()
""",
    "solver": """
from taichi_mpm import Elastic, MPMSolver, Sand, Snow, VonMises
solver = MPMSolver(res=16, dtype="float64")
solver.add_cube((0.2, 0.3, 0.3), (0.15, 0.15, 0.15), Elastic(E=1e4, nu=0.3), particles_per_cell=2)
solver.add_cube((0.5, 0.3, 0.3), (0.15, 0.15, 0.15), Sand(), particles_per_cell=2)
solver.add_cube((0.2, 0.6, 0.6), (0.15, 0.15, 0.15), Snow(), particles_per_cell=2)
solver.add_cube((0.5, 0.6, 0.6), (0.15, 0.15, 0.15), VonMises(), particles_per_cell=2)
solver.step(4e-3, dt=1e-3)
""",
    "plastic": """
import torch
import bridge.rollout as R
from taichi_mpm import MPMSolver, Sand
solver = MPMSolver(res=16, dtype="float64")
solver.add_cube((0.3, 0.4, 0.4), (0.19, 0.19, 0.19), Sand(), particles_per_cell=2)
scene = R.RolloutScene.from_solver(solver, dt=1e-3)
x0 = solver.positions(as_torch=True).clone()
angle = torch.tensor(35.0, dtype=torch.float64, requires_grad=True)
params = {"E": torch.tensor(1e4, dtype=torch.float64), "nu": torch.tensor(0.3, dtype=torch.float64),
          "friction_angle": angle}
traj = R.simulate(scene, x0, torch.zeros_like(x0), params, 6, [6])
traj.x.sum().backward()
""",
    "transient": """
import math
import torch
from bridge.transient import transient_gaussians
from render.transient import TransientGrid
g = torch.Generator().manual_seed(0)
f64 = torch.float64
leaves = [t.requires_grad_() for t in (
    torch.randn(7, 3, generator=g, dtype=f64) * 0.15 + torch.tensor([0.0, 0.0, 0.8], dtype=f64),
    torch.rand(7, 3, generator=g, dtype=f64) * 0.08 + 0.04, torch.randn(7, 4, generator=g, dtype=f64),
    torch.rand(7, generator=g, dtype=f64) * 0.8 + 0.1, torch.rand(7, generator=g, dtype=f64) + 0.2)]
grid = TransientGrid((0.0, 1.3), (-math.pi, math.pi), 20, 18, 0.3, 0.04, 30)
transient, histogram = transient_gaussians(*leaves, torch.zeros(2, 3, dtype=f64), grid)
(transient.sum() + histogram.sum()).backward()
""",
}


def temporaries(lines: Iterable[str]) -> Dict[str, List[Tuple[str, int]]]:
    """{kernel: [(type, offset)]} from Taichi's print_ir output: each kernel's temporaries as the
    last IR dump that names any has them (Taichi prints the IR after every pass)."""
    found: Dict[str, List[Tuple[str, int]]] = {}
    kernel, dump = None, []
    for line in lines:
        header = HEADER.search(line)
        if header:
            if kernel is not None and dump:
                found[kernel] = dump
            kernel, dump = header.group(1), []
            continue
        temp = TEMP.search(line)
        if temp and kernel is not None:
            entry = (temp.group(1), int(temp.group(2)))
            if entry not in dump:
                dump.append(entry)
    if kernel is not None and dump:
        found[kernel] = dump
    return found


def misaligned(temps: Dict[str, List[Tuple[str, int]]]) -> Dict[str, List[Tuple[str, int]]]:
    """The 8-byte temporaries (float64 / int64 scalars and tensors of them) at offsets not a multiple of 8."""
    bad = {k: [(t, off) for t, off in v if EIGHT_BYTE.search(t) and off % 8] for k, v in temps.items()}
    return {k: v for k, v in bad.items() if v}


def temporaries_of(argv: List[str], cwd: Path, what: str) -> Dict[str, List[Tuple[str, int]]]:
    """Runs ``python argv...`` (a script with Taichi's print_ir on at log level info, which prints the
    dumps' headers naming their kernels) with its output in one pipe, in order, and parses it as it
    streams; SystemExit with the output's tail if it fails."""
    child = subprocess.Popen([sys.executable, *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             errors="replace", cwd=str(cwd))
    tail: List[str] = []

    def stream():
        for line in child.stdout:
            tail.append(line)
            del tail[:-40]
            yield line
    temps = temporaries(stream())
    if child.wait() != 0:
        raise SystemExit(f"{what} failed:\n{''.join(tail)}")
    return temps


def run_workload(name: str, code: Path) -> Dict[str, List[Tuple[str, int]]]:
    """A workload of ``code``'s tree on the CPU, with print_ir and no offline cache (every kernel compiles)."""
    script = ("import sys; sys.path.insert(0, %r)\nfrom taichi_mpm import runtime\n"
              "runtime.init('cpu', print_ir=True, offline_cache=False, log_level='info')\n" % str(code))
    return temporaries_of(["-c", script + WORKLOADS[name]], code, f"workload {name}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", nargs="+", choices=sorted(WORKLOADS), default=sorted(WORKLOADS))
    ap.add_argument("--code", type=Path, default=ROOT, help="project tree to check (default: this one)")
    ap.add_argument("--out", type=Path, default=None, help="JSON of every kernel's temporaries")
    args = ap.parse_args()
    report, bad_total = {}, 0
    for name in args.workload:
        temps = run_workload(name, args.code.resolve())
        bad = misaligned(temps)
        bad_total += sum(len(v) for v in bad.values())
        report[name] = {"temporaries": temps, "misaligned": bad}
        eight = sum(1 for v in temps.values() for t, _ in v if EIGHT_BYTE.search(t))
        print(f"{name}: {len(temps)} kernels with global temporaries, {eight} of them 8-byte; "
              f"misaligned: {', '.join(f'{k} {v}' for k, v in bad.items()) or 'none'}", flush=True)
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    sys.exit(1 if bad_total else 0)


if __name__ == "__main__":
    main()
