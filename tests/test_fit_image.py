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


def ramp(height: int = 6, width: int = 7) -> np.ndarray:
    """A grey ramp in [0, 1], every pixel different."""
    return (np.arange(height * width, dtype=np.float64).reshape(height, width) / (height * width - 1))


@pytest.mark.parametrize("save, atol", [
    (lambda g, p: Image.fromarray((g * 65535).round().astype(np.uint16)).save(p / "deep.png") or p / "deep.png", 0.6 / 65535),
    (lambda g, p: Image.fromarray(g.astype(np.float32)).save(p / "float.tif") or p / "float.tif", 1e-6),
    (lambda g, p: Image.fromarray((g * 255).round().astype(np.uint8)).save(p / "grey.png") or p / "grey.png", 0.5 / 255),
], ids=["16-bit", "float", "8-bit"])
def test_images_of_other_depths_load_to_their_values(tmp_path, save, atol):
    """16-bit greyscale and float TIFFs: PIL's convert("RGB") clipped them at 255 (16-bit: mostly white;
    float: all black), which this caught; 8-bit greyscale for comparison."""
    grey = ramp()
    image = fit_image.load_image(save(grey, tmp_path)).cpu().double()
    assert image.shape == (*grey.shape, 3)
    for c in range(3):
        np.testing.assert_allclose(image[..., c].numpy(), grey, rtol=0, atol=atol)


def test_float_image_outside_unit_range_is_clipped_with_a_warning_and_nan_refused(tmp_path):
    Image.fromarray((ramp() * 3 - 1).astype(np.float32)).save(tmp_path / "hdr.tif")
    with pytest.warns(UserWarning, match="clipped"):
        image = fit_image.load_image(tmp_path / "hdr.tif")
    assert image.min() == 0.0 and image.max() == 1.0
    bad = ramp().astype(np.float32)
    bad[2, 3] = np.nan
    Image.fromarray(bad).save(tmp_path / "nan.tif")
    with pytest.raises(ValueError, match="NaN"):
        fit_image.load_image(tmp_path / "nan.tif")


def test_exif_orientation_is_applied(tmp_path):
    """A phone photo stored sideways with EXIF orientation 6 (turn 90 degrees clockwise to view):
    the fit's target is the photo as viewers show it (failed before exif_transpose)."""
    stored = (ramp(4, 9) * 255).round().astype(np.uint8)
    im = Image.fromarray(stored)
    exif = im.getexif()
    exif[0x0112] = 6
    im.save(tmp_path / "phone.png", exif=exif)
    image = fit_image.load_image(tmp_path / "phone.png").cpu().numpy()[..., 0] * 255
    np.testing.assert_allclose(image, np.rot90(stored, -1), atol=0.5)


def test_ssim_loss_on_a_one_pixel_strip_is_one_line_exit_2(tmp_path, capsys):
    """A 1-pixel-high strip with l1+ssim: pytorch_msssim squeezed the axis away and failed inside
    the first step with "Input images should be 4-d or 5-d tensors" (2026-11-28); now one line naming
    the loss and the size, before any fitting, and l2 fits the same image."""
    path = tmp_path / "strip.png"
    Image.fromarray(np.full((1, 9, 3), 128, np.uint8)).save(path)
    with pytest.raises(SystemExit) as exit_info:
        fit_image.main(["--input", str(path), "--loss", "l1+ssim", "--out", str(tmp_path / "o")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "l1+ssim" in err[0] and "9x1" in err[0], err
    fit_image.main(["--input", str(path), "--loss", "l2", "--num-gaussians", "4", "--iters", "2",
                    "--out", str(tmp_path / "l2")])


def test_fit_refuses_an_unknown_loss_name(photo):
    """fit(loss=...) took any name but 'l2' as l1+ssim."""
    target = fit_image.load_image(photo)
    model = fit_image.GaussianImage.from_image(target, 8)
    with pytest.raises(ValueError, match="loss must be one of"):
        fit_image.fit(model, target, 1, loss="l1")
