"""Data-parallel training loops over torch.distributed: one process per GPU, launched by torchrun.

    info = distributed.setup()                    # before anything touches CUDA or Taichi
    mine = distributed.shard(recordings, info)    # this rank's share of the items
    loss = sum(loss_of(r) for r in mine) / len(recordings)   # normalised by the GLOBAL count
    loss.backward()
    distributed.sum_gradients(model.parameters(), info)       # = the one-process gradient
    distributed.print0(info, f"loss {loss.item()}")

Why an explicit all-reduce and not DistributedDataParallel: the parameters that ranks share here
are a handful of physical scalars (E, nu, v0) or a Gaussian set whose gradients come out of Taichi
kernels, not a torch module whose forward DDP could hook; one flattened all-reduce after backward
is the whole synchronisation, costs one collective per step, and keeps the single-process loop
unchanged. Losses are normalised by the global item count and gradients summed, so uneven shards
(K not a multiple of the world size) still give exactly the one-process gradient.

Taichi 1.7 has no CUDA device index and uses the first GPU it sees, so each rank is pinned to its
GPU through CUDA_VISIBLE_DEVICES (from LOCAL_RANK) before CUDA starts in the process; torch's
cuda:0 and Taichi's device are then the same card, which :func:`setup` checks.
"""
from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterable, List, Optional, Sequence, TypeVar

import torch
import torch.distributed as dist

from taichi_mpm import runtime

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: ``rank`` of ``world_size``; ``local_rank`` on this host."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def pin_gpu(local_rank: int) -> None:
    """Make the process see only GPU ``local_rank`` (of those visible), before CUDA starts.

    Raises RuntimeError when CUDA or Taichi already started: the pin would not take effect and
    every rank would share one GPU.
    """
    if torch.cuda.is_initialized() or runtime.arch() is not None:
        raise RuntimeError("distributed.setup() must run before CUDA or Taichi start in this process "
                           "(call it first in the script)")
    # GPU numbers as nvidia-smi and the sysfs topology count them (CUDA's default puts the fastest first)
    os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(local_rank)
        return
    ids = [d for d in visible.split(",") if d.strip()]
    if ids:  # an empty list hides every GPU on purpose: leave it so
        if local_rank >= len(ids):
            raise RuntimeError(f"LOCAL_RANK={local_rank} but CUDA_VISIBLE_DEVICES={visible!r} names {len(ids)} GPU(s)")
        os.environ["CUDA_VISIBLE_DEVICES"] = ids[local_rank].strip()


def parse_cpulist(text: str) -> List[int]:
    """CPU ids of a Linux cpulist ("0-15,32-47")."""
    cpus: List[int] = []
    for part in text.strip().split(","):
        if part:
            first, _, last = part.partition("-")
            cpus.extend(range(int(first), int(last or first) + 1))
    return cpus


def format_cpulist(cpus: Iterable[int]) -> str:
    """The cpulist of CPU ids (the inverse of parse_cpulist), e.g. for logs."""
    runs: List[List[int]] = []
    for c in sorted(cpus):
        if runs and c == runs[-1][1] + 1:
            runs[-1][1] = c
        else:
            runs.append([c, c])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def gpu_local_cpus(gpu: str) -> Optional[List[int]]:
    """The CPUs of the NUMA node that GPU ``gpu`` (an nvidia-smi index, UUID or PCI bus id, as in
    CUDA_VISIBLE_DEVICES) is attached to, from nvidia-smi's PCI bus id and sysfs; None where either
    is missing."""
    try:
        query = subprocess.run(["nvidia-smi", "--query-gpu=pci.bus_id", "--format=csv,noheader", "-i", gpu],
                               capture_output=True, text=True, timeout=30)
        domain, _, rest = query.stdout.strip().lower().partition(":")  # 00000000:18:00.0
        if query.returncode or not rest:
            return None
        with open(f"/sys/bus/pci/devices/{domain[-4:]}:{rest}/local_cpulist") as f:
            return parse_cpulist(f.read()) or None
    except (OSError, ValueError, subprocess.SubprocessError):
        return None


