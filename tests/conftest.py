"""Shared test set-up: the suite runs on the Taichi device the runtime picks.

The arch comes from taichi_mpm.runtime (``TAICHI_MPM_ARCH``=cpu|cuda|auto, else auto: CUDA when
torch sees a GPU). CI sets cpu; ``bench/gpu_session.sh tests`` runs the same files with cuda. Tests
build their tensors on the ``device`` fixture and take tolerances from the helpers below, so one
test body serves both devices.

Helpers (import them with ``from conftest import ...``; tests/ is on sys.path under pytest):
    float_eps(dtype)                 machine epsilon of a float dtype
    tolerance(dtype, ulps)           ulps * eps: a tolerance written as "how many roundings"
    assert_grads_close(ours, ref, rtol)
        each named input's gradient on its own against a reference, the message naming the input
        and its worst element.
    assert_mp4(path)                 an MP4 was written where imageio-ffmpeg is installed (a declared
                                     dependency the GPU machine lacks), none where it is not
    load_bench(name)                 bench/<name>.py as a module (bench/ is no package; its scripts
                                     import each other by name, so bench/ goes on sys.path)
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Mapping, Optional

import pytest
import torch


@pytest.fixture(scope="session")
def ti_arch() -> str:
    """"cpu" or "cuda": Taichi started once for the whole session."""
    from taichi_mpm.runtime import ensure_init

    return ensure_init()


@pytest.fixture(scope="session")
def device(ti_arch) -> torch.device:
    """The torch device whose memory the Taichi kernels use in place; build test tensors here."""
    from taichi_mpm.runtime import device as runtime_device

    return runtime_device()


BENCH = Path(__file__).resolve().parents[1] / "bench"


def load_bench(name: str):
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def float_eps(dtype: torch.dtype) -> float:
    """Machine epsilon: 1.19e-7 for float32, 2.22e-16 for float64."""
    return torch.finfo(dtype).eps


def assert_mp4(path: Path) -> None:
    """The scenes write MP4 through imageio-ffmpeg and print a note instead when it is missing."""
    if importlib.util.find_spec("imageio_ffmpeg") is not None:
        assert Path(path).stat().st_size > 0, f"{path} is empty"
    else:
        assert not Path(path).exists(), f"{path} written without imageio-ffmpeg"


def tolerance(dtype: torch.dtype, ulps: float) -> float:
    """ulps roundings of ``dtype``: the tolerance of a result computed in that dtype through a chain
    whose error the caller has argued to be at most ``ulps`` relative roundings."""
    return ulps * float_eps(dtype)


def assert_grads_close(ours: Mapping[str, Optional[torch.Tensor]], ref: Mapping[str, Optional[torch.Tensor]],
                       rtol: float, zero_ok: tuple[str, ...] = ()) -> None:
    """Compare each named gradient on its own: |ours - ref| <= rtol * (|ref| + max|ref|), elementwise.

    The bound is relative to each element and to that input's own gradient scale (so a small
    input's gradient is never hidden under a large one's norm). A reference of None means the input
    must get no gradient (None or all zeros). A reference that is all zero fails unless the name is
    in ``zero_ok``: such a comparison could not catch a wrong gradient. The failure message names
    the input, its worst element's index and both values.
    """
    missing = set(ref) - set(ours)
    assert not missing, f"no gradient returned for {sorted(missing)}"
    for name, expected in ref.items():
        got = ours[name]
        if expected is None:
            assert got is None or not bool(got.any()), f"{name}: expected no gradient, got nonzero values"
            continue
        assert got is not None, f"{name}: missing gradient (None)"
        assert got.shape == expected.shape, f"{name}: gradient shape {tuple(got.shape)} != {tuple(expected.shape)}"
        got64, exp64 = got.detach().double(), expected.detach().double().to(got.device)
        assert bool(torch.isfinite(got64).all()), f"{name}: non-finite gradient values"
        scale = exp64.abs().max().item() if exp64.numel() else 0.0
        if scale == 0.0:
            assert name in zero_ok, f"{name}: reference gradient is all zero, the comparison would prove nothing"
            assert not bool(got64.any()), f"{name}: expected an all-zero gradient"
            continue
        bound = rtol * (exp64.abs() + scale)
        excess = (got64 - exp64).abs() / bound
        worst = int(excess.flatten().argmax())
        if excess.flatten()[worst] > 1.0:
            index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), exp64.shape))
            bad = int((excess > 1.0).sum())
            raise AssertionError(
                f"gradient of {name}: {bad} of {exp64.numel()} elements off; worst at {index}: "
                f"ours {got64[index].item():.8g}, reference {exp64[index].item():.8g} "
                f"(allowed |diff| {bound[index].item():.3g}, rtol {rtol:g} of max|ref| {scale:.4g})")
