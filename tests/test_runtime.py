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
