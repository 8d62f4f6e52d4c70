"""The package layers: taichi_mpm.runtime / launch / validation (the floor) -> kernels (taichi_mpm,
render) -> bridge (torch faces) -> scenes. No package imports one above it, so no package cycle,
and ``import render`` / ``import taichi_mpm`` work alone in a fresh interpreter.
Shown to catch: ``from bridge.rasterization import rasterize`` added to render/ply.py."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("taichi_mpm", "render", "bridge", "scenes")
FLOOR = {"taichi_mpm.runtime", "taichi_mpm.launch", "taichi_mpm.validation"}
# what each package may import from the project (besides itself)
ALLOWED = {"taichi_mpm": set(), "render": {"taichi_mpm"}, "bridge": {"taichi_mpm", "render"},
           "scenes": {"taichi_mpm", "render", "bridge"}}


def project_imports(path: Path):
    """(line, imported module) for every absolute import of a project package in a file."""
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            if name.split(".")[0] in PACKAGES:
                yield node.lineno, name


@pytest.mark.parametrize("package", PACKAGES)
def test_no_package_imports_upward(package):
    wrong = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for line, name in project_imports(path):
            top = name.split(".")[0]
            if top == package:
                continue
            if top not in ALLOWED[package]:
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
            elif package == "render" and not any(name == f or name.startswith(f + ".") for f in FLOOR):
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {name} (render may use only the floor: {sorted(FLOOR)})")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("package", ["taichi_mpm", "render", "bridge", "scenes"])
def test_each_package_imports_alone(package):
    proc = subprocess.run([sys.executable, "-c", f"import {package}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
