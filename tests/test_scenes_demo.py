"""The scenes this package ships run end to end at tiny sizes and write what they promise: non-empty,
non-uniform pictures, videos whose GIF frames have real delays, particle and 3DGS PLYs."""
import imageio.v3 as iio
import numpy as np
import pytest

from scenes.media import gif_delay_ms, gif_durations_ms
from conftest import assert_mp4

TINY_DEMO = ["--frames", "2", "--res", "20", "--width", "64", "--height", "48", "--fps", "24"]


def assert_picture(image: np.ndarray, shape=None) -> None:
    """Something was drawn: not empty, not one flat colour."""
    assert image.size > 0 and image.dtype == np.uint8
    if shape is not None:
        assert image.shape == shape
    assert image.std() > 5 and len(np.unique(image.reshape(-1, image.shape[-1]), axis=0)) > 20


def assert_video(folder, name: str, fps: float, n_frames: int) -> None:
    durations = gif_durations_ms(folder / f"{name}.gif")  # Pillow merges identical frames, adding delays
    assert all(d > 0 for d in durations) and sum(durations) == n_frames * gif_delay_ms(fps)
    assert_mp4(folder / f"{name}.mp4")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, ti_arch):
    from scenes import demo

    out = tmp_path_factory.mktemp("demo")
    result = demo.main(TINY_DEMO + ["--ply", "--out", str(out)])
    return out, result


def test_demo_writes_frames_videos_and_overview(demo_run):
    """Shown to catch: the GIF written with duration in seconds (every delay 0 ms)."""
    out, result = demo_run
    frames = sorted(out.glob("frame_*.png"))
    assert len(frames) == 3 == result["frames"]
    first, last = iio.imread(frames[0]), iio.imread(frames[-1])
    assert_picture(first, (48, 64, 3))
    assert np.abs(first.astype(int) - last.astype(int)).max() > 0  # and it moved
    assert_video(out, "demo", 24, 3)
    assert iio.imread(out / "overview.png").shape == (48, 4 * 64, 3)


def test_demo_writes_particle_and_gaussian_plys(demo_run):
    from render.ply import read_ply

    out, result = demo_run
    plys = sorted(out.glob("particles_*.ply"))
    assert len(plys) == 3
    header = plys[-1].read_bytes().split(b"end_header")[0].decode()
    assert f"element vertex {result['particles']}" in header and "property float x" in header
    splats = read_ply(out / "scene_gaussians.ply")
    assert splats.means.shape[0] > result["particles"]  # the particles and the floor
    assert np.all(np.isfinite(splats.log_scales)) and np.all(np.abs(np.linalg.norm(splats.quats, axis=1) - 1) < 1e-4)


def test_demo_drops_a_downloaded_like_mesh_with_no_options(tmp_path, ti_arch):
    from scenes import ASSETS, demo

    result = demo.main(["--obj", str(ASSETS / "bunny_like.obj"), "--frames", "1", "--res", "32", "--width", "48",
                        "--height", "36", "--out", str(tmp_path)])
    assert result["particles"] > 1000  # bunny and sand block
    assert_picture(iio.imread(tmp_path / "frame_0001.png"))


def test_shape_morph_writes_episode_pictures_and_video(tmp_path, ti_arch):
    from scenes import shape_morph

    result = shape_morph.main(["--res", "16", "--episodes", "1", "--steps", "10", "--stride", "5",
                               "--iterations", "1", "--out", str(tmp_path)])
    assert len(result["episodes"]) == 1
    episodes = sorted(tmp_path.glob("episode_*.png"))
    assert len(episodes) == 2
    assert_picture(iio.imread(episodes[-1]))
    assert_video(tmp_path, "morph", 2, 2)
    assert (tmp_path / "particles_0000.ply").exists() and (tmp_path / "result.json").exists()
