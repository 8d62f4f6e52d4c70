"""One command-line shape for every scene.

Each scene module builds its parser with :func:`scene_parser` (the shared options: ``--arch``,
``--out`` defaulting to ``out/<scene>``, ``--seed``, ``--debug``; ``--frames`` / ``--obj`` where the
scene has them, and ``--size`` / ``--scale`` placing the mesh when ``fit_size`` is given) and runs
its body through :func:`run`, which turns a user error into one line on stderr and exit status 2 (a
traceback only with ``--debug``). :func:`progress` is the progress bar every scene uses: it ends at
100% or says why it stopped. A module with a ``main`` and a docstring is listed by ``python -m scenes``.

    def main(argv=None):
        parser = scene_parser("demo", __doc__, frames=48, obj=ASSETS / "jelly.obj", fit_size=0.24)
        parser.add_argument(...)
        return run(parser, argv, body)      # body(args) does the work; mesh_fit(args, center) places --obj
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

# Exceptions that mean "the user asked for something that cannot be done": one line, exit 2.
USER_ERRORS = (ValueError, TypeError, FileNotFoundError, IsADirectoryError, PermissionError, KeyError)


class UserError(Exception):
    """Raised by scenes for bad input that no standard exception type describes."""


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def scene_parser(name: str, doc: Optional[str], *, frames: Optional[int] = None,
                 obj: Optional[Path] = None, fit_size: Optional[float] = None,
                 distributed: bool = False) -> argparse.ArgumentParser:
    """The parser every scene starts from; ``--help`` shows defaults.

    frames / obj: add ``--frames`` / ``--obj`` with these defaults. fit_size: add ``--size`` (the
    mesh's largest side in the scene, default ``fit_size``) and ``--scale`` (use the mesh's own
    units times this instead); read them back with :func:`mesh_fit`. distributed: add ``--backend``
    for scenes run through :func:`run_distributed`.
    """
    parser = argparse.ArgumentParser(prog=f"python -m scenes.{name}", description=doc, formatter_class=_Formatter)
    common = parser.add_argument_group("common options")
    common.add_argument("--arch", choices=("auto", "cpu", "cuda"), default=None,
                        help="where Taichi runs (default: TAICHI_MPM_ARCH, else auto: CUDA when torch sees a GPU)")
    common.add_argument("--out", type=Path, default=Path("out") / name, help="output folder")
    common.add_argument("--seed", type=int, default=0, help="random seed")
    common.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    if frames is not None:
        common.add_argument("--frames", type=int, default=frames, help="frames to simulate / render")
    if obj is not None:
        common.add_argument("--obj", type=Path, default=obj, help="mesh file (OBJ, PLY, STL, ... anything trimesh reads)")
    if fit_size is not None:
        place = common.add_mutually_exclusive_group()
        place.add_argument("--size", type=float, default=fit_size,
                           help="largest side of the mesh in the scene [m], whatever its units and origin")
        place.add_argument("--scale", type=float, default=None,
                           help="instead of --size: keep the mesh's own units times this factor (still centred)")
    if distributed:
        common.add_argument("--backend", choices=("nccl", "gloo"), default=None,
                            help="torch.distributed backend under torchrun (default: nccl on CUDA, gloo on CPU)")
    return parser


def mesh_fit(args: argparse.Namespace, center: Sequence[float]) -> dict:
    """Keyword arguments for ``MPMSolver.add_mesh`` / ``sample_mesh`` placing ``--obj`` at ``center``
    as ``--size`` / ``--scale`` ask."""
    from taichi_mpm.sampling import MeshFit

    scale = getattr(args, "scale", None)
    if scale is not None:
        if not scale > 0:
            raise ValueError(f"--scale must be > 0, got {scale}")
        return {"scale": scale, "fit": MeshFit(tuple(center), None)}
    if not args.size > 0:
        raise ValueError(f"--size must be > 0, got {args.size}")
    return {"fit": MeshFit(tuple(center), args.size)}


@contextmanager
def progress(total: int, desc: str, unit: str = "it", **kwargs) -> Iterator[Any]:
    """A tqdm bar that ends at 100% or says why it stopped.

    Call ``bar.stop(reason)`` when the work ends early on purpose (converged, ...): the bar is
    closed at 100% with ``done: <reason>``. An exception or Ctrl-C marks it ``stopped: <why>``.
    """
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit=unit, **kwargs)
    state = {"reason": None}

    def stop(reason: str) -> None:
        state["reason"] = reason
        bar.set_postfix_str(f"done: {reason}", refresh=False)
        bar.total = bar.n
        bar.refresh()

    bar.stop = stop
    try:
        yield bar
    except KeyboardInterrupt:
        bar.set_postfix_str("stopped: interrupted (Ctrl-C)")
        raise
    except BaseException as error:
        bar.set_postfix_str(f"stopped: {type(error).__name__}")
        raise
    else:
        if state["reason"] is None and bar.n < total:
            bar.set_postfix_str(f"stopped after {bar.n} of {total}")
    finally:
        bar.close()


def check_readable_file(path: Path, what: str = "file") -> Path:
    """A path that exists, is a file and can be read; else a FileNotFoundError / PermissionError."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    if not path.is_file():
        raise IsADirectoryError(f"{what} is not a file: {path}")
    if not os.access(path, os.R_OK):
        raise PermissionError(f"{what} is not readable: {path}")
    return path


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]], body: Callable[[argparse.Namespace], Any]) -> Any:
    """Parse, start Taichi on the asked arch, seed, make ``--out``, run ``body(args)``.

    A user error (bad value, missing file, ...) prints ``error: <message>`` on one line and exits
    with status 2, unless ``--debug`` asks for the traceback.
    """
    args = parser.parse_args(argv)
    with warnings.catch_warnings():
        if not args.debug:  # a warning is one line too: "<prog>: warning: <message>"
            warnings.showwarning = lambda message, *_, **__: print(f"{parser.prog}: warning: {message}",
                                                                   file=sys.stderr)
        return _run_body(parser, args, body)