def pin_cores(local_rank: int, local_world: int, local_cpus: Optional[Sequence[int]] = None) -> None:
    """Keep this process on the cores next to its GPU: ``local_cpus`` (the GPU's NUMA node, see
    gpu_local_cpus) where given and allowed, else its own contiguous block of the allowed cores
    (block local_rank of local_world). The ranks of a fit are host-bound (Python launching kernels),
    so ranks that the OS moves between cores, or that run on a socket away from their GPU, run
    slower than one process alone. GPU ranks only: CPU ranks whose Taichi worker threads shared one
    pinned core aborted at exit ("terminate called without an active exception", 2 of 3 runs on a
    2-core machine)."""
    if not hasattr(os, "sched_setaffinity") or local_world < 2:
        return
    cores = sorted(os.sched_getaffinity(0))
    near = sorted(set(cores) & set(local_cpus or ()))
    if near:
        os.sched_setaffinity(0, near)
        return
    per_rank = len(cores) // local_world
    if per_rank >= 1:
        os.sched_setaffinity(0, cores[local_rank * per_rank:(local_rank + 1) * per_rank])


def setup(arch: Optional[str] = None, backend: Optional[str] = None, timeout_s: float = 600.0,
          pin_cpus: bool = True) -> DistInfo:
    """Join the process group described by torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT) and start Taichi on this rank's device.

    Without those variables (a plain ``python script.py``) it returns a world of one and only starts
    Taichi, so the same script runs with and without torchrun.
    arch: as ``bridge.init`` ("auto" | "cpu" | "cuda"); backend: "nccl" on GPUs, "gloo" on CPU by
    default. Checks that torch and Taichi use the same device. pin_cpus: keep each GPU rank on the
    cores of its GPU's NUMA node (:func:`pin_cores`).
    """
    world = _env_int("WORLD_SIZE", 1)
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK={rank} and WORLD_SIZE={world} are inconsistent")
    if world == 1:
        runtime.init(arch)
        return DistInfo()
    if (arch or os.environ.get(runtime.ENV_VAR) or "auto").lower() != "cpu":
        pin_gpu(local_rank)  # harmless on a machine without GPUs
        if pin_cpus and torch.cuda.is_available():  # after the GPU pin: this starts CUDA's driver
            pin_cores(local_rank, _env_int("LOCAL_WORLD_SIZE", world),
                      gpu_local_cpus(os.environ.get("CUDA_VISIBLE_DEVICES", str(local_rank))))
    chosen = runtime.init(arch)
    if chosen == "cuda":
        torch.cuda.set_device(0)
        if torch.cuda.device_count() != 1:
            raise RuntimeError(f"rank {rank} sees {torch.cuda.device_count()} GPUs after pinning; "
                               "Taichi and torch could pick different cards")
    backend = backend or ("nccl" if chosen == "cuda" else "gloo")
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))
    if dist.get_world_size() != world or dist.get_rank() != rank:
        raise RuntimeError("the existing process group does not match RANK / WORLD_SIZE")
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank)


def shard(items: Sequence[T], info: DistInfo) -> List[T]:
    """This rank's items: a contiguous block, the first ``len(items) % world`` ranks one longer.

    Every item goes to exactly one rank; a rank may get none when there are fewer items than ranks.
    """
    n, world = len(items), info.world_size
    base, extra = divmod(n, world)
    start = info.rank * base + min(info.rank, extra)
    return list(items[start:start + base + (info.rank < extra)])


def sum_gradients(parameters: Iterable[torch.Tensor], info: DistInfo) -> None:
    """All-reduce (sum) the ``.grad`` of every parameter across ranks, in one collective.

    With each rank's loss normalised by the global item count this yields the single-process
    gradient. Parameters without a gradient on this rank (no item touched them) count as zero,
    so every rank takes part in the same collective.
    """
    params = [p for p in parameters if p.requires_grad]
    if not info.active or not params:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for p in params:
        p.grad.copy_(flat[offset:offset + p.numel()].view_as(p.grad))
        offset += p.numel()


def all_sum(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The sum of a tensor over ranks (e.g. a loss for printing); itself when not distributed."""
    if not info.active:
        return value
    total = value.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def gather_object(value: T, info: DistInfo) -> List[T]:
    """Every rank's value (any picklable object), in rank order, on every rank; [value] when not
    distributed. A collective: every rank must call it."""
    if not info.active:
        return [value]
    out: List[T] = [None] * info.world_size  # type: ignore[list-item]
    dist.all_gather_object(out, value)
    return out


def print0(info: DistInfo, *args, **kwargs) -> None:
    """print on rank 0 only."""
    if info.is_main:
        print(*args, **kwargs)


def cleanup() -> None:
    """Leave the process group (at the end of a torchrun script)."""
    if dist.is_initialized():
        dist.destroy_process_group()
