"""``python -m scenes``: list the runnable scenes, one line each.

A scene is any module of this package with a top-level ``main`` function; its line is the first
line of the module docstring. Modules are read with ``ast``, not imported, so listing is instant and
a new scene appears here without editing a list.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def discover(folder: Path = HERE) -> dict[str, str]:
    """{module name: first docstring line} for every module in ``folder`` defining ``main``."""
    found = {}
    for path in sorted(folder.glob("*.py")):
        if path.name.startswith("_"):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        except (SyntaxError, UnicodeDecodeError):
            continue
        if any(isinstance(node, ast.FunctionDef) and node.name == "main" for node in tree.body):
            doc = (ast.get_docstring(tree) or "").strip()
            found[path.stem] = doc.splitlines()[0] if doc else ""
    return found


def main(argv=None) -> int:
    scenes = discover()
    width = max(map(len, scenes), default=0)
    print("Scenes (run `python -m scenes.<name> --help` for options):")
    for name, line in scenes.items():
        print(f"  {name:<{width}}  {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