def run_distributed(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]],
                    body: Callable[[argparse.Namespace, Any], Any]) -> Any:
    """:func:`run` for scenes that split their work over torchrun ranks: ``body(args, info)`` gets
    the ``bridge.distributed.DistInfo`` of this process (a world of one without torchrun).

    Under torchrun the process joins the group first, which pins this rank's GPU before
    :func:`run` starts Taichi (Taichi takes no device index); the group is left at the end.
    """
    from bridge import distributed

    info = distributed.DistInfo()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        known, _ = parser.parse_known_args(argv)
        info = distributed.setup(known.arch, backend=known.backend)
    try:
        result = run(parser, argv, lambda args: body(args, info))
    except SystemExit as stop:  # a user error: one line printed, status 2
        _leave(info, stop.code)
        raise
    except BaseException:
        distributed.cleanup()
        raise
    _leave(info, 0)
    return result


def _leave(info, status) -> None:
    """Leave the process group; a torchrun rank then ends here, after the atexit handlers (Taichi's
    cache write among them) and with its streams flushed, but before C++ static destructors: a CPU
    (gloo) rank sometimes aborted in those after everything else had finished ("terminate called
    without an active exception", 1 run in 10-40 on a 2-core machine), failing the whole torchrun."""
    import atexit

    from bridge import distributed

    distributed.cleanup()
    if not info.active:
        return
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status if isinstance(status, int) else (0 if status is None else 1))


def _run_body(parser: argparse.ArgumentParser, args: argparse.Namespace, body) -> Any:
    # a simulation gone unstable or a render past its pair cap: messages that say what to change
    from render.binning import TooManyPairsError
    from taichi_mpm.solver import SimulationError

    try:
        if getattr(args, "frames", 1) is not None and getattr(args, "frames", 1) < 0:
            raise ValueError(f"--frames must be >= 0, got {args.frames}")
        if getattr(args, "obj", None) is not None:
            check_readable_file(args.obj, "mesh")
        from taichi_mpm.runtime import init

        init(args.arch)
        seed_everything(args.seed)
        args.out.mkdir(parents=True, exist_ok=True)
        return body(args)
    except (UserError, SimulationError, TooManyPairsError, *USER_ERRORS) as error:
        module = type(error).__module__
        if args.debug or module == "taichi" or module.startswith("taichi."):
            raise  # Taichi's TypeErrors are compile errors in our kernels: bugs, shown in full
        message = str(error) if not isinstance(error, KeyError) else f"missing {error}"
        lines = [line for line in message.splitlines() if line.strip()]
        print(f"{parser.prog}: error: {lines[0] if lines else type(error).__name__}", file=sys.stderr)
        raise SystemExit(2) from None
