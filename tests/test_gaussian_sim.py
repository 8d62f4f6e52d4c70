"""Simulating 3DGS scenes: interior fill, SH rotation, advection, PLY export, bad input, the scene."""
import math

import numpy as np
import pytest
import torch

from bridge.gaussian_sim import (Splats, advect_splats, bind_splats, fill_splats, polar_rotation,
                                 rotate_sh, splats_from_ply, splats_to_ply)
from bridge.surface import upper_triangle
from render.ply import GaussianPly, read_ply, write_ply
from render.reference import sh_basis
from taichi_mpm.gaussian_fill import fill_gaussians, inside_by_ray_crossings
from taichi_mpm.runtime import device
from taichi_mpm.sampling import EmptyVolumeError


def sphere_shell(n=3000, radius=0.1, center=(0.5, 0.5, 0.5), seed=0, degree=1):
    """A trained-looking splat sphere: flat Gaussians tangent to the surface, random SH."""
    rng = np.random.default_rng(seed)
    normals = rng.normal(size=(n, 3))
    normals /= np.linalg.norm(normals, axis=1, keepdims=True)
    means = np.asarray(center) + radius * normals
    # rotation taking z to the normal: quaternion of the half-way vector
    z = np.array([0.0, 0.0, 1.0])
    half = normals + z
    half /= np.linalg.norm(half, axis=1, keepdims=True)
    quats = np.concatenate([(half @ z)[:, None], np.cross(z, half)], 1)
    spacing = radius * math.sqrt(4 * math.pi / n)
    log_scales = np.log(np.tile([spacing, spacing, 0.1 * spacing], (n, 1)))
    sh = rng.normal(scale=0.3, size=(n, (degree + 1) ** 2, 3))
    return GaussianPly(means.astype(np.float32), sh.astype(np.float32), np.full(n, 3.0, np.float32),
                       log_scales.astype(np.float32), quats.astype(np.float32))


def test_fill_puts_particles_inside_the_shell_with_the_right_volume(ti_arch):
    """Shown to catch: counting ray crossings per shell cell instead of per run (the thick shell
    then reads as an even number of walls and the inside stays empty)."""
    splats = splats_from_ply(sphere_shell(), torch.float64)
    points = fill_splats(splats, 0.01)
    r = np.linalg.norm(points - 0.5, axis=1)
    assert r.max() < 0.1 + 0.03
    # the fill is the inside plus the shell cells, which straddle the surface: between the sphere's
    # volume and that of a sphere 1.5 cells larger (measured: 1.41x the sphere's)
    volume = len(points) * 0.01 ** 3
    assert 4 / 3 * math.pi * 0.1 ** 3 < volume < 4 / 3 * math.pi * 0.115 ** 3, volume
    inner = np.sum(r < 0.05)
    assert inner > 0.8 * (4 / 3 * math.pi * 0.05 ** 3) / 0.01 ** 3  # the middle is filled, not only the shell


def test_ray_crossings_on_a_hollow_box():
    shell = np.zeros((9, 9, 9), bool)
    shell[2:7, 2:7, 2:7] = True
    shell[3:6, 3:6, 3:6] = False
    inside = inside_by_ray_crossings(shell)
    assert inside[3:6, 3:6, 3:6].all() and inside.sum() == 27
    open_top = shell.copy()
    open_top[3:6, 6, 3:6] = False  # a hole: 5 of 6 rays still vote inside for most cells
    assert inside_by_ray_crossings(open_top, min_votes=4)[4, 4, 4]


def test_bad_splat_input_is_a_clear_error(ti_arch):
    ply = sphere_shell(50)
    empty = GaussianPly(*(a[:0] for a in (ply.means, ply.sh, ply.opacity_logits, ply.log_scales, ply.quats)))
    with pytest.raises(ValueError, match="zero Gaussians"):
        splats_from_ply(empty)
    bad = sphere_shell(50)
    bad.means[3, 1] = np.nan
    with pytest.raises(ValueError, match="means contain NaN"):
        splats_from_ply(bad)
    with pytest.raises(ValueError, match="no Gaussians"):
        fill_gaussians(np.zeros((0, 3)), np.zeros((0, 3, 3)), np.zeros(0), 0.01)
    with pytest.raises(EmptyVolumeError):
        fill_gaussians(ply.means, np.tile(np.eye(3) * 1e-4, (50, 1, 1)), np.full(50, 0.01), 0.01)
    with pytest.raises(ValueError, match="spacing"):
        fill_gaussians(ply.means, np.tile(np.eye(3) * 1e-4, (50, 1, 1)), np.full(50, 0.9), 0.0)


def test_polar_rotation_and_sh_rotation_are_exact():
    """SH_{c'}(d) = SH_c(R^T d) for degree 3. Shown to catch: rotating by R instead of R^T."""
    g = torch.Generator().manual_seed(0)
    F = torch.eye(3, dtype=torch.float64) + 0.3 * torch.randn(6, 3, 3, generator=g, dtype=torch.float64)
    R = polar_rotation(F)
    U, _, Vh = torch.linalg.svd(F)
    assert torch.allclose(R, U @ Vh, atol=1e-12)
    sh = torch.randn(6, 16, 3, generator=g, dtype=torch.float64)
    rotated = rotate_sh(sh, R)
    d = torch.nn.functional.normalize(torch.randn(6, 3, generator=g, dtype=torch.float64), dim=1)
    seen = (sh_basis(d, 3)[:, :, None] * rotated).sum(1)
    expected = (sh_basis(torch.einsum("ni,nij->nj", d, R), 3)[:, :, None] * sh).sum(1)
    assert torch.allclose(seen, expected, atol=1e-12)
    assert torch.allclose(rotated[:, 0], sh[:, 0])  # the DC term does not turn


