"""Forward MLS-MPM throughput: taichi_mpm.MPMSolver against the plain reference substep.

A fixed-corotated elastic cube falling under gravity, 8 particles per cell, lattice order as the
samplers produce it: 1M particles in a 128^3 grid and 8M in 256^3 (``--quick``: tiny CPU sizes).
For each size it times, at the same fixed dt:
  - taichi_mpm: ``MPMSolver.step`` (state checks every 8 substeps included) and a per-stage
    profile (each stage timed alone);
  - on CUDA, taichi_mpm with the kernels it runs below 2^16 particles (TAICHI_MPM_TILED_P2G=0:
    no shared-memory tiles, run-time stencil loops: taichi_mpm.substep.for_axis);
  - taichi_mpm after one ``sort_particles()`` (the order the transfers prefer);
  - taichi_mpm on randomly shuffled particles, unsorted and with ``sort_every=64`` (1M only);
  - the plain reference (bench/mpm_reference.py): Taichi fields, one kernel per stage;
  - taichi_elements' solver (bench/mpm_peer_taichi_elements.py, in its own process) where its
    engine/ folder is found (``--taichi-elements DIR``, default .peers/taichi_elements); the
    JSON says why when it was not run.
Prints a table and writes JSON with the device name and date.

    python bench/mpm_forward.py [--quick] [--out bench/results/mpm_forward_<arch>.json]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from mpm_reference import ReferenceMPM  # noqa: E402
from taichi_mpm.runtime import ensure_init  # noqa: E402
from taichi_mpm import Elastic, MPMSolver  # noqa: E402

MATERIAL = Elastic(E=1e5, nu=0.3, density=1000.0)
VELOCITY = (0.0, -1.0, 0.0)


def sync():
    import taichi as ti

    ti.sync()
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def cube(res: int, side: int) -> tuple[np.ndarray, float]:
    spacing = 1.0 / (2 * res)
    start = 0.5 - side * spacing / 2
    axis = start + spacing * (np.arange(side) + 0.5)
    return np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3), spacing


def cube_solver(res: int, positions: np.ndarray, spacing: float, **kwargs) -> MPMSolver:
    """The benchmark's solver: the cube's particles (any order) in a res^3 grid with sticky walls."""
    solver = MPMSolver(res=res, boundary="sticky", **kwargs)
    solver.add_particles(positions, MATERIAL, velocity=VELOCITY, volume=spacing ** 3)
    return solver


def timed(fn, substeps: int) -> float:
    """Seconds per substep of fn(), which runs `substeps` substeps."""
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return (time.perf_counter() - start) / substeps


def time_solver(solver: MPMSolver, dt: float, substeps: int) -> float:
    solver.step(dt * 8, dt=dt)  # warm-up (compiles on first use)
    return timed(lambda: solver.step(dt * substeps, dt=dt), substeps)


def stage_profile(solver: MPMSolver, dt: float, reps: int) -> dict:
    """Milliseconds per call of each substep stage, timed alone (synchronised)."""
    k, s = solver.kernels, solver.state
    src, n = solver.src, solver.n_particles
    origin = solver._origin_vec
    # the three stages of the solver's one substep call, timed alone; every stage writes the other
    # slot or scratch, so repetitions see the same state (the grid's sums grow, which costs nothing)
    stages = {
        "stress_p2g": lambda: k.stress_p2g(
            src, 1 - src, n, s["x"], s["v"], s["C"], s["F"], s["plastic"], s["material"], s["E"], s["nu"],
            s["density"], s["volume"], s["aux"], solver._no_control, 0.0, solver.grid_mv, solver.grid_m, origin,
            solver.inv_dx, dt, solver.tiled),
        "grid_update": lambda: k.grid_update(solver.grid_mv, solver.grid_m, solver.grid_v, dt,
                                             solver._gravity_vec, origin, solver.dx, solver.wall_mode,
                                             solver.wall_friction, solver.collider_table, 0, solver.time, 1),
        "g2p": lambda: k.g2p(src, 1 - src, n, s["x"], s["v"], s["C"], solver.grid_v, origin,
                             solver.inv_dx, dt, solver.tiled),
        "check": lambda: solver.check(),
    }
    profile = {}
    for name, fn in stages.items():
        fn()
        sync()
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        sync()
        profile[name] = 1e3 * (time.perf_counter() - start) / reps
    return profile


def time_taichi_elements(engine: Path, res: int, side: int, substeps: int, dt: float, arch: str):
    """(seconds per substep, None) of the taichi_elements peer, or (None, why it did not run)."""
    script = Path(__file__).resolve().parent / "mpm_peer_taichi_elements.py"
    cmd = [sys.executable, str(script), "--engine", str(engine), "--res", str(res), "--side", str(side),
           "--substeps", str(substeps), "--dt", repr(dt), "--arch", arch]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        return None, "timed out after 600 s"
    if proc.returncode != 0:
        return None, (proc.stderr.strip().splitlines() or ["exit status %d" % proc.returncode])[-1]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if not result["finite"]:
        return None, "its particles left the domain (unstable at this dt)"
    return result["ms_per_substep"] / 1e3, None


def bench_size(res: int, side: int, substeps: int, shuffled_too: bool, engine: Path, arch: str) -> dict:
    positions, spacing = cube(res, side)
    n = len(positions)
    rows = {}

    def make(x, **kwargs):
        return cube_solver(res, x, spacing, **kwargs)

    solver = make(positions)
    dt = solver.stable_dt(2.0)
    rows["taichi_mpm"] = time_solver(solver, dt, substeps)
    profile = stage_profile(solver, dt, reps=max(3, substeps // 4))
    del solver
    if arch == "cuda":  # the P2G without shared-memory tiles, for comparison
        os.environ["TAICHI_MPM_TILED_P2G"] = "0"
        rows["taichi_mpm plain P2G"] = time_solver(make(positions), dt, substeps)
        del os.environ["TAICHI_MPM_TILED_P2G"]
    solver = make(positions)
    solver.sort_particles()  # the transfers' order (MPMSolver.sort_particles), once
    rows["taichi_mpm sorted"] = time_solver(solver, dt, substeps)
    del solver
    if shuffled_too:
        shuffled = positions[np.random.default_rng(0).permutation(n)]
        rows["taichi_mpm shuffled"] = time_solver(make(shuffled), dt, substeps)
        rows["taichi_mpm shuffled sort_every=64"] = time_solver(make(shuffled, sort_every=64), dt, substeps)
    torch.cuda.empty_cache() if torch.cuda.is_available() else None

    reference = ReferenceMPM(positions, res, MATERIAL.E, MATERIAL.nu, MATERIAL.density, spacing ** 3,
                             velocity=VELOCITY)
    for _ in range(8):
        reference.substep(dt)

    def run_reference():
        for _ in range(substeps):
            reference.substep(dt)

    rows["plain reference"] = timed(run_reference, substeps)
    reference.destroy()
    peers_not_run = {}
    seconds, why = time_taichi_elements(engine, res, side, substeps, dt, arch)
    if seconds is None:
        peers_not_run["taichi_elements"] = why
    else:
        rows["taichi_elements"] = seconds
    return {"res": res, "particles": n, "dt": dt, "substeps_timed": substeps, "peers_not_run": peers_not_run,
            "ms_per_substep": {k: 1e3 * v for k, v in rows.items()},
            "particle_steps_per_s": {k: n / v for k, v in rows.items()},
            "stage_ms": profile}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (CPU smoke run)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--taichi-elements", type=Path, default=Path(__file__).resolve().parents[1] / ".peers" /
                        "taichi_elements", help="folder holding taichi_elements' engine/ (the second peer)")
    args = parser.parse_args()
    arch = ensure_init()
    sizes = [(32, 24, 20, True)] if args.quick else [(128, 100, 100, True), (256, 200, 40, False)]
    results = [bench_size(*size, engine=args.taichi_elements, arch=arch) for size in sizes]
    device = torch.cuda.get_device_name() if arch == "cuda" else (platform.processor() or platform.machine())
    report = {"benchmark": "mpm_forward", "device": device, "arch": arch,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "material": "fixed_corotated E=1e5 nu=0.3 rho=1000, 8 particles/cell, float32",
              "results": results}
    out = args.out or Path(__file__).parent / "results" / f"mpm_forward_{arch}{'_quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))

    print(f"device: {device} ({arch}), {report['date']}")
    print(f"{'grid':>6} {'particles':>10}  {'variant':<36} {'ms/substep':>10} {'G particle-steps/s':>19}")
    for r in results:
        for name, ms in r["ms_per_substep"].items():
            print(f"{r['res']:>5}^3 {r['particles']:>10}  {name:<36} {ms:>10.3f} "
                  f"{r['particle_steps_per_s'][name] / 1e9:>19.3f}")
        print("       stage profile (ms): " + ", ".join(f"{k} {v:.3f}" for k, v in r["stage_ms"].items()))
        for peer, why in r["peers_not_run"].items():
            print(f"       {peer} not run: {why}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
