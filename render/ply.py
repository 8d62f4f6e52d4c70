"""3DGS PLY files in the standard layout (Inria's save_ply), any SH degree.

Per vertex, float32: x y z, nx ny nz (zeros), f_dc_0..2, f_rest_0..3*(B-1)-1 (channel-major: all
coefficients of R, then G, then B), opacity (logit), scale_0..2 (log), rot_0..3 (quaternion wxyz).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np


@dataclass
class GaussianPly:
    """Gaussians as stored (pre-activation). Shapes: means (N,3), sh (N,B,3), opacity_logits (N,),
    log_scales (N,3), quats (N,4) wxyz."""

    means: np.ndarray
    sh: np.ndarray
    opacity_logits: np.ndarray
    log_scales: np.ndarray
    quats: np.ndarray

    @property
    def sh_degree(self) -> int:
        return int(round(math.sqrt(self.sh.shape[1]))) - 1

    def activated(self) -> dict:
        """Rendering parameters: means, quats (normalized), scales = exp, opacities = sigmoid, sh."""
        q = self.quats / np.linalg.norm(self.quats, axis=1, keepdims=True)
        return dict(means=self.means, quats=q.astype(np.float32), scales=np.exp(self.log_scales),
                    opacities=1.0 / (1.0 + np.exp(-self.opacity_logits)), sh=self.sh)


def _fields(num_bases: int) -> list[str]:
    return (["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
            + [f"f_rest_{i}" for i in range(3 * (num_bases - 1))]
            + ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"])


def write_ply(path: Union[str, Path], g: GaussianPly) -> None:
    N, B = g.sh.shape[:2]
    if B not in (1, 4, 9, 16, 25) or g.sh.shape[2] != 3:
        raise ValueError(f"sh must be (N, (d+1)^2, 3), got {g.sh.shape}")
    for name, arr, shape in (("means", g.means, (N, 3)), ("opacity_logits", g.opacity_logits, (N,)),
                             ("log_scales", g.log_scales, (N, 3)), ("quats", g.quats, (N, 4))):
        if arr.shape != shape:
            raise ValueError(f"{name} must be {shape}, got {arr.shape}")
    rest = np.transpose(g.sh[:, 1:, :], (0, 2, 1)).reshape(N, 3 * (B - 1))  # explicit width: N may be 0
    data = np.concatenate([g.means, np.zeros((N, 3)), g.sh[:, 0, :], rest, g.opacity_logits[:, None],
                           g.log_scales, g.quats], 1).astype("<f4")
    header = "ply\nformat binary_little_endian 1.0\nelement vertex %d\n" % N
    header += "".join(f"property float {f}\n" for f in _fields(B)) + "end_header\n"
    with open(path, "wb") as fh:
        fh.write(header.encode("ascii"))
        fh.write(np.ascontiguousarray(data).tobytes())


_TYPES = {"float": "f4", "float32": "f4", "double": "f8", "float64": "f8", "uchar": "u1", "uint8": "u1",
          "char": "i1", "int8": "i1", "short": "i2", "int16": "i2", "ushort": "u2", "uint16": "u2",
          "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4"}


def read_ply(path: Union[str, Path]) -> GaussianPly:
    """Read a binary 3DGS PLY (little or big endian); extra vertex properties are ignored."""
    with open(path, "rb") as fh:
        if fh.readline().strip() != b"ply":
            raise ValueError(f"{path} is not a PLY file")
        fmt, count, props, element = None, 0, [], None
        while True:
            line = fh.readline()
            if not line:
                raise ValueError(f"{path}: header has no end_header")
            words = line.decode("ascii").split()
            if not words or words[0] in ("comment", "obj_info"):
                continue
            if words[0] == "end_header":
                break
            if words[0] == "format":
                fmt = words[1]
            elif words[0] == "element":
                element = words[1]
                if element == "vertex":
                    count = int(words[2])
            elif words[0] == "property" and element == "vertex":
                if words[1] == "list":
                    raise ValueError(f"{path}: list properties in the vertex element are not supported")
                props.append((words[2], _TYPES[words[1]]))
        if fmt not in ("binary_little_endian", "binary_big_endian"):
            raise ValueError(f"{path}: only binary PLY is supported, got format {fmt}")
        order = "<" if fmt == "binary_little_endian" else ">"
        dtype = np.dtype([(name, order + t) for name, t in props])
        v = np.frombuffer(fh.read(dtype.itemsize * count), dtype=dtype, count=count)
    names = set(dtype.names)

    def cols(prefix, n):
        missing = [f"{prefix}{i}" for i in range(n) if f"{prefix}{i}" not in names]
        if missing:
            raise ValueError(f"{path}: missing vertex properties {missing}")
        return np.stack([v[f"{prefix}{i}"].astype(np.float32) for i in range(n)], 1)

    n_rest = sum(1 for n in names if n.startswith("f_rest_"))
    B = 1 + n_rest // 3
    if n_rest % 3 or int(round(math.sqrt(B))) ** 2 != B:
        raise ValueError(f"{path}: {n_rest} f_rest properties do not make a whole SH degree")
    rest = cols("f_rest_", n_rest).reshape(count, 3, B - 1).transpose(0, 2, 1) if n_rest else \
        np.zeros((count, 0, 3), np.float32)
    sh = np.concatenate([cols("f_dc_", 3)[:, None, :], rest], 1)
    return GaussianPly(means=np.stack([v[k].astype(np.float32) for k in "xyz"], 1), sh=np.ascontiguousarray(sh),
                       opacity_logits=v["opacity"].astype(np.float32), log_scales=cols("scale_", 3),
                       quats=cols("rot_", 4))
