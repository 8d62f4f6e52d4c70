"""One command-line shape for every scene.

Each scene module builds its parser with :func:`scene_parser` (the shared options: ``--arch``,
``--out`` defaulting to ``out/<scene>``, ``--seed``, ``--debug``; ``--frames`` / ``--obj`` where the
scene has them) and runs its body through :func:`run`, which turns a user error into one line on
stderr and exit status 2 (a traceback only with ``--debug``).

    def main(argv=None):
        parser = scene_parser("demo", __doc__, frames=48, obj=ASSETS / "jelly.obj")
        parser.add_argument(...)
        return run(parser, argv, body)      # body(args) does the work
"""
from __future__ import annotations

import argparse
import os
import random
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

# Exceptions that mean "the user asked for something that cannot be done": one line, exit 2.
USER_ERRORS = (ValueError, TypeError, FileNotFoundError, IsADirectoryError, PermissionError, KeyError)


class UserError(Exception):
    """Raised by scenes for bad input that no standard exception type describes."""


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def scene_parser(name: str, doc: Optional[str], *, frames: Optional[int] = None,
                 obj: Optional[Path] = None) -> argparse.ArgumentParser:
    """The parser every scene starts from; ``--help`` shows defaults."""
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
    return parser


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
    except (UserError, *USER_ERRORS) as error:
        if args.debug:
            raise
        message = str(error) if not isinstance(error, KeyError) else f"missing {error}"
        print(f"{parser.prog}: error: {message.splitlines()[0] if message else type(error).__name__}", file=sys.stderr)
        raise SystemExit(2) from None
