"""taichi_mpm.runtime: one ti.init per process, matched to torch, overridable by environment."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import taichi as ti
import torch

import bridge
from taichi_mpm import runtime

ROOT = Path(__file__).resolve().parents[1]


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    """Run code in a fresh interpreter (a fresh Taichi runtime) from a file, as Taichi needs source."""
    script = ROOT / "tests" / f"_runtime_probe_{os.getpid()}.py"
    script.write_text(textwrap.dedent(code))
    try:
        path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        full_env = {**os.environ, "PYTHONPATH": path, **env}
        return subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                              env=full_env, timeout=120)
    finally:
        script.unlink()


def test_init_follows_environment_or_torch(ti_arch, device):
    """The session's arch is the one TAICHI_MPM_ARCH asks for, or with auto the one torch can use."""
    requested = os.environ.get(runtime.ENV_VAR, "auto").strip().lower()
    expected = requested if requested != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    assert ti_arch == expected
    assert device.type == expected
    assert bridge.arch() == expected
    assert bridge.device().type == expected


def test_init_twice_same_arch_is_noop(ti_arch):
    assert bridge.init(ti_arch) == ti_arch
    assert bridge.init("auto") == ti_arch
    assert bridge.ensure_init() == ti_arch


def test_conflicting_arch_raises_in_process(ti_arch):
    other = "cuda" if ti_arch == "cpu" else "cpu"
    with pytest.raises(runtime.RuntimeConflictError, match="already runs"):
        bridge.init(other)
    with pytest.raises(runtime.RuntimeConflictError):
        bridge.init(ti_arch, debug=True)
    assert bridge.arch() == ti_arch  # the running runtime is untouched


def test_kernel_writes_torch_tensor_in_place(device):
    @ti.kernel
    def scale_in_place(a: ti.types.ndarray(), factor: ti.f32):
        for i in a:
            a[i] *= factor

    t = torch.arange(8, dtype=torch.float32, device=device)
    scale_in_place(t, 3.0)
    assert torch.equal(t.cpu(), torch.arange(8, dtype=torch.float32) * 3)


def test_conflicting_reinit_in_fresh_process():
    proc = run_python("""
        import bridge
        bridge.init("cpu")
        try:
            bridge.init("cuda")
        except bridge.RuntimeConflictError as e:
            print("CONFLICT", e)
    """, TAICHI_MPM_ARCH="auto")
    assert proc.returncode == 0, proc.stderr
    assert "CONFLICT" in proc.stdout and "already runs with arch='cpu'" in proc.stdout


def test_environment_variable_chooses_arch():
    proc = run_python("""
        import bridge
        print("ARCH", bridge.ensure_init(), bridge.device())
    """, TAICHI_MPM_ARCH="cpu")
    assert proc.returncode == 0, proc.stderr
    assert "ARCH cpu cpu" in proc.stdout


def test_bad_environment_variable_is_a_clear_error():
    proc = run_python("""
        import bridge
        bridge.ensure_init()
    """, TAICHI_MPM_ARCH="tpu")
    assert proc.returncode != 0
    assert "TAICHI_MPM_ARCH" in proc.stderr and "tpu" in proc.stderr


def test_cuda_without_gpu_is_a_clear_error():
    # CUDA_VISIBLE_DEVICES="" hides any GPU from the fresh process, so this runs on every machine
    proc = run_python("""
        import bridge
        bridge.init("cuda")
    """, CUDA_VISIBLE_DEVICES="")
    assert proc.returncode != 0
    assert "torch sees no CUDA device" in proc.stderr


def test_a_process_that_ran_a_rollout_leaves_its_kernels_in_the_offline_cache(tmp_path):
    """The next process finds the kernels compiled: Taichi writes its offline cache when its
    program is destroyed, which did not happen at exit once a differentiable rollout had run
    (every new process compiled again: 19 s to the first gradient instead of ~5 s on 2 cores).
    Shown to catch: the runtime's exit hook removed (the cache folder stays empty)."""
    cache = tmp_path / "ticache"
    proc = run_python(f"""
        import torch
        from taichi_mpm.runtime import init
        init(offline_cache_file_path={str(cache)!r})
        from bridge.rollout import RolloutScene, simulate
        from taichi_mpm import Elastic, MPMSolver
        solver = MPMSolver(res=16, dtype="float64")
        solver.add_cube((0.4, 0.3, 0.4), (0.15, 0.15, 0.15), Elastic(E=2e4, nu=0.3), particles_per_cell=1)
        scene = RolloutScene.from_solver(solver, dt=2e-4)
        x0 = solver.positions(as_torch=True).clone()
        E = torch.tensor(2e4, dtype=torch.float64, requires_grad=True)
        # a trajectory with its autograd graph still alive at exit, as in a user's script
        traj = simulate(scene, x0, torch.zeros_like(x0), {{"E": E, "nu": torch.tensor(0.3, dtype=torch.float64)}},
                        2, [2])
    """, TAICHI_MPM_ARCH="cpu")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert cache.is_dir() and any(p.suffix == ".tic" for p in cache.iterdir())


def test_cpu_arch_runs_torch_on_one_thread_unless_told_otherwise():
    """Taichi's CPU kernels use every core; torch ops between them waited for cores with torch's own
    pool (the rollout's backward 1.3x slower on an idle 2-core machine, 6x beside a busy process).
    Shown to catch: the thread setting dropped."""
    proc = run_python("""
        import torch
        torch.set_num_threads(2)
        from taichi_mpm.runtime import init
        init(arch="cpu")
        print("threads", torch.get_num_threads())
    """)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "threads 1" in proc.stdout
    proc = run_python("""
        import torch
        torch.set_num_threads(2)
        from taichi_mpm.runtime import init
        init(arch="cpu", torch_threads=None)
        print("threads", torch.get_num_threads())
    """)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "threads 2" in proc.stdout


def test_a_kernel_error_still_points_at_its_source(device):
    """runtime replaces Taichi's source-position strings (its front end built them with an 80-column
    TextWrapper for every name of every kernel, ~1.8 s of a warm fit_material process); an error in
    a kernel must still name the file, the line and the expression, caret under it. Seen to fail
    with the caret line dropped and with the line number off by the kernel's offset."""
    from taichi.lang.ast.ast_transformer_utils import ASTTransformerContext

    assert ASTTransformerContext.get_pos_info is runtime._source_position

    @ti.kernel
    def broken(a: ti.types.ndarray(ti.f32, ndim=1)):
        for i in range(a.shape[0]):
            a[i] = no_such_name + 1.0  # noqa: F821

    with pytest.raises(Exception) as error:
        broken(torch.zeros(3, device=device))
    with open(__file__) as source:
        line = next(n for n, text in enumerate(source, 1) if "a[i] = no_such_name" in text)
    lines = str(error.value).splitlines()
    at = next(i for i, text in enumerate(lines) if text.startswith(f'File "{__file__}", line {line}, in broken'))
    assert lines[at + 1].strip() == "a[i] = no_such_name + 1.0  # noqa: F821"
    assert lines[at + 2] == " " * lines[at + 1].index("no_such_name") + "^" * len("no_such_name")
