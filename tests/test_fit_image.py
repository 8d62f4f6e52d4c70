"""scenes.fit_image from the command line: a tiny fit writes every output and improves the PSNR, the
saved Gaussians render at twice the size, and user errors (a file that is not an image, a missing
file) give one line on stderr and exit status 2.

Breakage seen caught (2026-11-27): the first compact file clamped saved positions into the image,
which moved the Gaussians fitted just outside it: test_fit_writes_outputs_and_renders_at_scale failed
(38.0 dB fitted, 29.2 dB from the file) until the file kept a margin around the image.
"""
import json

import numpy as np
import pytest
from PIL import Image

from scenes import fit_image


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    y, x = np.mgrid[0:19, 0:23]
    rgb = np.stack([x / 22, y / 18, 0.5 + 0.4 * np.sin(x / 3.0) * np.cos(y / 4.0)], -1)
    path = tmp_path_factory.mktemp("img") / "photo.png"
    Image.fromarray((rgb * 255).astype(np.uint8)).save(path)
    return path


@pytest.mark.parametrize("extra", [[], ["--grow", "--mode", "alpha"]])
def test_fit_writes_outputs_and_renders_at_scale(photo, tmp_path, capsys, extra):
    out = tmp_path / "fit"
    fit_image.main(["--input", str(photo), "--num-gaussians", "60", "--iters", "40", "--out", str(out),
                    "--loss", "l1+ssim", "--lr", "0.02", *extra])
    summary = json.loads((out / "fit.json").read_text())
    assert summary["num_gaussians"] == 60  # grown from 15 in the first half of the run
    assert (summary["log"]["gaussians"][0] < 60) == bool(extra)
    assert summary["psnr"] > summary["log"]["psnr"][0] + 1.0, "fitting should improve the PSNR"
    assert abs(summary["psnr_compact_file"] - summary["psnr"]) < 1.0
    for name in ("reconstruction.png", "comparison.png", "psnr.png", "gaussians.npz"):
        assert (out / name).stat().st_size > 0, name
    with Image.open(out / "reconstruction.png") as im:
        assert im.size == (23, 19)
    fit_image.main(["--render", str(out / "gaussians.npz"), "--scale", "2", "--out", str(tmp_path / "r")])
    with Image.open(tmp_path / "r" / "render_x2.png") as im:
        assert im.size == (46, 38)


@pytest.mark.parametrize("make, match", [
    (lambda d: (d / "notes.png").write_text("not a picture") and d / "notes.png", "not an image"),
    (lambda d: d / "missing.png", "not found"),
])
def test_not_an_image_is_one_line_exit_2(tmp_path, capsys, make, match):
    path = make(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        fit_image.main(["--input", str(path), "--out", str(tmp_path / "o")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0]


def test_render_of_a_non_gaussian_file_is_exit_2(photo, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        fit_image.main(["--render", str(photo), "--out", str(tmp_path / "o")])
    assert exit_info.value.code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1
