"""NLOS capture readers on small files written in each layout, and the back-projection baseline.

Breakages seen caught (each once, then reverted): dropping the .transpose() of h5py arrays in the
v7.3 reader (test_fk_mat_v5_and_v73_agree fails); rectifying with the laser leg only
(test_zaragoza_layout fails: peaks off by bins).
"""
import math

import h5py
import numpy as np
import pytest
import scipy.io
import torch

from render.backprojection import backproject, depth_from_volume, gaussian_density
from render.nlos_io import SPEED_OF_LIGHT, NLOSFormatError, load_capture, load_fk_mat, load_zaragoza_hdf5

C = SPEED_OF_LIGHT


def fk_arrays(X=4, Y=6, T=40):
    meas = np.zeros((X, Y, T), np.float32)
    shift = np.arange(X * Y).reshape(X, Y) % 5
    for x in range(X):
        for y in range(Y):
            meas[x, y, 10 + x + shift[x, y]] = 1.0 + y
    return meas, shift * 32.0 + 7.0  # tofgrid in ps: floor(tof / 32) = shift


def test_fk_mat_v5_and_v73_agree(tmp_path):
    meas, tof = fk_arrays()
    scipy.io.savemat(tmp_path / "v5.mat", {"meas": meas, "tofgrid": tof})
    with h5py.File(tmp_path / "v73.mat", "w") as f:  # MATLAB v7.3 stores column-major: h5py sees axes reversed
        f["meas"] = meas.transpose()
        f["tofgrid"] = tof.transpose()
    for name in ("v5.mat", "v73.mat"):
        cap = load_capture(tmp_path / name)
        assert cap.meas.shape == (4, 6, 40)
        peaks = cap.meas.argmax(-1)
        np.testing.assert_array_equal(peaks, 10 + np.arange(4)[:, None].repeat(6, 1))  # tofgrid removed
        np.testing.assert_array_equal(cap.meas.max(-1), 1.0 + np.arange(6)[None, :].repeat(4, 0))  # x, y order kept
        assert cap.deltaT == pytest.approx(32e-12) and cap.t0 == 0
        xs = cap.scan_points[:, 0, 0]
        assert np.all(np.diff(xs) > 0) and xs[0] == pytest.approx(-1 + 0.25) and np.all(cap.scan_points[..., 2] == 0)
        assert cap.scan_points[0, :, 1][-1] == pytest.approx(1 - 1 / 6)


def test_fk_mat_errors(tmp_path):
    meas, tof = fk_arrays()
    scipy.io.savemat(tmp_path / "nomeas.mat", {"rect_data": meas})
    with pytest.raises(NLOSFormatError, match="meas"):
        load_fk_mat(tmp_path / "nomeas.mat")
    scipy.io.savemat(tmp_path / "timefirst.mat", {"meas": meas.transpose(2, 0, 1), "tofgrid": tof})
    with pytest.raises(NLOSFormatError, match="time axis"):
        load_fk_mat(tmp_path / "timefirst.mat")
    sq = np.zeros((40, 5, 5), np.float32)
    scipy.io.savemat(tmp_path / "timefirst2.mat", {"meas": sq})
    with pytest.raises(NLOSFormatError, match="time axis"):
        load_fk_mat(tmp_path / "timefirst2.mat")
    with pytest.raises(FileNotFoundError):
        load_capture(tmp_path / "absent.mat")


def write_zaragoza(path, ny=3, nx=5, T=300, delta_m=0.01, t0_m=0.05, drop=None, time_last=False):
    """A confocal capture in the Zaragoza layout: wall in the plane y = 0 of the file, hidden side y > 0
    (as the dataset's hidden volume), camera and laser off the wall on that side."""
    xs = np.linspace(-0.4, 0.4, nx)
    zs = np.linspace(-0.2, 0.2, ny)
    grid = np.stack([xs[None, :].repeat(ny, 0), np.zeros((ny, nx)), zs[:, None].repeat(nx, 1)])  # [3, y, x]
    camera, laser = np.array([0.3, 1.0, 0.1]), np.array([-0.2, 1.1, 0.0])
    data = np.zeros((T, 3, ny, nx), np.float32)
    pts = grid.transpose(1, 2, 0)
    legs = np.linalg.norm(pts - camera, axis=-1) + np.linalg.norm(pts - laser, axis=-1)
    for iy in range(ny):
        for ix in range(nx):
            k = 5 + ix + iy + int(np.rint(legs[iy, ix] / delta_m))
            data[k, 1, iy, ix] = 1.0  # third-bounce slot; bounces are summed
            data[k, 2, iy, ix] = 0.5
    fields = dict(data=data if not time_last else data.transpose(2, 3, 1, 0), deltaT=np.array(delta_m),
                  t0=np.array(t0_m), t=np.array(T), isConfocal=np.array(1), cameraGridPositions=grid,
                  cameraPosition=camera, laserPosition=laser, laserGridPositions=grid,
                  hiddenVolumePosition=np.array([0.0, 0.5, 0.0]), hiddenVolumeSize=np.array(0.6))
    with h5py.File(path, "w") as f:
        for k, v in fields.items():
            if k != drop:
                f[k] = v


