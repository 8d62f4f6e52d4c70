"""scenes.fit_material --experiments K split over 2 gloo ranks equals the one-process fit."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from scenes import fit_material

ROOT = Path(__file__).resolve().parents[1]
# 3 recordings over 2 ranks: shards of 2 and 1 (uneven on purpose); tiny sizes, one Adam step
TINY = ["--experiments", "3", "--iters", "1", "--res", "16", "--ppc", "1", "--gaussians", "300",
        "--size", "16", "12", "--frames", "2", "--every", "1", "--no-video", "--seed", "4"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_cpu(module: str, args: list, out: Path, ranks: int = 0) -> None:
    """``python -m module`` on the CPU (under torchrun with ``ranks`` gloo processes when > 0). The
    one-process reference runs in a subprocess too, so that a CUDA suite compares CPU with CPU: the
    float32 rounding of the GPU's atomics is not what these tests are about."""
    env = {**os.environ, "TAICHI_MPM_ARCH": "cpu", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}",
                f"--master_port={_free_port()}"] if ranks else [sys.executable]
    extra = ["--backend", "gloo"] if ranks else []
    cmd = [*launcher, "-m", module, *args, "--arch", "cpu", *extra, "--out", str(out)]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_recordings_are_deterministic_distinct_and_start_with_the_default_throw():
    args = SimpleNamespace(experiments=4, seed=7, true_velocity=(0.6, -0.8, 0.3))
    throws = fit_material.recordings(args)
    assert throws == fit_material.recordings(args)
    assert throws[0] == ((0.5, 0.3, 0.5), (0.6, -0.8, 0.3))  # --experiments 1 is the old single fit
    assert len({t for t in throws}) == 4
    for center, velocity in throws:  # body (0.22 wide) above the ground at 0.1 and inside the domain
        assert 0.3 <= center[1] <= 0.4 and all(0.3 <= c <= 0.7 for c in center)
        assert np.abs(np.asarray(velocity) - (0.6, -0.8, 0.3)).max() <= 0.4
    assert fit_material.recordings(SimpleNamespace(experiments=4, seed=8, true_velocity=(0.6, -0.8, 0.3)))[1:] \
        != throws[1:]


def test_two_gloo_ranks_give_the_one_process_gradient_and_step(tmp_path):
    """torchrun with 2 CPU ranks over 3 recordings gives rank 0 the same loss, first-step gradient of
    (log E, nu logit, v0 [3, 3]) and parameters after the step as one process over all 3.

    The ranks simulate the same recordings with the same float32 kernels; what differs is the order
    in which the per-recording gradients are added (autograd in one process; shard sum, then the
    all-reduce, over ranks): a few float32 roundings of terms no larger than the sum's largest
    term, so 1e-5 relative to each gradient's largest element. Taichi's CPU backend runs P2G
    atomics on several threads, whose order can move the last bits too.
    The parameters after one Adam step are start - lr * g / |g| per element, insensitive to a
    gradient's scale, so the gradients are compared as well as the parameters.
    Shown to catch: averaging instead of summing over ranks (gradients off by 2), normalising each
    rank's loss by its own recording count, and a shard that drops a recording.
    """
    rtol = 1e-5
    _run_cpu("scenes.fit_material", TINY, tmp_path / "ranks", ranks=2)
    _run_cpu("scenes.fit_material", TINY, tmp_path / "one")
    ranked = json.loads((tmp_path / "ranks" / "result.json").read_text())
    one = json.loads((tmp_path / "one" / "result.json").read_text())
    assert ranked["world_size"] == 2 and ranked["experiments"] == 3
    assert one["world_size"] == 1
    assert ranked["loss"]["first"] == pytest.approx(one["loss"]["first"], rel=rtol)
    for name in ("log_E", "nu_logit", "velocity"):
        got, expected = np.asarray(ranked["gradient"][name]), np.asarray(one["gradient"][name])
        scale = float(np.abs(expected).max())
        assert scale > 0, f"{name}: zero gradient, the comparison could not fail"
        assert np.abs(got - expected).max() <= rtol * scale, \
            f"{name}: ranks give {got.tolist()}, one process {expected.tolist()}"
    for name in ("E", "nu"):
        assert ranked[name]["fit"] == pytest.approx(one[name]["fit"], rel=1e-5)
    np.testing.assert_allclose(ranked["v0"]["fit"], one["v0"]["fit"], rtol=0, atol=1e-5)


def test_fit_gaussians_two_gloo_ranks_take_the_one_process_step(tmp_path):
    """scenes.fit_gaussians under torchrun (2 CPU ranks, a batch of 3 views split 2 + 1) writes the
    same fit after one Adam step as one process. One Adam step moves each element by lr * g / |g|,
    so the means, SH and opacities agree to float32 rounding (1e-5 against steps of 1e-3 or more)
    unless a gradient element's sign is decided by rounding; quaternions are left out for that
    reason (their gradient along the quaternion itself is zero up to rounding, so its sign is noise).
    Adam's step does not depend on the gradient's scale, so summing vs averaging over ranks cannot
    show here (the material test checks it). Shown to catch: each rank's loss normalised by its own
    share of the batch, and a shard that drops a view.
    """
    from render.ply import read_ply

    args = ["--views", "4", "--width", "16", "--height", "12", "--gaussians", "200", "--iters", "1",
            "--batch", "3", "--orbit-frames", "0", "--seed", "2"]
    _run_cpu("scenes.fit_gaussians", args, tmp_path / "ranks", ranks=2)
    _run_cpu("scenes.fit_gaussians", args, tmp_path / "one")
    ranked, one = read_ply(tmp_path / "ranks" / "fit.ply"), read_ply(tmp_path / "one" / "fit.ply")
    for name in ("means", "sh", "opacity_logits"):
        got, expected = getattr(ranked, name), getattr(one, name)
        assert np.abs(got - expected).max() <= 1e-5, f"{name}: differs by {np.abs(got - expected).max()}"