def test_advection_follows_rigid_motion_and_gradients_check(ti_arch):
    """A rigid rotation + translation of the particles turns every splat with it: means, covariances
    and view-dependent colour. gradcheck on x and F (float64), each on its own."""
    dev = device()
    splats = splats_from_ply(sphere_shell(40, degree=2), torch.float64, dev)
    x_rest = torch.as_tensor(fill_splats(splats, 0.02), dtype=torch.float64, device=dev)
    binding = bind_splats(splats, x_rest, neighbours=3)
    c, s = math.cos(0.4), math.sin(0.4)
    R = torch.tensor([[c, -s, 0], [s, c, 0], [0, 0, 1]], dtype=torch.float64, device=dev)
    shift = torch.tensor([0.01, -0.02, 0.03], dtype=torch.float64, device=dev)
    x = (x_rest - 0.5) @ R.T + 0.5 + shift
    F = R.expand(len(x_rest), 3, 3).contiguous()
    means, covars, opac, sh = advect_splats(x, F, splats, binding, dtype=torch.float64)
    assert torch.allclose(means, (splats.means - 0.5) @ R.T + 0.5 + shift, atol=1e-12)
    assert torch.allclose(covars, upper_triangle(R @ splats.cov @ R.T), atol=1e-12)
    d = torch.nn.functional.normalize(torch.tensor([[0.3, -0.2, 0.9]], dtype=torch.float64, device=dev), dim=1)
    assert torch.allclose((sh_basis(d, 2)[:, :, None] * sh).sum(1),
                          (sh_basis(d @ R, 2)[:, :, None] * splats.sh).sum(1), atol=1e-10)
    # gradients: 4 splats bound to 6 particles, so that gradcheck's Jacobians stay small
    small = Splats(splats.means[:4], splats.cov[:4], splats.opacities[:4], splats.sh[:4])
    g = torch.Generator().manual_seed(1)
    x6 = splats.means[:4].mean(0) + 0.05 * torch.randn(6, 3, generator=g, dtype=torch.float64).to(dev)
    sb = bind_splats(small, x6, neighbours=3)
    F6 = (torch.eye(3, dtype=torch.float64) + 0.1 * torch.randn(6, 3, 3, generator=g, dtype=torch.float64)).to(dev)
    for wrt in ("x", "F"):
        def fn(t):
            out = advect_splats(t if wrt == "x" else x6, t if wrt == "F" else F6, small, sb, dtype=torch.float64)
            return out[0], out[1], out[3]
        assert torch.autograd.gradcheck(fn, ((x6 if wrt == "x" else F6).clone().requires_grad_(True),))


def test_ply_export_round_trips(tmp_path, ti_arch):
    splats = splats_from_ply(sphere_shell(30), torch.float64)
    write_ply(tmp_path / "f.ply", splats_to_ply(splats.means, upper_triangle(splats.cov), splats.opacities, splats.sh))
    back = splats_from_ply(read_ply(tmp_path / "f.ply"), torch.float64)
    assert torch.allclose(back.cov, splats.cov, rtol=1e-4, atol=1e-10)
    assert torch.allclose(back.means, splats.means, atol=1e-6)
    assert torch.allclose(back.opacities, splats.opacities, atol=1e-6)


def test_simulate_3dgs_scene_writes_ply_frames_that_read_back(tmp_path, ti_arch):
    from scenes import simulate_3dgs

    write_ply(tmp_path / "in.ply", sphere_shell(1500, radius=0.3))
    simulate_3dgs.main(["--ply", str(tmp_path / "in.ply"), "--frames", "3", "--res", "16", "--width", "64",
                        "--out", str(tmp_path / "out")])
    frames = sorted((tmp_path / "out").glob("frame_*.ply"))
    assert len(frames) == 4
    first, last = read_ply(frames[0]), read_ply(frames[-1])
    assert first.means.shape == (1500, 3) and first.sh.shape == (1500, 4, 3)
    assert last.means[:, 1].mean() < first.means[:, 1].mean() - 0.01  # it fell
    assert (tmp_path / "out" / "preview.gif").stat().st_size > 0


def test_simulate_3dgs_rejects_an_empty_ply(tmp_path, ti_arch, capsys):
    from scenes import simulate_3dgs

    fields = ["x", "y", "z", "f_dc_0", "f_dc_1", "f_dc_2", "opacity", "scale_0", "scale_1", "scale_2",
              "rot_0", "rot_1", "rot_2", "rot_3"]
    header = "ply\nformat binary_little_endian 1.0\nelement vertex 0\n"
    (tmp_path / "empty.ply").write_bytes((header + "".join(f"property float {f}\n" for f in fields)
                                          + "end_header\n").encode())
    with pytest.raises(SystemExit) as exit_info:
        simulate_3dgs.main(["--ply", str(tmp_path / "empty.ply"), "--out", str(tmp_path / "o")])
    assert exit_info.value.code == 2 and "zero Gaussians" in capsys.readouterr().err


@pytest.mark.parametrize("args, match", [(["--E", "-1"], "E must lie"), (["--nu", "0.5"], "nu must lie"),
                                         (["--velocity", "nan", "0", "0"], "--velocity"),
                                         (["--width", "1"], "--width"), (["--size", "0"], "--size")])
def test_simulate_3dgs_checks_its_arguments_before_making_the_input(tmp_path, ti_arch, capsys, args, match):
    """Bad material or scene arguments are one line and status 2 before the default input PLY is
    made from --obj: E=-1 or a NaN velocity used to fail only after input.ply was written
    (2026-11-28)."""
    from scenes import simulate_3dgs

    with pytest.raises(SystemExit) as exit_info:
        simulate_3dgs.main([*args, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and match in err[0], err
    assert not (tmp_path / "o" / "input.ply").exists()
