"""Time to the first gradient: a new user's first ``bridge.simulate(...).backward()`` (or first render's
backward: ``--workload raster|splat2d``), cold Taichi cache.

    python bench/first_gradient.py [--before DIR] [--workload rollout|raster|splat2d]
                                   [--material elastic|von_mises|sand|snow] [--substeps T]
                                   [--out bench/results/first_gradient_cpu.json]

Each measurement runs in a fresh interpreter with its own empty Taichi offline cache (a temporary
folder passed as ``offline_cache_file_path`` to the runtime's init), so every kernel -- forward and reverse --
is compiled from scratch, as on a new user's machine. Then the same script runs again on that now
warm cache. Columns: seconds to import + build the scene, the first forward (its kernels compile),
the first backward (the reverse-mode kernels compile) -- wall clock and this process's CPU time (the
CPU time is the fairer figure on a shared machine) -- and how many Taichi warnings "Loading
variable ... before anything is stored" the run printed.

Peer in the same run: ``--before DIR`` measures a checkout of the code before this change (e.g.
``git worktree add /tmp/before <rev>``) on the same machine, same scene, same cold cache rule.
``--quick`` is accepted for symmetry with the other benchmarks (the scene is already tiny).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, sys, time
cpu = lambda: (lambda r: r.ru_utime + r.ru_stime)(resource.getrusage(resource.RUSAGE_SELF))
t0, c0 = time.perf_counter(), cpu()
import torch
from taichi_mpm.runtime import init
# the cache folder as an init argument: TI_OFFLINE_CACHE_FILE_PATH alone left the folder empty
init(offline_cache_file_path=sys.argv[2])
# where the compile time goes, per kernel: Taichi's front end (Python AST -> IR, ensure_compiled), its
# back end (IR passes, LLVM, offline cache: Program.compile_kernel) and launches over 50 ms (on CUDA
# a kernel's first launch generates its PTX and the driver compiles that to machine code)
from taichi.lang import impl, kernel_impl
stages, current = {}, []
def timed(stage, fn):
    def wrapper(*a, **k):
        if not current:
            return fn(*a, **k)
        start = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            seconds = time.perf_counter() - start
            if seconds > 0.05 or stage != "launch_s":  # a launch that loaded a module, not a plain one
                row = stages.setdefault(current[-1], {"front_s": 0.0, "compile_s": 0.0, "launch_s": 0.0})
                row[stage] += seconds
    return wrapper
class TimedProgram:
    def __init__(self, prog):
        self.prog = prog
        self.compile_kernel = timed("compile_s", prog.compile_kernel)
        self.launch_kernel = timed("launch_s", prog.launch_kernel)
    def __getattr__(self, name):
        return getattr(self.prog, name)
impl.get_runtime().prog = TimedProgram(impl.get_runtime().prog)
call, ensure = kernel_impl.Kernel.__call__, kernel_impl.Kernel.ensure_compiled
def kernel_call(self, *a, **k):
    name = self.func.__name__ + ("" if self.autodiff_mode == kernel_impl.AutodiffMode.NONE else ".grad")
    current.append(name)
    try:
        return call(self, *a, **k)
    finally:
        current.pop()
kernel_impl.Kernel.__call__ = kernel_call
kernel_impl.Kernel.ensure_compiled = timed("front_s", ensure)
{workload}
t1, c1 = time.perf_counter(), cpu()
loss = forward()
float(loss)
t2, c2 = time.perf_counter(), cpu()
loss.backward()
if torch.cuda.is_available():
    torch.cuda.synchronize()
t3, c3 = time.perf_counter(), cpu()
print("RESULT " + json.dumps({"setup_s": t1 - t0, "forward_s": t2 - t1, "backward_s": t3 - t2,
                              "setup_cpu_s": c1 - c0, "forward_cpu_s": c2 - c1, "backward_cpu_s": c3 - c2,
                              "kernels": dict(sorted(stages.items(), key=lambda kv: -sum(kv[1].values())))}))
"""

