"""bridge.distributed: sharding and gradient averaging over torchrun ranks (gloo on CPU)."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import multi_recording
from bridge.distributed import DistInfo, shard

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("n, world", [(5, 2), (2, 4), (8, 4), (0, 3), (7, 1)])
def test_shard_gives_every_item_to_exactly_one_rank(n, world):
    items = list(range(n))
    parts = [shard(items, DistInfo(rank=r, world_size=world)) for r in range(world)]
    assert sorted(sum(parts, [])) == items
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_give_the_single_process_gradient(ti_arch, tmp_path):
    """torchrun with 2 CPU ranks over K=5 recordings (shards of 3 and 2) reproduces the one-process
    gradient of (log E, nu logit) and the loss to 1e-12 relative: the same float64 rollouts summed in
    another order, so only rounding differs. Shown to catch: averaging instead of summing the
    gradients (a factor 2), and a shard that drops or repeats a recording. Under a CUDA suite the
    reference runs on the GPU, whose atomics add in another order: 1e-9 there."""
    rtol = 1e-12 if ti_arch == "cpu" else 1e-9
    out = tmp_path / "grads.pt"
    env = {**os.environ, "TAICHI_MPM_ARCH": "cpu", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           str(ROOT / "tests" / "multi_recording.py"), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranked = torch.load(out)
    assert ranked["world"] == 2 and ranked["counts"] == 3

    params, x0, recordings = multi_recording.build()
    loss = multi_recording.loss_over(params, x0, recordings, total=len(recordings))
    loss.backward()
    assert float(ranked["loss"]) == pytest.approx(loss.item(), rel=rtol)
    for name, p in params.named_parameters():
        expected, got = p.grad.cpu(), ranked[name].cpu()
        assert torch.allclose(got, expected, rtol=rtol, atol=1e-14 * float(expected.abs().max())), \
            f"{name}: ranks give {got.tolist()}, one process {expected.tolist()}"


def test_cpulists_parse_and_format():
    from bridge.distributed import format_cpulist, parse_cpulist

    assert parse_cpulist("0-3,8,10-11\n") == [0, 1, 2, 3, 8, 10, 11]
    assert format_cpulist([11, 0, 1, 2, 3, 8, 10]) == "0-3,8,10-11"
    assert parse_cpulist(format_cpulist([5, 7, 6, 40])) == [5, 6, 7, 40]


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this OS")
def test_pin_cores_keeps_a_rank_next_to_its_gpu():
    """With the GPU's NUMA-node CPUs known, the rank runs on those of them it may use (here: all
    allowed CPUs but the first); with none of them allowed, on its own block. Shown to catch: the
    local CPUs ignored (the block taken instead)."""
    code = ("import json, os; from bridge.distributed import pin_cores; before = sorted(os.sched_getaffinity(0)); "
            "pin_cores(0, 2, before[1:] + [100000]); near = sorted(os.sched_getaffinity(0)); "
            "os.sched_setaffinity(0, before); pin_cores(1, 2, [100000]); "
            "print(json.dumps([before, near, sorted(os.sched_getaffinity(0))]))")
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    before, near, fallback = json.loads(out.stdout.strip().splitlines()[-1])
    assert near == (before[1:] or before)
    per_rank = len(before) // 2
    assert fallback == (before[per_rank:2 * per_rank] if per_rank else before)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this OS")
def test_pin_cores_gives_each_rank_its_own_block():
    """Shown to catch: every rank pinned to block 0 (local_rank ignored)."""
    code = ("import json, os; from bridge.distributed import pin_cores; before = sorted(os.sched_getaffinity(0)); "
            "pin_cores(1, 2); print(json.dumps([before, sorted(os.sched_getaffinity(0))]))")
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    before, after = __import__("json").loads(out.stdout.strip().splitlines()[-1])
    per_rank = len(before) // 2
    assert after == (before[per_rank:2 * per_rank] if per_rank else before)
