"""Checkpointed differentiable MPM rollout (bridge.simulate): forward, backward, peak GPU memory.

A fixed-corotated elastic cube (8 particles per cell, 128^3 grid, float32) falls for T substeps;
the loss is a random weighting of the final positions, and backward gives gradients w.r.t. x0,
v0, E and nu (per particle). For each particle count it times, after a small warm-up rollout that
compiles every kernel:
  - the forward solver (MPMSolver.step) on the same scene, a substep's time,
  - forward without grad (no checkpoints kept),
  - forward with grad (checkpoints kept: on the device, or in pinned host memory when large),
  - backward (segment recompute + kernel.grad of every substep in reverse),
and reads torch's peak allocated memory (all rollout buffers are torch tensors) and the device's
used memory (cudaMemGetInfo: CUDA context and Taichi's own pool included). Each size runs once
untimed (its first run compiles the large-scene kernels and allocates the pinned checkpoint memory:
12-17 s at 1M on an H200, where the warm-up's tiny scene used the small-scene kernels), then
``--repeats`` times; the table shows the repeat of median backward / forward ratio (at 100k the
rollout is host-bound and single runs moved 1.2-4.3x on one H200 within an hour). Prints a table
and writes JSON with the device name and date.

    python bench/mpm_backward.py [--particles 100000 1000000] [--substeps 1000] [--quick]
                                 [--material elastic von_mises]

``--material`` lists the materials to run (each its own rows): ``von_mises`` times the plastic
path (trial_svd + particle_stress_svd and the hand-written SVD adjoint) beside the elastic one.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bridge.rollout import REALS_PER_PARTICLE, RolloutScene, plan_for, simulate  # noqa: E402
from taichi_mpm.runtime import ensure_init  # noqa: E402
from taichi_mpm import Elastic, MPMSolver, VonMises  # noqa: E402

MATERIALS = {"elastic": Elastic(E=1e5, nu=0.3, density=1000.0),
             "von_mises": VonMises(E=1e5, nu=0.3, density=1000.0, yield_stress=2e3)}
MATERIAL = MATERIALS["elastic"]


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def build(n_particles: int, res: int, dtype: str, material=MATERIAL):
    solver = MPMSolver(res=res, dtype=dtype)
    side = (n_particles / 8) ** (1 / 3) / res  # 8 particles per cell
    solver.add_cube((0.5 - side / 2, 0.3, 0.5 - side / 2), (side, side, side), material, particles_per_cell=8)
    dt = min(1e-4, solver.stable_dt(1.0))
    return solver, RolloutScene.from_solver(solver, dt=dt)


def solver_ms_per_substep(solver, dt: float, substeps: int) -> float:
    """The forward solver's time a substep on the rollout's own scene (MPMSolver.step at the
    rollout's dt, its state checks included), after 8 untimed substeps: what the rollout's forward
    without grad is compared with."""
    solver.step(8 * dt, dt=dt)
    sync()
    t = time.perf_counter()
    taken = solver.step(substeps * dt, dt=dt)
    sync()
    return 1e3 * (time.perf_counter() - t) / taken


def measure(x0, scene, substeps: int, budget: int):
    n = scene.n_particles
    gen = torch.Generator(device=x0.device).manual_seed(0)
    weights = torch.randn((n, 3), generator=gen, device=x0.device, dtype=x0.dtype)
    E = torch.full((n,), MATERIAL.E, dtype=x0.dtype, device=x0.device)
    nu = torch.full((n,), MATERIAL.nu, dtype=x0.dtype, device=x0.device)
    v0 = torch.zeros_like(x0)
    out = {}

    sync()
    t = time.perf_counter()
    with torch.no_grad():
        simulate(scene, x0, v0, {"E": E, "nu": nu}, substeps, [substeps], device_budget_bytes=budget)
    sync()
    out["forward_nograd_s"] = time.perf_counter() - t

    leaves = [t.clone().requires_grad_() for t in (x0, v0, E, nu)]
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
    sync()
    t = time.perf_counter()
    traj = simulate(scene, leaves[0], leaves[1], {"E": leaves[2], "nu": leaves[3]}, substeps, [substeps],
                    device_budget_bytes=budget)
    loss = (traj.x[-1] * weights).sum()
    sync()
    out["forward_s"] = time.perf_counter() - t
    t = time.perf_counter()
    loss.backward()
    sync()
    out["backward_s"] = time.perf_counter() - t
    if torch.cuda.is_available():
        out["peak_torch_allocated_GB"] = torch.cuda.max_memory_allocated() / 1e9
        out["peak_rollout_GB"] = (torch.cuda.max_memory_allocated() - base) / 1e9
        free, total = torch.cuda.mem_get_info()
        out["device_used_after_GB"] = (total - free) / 1e9
    out["grads_finite"] = bool(all(torch.isfinite(leaf.grad).all() for leaf in leaves))
    out["backward_over_forward"] = out["backward_s"] / out["forward_s"]
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--particles", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--substeps", type=int, default=1000)
    parser.add_argument("--res", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs a size, after an untimed one")
    parser.add_argument("--budget-gb", type=float, default=1.0, help="device bytes for checkpoints + segment")
    parser.add_argument("--quick", action="store_true", help="tiny CPU-sized run")
    parser.add_argument("--material", nargs="+", choices=sorted(MATERIALS), default=["elastic"])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.quick:
        args.particles, args.substeps, args.res, args.repeats = [2000], 40, 32, 1
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    arch = ensure_init()
    device_name = torch.cuda.get_device_name() if arch == "cuda" else platform.processor() or "cpu"
    budget = int(args.budget_gb * (1 << 30))

    # warm-up: compile every kernel (forward and adjoints) of each material on a tiny scene
    t = time.perf_counter()
    for name in args.material:
        solver, scene = build(1000, args.res, "float32", MATERIALS[name])
        x0 = solver.positions(as_torch=True).clone().requires_grad_()
        simulate(scene, x0, torch.zeros_like(x0), {"E": MATERIAL.E, "nu": MATERIAL.nu}, 4, [4]).x.sum().backward()
    sync()
    compile_s = time.perf_counter() - t
    print(f"device: {device_name} ({arch}); warm-up/compile {compile_s:.1f} s", flush=True)

    rows = []
    for material, n_target in [(m, n) for m in args.material for n in args.particles]:
        solver, scene = build(n_target, args.res, "float32", MATERIALS[material])
        x0 = solver.positions(as_torch=True).clone()
        solver_ms = solver_ms_per_substep(solver, scene.dt, min(args.substeps, 200))
        del solver  # the scene holds what the rollout needs: the peak memory is the rollout's workload alone
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        n = scene.n_particles
        state_bytes = n * REALS_PER_PARTICLE * 4
        plan = plan_for(scene, args.substeps, device_budget_bytes=budget)
        first = measure(x0, scene, args.substeps, budget)
        runs = [measure(x0, scene, args.substeps, budget) for _ in range(args.repeats)]
        median = sorted(runs, key=lambda r: r["backward_over_forward"])[(len(runs) - 1) // 2]
        row = {"material": material, "particles": n, "substeps": args.substeps, "grid": list(scene.grid_shape), "dt": scene.dt,
               "checkpoint_every": plan.every, "checkpoint_storage": plan.storage, "store_grids": plan.store_grids,
               "store_everything_GB": args.substeps * state_bytes / 1e9, **median,
               "solver_ms_per_substep": solver_ms, "rollout_forward_ms_per_substep": 1e3 * median["forward_nograd_s"] / args.substeps,
               "repeats": runs, "untimed_first": first}
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in ("repeats", "untimed_first")}), flush=True)

    header = f"{'material':>10} {'particles':>10} {'substeps':>8} {'K':>3} {'ckpt':>6} {'fwd(nograd) s':>13} {'fwd s':>7} " \
             f"{'bwd s':>7} {'bwd/fwd':>7} {'peak GB':>8} {'store-all GB':>12} {'ms/substep rollout / solver':>27}"
    print(header)
    for r in rows:
        print(f"{r['material']:>10} {r['particles']:>10} {r['substeps']:>8} {r['checkpoint_every']:>3} {r['checkpoint_storage']:>6} "
              f"{r['forward_nograd_s']:>13.3f} {r['forward_s']:>7.3f} {r['backward_s']:>7.3f} "
              f"{r['backward_over_forward']:>7.2f} {r.get('peak_torch_allocated_GB', float('nan')):>8.3f} "
              f"{r['store_everything_GB']:>12.1f} {r['rollout_forward_ms_per_substep']:>14.3f} / {r['solver_ms_per_substep']:<10.3f}")
    result = {"benchmark": "mpm_backward", "device": device_name, "arch": arch,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "torch": torch.__version__, "compile_warmup_s": compile_s, "budget_GB": args.budget_gb,
              "command": " ".join(sys.argv), "rows": rows}
    out = args.out or Path(__file__).resolve().parent / "results" / f"mpm_backward_{arch}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
