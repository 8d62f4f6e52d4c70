"""Data-parallel scaling: time per optimisation step of the K = 8 recording material fit on 1, 2, 4 GPUs.

    python bench/multigpu.py [--gpus 1 2 4] [--out bench/results/multigpu.json]   (a 4-GPU host, NCCL)
    python bench/multigpu.py --quick --backend gloo                               (CPU check: 1 and 2 processes)

For each process count N it launches ``torchrun --nproc_per_node=N -m scenes.fit_material
--experiments 8 ...`` on the same workload (same recordings, sizes and steps), reads the per-step wall
times rank 0 writes to its result.json (``step_ms``: the whole step, i.e. forward + backward of the
rank's share, the gradient all-reduce and the Adam step; rank 0 waits for the slowest rank in the
all-reduce) and reports the median over the steps after the first ``--warmup`` (Taichi compiles
kernels on the first ones). ``speedup`` is the 1-process step time over the N-process one, measured
in the same run; the 1-process run is torchrun with WORLD_SIZE=1, which the scene runs as a plain
process (no process group, no all-reduce): the one-GPU fit as users run it. The sequence of process
counts runs ``--repeats`` times, interleaved (every other repeat in reverse order), and each row is
the median run (a run's median moved by ~20% between runs of the same code on one 4x H200 host,
2026-11-27), with every repeat's own speedup beside it. The runs must agree on the first step's loss
(the same K recordings), else the script stops. Prints a table and writes JSON rows with ``gpus``, ``step_ms``, ``speedup``, the device name
and the date.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# the GPU workload: the GPU size of scenes.fit_material's docstring, 8 recordings
# 8 frames (not the scene's 24): one step took 21.6 s on one H200 at 6 frames (2026-11-27), and the 1, 2
# and 4-GPU runs must fit one 10-minute call
FULL = ["--res", "48", "--ppc", "8", "--gaussians", "60000", "--size", "256", "192", "--frames", "8", "--every", "2"]
QUICK = ["--res", "16", "--ppc", "1", "--gaussians", "300", "--size", "16", "12", "--frames", "2", "--every", "1"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


def device_name(arch: str) -> str:
    if arch == "cpu":
        return f"CPU: {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"
    import torch

    return torch.cuda.get_device_name(0)


def _topology(arch: str) -> Optional[str]:
    """nvidia-smi's GPU/CPU topology matrix (which cores and NUMA node each GPU is next to)."""
    if arch == "cpu":
        return None
    try:
        return subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None


