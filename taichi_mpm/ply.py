"""Binary PLY export of particles (one file per frame), readable by trimesh, Blender, MeshLab."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Union

import numpy as np


def write_particles_ply(path: Union[str, Path], positions: np.ndarray,
                        attributes: Dict[str, np.ndarray] | None = None) -> Path:
    """Write positions [N, 3] and optional per-particle attributes as PLY vertices.

    attributes: name -> [N] or [N, k] array; a [N, k] array becomes properties name_0..name_{k-1}.
    Floats are stored as float32, integers as int32.
    """
    positions = np.asarray(positions)
    if positions.ndim != 2 or positions.shape[1] != 3:
        raise ValueError(f"positions must have shape [N, 3], got {positions.shape}")
    n = len(positions)
    columns = [("x", positions[:, 0]), ("y", positions[:, 1]), ("z", positions[:, 2])]
    for name, values in (attributes or {}).items():
        values = np.asarray(values)
        if values.shape[0] != n:
            raise ValueError(f"attribute {name!r} has {values.shape[0]} rows, expected {n}")
        values = values.reshape(n, -1)
        if values.shape[1] == 1:
            columns.append((name, values[:, 0]))
        else:
            columns += [(f"{name}_{i}", values[:, i]) for i in range(values.shape[1])]
    dtype = [(name, "<i4" if np.issubdtype(col.dtype, np.integer) else "<f4") for name, col in columns]
    vertices = np.empty(n, dtype=dtype)
    for name, col in columns:
        vertices[name] = col
    header = ["ply", "format binary_little_endian 1.0", f"element vertex {n}"]
    header += [f"property {'int' if t == '<i4' else 'float'} {name}" for name, t in dtype]
    header.append("end_header")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(("\n".join(header) + "\n").encode("ascii"))
        f.write(vertices.tobytes())
    return path
