"""scenes.fit_material at a tiny size: the image loss falls, the estimates move from the start
towards the hidden values, and it writes what it promises (folds the old fit_from_images test in)."""
import json

import imageio.v2 as imageio
import pytest

from scenes import fit_material


def test_fit_material_lowers_the_loss_and_writes_curves_video_and_result(tmp_path, ti_arch, capsys):
    """Shown to catch: the optimizer left without the velocity parameter (v0 stays at the start)."""
    result = fit_material.main(["--iters", "4", "--res", "16", "--ppc", "1", "--gaussians", "600",
                                "--size", "32", "24", "--frames", "6", "--every", "3", "--lr", "0.1",
                                "--out", str(tmp_path)])
    assert result["loss"]["last"] < result["loss"]["first"]
    assert result["v0"]["error"] < 0.97  # moved from v0 = 0 (error 100%) towards the hidden velocity
    assert result["E"]["fit"] < result["E"]["start"]  # the start is too stiff; the fit softens it
    saved = json.loads((tmp_path / "result.json").read_text())
    assert saved["E"]["true"] == result["E"]["true"]
    video = imageio.mimread(tmp_path / "fit.gif")
    assert len(video) == 7 and video[0].shape[:2] == (48, 64)  # 2 cameras x (target | fit)
    assert imageio.imread(tmp_path / "curves.png").shape[:2] == (600, 720)
    assert "image loss" in capsys.readouterr().out


def test_missing_mesh_is_one_line_and_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        fit_material.main(["--obj", str(tmp_path / "nope.obj"), "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "mesh not found" in err[0]


@pytest.mark.parametrize("flag, value", [("--lr", "0"), ("--lr-velocity", "-0.1"), ("--lr-end", "0"),
                                         ("--lr-end", "2")])
def test_bad_step_sizes_are_one_line_and_exit_2(tmp_path, capsys, flag, value):
    with pytest.raises(SystemExit) as exit_info:
        fit_material.main([flag, value, "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and flag in err[0]
