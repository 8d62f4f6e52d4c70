"""Readers for confocal NLOS captures: the f-k migration release (.mat) and the Zaragoza HDF5 layout.

Both give an :class:`NLOSCapture`: histograms ``meas`` [x, y, time] on a regular scan grid of the
relay wall, the scan points in the wall frame (wall plane z = 0, hidden side +z, metres), and the
time axis: bin k spans round-trip times [t0 + k deltaT, t0 + (k + 1) deltaT) measured from the wall
point (out to the hidden scene and back), so a surface at distance r shows up at t = 2 r / c.

f-k migration release (Lindell et al. 2019): ``meas`` [x, y, time] (512 x 512 x 2048), ``tofgrid``
[x, y] picoseconds from the laser/SPAD to each wall point (removed here by shifting each histogram),
a 2 m x 2 m wall and 32 ps bins (neither stored in the file: arguments). MATLAB v5 files are read with
scipy.io, v7.3 (HDF5) with h5py, whose axes come reversed (column-major) and are turned back.

Zaragoza NLOS dataset (HDF5, read with h5py, C order): ``data`` [time, bounce, y, x] (or [time, y, x]),
``cameraGridPositions`` [3, y, x], ``deltaT`` and ``t0`` as optical path lengths in metres (c * time),
``isConfocal``, ``cameraPosition``, ``laserPosition``, optional ``hiddenVolumePosition`` /
``hiddenVolumeSize``. The time stored there includes the laser -> wall and wall -> camera legs; they
are removed (rectify) by shifting each histogram by the nearest whole bin. Bounces are summed. The
wall frame is fitted to the grid: origin at its centre, z its normal towards the hidden volume (or
the camera: in NLOS the hidden scene is on the camera's side of the wall), x along the grid's x.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

SPEED_OF_LIGHT = 299_792_458.0


class NLOSFormatError(ValueError):
    """The file is not in the expected layout (missing field, wrong shapes, time axis elsewhere)."""


@dataclass
class NLOSCapture:
    """meas [X, Y, T] float32; scan_points [X, Y, 3] metres in the wall frame; deltaT, t0 seconds."""

    meas: np.ndarray
    scan_points: np.ndarray
    deltaT: float
    t0: float
    c: float = SPEED_OF_LIGHT
    hidden_volume: Optional[tuple] = None  # (centre (3,), size) in the wall frame, when the file has it
    source: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def num_bins(self) -> int:
        return self.meas.shape[2]

    def bin_radius(self, k) -> np.ndarray:
        """Distance from the wall of the centre of bin k (round trip: r = c t / 2)."""
        return 0.5 * self.c * (self.t0 + (np.asarray(k) + 0.5) * self.deltaT)


def _shift_bins(meas: np.ndarray, shifts: np.ndarray) -> np.ndarray:
    """out[x, y, k] = meas[x, y, k + shifts[x, y]], zero where that falls outside.

    One x row at a time: a full capture (512 x 512 x 2048) would need 4 GiB of int64 indices at once."""
    T = meas.shape[2]
    out = np.zeros(meas.shape, np.float32)
    for x in range(meas.shape[0]):
        k = np.arange(T)[None, :] + shifts[x][:, None].astype(np.int64)
        valid = (k >= 0) & (k < T)
        out[x] = np.where(valid, np.take_along_axis(meas[x], np.clip(k, 0, T - 1), 1), 0)
    return out


def _read_mat(path: Path) -> dict:
    import h5py

    if h5py.is_hdf5(path):  # MATLAB v7.3: HDF5, axes reversed
        with h5py.File(path, "r") as f:
            return {k: np.asarray(f[k]).transpose() for k in f.keys() if isinstance(f[k], h5py.Dataset)}
    import scipy.io

    return {k: v for k, v in scipy.io.loadmat(path).items() if not k.startswith("__")}


def load_fk_mat(path, wall_size: float = 2.0, bin_ps: float = 32.0) -> NLOSCapture:
    """An f-k migration release capture: ``meas`` [x, y, time], optional ``tofgrid`` [x, y] in ps."""
    path = Path(path)
    fields = _read_mat(path)
    if "meas" not in fields:
        raise NLOSFormatError(f"{path}: no field 'meas' (the f-k release stores the histograms as meas "
                              f"[x, y, time]); fields found: {sorted(fields)}")
    meas = np.asarray(fields["meas"], dtype=np.float32)
    if meas.ndim != 3:
        raise NLOSFormatError(f"{path}: meas must be 3-D [x, y, time], got shape {meas.shape}")
    tof = fields.get("tofgrid")
    if tof is not None and np.size(tof) > 1:
        tof = np.asarray(tof, dtype=np.float64)
        if tof.shape != meas.shape[:2]:
            hint = " (the time axis looks like the first: expected [x, y, time])" if tof.shape == meas.shape[1:] else ""
            raise NLOSFormatError(f"{path}: tofgrid {tof.shape} does not match meas's scan grid {meas.shape[:2]}{hint}")
        meas = _shift_bins(meas, np.floor(tof / bin_ps).astype(np.int64))
    elif meas.shape[0] != meas.shape[1] or meas.shape[2] < meas.shape[0]:
        raise NLOSFormatError(f"{path}: expected meas [x, y, time] on a square scan grid with the time axis "
                              f"last, got shape {meas.shape}; is the time axis elsewhere?")
    X, Y = meas.shape[:2]
    xs = -wall_size / 2 + (np.arange(X) + 0.5) * wall_size / X
    ys = -wall_size / 2 + (np.arange(Y) + 0.5) * wall_size / Y
    scan = np.stack(list(np.meshgrid(xs, ys, indexing="ij")) + [np.zeros((X, Y))], -1)
    return NLOSCapture(meas, scan.astype(np.float64), bin_ps * 1e-12, 0.0, source=str(path))


def _need(f, path: Path, name: str):
    if name not in f:
        raise NLOSFormatError(f"{path}: no field '{name}' (Zaragoza NLOS HDF5 layout); fields found: {sorted(f.keys())}")
    return np.asarray(f[name])


def load_zaragoza_hdf5(path, rectify: bool = True) -> NLOSCapture:
    """A confocal capture in the Zaragoza NLOS HDF5 layout (see the module docstring)."""
    import h5py

    path = Path(path)
    with h5py.File(path, "r") as f:
        data = _need(f, path, "data")
        delta = float(_need(f, path, "deltaT").reshape(-1)[0])
        t0 = float(_need(f, path, "t0").reshape(-1)[0])
        confocal = bool(_need(f, path, "isConfocal").reshape(-1)[0])
        grid = _need(f, path, "cameraGridPositions").astype(np.float64)
        camera = _need(f, path, "cameraPosition").astype(np.float64).reshape(-1)
        laser = np.asarray(f["laserPosition"], dtype=np.float64).reshape(-1) if "laserPosition" in f else camera
        num_t = int(np.asarray(f["t"]).reshape(-1)[0]) if "t" in f else None
        hidden = (np.asarray(f["hiddenVolumePosition"], dtype=np.float64).reshape(-1),
                  float(np.asarray(f["hiddenVolumeSize"]).reshape(-1)[0])) \
            if "hiddenVolumePosition" in f and "hiddenVolumeSize" in f else None
    if not confocal:
        raise NLOSFormatError(f"{path}: isConfocal is false; only confocal captures are supported")
    if delta <= 0:
        raise NLOSFormatError(f"{path}: deltaT must be > 0, got {delta}")
    if grid.ndim != 3 or grid.shape[0] != 3:
        raise NLOSFormatError(f"{path}: cameraGridPositions must be [3, y, x], got shape {grid.shape}")
    ny, nx = grid.shape[1:]
    if data.ndim not in (3, 4) or data.shape[-2:] != (ny, nx):
        hint = " (the time axis looks like the last; expected [time, (bounce,) y, x])" \
            if data.ndim >= 3 and data.shape[:2] == (ny, nx) else ""
        raise NLOSFormatError(f"{path}: data must be [time, (bounce,) y, x] with y, x = {(ny, nx)} from "
                              f"cameraGridPositions, got shape {data.shape}{hint}")
    if num_t is not None and data.shape[0] != num_t:
        raise NLOSFormatError(f"{path}: data has {data.shape[0]} bins on its first (time) axis but t = {num_t}")
    if data.ndim == 4:
        data = data.sum(1)  # every bounce
    meas = np.ascontiguousarray(data.transpose(2, 1, 0), dtype=np.float32)  # [x, y, time]
    points = grid.transpose(2, 1, 0)  # [x, y, 3]
    if rectify:
        legs = np.linalg.norm(points - laser, axis=-1) + np.linalg.norm(points - camera, axis=-1)
        meas = _shift_bins(meas, np.rint(legs / delta).astype(np.int64))
    # Wall frame fitted to the grid.
    centre = points.reshape(-1, 3).mean(0)
    _, _, vt = np.linalg.svd(points.reshape(-1, 3) - centre)
    normal = vt[2]
    towards = (hidden[0] if hidden is not None else camera) - centre
    if normal @ towards < 0:
        normal = -normal
    x_axis = points[-1, 0] - points[0, 0] if nx > 1 else vt[0]
    x_axis = x_axis - (x_axis @ normal) * normal
    x_axis /= np.linalg.norm(x_axis)
    R = np.stack([x_axis, np.cross(normal, x_axis), normal])  # rows: wall-frame axes in file coordinates
    local = (points - centre) @ R.T
    hidden_local = None if hidden is None else (R @ (hidden[0] - centre), hidden[1])
    return NLOSCapture(meas, local, delta / SPEED_OF_LIGHT, t0 / SPEED_OF_LIGHT, hidden_volume=hidden_local,
                       source=str(path), extra=dict(frame_origin=centre, frame_rotation=R))


def load_capture(path, **options) -> NLOSCapture:
    """Either layout, chosen by extension: .mat -> f-k release, .h5 / .hdf5 -> Zaragoza."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"capture not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".mat":
        return load_fk_mat(path, **options)
    if suffix in (".h5", ".hdf5"):
        return load_zaragoza_hdf5(path, **options)
    raise NLOSFormatError(f"{path}: unknown capture format {suffix!r}; expected .mat (f-k release) or "
                          f".h5/.hdf5 (Zaragoza)")
