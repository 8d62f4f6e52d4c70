"""The one place that starts Taichi, matched to the torch device.

Every module that launches kernels calls :func:`ensure_init` first, so users never call
``ti.init`` themselves. The arch comes from, in order: the ``arch`` argument of an explicit
:func:`init`, the ``TAICHI_MPM_ARCH`` environment variable (``auto``, ``cpu`` or ``cuda``),
then ``auto`` (CUDA when torch sees a GPU and Taichi can start on it, else CPU). On the CPU
arch, torch is set to one intra-op thread (see :func:`init`'s ``torch_threads``), and at exit
Taichi is finalised so that its offline cache gets written.
"""
from __future__ import annotations

import atexit
import os
from typing import Optional

import taichi as ti

ENV_VAR = "TAICHI_MPM_ARCH"
_ARCHS = ("auto", "cpu", "cuda")

_arch: Optional[str] = None  # "cpu" or "cuda" once Taichi is up
_debug: bool = False


class RuntimeConflictError(RuntimeError):
    """Raised when Taichi is asked to start again with different settings."""


def _requested_arch(arch: Optional[str]) -> str:
    requested = (arch or os.environ.get(ENV_VAR) or "auto").strip().lower()
    if requested not in _ARCHS:
        source = "arch argument" if arch else f"environment variable {ENV_VAR}"
        raise ValueError(f"{source} must be one of {_ARCHS}, got {requested!r}")
    return requested


def _cuda_usable() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def _source_position(ctx, node) -> str:
    """Taichi's ASTTransformerContext.get_pos_info without its text wrapping: the file, line and
    kernel, the node's first source line and a caret line under the node. Taichi's front end (Python
    AST -> IR) calls it for every name in every kernel it builds, in every process: the offline
    cache keys on the IR it builds, so a warm cache pays it too. Its 80-column TextWrapper was 3.5 s
    of the 15.5 s of a 4-step ``scenes.fit_material`` process on the 2-core CPU (cProfile,
    2026-11-28). The string only goes into Taichi's error messages."""
    line = ctx.src[node.lineno - 1]
    start = ctx.indent + node.col_offset
    end = ctx.indent + node.end_col_offset if node.end_lineno == node.lineno else len(line.rstrip())
    return (f'File "{ctx.file}", line {node.lineno + ctx.lineno_offset}, in {ctx.func.func.__name__}:\n'
            f"{line}\n{' ' * start}{'^' * max(end - start, 1)}\n")


def _use_fast_source_positions() -> None:
    from taichi.lang.ast.ast_transformer_utils import ASTTransformerContext

    ASTTransformerContext.get_pos_info = _source_position


def init(arch: Optional[str] = None, debug: bool = False, torch_threads: Optional[int] = 1, **ti_kwargs) -> str:
    """Start Taichi once for this process and return the arch in use ("cpu" or "cuda").

    Args:
        arch: "auto" | "cpu" | "cuda"; None reads ``TAICHI_MPM_ARCH`` and falls back to "auto".
        debug: Taichi's debug mode (bounds checks in kernels; slow).
        torch_threads: on the CPU arch, torch's intra-op thread count (``torch.set_num_threads``);
            None leaves it alone. Default 1: Taichi's CPU kernels use every core, and a large torch
            op between two kernels (zeroing or copying adjoints, a loss over an image) then waits
            for torch's own pool to get cores. Measured 2026-11-27 on 2 cores, the rollout's
            backward at 4k particles: 10.9 -> 8.3 ms a substep on an idle machine, 86 -> 14 ms
            with another process busy on one core (5 ms a ``zero_`` there). Ignored on CUDA.
        **ti_kwargs: passed on to ``ti.init`` (e.g. ``device_memory_fraction``).

    Calling it again with the same arch (and debug flag) does nothing; asking for another arch
    once Taichi is running raises :class:`RuntimeConflictError`, because ``ti.init`` would
    silently destroy every field and kernel already made.
    """
    global _arch, _debug
    requested = _requested_arch(arch)
    if _arch is not None:
        if requested not in ("auto", _arch) or debug != _debug:
            raise RuntimeConflictError(
                f"Taichi already runs with arch={_arch!r}, debug={_debug}; cannot restart it with "
                f"arch={requested!r}, debug={debug} in the same process")
        return _arch

    if requested == "cuda" and not _cuda_usable():
        raise RuntimeError("arch='cuda' was asked for but torch sees no CUDA device")
    chosen = "cuda" if requested == "cuda" or (requested == "auto" and _cuda_usable()) else "cpu"
    _use_fast_source_positions()
    ti_kwargs.setdefault("offline_cache", True)
    ti_kwargs.setdefault("log_level", ti.WARN)
    if chosen == "cuda":
        try:
            ti.init(arch=ti.cuda, debug=debug, **ti_kwargs)
        except Exception:
            if requested == "cuda":
                raise
            chosen = "cpu"
    if chosen == "cpu":
        ti.init(arch=ti.cpu, debug=debug, **ti_kwargs)
    elif ti.lang.impl.current_cfg().arch != ti.cuda:
        # Taichi falls back to CPU by itself when its CUDA start fails; keep torch and Taichi matched.
        if requested == "cuda":
            raise RuntimeError("Taichi could not start on CUDA although torch sees a GPU")
        chosen = "cpu"
    _arch, _debug = chosen, debug
    if chosen == "cpu" and torch_threads is not None:
        import torch

        torch.set_num_threads(torch_threads)
    atexit.register(_write_offline_cache)
    return chosen


def _write_offline_cache() -> None:
    """Finalise Taichi at exit, which writes the kernels compiled in this process to its offline
    cache. Taichi writes them when its program object is destroyed, and at interpreter exit that
    did not happen once a differentiable rollout had run (something still held the program): the
    next process compiled every kernel again (19 s to the first gradient on a 2-core CPU instead
    of ~4 s)."""
    try:
        ti.reset()
    except Exception:  # the interpreter is going down; a failed cache write costs only speed
        pass


def ensure_init() -> str:
    """Start Taichi with the default choice if nobody has yet; return the arch in use."""
    return _arch if _arch is not None else init()


def arch() -> Optional[str]:
    """The arch Taichi runs on ("cpu" / "cuda"), or None before it starts."""
    return _arch


def device():
    """The torch device whose memory Taichi kernels read and write without copies."""
    import torch

    return torch.device("cuda" if ensure_init() == "cuda" else "cpu")
