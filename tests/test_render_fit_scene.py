"""scenes.fit_gaussians end to end on a tiny budget: the fit improves and its outputs load back."""
import imageio.v3 as iio

from render.ply import read_ply
from scenes.media import gif_durations_ms


def test_fit_improves_psnr_and_writes_outputs(tmp_path):
    from scenes.fit_gaussians import main
    result = main(["--views", "3", "--width", "40", "--height", "30", "--gaussians", "300", "--iters", "40",
                   "--batch", "2", "--orbit-frames", "3", "--out", str(tmp_path)])
    assert result["psnr_final"] > result["psnr_initial"] + 3.0
    renders = iio.imread(tmp_path / "renders.png")
    assert renders.shape == (60, 120, 3) and renders.std() > 5
    fit = read_ply(tmp_path / "fit.ply")
    assert fit.means.shape == (300, 3) and fit.sh_degree == 1
    orbit = iio.imread(tmp_path / "orbit_0002.png")
    assert orbit.shape == (30, 40, 3) and orbit.std() > 5
    assert gif_durations_ms(tmp_path / "orbit.gif") == [80, 80, 80]  # 12 fps


def test_default_output_folder_is_out_fit_gaussians():
    from scenes.fit_gaussians import parser

    assert str(parser().parse_args([]).out) == "out/fit_gaussians"