def time_steps(n: int, args, scene_args: list, out: Path) -> dict:
    """Run the fit on n processes; return rank 0's result.json."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--master_port={_free_port()}",
           f"--nproc_per_node={n}", "-m", "scenes.fit_material", *scene_args, "--experiments", str(args.experiments),
           "--iters", str(args.iters), "--no-video", "--arch", args.arch, "--out", str(out)]
    if args.backend:
        cmd += ["--backend", args.backend]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    if args.arch == "cpu":  # split the host's cores between the ranks instead of oversubscribing them
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // n))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{n} process(es) failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads((out / "result.json").read_text())


def summarize(result: dict, warmup: int) -> dict:
    """One run's figures from rank 0's result.json, the first ``warmup`` steps left out."""
    steps = result["step_ms"][warmup:]
    # each rank's own share (before the all-reduce): grows with n under host contention, differs
    # between ranks under load imbalance
    per_step = np.array([ms[warmup:] for ms in result["rank_compute_ms"]])  # (ranks, steps)
    # where a step's time goes on rank 0: the slowest rank's share of that step, rank 0's wait for
    # it plus the all-reduces, and the rest (Adam, bookkeeping)
    return {"step_ms": float(np.median(steps)), "step_ms_all": result["step_ms"],
            "rank_compute_ms": [float(np.median(ms)) for ms in per_step],
            "slowest_rank_ms": float(np.median(per_step.max(0))),
            "rank0_sync_ms": float(np.median(result["sync_ms"][warmup:])),
            "rank_cpus": result.get("rank_cpus"), "loss_first": result["loss"]["first"]}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, nargs="+", default=None,
                        help="process counts (default 1, 2, 4, 8 up to the GPUs present; --quick 1 2)")
    parser.add_argument("--experiments", type=int, default=8, help="recordings K of the fit")
    parser.add_argument("--iters", type=int, default=None, help="steps per run (default 6; --quick 3)")
    parser.add_argument("--warmup", type=int, default=None, help="first steps left out (default 2; --quick 1)")
    parser.add_argument("--backend", choices=("nccl", "gloo"), default=None,
                        help="torch.distributed backend (default: nccl on GPUs); gloo alone runs on the CPU")
    parser.add_argument("--arch", choices=("cpu", "cuda"), default=None,
                        help="Taichi arch of the ranks (default: cpu with --backend gloo, else cuda)")
    parser.add_argument("--frames", type=int, default=None,
                        help="frames per recording (default: the workload's, 8 on a GPU)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="runs of the whole 1, 2, 4... sequence, interleaved (default 3; --quick 1): a run's "
                             "median varies by ~20%% between runs on a GPU host, so each row is the median over runs")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 1 and 2 processes (checks the script)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (default bench/results/multigpu.json, multigpu_cpu_quick.json with --quick)")
    args = parser.parse_args(argv)
    args.arch = args.arch or ("cpu" if args.backend == "gloo" else "cuda")
    gpus = args.gpus or ([1, 2] if args.quick else [n for n in (1, 2, 4, 8) if n <= _gpu_count()])
    # 6 steps, the first 2 left out: one step's time varies by +-15% on a GPU host (host-bound ranks)
    args.iters = args.iters or (3 if args.quick else 6)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    if not 0 <= warmup < args.iters:
        parser.error("--warmup must be >= 0 and below --iters")
    args.repeats = args.repeats or (1 if args.quick else 3)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if 1 not in gpus:
        parser.error("--gpus must include 1: speedups are over one process measured in the same run")
    scene_args = list(QUICK if args.quick else FULL)
    if args.frames is not None:
        scene_args[scene_args.index("--frames") + 1] = str(args.frames)
    runs = {n: [] for n in sorted(set(gpus))}  # process count -> one summary per repeat
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):  # interleaved: a slow spell of the host hits every count alike
            # and the order reversed every other repeat: in one fixed order a host that speeds up (or
            # slows down) through a run favours the counts run last (4x H200, 2026-11-28: one process
            # took 2860, 2200 and 1867 ms a step in three runs of the order 1, 2, 4)
            for n in (list(runs) if repeat % 2 == 0 else list(runs)[::-1]):
                result = time_steps(n, args, scene_args, Path(tmp) / f"r{repeat}n{n}")
                runs[n].append(summarize(result, warmup))
                r = runs[n][-1]
                print(f"run {repeat + 1}/{args.repeats}, {n} process(es): {r['step_ms']:.1f} ms/step (median of "
                      f"{len(result['step_ms']) - warmup}); ranks' own share {min(r['rank_compute_ms']):.1f} .. "
                      f"{max(r['rank_compute_ms']):.1f} ms, the slowest of each step {r['slowest_rank_ms']:.1f} ms; "
                      f"rank 0 waits + all-reduces {r['rank0_sync_ms']:.1f} ms", flush=True)
    rows = []
    for n, summaries in runs.items():
        middle = sorted(summaries, key=lambda r: r["step_ms"])[len(summaries) // 2]  # the median run
        rows.append(dict(middle, gpus=n, runs_step_ms=[r["step_ms"] for r in summaries]))
    losses = [r["loss_first"] for r in rows]  # the same workload: the same first loss up to float32 sums
    if max(losses) - min(losses) > 1e-5 * abs(losses[0]):
        sys.exit(f"the runs disagree on the first loss ({losses}): not the same workload")
    base = rows[0]
    for r in rows:
        r["speedup"] = base["step_ms"] / r["step_ms"]
        # each repeat's own ratio (one process and n processes of the same repeat): the spread
        r["runs_speedup"] = [b / m for b, m in zip(base["runs_step_ms"], r["runs_step_ms"])]
    print(f"\n{'gpus':>5} {'step ms':>10} {'speedup':>8}   per run")
    for r in rows:
        print(f"{r['gpus']:>5} {r['step_ms']:>10.1f} {r['speedup']:>7.2f}x   "
              + " ".join(f"{x:.2f}x" for x in r["runs_speedup"]))
    report = {"benchmark": "multigpu", "device": device_name(args.arch), "arch": args.arch,
              "backend": args.backend or ("gloo" if args.arch == "cpu" else "nccl"),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "experiments": args.experiments, "iters": args.iters, "warmup": warmup, "repeats": args.repeats,
              "quick": args.quick,
              "scene_args": scene_args, "topology": _topology(args.arch), "rows": rows,
              "note": "step_ms: median wall time of one optimisation step on rank 0 (forward + backward of "
                      "its share of the recordings, gradient all-reduce, Adam), the median run of the repeats; "
                      "speedup over 1 process, same repeats"}
    out = args.out or ROOT / "bench" / "results" / ("multigpu_cpu_quick.json" if args.quick else "multigpu.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