def test_zaragoza_layout(tmp_path):
    write_zaragoza(tmp_path / "z.hdf5")
    cap = load_capture(tmp_path / "z.hdf5")
    assert cap.meas.shape == (5, 3, 300)  # [x, y, time]
    expected = 5 + np.arange(5)[:, None] + np.arange(3)[None, :]
    np.testing.assert_array_equal(cap.meas.argmax(-1), expected)  # both legs removed, axes in x, y order
    np.testing.assert_allclose(cap.meas.max(-1), 1.5)  # bounces summed
    assert cap.deltaT == pytest.approx(0.01 / C) and cap.t0 == pytest.approx(0.05 / C)
    np.testing.assert_allclose(cap.scan_points[..., 2], 0, atol=1e-12)  # wall frame: wall at z = 0
    np.testing.assert_allclose(cap.scan_points[:, 0, 0], np.linspace(-0.4, 0.4, 5), atol=1e-12)  # x along file x
    centre, size = cap.hidden_volume
    assert centre[2] == pytest.approx(0.5) and size == pytest.approx(0.6)  # hidden side is +z
    assert cap.bin_radius(0) == pytest.approx(0.5 * (0.05 + 0.005))


@pytest.mark.parametrize("field", ["data", "deltaT", "t0", "cameraGridPositions", "isConfocal"])
def test_zaragoza_missing_field(tmp_path, field):
    write_zaragoza(tmp_path / "z.hdf5", drop=field)
    with pytest.raises(NLOSFormatError, match=field):
        load_zaragoza_hdf5(tmp_path / "z.hdf5")


def test_zaragoza_time_axis_elsewhere(tmp_path):
    write_zaragoza(tmp_path / "z.h5", time_last=True, ny=5, nx=5)
    with pytest.raises(NLOSFormatError, match="time axis"):
        load_capture(tmp_path / "z.h5")
    write_zaragoza(tmp_path / "nc.h5")
    with h5py.File(tmp_path / "nc.h5", "a") as f:
        f["isConfocal"][()] = 0
    with pytest.raises(NLOSFormatError, match="confocal"):
        load_capture(tmp_path / "nc.h5")


def test_backprojection_finds_a_point():
    """A point target's histograms back-project to a peak at its (x, y) column and depth."""
    n, T, dT = 12, 320, 32e-12
    xs = -0.5 + (np.arange(n) + 0.5) / n
    scan = torch.tensor(np.stack(list(np.meshgrid(xs, xs, indexing="ij")) + [np.zeros((n, n))], -1))
    target = torch.tensor([xs[7], xs[3], 0.6], dtype=torch.float64)
    r = (scan - target).norm(dim=-1)
    meas = torch.zeros(n, n, T, dtype=torch.float64)
    k = torch.floor(2 * r / C / dT).long()
    meas.scatter_(2, k[..., None], 1.0 / r[..., None] ** 4)
    z = torch.linspace(0.3, 0.9, 61, dtype=torch.float64)
    vol = backproject(meas, scan, z, 0.0, dT)
    depth, image = depth_from_volume(vol, z, threshold=0.5)
    assert divmod(int(image.argmax()), n) == (7, 3)
    assert abs(depth[7, 3].item() - 0.6) <= 0.011
    assert torch.isnan(depth).sum() > n * n // 2  # far columns: nothing found


def test_gaussian_density():
    means = torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64)
    scales = torch.tensor([[0.1, 0.2, 0.3]], dtype=torch.float64)
    quats = torch.tensor([[math.cos(0.3), 0.0, 0.0, math.sin(0.3)]], dtype=torch.float64)  # 0.6 rad about z
    p = torch.tensor([[0.05, 0.02, 1.1], [0.0, 0.0, 2.5]], dtype=torch.float64)
    a = 0.6
    Rz = torch.tensor([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]], dtype=torch.float64)
    local = (p - means) @ Rz / scales
    expected = 0.7 * torch.exp(-0.5 * local.square().sum(-1)) * (local.square().sum(-1) <= 9)
    torch.testing.assert_close(gaussian_density(means, scales, quats, torch.tensor([0.7], dtype=torch.float64), p),
                               expected)
    assert expected[1] == 0 and expected[0] > 0


def test_found_mask_quantile():
    """One hot column: relative to the max it hides the rest, relative to a quantile it does not."""
    from render.backprojection import found_mask

    peaks = torch.tensor([[1.0, 1.2, 0.9], [0.05, 50.0, 1.1]])
    assert found_mask(peaks, 0.25).sum() == 1
    assert found_mask(peaks, 0.25, quantile=0.6).tolist() == [[True, True, True], [False, True, True]]