# Each workload builds its inputs (the set-up) and defines forward() -> a scalar loss; the child
# times the set-up, forward() and the loss's backward. argv: workload option, cache folder, size.
WORKLOADS = {
    # an MPM rollout of argv[3] substeps of the material argv[1] (float64, ~300 particles)
    "rollout": """
from bridge.rollout import RolloutScene, simulate
from taichi_mpm import Elastic, MPMSolver, Sand, Snow, VonMises
from taichi_mpm.runtime import device
material = {"elastic": Elastic(E=2e4, nu=0.3), "von_mises": VonMises(E=2e4, nu=0.3, yield_stress=300.0),
            "sand": Sand(E=2e4, nu=0.3), "snow": Snow(E=2e4, nu=0.3)}[sys.argv[1]]
solver = MPMSolver(res=16, dtype="float64")
solver.add_cube((0.4, 0.3, 0.4), (0.15, 0.15, 0.15), material, particles_per_cell=1)
scene = RolloutScene.from_solver(solver, dt=2e-4)
x0 = solver.positions(as_torch=True).clone().to(device())
v0 = torch.zeros_like(x0)
E = torch.tensor(2e4, dtype=torch.float64, device=x0.device, requires_grad=True)
nu = torch.tensor(0.3, dtype=torch.float64, device=x0.device)
T = int(sys.argv[3])
def forward():
    traj = simulate(scene, x0, v0, {"E": E, "nu": nu}, n_substeps=T, frames=[T])
    return traj.x[-1].square().sum() + traj.F[-1].square().sum()
""",
    # the README's rasterizer call: 10k Gaussians, SH degree 3, one 256x256 camera
    "raster": """
import bridge
from render import Camera, stack_cameras
from taichi_mpm.runtime import device
g = torch.Generator().manual_seed(0)
N = 10_000
leaves = [t.to(device()).requires_grad_() for t in (torch.randn(N, 3, generator=g) * 0.5,
          torch.randn(N, 4, generator=g), torch.rand(N, 3, generator=g) * 0.03, torch.rand(N, generator=g),
          torch.rand(N, 16, 3, generator=g))]
viewmats, Ks = stack_cameras([Camera.look_at(eye=(0, -3, 1), width=256, height=256)], device())
def forward():
    images, _, _ = bridge.rasterize(*leaves, viewmats, Ks, 256, 256, sh_degree=3)
    return images.square().mean()
""",
    # the README's image fit: 500 2D Gaussians on a 64x64 image, order-free sum
    "splat2d": """
from bridge import GaussianImage
from taichi_mpm.runtime import device
photo = torch.rand(64, 64, 3, generator=torch.Generator().manual_seed(0)).to(device())
model = GaussianImage.from_image(photo, 500)
def forward():
    return (model() - photo).square().mean()
""",
}


def measure(code_dir: Path, material: str, cache: str, substeps: int = 8, workload: str = "rollout") -> dict:
    path = os.pathsep.join([str(code_dir)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                                              if p and Path(p).resolve() != ROOT])
    env = dict(os.environ, PYTHONPATH=path)
    env.setdefault("TAICHI_MPM_ARCH", "cpu")
    start = time.perf_counter()
    child = CHILD.replace("{workload}", WORKLOADS[workload])
    proc = subprocess.run([sys.executable, "-c", child, material, cache, str(substeps)], cwd=code_dir, env=env,
                          capture_output=True, text=True)
    wall = time.perf_counter() - start
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"run in {code_dir} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    result = json.loads(lines[-1][len("RESULT "):])
    result["total_s"] = wall
    result["cache_files"] = len(os.listdir(cache))
    result["loading_variable_warnings"] = (proc.stdout + proc.stderr).count("before anything is stored")
    result["notices"] = [l for l in proc.stderr.splitlines() if "compil" in l.lower() and "taichi_mpm" in l]
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, default=None, help="checkout of the code to compare against")
    parser.add_argument("--workload", default="rollout", choices=tuple(WORKLOADS),
                        help="rollout (MPM, --material), raster (bridge.rasterize) or splat2d (GaussianImage)")
    parser.add_argument("--material", default="elastic", choices=("elastic", "von_mises", "sand", "snow"))
    parser.add_argument("--substeps", type=int, default=8, help="rollout length")
    parser.add_argument("--quick", action="store_true", help="accepted; the scene is always tiny")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/first_gradient_cpu.json")
    args = parser.parse_args(argv)

    print("code       cache | wall s: setup  forward backward total | cpu s: setup forward backward | 'Loading variable' warnings")
    runs = []
    codes = ([("before", args.before)] if args.before else []) + [("this tree", ROOT)]
    for label, code in codes:
        with tempfile.TemporaryDirectory(prefix="ti_cache_") as cache:
            for state in ("cold", "warm"):
                r = measure(Path(code).resolve(), args.material, cache, args.substeps, args.workload)
                r.update(code=label, cache=state)
                runs.append(r)
                print(f"{label:10s} {state:4s} | {r['setup_s']:6.1f} {r['forward_s']:6.1f} {r['backward_s']:6.1f} "
                      f"{r['total_s']:6.1f} | {r['setup_cpu_s']:6.1f} {r['forward_cpu_s']:6.1f} {r['backward_cpu_s']:6.1f} "
                      f"| {r['loading_variable_warnings']:4d}", flush=True)
                for name, t in list(r["kernels"].items())[:6]:  # the slowest compiles
                    print(f"    {name:28s} front {t['front_s']:5.2f}  compile {t['compile_s']:5.2f}  "
                          f"slow launches {t['launch_s']:5.2f} s", flush=True)
    import taichi_mpm.runtime as rt  # noqa: F401  (device name below)
    arch = os.environ.get("TAICHI_MPM_ARCH", "cpu")
    device = platform.processor() or platform.machine()
    if arch == "cuda":
        import torch
        device = torch.cuda.get_device_name(0)
    scene = {"rollout": f"16^3 grid, 1 particle a cell cube (~300 particles), {args.substeps} substeps, float64",
             "raster": "bridge.rasterize, 10k Gaussians, SH degree 3, one 256x256 camera",
             "splat2d": "GaussianImage, 500 2D Gaussians, 64x64, sum mode"}[args.workload]
    result = {"benchmark": "first_gradient", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "device": device, "arch": arch, "cpu_count": os.cpu_count(), "workload": args.workload,
              "material": args.material if args.workload == "rollout" else args.workload, "scene": scene,
              "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
