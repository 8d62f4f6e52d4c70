"""Input checks shared by every layer: one wording, one place, run before any kernel launches.

A kernel fed a wrong shape, a tensor on the other device or a NaN either crashes the process (an
illegal memory access on CUDA) or returns garbage silently, so every public entry point checks its
inputs with these helpers first. Physical limits are defined once here and imported wherever they
are checked.
"""
from __future__ import annotations

import math
from numbers import Real
from typing import Optional, Sequence

import torch

NU_LIMITS = (-1.0, 0.5)  # Poisson's ratio: open interval; lam and the bulk modulus diverge at 0.5


def same_device(a: torch.device, b: torch.device) -> bool:
    """torch.device("cuda") and torch.device("cuda:0") name one GPU when 0 is the current one."""
    def index(d: torch.device) -> int:
        if d.index is not None:
            return d.index
        return torch.cuda.current_device() if d.type == "cuda" else 0

    return a.type == b.type and index(a) == index(b)


def check_tensor(name: str, t, shape: Optional[Sequence[Optional[int]]] = None,
                 dtype: Optional[torch.dtype | Sequence[torch.dtype]] = None,
                 device: Optional[torch.device] = None, finite: bool = False) -> torch.Tensor:
    """Raise TypeError / ValueError naming ``name`` unless ``t`` is a tensor as described.

    shape: expected sizes, ``None`` for any size in that dimension (the rank is always checked).
    dtype: one dtype or a sequence of accepted dtypes. device: the device the kernels run on.
    finite: also check for NaN / Inf (one device sync).
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtype is not None:
        accepted = (dtype,) if isinstance(dtype, torch.dtype) else tuple(dtype)
        if t.dtype not in accepted:
            want = " or ".join(str(d).replace("torch.", "") for d in accepted)
            raise TypeError(f"{name} must be {want}, got {str(t.dtype).replace('torch.', '')}")
    if device is not None and not same_device(t.device, torch.device(device)):
        raise ValueError(f"{name} is on {t.device} but the Taichi kernels run on {device}; move it there")
    if shape is not None and (t.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape))):
        want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
        raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")
    if finite and t.numel() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or Inf")
    return t


def check_finite(**named: Optional[torch.Tensor]) -> None:
    """One device sync for several tensors; the error names every tensor holding NaN or Inf."""
    tensors = {k: v for k, v in named.items() if v is not None and v.numel()}
    if not tensors:
        return
    bad = torch.stack([~torch.isfinite(v.detach()).all() for v in tensors.values()]).tolist()
    if any(bad):
        raise ValueError("non-finite values (nan/inf) in " + ", ".join(k for k, b in zip(tensors, bad) if b))


def check_number(name: str, value, low: Optional[float] = None, high: Optional[float] = None,
                 low_open: bool = False, high_open: bool = False) -> float:
    """A finite real number within [low, high] (open ends where asked); returns it as float."""
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    value = float(value)
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        raise ValueError(f"{name} must lie in {left}{lo}, {hi}{right}, got {value:g}")
    return value


def check_positive(name: str, value) -> float:
    return check_number(name, value, low=0.0, low_open=True)


def check_int(name: str, value, low: int = 0, high: Optional[int] = None) -> int:
    """An int (numpy ints too, not bools) in [low, high]."""
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise ValueError(f"{name} must be an int, got {value!r}")
    value = int(value)
    if value < low or (high is not None and value > high):
        raise ValueError(f"{name} must be an int in [{low}, {'inf' if high is None else high}], got {value}")
    return value


def check_nu(name: str, nu) -> None:
    """Poisson's ratio in NU_LIMITS (open): a number, array or tensor."""
    values = torch.as_tensor(nu, dtype=torch.float64)
    bad = ~torch.isfinite(values) | (values <= NU_LIMITS[0]) | (values >= NU_LIMITS[1])
    if bool(bad.any()):
        first = values[bad].flatten()[0].item()
        raise ValueError(f"{name} must lie in ({NU_LIMITS[0]:g}, {NU_LIMITS[1]:g}), got {first:g}")
