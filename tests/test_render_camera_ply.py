"""render.camera (look-at, orbits, Inria and gsplat matrices) and render.ply (3DGS layout round trip)."""
import math

import numpy as np
import pytest
import torch

from render.camera import Camera, stack_cameras
from render.ply import GaussianPly, read_ply, write_ply


def project_with_K(camera, point):
    p = camera.viewmat[:3, :3] @ point + camera.viewmat[:3, 3]
    return torch.stack([camera.fx * p[0] / p[2] + camera.cx, camera.fy * p[1] / p[2] + camera.cy])


def test_look_at_centres_the_target_and_keeps_up_up():
    cam = Camera.look_at((2.0, -3.0, 1.0), (0.1, 0.2, 0.3), (0, 0, 1), 64, 48, 60)
    torch.testing.assert_close(cam.camera_center, torch.tensor([2.0, -3.0, 1.0]), atol=1e-5, rtol=0)
    torch.testing.assert_close(project_with_K(cam, torch.tensor([0.1, 0.2, 0.3])), torch.tensor([32.0, 24.0]),
                               atol=1e-4, rtol=0)
    above = project_with_K(cam, torch.tensor([0.1, 0.2, 0.8]))
    assert above[1] < 24.0, "a point above the target must appear higher in the image (smaller y)"
    R = cam.viewmat[:3, :3]
    torch.testing.assert_close(R @ R.T, torch.eye(3), atol=1e-6, rtol=0)
    assert math.isclose(cam.fy, 0.5 * 48 / math.tan(math.radians(30)), rel_tol=1e-6)
    with pytest.raises(ValueError, match="parallel"):
        Camera.look_at((0, 0, 2), (0, 0, 0), (0, 0, 1))


def test_orbit_cameras_circle_the_target():
    cams = Camera.orbit(6, radius=4.0, elevation_degrees=30, target=(1.0, 0.0, 0.0), width=32, height=24)
    assert len(cams) == 6
    for cam in cams:
        assert math.isclose(float((cam.camera_center - torch.tensor([1.0, 0.0, 0.0])).norm()), 4.0, rel_tol=1e-5)
        assert math.isclose(float(cam.camera_center[2]), 4.0 * math.sin(math.radians(30)), rel_tol=1e-5)
        torch.testing.assert_close(project_with_K(cam, torch.tensor([1.0, 0.0, 0.0])), torch.tensor([16.0, 12.0]),
                                   atol=1e-4, rtol=0)


def test_inria_matrices_project_like_K():
    """Inria maps p to pixel ((ndc + 1) * W - 1) / 2 with ndc from p_hom @ projmatrix; pixel centres
    sit at integers there and at +0.5 here."""
    cam = Camera.look_at((0.5, -2.0, 0.7), (0, 0, 0), (0, 0, 1), 50, 30, 45)
    cam.cx += 4.0
    cam.cy -= 2.0
    points = torch.tensor([[0.1, 0.2, -0.1], [-0.3, 0.1, 0.2], [0.0, 0.0, 0.0]])
    hom = torch.cat([points, torch.ones(3, 1)], 1) @ cam.inria_projmatrix
    ndc = hom[:, :2] / hom[:, 3:]
    inria_pixels = ((ndc + 1) * torch.tensor([50.0, 30.0]) - 1) / 2
    for p, inria in zip(points, inria_pixels):
        torch.testing.assert_close(inria + 0.5, project_with_K(cam, p), atol=1e-4, rtol=0)
    view = torch.cat([points, torch.ones(3, 1)], 1) @ cam.inria_viewmatrix
    torch.testing.assert_close(view[:, :3], points @ cam.viewmat[:3, :3].T + cam.viewmat[:3, 3])
    assert math.isclose(cam.tanfovx, 25.0 / cam.fx)


def test_stack_cameras():
    cams = Camera.orbit(3, 2.0, width=20, height=10)
    viewmats, Ks = stack_cameras(cams)
    assert viewmats.shape == (3, 4, 4) and Ks.shape == (3, 3, 3) and viewmats.dtype == torch.float32
    with pytest.raises(ValueError, match="image size"):
        stack_cameras([cams[0], Camera.look_at((2, 0, 0), width=21, height=10)])


@pytest.mark.parametrize("degree, n", [(0, 17), (1, 17), (2, 17), (3, 17), (3, 0)])
def test_ply_round_trip(tmp_path, degree, n):
    """Every field survives write/read bit for bit, an empty set (n = 0) too."""
    rng = np.random.default_rng(degree)
    bases = (degree + 1) ** 2
    g = GaussianPly(*(rng.normal(size=s).astype(np.float32) for s in ((n, 3), (n, bases, 3), (n,), (n, 3), (n, 4))))
    write_ply(tmp_path / "g.ply", g)
    back = read_ply(tmp_path / "g.ply")
    assert back.sh_degree == degree
    for field in ("means", "sh", "opacity_logits", "log_scales", "quats"):
        np.testing.assert_array_equal(getattr(back, field), getattr(g, field))
    act = back.activated()
    np.testing.assert_allclose(np.linalg.norm(act["quats"], axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(act["opacities"], 1 / (1 + np.exp(-g.opacity_logits)), rtol=1e-6)


def test_ply_reads_the_inria_layout(tmp_path):
    """A file laid out as Inria's save_ply writes it (f_rest channel-major) loads with the right SH."""
    n, rest = 5, 15
    sh = np.arange(n * 16 * 3, dtype=np.float32).reshape(n, 16, 3)
    names = (["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"] + [f"f_rest_{i}" for i in range(3 * rest)]
             + ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"])
    features_rest = sh[:, 1:, :].transpose(0, 2, 1).reshape(n, -1)  # Inria: (N, 3, 15) flattened
    data = np.concatenate([np.zeros((n, 6)), sh[:, 0], features_rest, np.zeros((n, 8))], 1).astype("<f4")
    data[:, -4] = 1.0
    header = f"ply\nformat binary_little_endian 1.0\nelement vertex {n}\n"
    header += "".join(f"property float {name}\n" for name in names) + "end_header\n"
    (tmp_path / "inria.ply").write_bytes(header.encode() + data.tobytes())
    g = read_ply(tmp_path / "inria.ply")
    np.testing.assert_array_equal(g.sh, sh)
    assert g.sh_degree == 3
    write_ply(tmp_path / "ours.ply", g)
    assert (tmp_path / "ours.ply").read_bytes() == (tmp_path / "inria.ply").read_bytes()


def test_ply_errors(tmp_path):
    (tmp_path / "x.ply").write_bytes(b"ply\nformat ascii 1.0\nelement vertex 0\nend_header\n")
    with pytest.raises(ValueError, match="binary"):
        read_ply(tmp_path / "x.ply")
    (tmp_path / "y.ply").write_bytes(b"not a ply")
    with pytest.raises(ValueError, match="not a PLY"):
        read_ply(tmp_path / "y.ply")
