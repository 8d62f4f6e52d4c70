"""scenes.fit_gaussians end to end on a tiny budget: the fit improves and its outputs load back."""
from render.ply import read_ply


def test_fit_improves_psnr_and_writes_outputs(tmp_path):
    from scenes.fit_gaussians import main
    result = main(["--views", "3", "--width", "40", "--height", "30", "--gaussians", "300", "--iters", "40",
                   "--batch", "2", "--out", str(tmp_path)])
    assert result["psnr_final"] > result["psnr_initial"] + 3.0
    assert (tmp_path / "renders.png").stat().st_size > 0
    fit = read_ply(tmp_path / "fit.ply")
    assert fit.means.shape == (300, 3) and fit.sh_degree == 1
