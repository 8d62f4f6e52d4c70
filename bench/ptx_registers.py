"""Registers, spills and shared memory of the CUDA kernels our calls compile, read from their PTX.

    python bench/ptx_registers.py dump DIR [--code TREE] [--workload raster splat2d rollout]
        on the GPU machine: runs each workload once with Taichi's print_kernel_asm on, which writes
        the PTX of every module Taichi JIT-loads into DIR (one taichi_kernel_nvptx_NNNN.ptx each)
    python bench/ptx_registers.py count DIR [--arch sm_XX] [--ptxas PATH] [--out FILE]
        anywhere (no GPU): ptxas -v on each PTX file, for the GPU the dump ran on unless --arch says;
        a table of kernel, registers a thread, 256-thread blocks an SM holds by its registers, spill
        bytes and shared memory (JSON with --out)

Registers set how many blocks an SM holds (65536 registers, a thread's count rounded up to 8), and
Taichi 1.7 has no register cap or launch bounds to ask for more (its gpu_max_reg setting left the
count as it was, measured 2026-11-28), so a kernel edit meant to free registers is checked here in
seconds: dump on the GPU machine, bring DIR back, count. ptxas comes with the CUDA toolkit or with
``pip install nvidia-cuda-nvcc-cu12`` (found there when not on PATH and not given).
Workloads: bench/profile_gpu.py's raster (10k 3D Gaussians, one 256x256 camera, SH3), splat2d (10k 2D
Gaussians at 512x512) and rollout (the MPM forward+backward, 100k particles).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+a?)'")
USAGE = re.compile(r"Used (\d+) registers(?:, used \d+ barriers)?(?:, (\d+) bytes smem)?")
SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
TARGET = re.compile(rb"^\.target\s+(sm_\d+a?)", re.MULTILINE)
ARCH_FILE = "arch.txt"  # dump writes the GPU's sm_XX here


def find_ptxas(given: str | None) -> str:
    """ptxas from --ptxas, PATH, or the nvidia-cuda-nvcc-cu12 wheel; SystemExit saying how to get it."""
    if given:
        return given
    found = shutil.which("ptxas")
    if found:
        return found
    try:
        import nvidia.cuda_nvcc  # the pip wheel's package: bin/ptxas beside it
        candidate = Path(list(nvidia.cuda_nvcc.__path__)[0]) / "bin" / "ptxas"
        if candidate.exists():
            return str(candidate)
    except ImportError:
        pass
    raise SystemExit("ptxas not found: install the CUDA toolkit or `pip install nvidia-cuda-nvcc-cu12`, "
                     "or pass --ptxas PATH")


def parse_ptxas(log: str) -> list:
    """Rows (kernel, arch, registers, spill store/load bytes, shared bytes) from ptxas -v's log."""
    rows, row = [], None
    for line in log.splitlines():
        if m := ENTRY.search(line):
            row = {"kernel": m.group(1), "arch": m.group(2), "registers": None, "spill_store_bytes": 0,
                   "spill_load_bytes": 0, "shared_bytes": 0}
            rows.append(row)
        elif row is not None and (m := SPILL.search(line)):
            row["spill_store_bytes"], row["spill_load_bytes"] = int(m.group(1)), int(m.group(2))
        elif row is not None and (m := USAGE.search(line)):
            row["registers"] = int(m.group(1))
            row["shared_bytes"] = int(m.group(2) or 0)
    return rows


def blocks_per_sm(registers: int, threads: int = 256) -> int:
    """Blocks of `threads` an SM's 65536 registers hold (registers go to a warp 256 at a time, so a
    thread's count rounds up to a multiple of 8); shared memory and the block cap not counted."""
    per_thread = -(-registers // 8) * 8
    return 65536 // (per_thread * threads)


def count(directory: Path, ptxas: str, arch: str | None = None) -> list:
    """ptxas -v on every PTX file of directory, for `arch`, else the GPU dump recorded (ARCH_FILE: the
    driver compiles the PTX for the GPU it runs on), else the PTX's own .target (Taichi 1.7 writes
    sm_86 there for an sm_90 GPU, and the counts differ by a few registers)."""
    if arch is None and (directory / ARCH_FILE).exists():
        arch = (directory / ARCH_FILE).read_text().strip()
    rows = []
    for ptx in sorted(directory.glob("*.ptx")):
        target = TARGET.search(ptx.read_bytes())
        if target is None:
            raise SystemExit(f"{ptx}: no .target line; is it a PTX file?")
        done = subprocess.run([ptxas, "-v", f"-arch={arch or target.group(1).decode()}", "-o", os.devnull,
                               str(ptx)], capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"ptxas failed on {ptx}:\n{done.stderr}")
        rows += [dict(r, file=ptx.name) for r in parse_ptxas(done.stderr + done.stdout)]
    return rows


def dump(directory: Path, code: Path, workloads: list) -> None:
    sys.path[:0] = [str(code), str(code / "bench")]
    from taichi.lang import impl
    from taichi_mpm.runtime import ensure_init
    if ensure_init() != "cuda":
        raise SystemExit("dump needs the CUDA arch (PTX comes from Taichi's CUDA backend)")
    directory.mkdir(parents=True, exist_ok=True)
    os.chdir(directory)  # Taichi writes the PTX files into the working directory
    impl.current_cfg().print_kernel_asm = True
    import profile_gpu
    import torch
    calls = {"raster": profile_gpu.raster_call, "splat2d": profile_gpu.splat2d_call,
             "rollout": lambda: list(profile_gpu.rollout_calls().values())[1]}
    for name in workloads:
        calls[name]()()
    torch.cuda.synchronize()
    major, minor = torch.cuda.get_device_capability()
    (directory / ARCH_FILE).write_text(f"sm_{major}{minor}\n")
    print(f"wrote {len(list(directory.glob('*.ptx')))} PTX files to {directory}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    d = sub.add_parser("dump")
    d.add_argument("directory", type=Path)
    d.add_argument("--code", type=Path, default=Path(__file__).resolve().parents[1], help="project tree to run")
    d.add_argument("--workload", nargs="+", choices=("raster", "splat2d", "rollout"), default=["raster", "splat2d"])
    c = sub.add_parser("count")
    c.add_argument("directory", type=Path)
    c.add_argument("--ptxas", default=None)
    c.add_argument("--arch", default=None, help="sm_XX to compile for (default: the dump's GPU, see count)")
    c.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.command == "dump":
        dump(args.directory.resolve(), args.code.resolve(), args.workload)
        return
    if not args.directory.is_dir():
        ap.error(f"{args.directory} is not a directory")
    rows = count(args.directory, find_ptxas(args.ptxas), args.arch)
    if not rows:
        ap.error(f"no kernels in {args.directory}/*.ptx")
    print(f"{'kernel':<48} {'arch':>6} {'regs':>5} {'blocks/SM':>9} {'spill st/ld (B)':>16} {'smem (B)':>9}")
    for r in rows:
        blocks = blocks_per_sm(r["registers"])
        print(f"{r['kernel']:<48} {r['arch']:>6} {r['registers']:>5} {blocks:>9} "
              f"{r['spill_store_bytes']:>7}/{r['spill_load_bytes']:<8} {r['shared_bytes']:>9}")
    if args.out:
        args.out.write_text(json.dumps({"benchmark": "ptx_registers", "directory": str(args.directory),
                                        "kernels": rows}, indent=1))


if __name__ == "__main__":
    main()
