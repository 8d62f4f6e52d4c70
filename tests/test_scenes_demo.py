"""The README's demo and the viewer run end to end (tiny sizes) and write what they promise."""
import imageio.v2 as imageio
import numpy as np

from scenes import demo, viewer


def test_demo_writes_frames_gif_and_overview(tmp_path, ti_arch):
    demo.main(["--frames", "2", "--res", "16", "--size", "64", "48", "--out", str(tmp_path)])
    frames = sorted(tmp_path.glob("frame_*.png"))
    assert len(frames) == 3
    first, last = imageio.imread(frames[0]), imageio.imread(frames[-1])
    assert first.shape == (48, 64, 3)
    assert first.std() > 5  # something was drawn on the background
    assert np.abs(first.astype(int) - last.astype(int)).max() > 0  # and it moved
    assert (tmp_path / "demo.gif").stat().st_size > 0
    assert imageio.imread(tmp_path / "overview.png").shape == (48, 4 * 64, 3)


def test_viewer_runs_headless(tmp_path, ti_arch):
    viewer.main(["--headless", "2", "--res", "16", "--size", "64", "48", "--out", str(tmp_path)])
    shots = sorted(tmp_path.glob("viewer_*.png"))
    assert len(shots) == 2
    assert imageio.imread(shots[-1]).std() > 5


def test_orbit_camera_drag_and_zoom_stay_in_range():
    orbit = viewer.OrbitCamera()
    for _ in range(50):
        orbit.drag(0.0, 1.0)
        orbit.zoom(0.5)
    assert -1.4 <= orbit.elevation <= 1.4 and orbit.distance >= 0.3
    cam = orbit.camera(64, 48)
    eye = cam.camera_center
    assert np.isfinite(eye.numpy()).all()


def test_fit_from_images_lowers_the_image_loss(tmp_path, ti_arch, capsys):
    from scenes import fit_from_images

    fit_from_images.main(["--iters", "4", "--res", "16", "--duration", "0.1", "--size", "48", "36",
                          "--out", str(tmp_path)])
    out = capsys.readouterr().out
    first, last = (float(v) for v in out.split("image loss ")[1].split()[0:3:2])
    assert last < first
    assert (tmp_path / "fit.png").exists() and (tmp_path / "loss.png").exists()
