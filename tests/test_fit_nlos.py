"""Smoke tests of python -m scenes.fit_nlos: synthetic run, --data on small files in both layouts, CLI errors.

No --arch: the scene runs wherever the test session's Taichi runs (TAICHI_MPM_ARCH).

Breakage seen caught (once, then reverted): writing depth.npz on the pooled grid instead of the
file's scan grid (test_fit_real_capture fails on the shape).
"""
import h5py
import numpy as np
import pytest
import scipy.io

from scenes.fit_nlos import main

C = 299_792_458.0
TINY = ["--iters", "3", "--gaussians", "20", "--batch", "6", "--bins", "16",
        "--directions", "8", "8"]


def point_histograms(X, Y, T, dT, target, wall=2.0):
    xs = -wall / 2 + (np.arange(X) + 0.5) * wall / X
    ys = -wall / 2 + (np.arange(Y) + 0.5) * wall / Y
    pts = np.stack(list(np.meshgrid(xs, ys, indexing="ij")) + [np.zeros((X, Y))], -1)
    r = np.linalg.norm(pts - np.asarray(target), axis=-1)
    meas = np.zeros((X, Y, T), np.float32)
    k = np.floor(2 * r / C / dT).astype(int)
    np.put_along_axis(meas, k[..., None], (1 / r ** 4)[..., None].astype(np.float32), 2)
    return meas


def test_fit_synthetic(tmp_path, ti_arch):
    out = main(TINY + ["--scan", "6", "--out", str(tmp_path)])
    for name in ("result.png", "loss.png", "depth.npz"):
        assert (tmp_path / name).is_file(), name
    assert np.isfinite(out["loss"]) and out["loss"] > 0
    assert out["fit"]["truth_cells"] > 0 and 0 <= out["fit"]["mask_iou"] <= 1
    d = np.load(tmp_path / "depth.npz")
    assert d["depth"].shape == d["depth_backprojection"].shape == d["depth_truth"].shape == (6, 6)


def test_fit_real_capture(tmp_path, ti_arch):
    """--data with an f-k .mat (no ground truth): depth.npz on the file's own 8 x 6 scan grid."""
    meas = point_histograms(8, 6, 360, 32e-12, (0.2, -0.1, 0.5), wall=2.0)
    scipy.io.savemat(tmp_path / "cap.mat", {"meas": meas, "tofgrid": np.zeros((8, 6))})
    out = main(TINY + ["--scan", "4", "--data", str(tmp_path / "cap.mat"), "--out", str(tmp_path / "o")])
    d = np.load(tmp_path / "o" / "depth.npz")
    assert d["depth"].shape == d["depth_backprojection"].shape == (8, 6)
    assert d["x"].shape == (8,) and d["y"].shape == (6,)
    found = d["depth_backprojection"][~np.isnan(d["depth_backprojection"])]
    assert found.size > 0 and np.all((found > 0) & (found < 360 * 32e-12 * C / 2))
    assert np.isfinite(out["loss"])


def test_fit_zaragoza_capture(tmp_path, ti_arch):
    ny, nx, T, delta_m = 4, 4, 400, 0.01
    xs = np.linspace(-0.5, 0.5, nx)
    zs = np.linspace(-0.5, 0.5, ny)
    grid = np.stack([xs[None, :].repeat(ny, 0), np.zeros((ny, nx)), zs[:, None].repeat(nx, 1)])  # wall y = 0
    camera = np.array([0.0, 0.3, 0.0])
    pts = grid.transpose(1, 2, 0)
    target = np.array([0.1, 0.6, 0.0])
    path_len = 2 * np.linalg.norm(pts - camera, axis=-1) + 2 * np.linalg.norm(pts - target, axis=-1)
    data = np.zeros((T, 1, ny, nx), np.float32)
    for iy in range(ny):
        for ix in range(nx):
            data[int(path_len[iy, ix] / delta_m), 0, iy, ix] = 1.0
    with h5py.File(tmp_path / "z.hdf5", "w") as f:
        for k, v in dict(data=data, deltaT=np.array(delta_m), t0=np.array(0.0), isConfocal=np.array(1),
                         cameraGridPositions=grid, cameraPosition=camera, laserPosition=camera).items():
            f[k] = v
    main(TINY + ["--scan", "4", "--data", str(tmp_path / "z.hdf5"), "--out", str(tmp_path / "o")])
    d = np.load(tmp_path / "o" / "depth.npz")
    assert d["depth"].shape == (nx, ny)


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "absent.mat", "not found"),
    (lambda p: (p / "x.txt").write_text("hi") and p / "x.txt", "unknown capture format"),
    (lambda p: scipy.io.savemat(p / "n.mat", {"rect_data": np.zeros((4, 4, 8))}) or p / "n.mat", "meas"),
])
def test_cli_errors(tmp_path, capsys, make, message, ti_arch):
    path = make(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(TINY + ["--data", str(path), "--out", str(tmp_path / "o")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    with pytest.raises(SystemExit) as e:
        main(TINY + ["--iters", "0", "--out", str(tmp_path / "o")])
    assert e.value.code == 2
