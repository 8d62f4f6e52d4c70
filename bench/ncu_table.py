"""What bounds each GPU kernel of a workload: Nsight Compute's counters, one row a kernel launch.

    python bench/ncu_table.py mpm_forward [--size 1M|8M]     # the forward benchmark's cube's substep
    python bench/ncu_table.py mpm_backward [--size 1M|8M]    # the same cube's elastic substep adjoint
    python bench/ncu_table.py --kernels REGEX -- python3 SCRIPT ARGS...
    (both take --skip N --count M: the matching launches to skip, then to profile; default 0 and 10)

Runs the workload under ``ncu`` (GPU machine; clocks left alone), keeps the launches whose kernel
name matches ``--kernels`` after skipping ``--skip`` of them, and prints per launch: duration, the
throughput of L2, L1 and DRAM and of the SMs (% of peak), L2 sectors written and reduced, local
memory sectors stored (registers spilt or arrays indexed at run time), registers a thread and
achieved occupancy. A kernel near the peak of one unit is bound by it; the sector counts say by
what. Taichi names each offloaded loop ``<kernel>_c<N>_0_kernel_<i>_<kind>``: ``i`` is the loop's
place in its ti.kernel. The 2026-11-28 run of ``mpm_forward`` found the stress+P2G and G2P loops of
the substep L2-bound on local-memory and scattered stores (taichi_mpm/substep.py says what came of it).
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.mpm_forward_variants import SIZES  # noqa: E402  (the cube sizes, named as there)

# column -> (ncu metric, scale)
METRICS = {
    "us": ("gpu__time_duration.sum", 1e-3),
    "L2 %": ("lts__throughput.avg.pct_of_peak_sustained_elapsed", 1.0),
    "L1 %": ("l1tex__throughput.avg.pct_of_peak_sustained_elapsed", 1.0),
    "DRAM %": ("dram__throughput.avg.pct_of_peak_sustained_elapsed", 1.0),
    "SM %": ("sm__throughput.avg.pct_of_peak_sustained_elapsed", 1.0),
    "L2 wr Msec": ("lts__t_sectors_srcunit_tex_op_write.sum", 1e-6),
    "L2 atom Msec": ("lts__t_sectors_srcunit_tex_op_atom.sum", 1e-6),
    "local st Msec": ("l1tex__t_sectors_pipe_lsu_mem_local_op_st.sum", 1e-6),
    "regs": ("launch__registers_per_thread", 1.0),
    "occup %": ("sm__warps_active.avg.pct_of_peak_sustained_active", 1.0),
}

# Workloads: (kernel regex, script). The scripts run the forward benchmark's cube (bench/mpm_forward.py:
# lattice order, 8 particles a cell); the rows are the first launches of substep_forward /
# substep_adjoint: each loop of the kernel is a launch (Taichi adds a serial one before a loop whose
# range it computes), so the first call's loops come first and the names say which loop a row is.
MPM_FORWARD = """
import sys
sys.path[:0] = [{root!r}, {root!r} + "/bench"]
import mpm_forward as mf
positions, spacing = mf.cube({res}, {side})
solver = mf.cube_solver({res}, positions, spacing)
dt = solver.stable_dt(2.0)
solver.step(dt * 2, dt=dt)
mf.sync()
"""
MPM_BACKWARD = """
import sys
sys.path[:0] = [{root!r}, {root!r} + "/bench"]
import torch
import mpm_forward as mf
from bridge.rollout import RolloutScene, simulate
positions, spacing = mf.cube({res}, {side})
solver = mf.cube_solver({res}, positions, spacing)
scene = RolloutScene.from_solver(solver, dt=solver.stable_dt(2.0))
x0 = solver.positions(as_torch=True).clone().requires_grad_()
n = scene.n_particles
params = {{"E": torch.full((n,), mf.MATERIAL.E, device=x0.device), "nu": torch.full((n,), mf.MATERIAL.nu, device=x0.device)}}
simulate(scene, x0, torch.zeros_like(x0), params, 2, [2]).x.sum().backward()
mf.sync()
"""
WORKLOADS = {"mpm_forward": ("substep_forward", MPM_FORWARD), "mpm_backward": ("substep_adjoint", MPM_BACKWARD)}


def parse_raw(text: str) -> list:
    """``ncu --page raw --print-units base`` text -> [(kernel name, {metric: float})] in launch order."""
    launches = []
    # a C++ kernel's name has spaces ("void gsplat::f<3u, float>(unsigned int, ...)"): keep its short form
    header = re.compile(r"^\s+(?:void )?([^\s(<]+)\S*.* \(\d+, \d+, \d+\)x\(\d+, \d+, \d+\), Context")
    for line in text.splitlines():
        match = header.match(line)
        if match:
            launches.append((match.group(1), {}))
            continue
        fields = line.split()
        if launches and len(fields) >= 2:
            try:
                launches[-1][1][fields[0]] = float(fields[-1].replace(",", ""))
            except ValueError:
                pass  # a metric without a value (n/a), or a table rule
    return launches


def table(launches: list) -> str:
    names = [name for name, _ in launches]
    width = max([len("kernel")] + [len(n) for n in names])
    rows = [f"{'kernel':<{width}} " + " ".join(f"{c:>13}" for c in METRICS)]
    for name, values in launches:
        cells = []
        for metric, scale in METRICS.values():
            value = values.get(metric)
            cells.append(f"{value * scale:>13.2f}" if value is not None else f"{'-':>13}")
        rows.append(f"{name:<{width}} " + " ".join(cells))
    return "\n".join(rows)


def profile(command: list, kernels: str, skip: int, count: int) -> list:
    metrics = ",".join(metric for metric, _ in METRICS.values())
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report"
        subprocess.run(["ncu", "--clock-control", "none", "-k", f"regex:{kernels}", "--launch-skip", str(skip),
                        "--launch-count", str(count), "--metrics", metrics, "-o", str(report), *command],
                       check=True)
        raw = subprocess.run(["ncu", "--import", f"{report}.ncu-rep", "--page", "raw", "--print-units", "base"],
                             check=True, capture_output=True, text=True).stdout
    return parse_raw(raw)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     usage="%(prog)s [WORKLOAD] [options] [-- python3 SCRIPT ARGS...]")
    parser.add_argument("workload", nargs="?", choices=sorted(WORKLOADS))
    parser.add_argument("--size", choices=sorted(SIZES), default="1M")
    parser.add_argument("--kernels", help="regex of the kernel names to profile (with a command after --)")
    parser.add_argument("--skip", type=int, default=0, help="matching launches to skip first")
    parser.add_argument("--count", type=int, default=10, help="matching launches to profile")
    parser.add_argument("--out", type=Path, default=None, help="also write the table to this file")
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)  # what follows "--" is the command to profile
    args, command = parser.parse_args(argv[:split]), argv[split + 1:]
    if (args.workload is None) == (not command):
        parser.error("name a workload, or give --kernels and a command after --")
    if args.workload:
        kernels, script = WORKLOADS[args.workload]
        res, side = SIZES[args.size]
        command = [sys.executable, "-c", script.format(root=str(ROOT), res=res, side=side)]
    elif not args.kernels:
        parser.error("--kernels REGEX is needed with a command")
    else:
        kernels = args.kernels
    try:
        launches = profile(command, kernels, args.skip, args.count)
    except FileNotFoundError:
        parser.error("ncu (Nsight Compute) is not on PATH: run this on a GPU machine that has it")
    except subprocess.CalledProcessError as e:
        sys.exit(f"ncu_table: {' '.join(e.cmd[:2])} ... exited with status {e.returncode} (its output is above)")
    text = table(launches) if launches else f"no launch of a kernel matching {kernels!r} was profiled"
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
