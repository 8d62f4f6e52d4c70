"""One command-line shape: user errors are one line and status 2, the registry lists every scene,
progress bars end at 100% or say why, and the media helper writes real frame delays."""
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from scenes.__main__ import discover
from scenes.cli import mesh_fit, progress, run, scene_parser
from scenes.media import gif_delay_ms, gif_durations_ms, write_animation
from conftest import assert_mp4

ROOT = Path(__file__).resolve().parents[1]


def run_scene(*args, env=None):
    """Run ``python -m <args>`` from the repository root; returns (status, stdout, stderr lines)."""
    environment = dict(os.environ, **(env or {}))
    environment.setdefault("TAICHI_MPM_ARCH", "cpu")
    done = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=environment, capture_output=True,
                          text=True, timeout=300)
    return done.returncode, done.stdout, [line for line in done.stderr.splitlines() if line.strip()]


# ----------------------------------------------------------------------------- user errors
@pytest.mark.parametrize("scene", ["scenes.demo", "scenes.viewer"])
def test_missing_mesh_is_one_line_and_status_2(scene, tmp_path):
    """Shown to catch: run() re-raising the error (a 15-line traceback, status 1)."""
    missing = tmp_path / "no_such_bunny.obj"
    args = ["--obj", str(missing)] if scene == "scenes.demo" else [str(missing), "--offscreen"]
    status, _, err = run_scene(scene, *args, "--out", str(tmp_path / "out"))
    assert status == 2
    assert len(err) == 1 and err[0].startswith(f"python -m {scene}: error:") and "not found" in err[0], err


def test_unreadable_mesh_is_one_line_and_status_2(tmp_path):
    garbage = tmp_path / "bunny.obj"
    garbage.write_bytes(b"\x00\x01 this is not a mesh \xff" * 10)
    status, _, err = run_scene("scenes.demo", "--obj", str(garbage), "--out", str(tmp_path / "out"))
    assert status == 2 and len(err) == 1 and "error:" in err[0], err
    status, _, err = run_scene("scenes.demo", "--obj", str(tmp_path), "--out", str(tmp_path / "out"))
    assert status == 2 and len(err) == 1 and "not a file" in err[0], err
    if os.geteuid() != 0:  # root reads everything
        locked = tmp_path / "locked.obj"
        locked.write_text("v 0 0 0\n")
        locked.chmod(0)
        status, _, err = run_scene("scenes.demo", "--obj", str(locked), "--out", str(tmp_path / "out"))
        assert status == 2 and len(err) == 1 and "not readable" in err[0], err


def test_flat_mesh_is_one_line_and_status_2(tmp_path):
    """A mesh with no interior (a square): the sampler's EmptyVolumeError, a ValueError from our own
    taichi_mpm package, was taken for one of Taichi's compile errors (module name starting with
    "taichi") and shown as a traceback with status 1; this caught it."""
    flat = tmp_path / "square.obj"
    flat.write_text("v 0 0 0\nv 1 0 0\nv 1 1 0\nv 0 1 0\nf 1 2 3\nf 1 3 4\n")
    status, _, err = run_scene("scenes.demo", "--obj", str(flat), "--out", str(tmp_path / "out"))
    assert status == 2 and len(err) == 1 and "encloses no volume" in err[0], err


def test_unstable_simulation_and_pair_cap_are_one_line_and_status_2(tmp_path, capsys):
    """SimulationError (a RuntimeError) and TooManyPairsError say what to change; run() let both out
    as tracebacks with status 1, which this caught."""
    from render.binning import TooManyPairsError
    from taichi_mpm.solver import SimulationError

    for error in (SimulationError("substep 7: 3 particles have NaN/Inf state"), TooManyPairsError("too many pairs")):
        def body(args, error=error):
            raise error
        with pytest.raises(SystemExit) as stop:
            run(scene_parser("check", "A scene that fails."), ["--out", str(tmp_path / "o")], body)
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert stop.value.code == 2 and len(err) == 1 and str(error) in err[0], err


def test_debug_shows_the_traceback(tmp_path):
    status, _, err = run_scene("scenes.demo", "--obj", str(tmp_path / "missing.obj"), "--debug")
    assert status == 1 and any("Traceback" in line for line in err)


def test_viewer_without_display_says_so_in_one_line(tmp_path):
    env = {"DISPLAY": "", "WAYLAND_DISPLAY": ""}
    status, _, err = run_scene("scenes.viewer", "--out", str(tmp_path), env=env)
    assert status == 2 and len(err) == 1 and "--offscreen" in err[0] and "display" in err[0], err


def test_every_scene_has_the_shared_options():
    from scenes import demo, fit_gaussians, shape_morph, viewer

    for module in (demo, fit_gaussians, shape_morph, viewer):
        parser = module.parser()
        options = {o for action in parser._actions for o in action.option_strings}
        assert {"--arch", "--out", "--seed", "--debug", "--help"} <= options, module.__name__
        assert parser.parse_args([]).out == Path("out") / module.__name__.split(".")[-1]
    assert "--frames" in {o for a in demo.parser()._actions for o in a.option_strings}


# ----------------------------------------------------------------------------- registry
def test_registry_lists_scenes_one_line_each():
    status, out, _ = run_scene("scenes")
    assert status == 0
    lines = out.splitlines()
    for name in ("demo", "viewer", "fit_gaussians", "shape_morph"):
        assert any(line.split()[:1] == [name] and len(line.split()) > 3 for line in lines), name
    assert not any(line.split()[:1] in (["cli"], ["media"], ["plots"]) for line in lines)


def test_registry_finds_a_new_scene_without_a_list(tmp_path):
    (tmp_path / "my_scene.py").write_text('"""My scene: does a thing.\n\nMore."""\ndef main(argv=None):\n    pass\n')
    (tmp_path / "helper.py").write_text('"""Not a scene."""\nX = 1\n')
    assert discover(tmp_path) == {"my_scene": "My scene: does a thing."}


# ----------------------------------------------------------------------------- progress, mesh placement
def test_progress_ends_at_100_percent_or_says_why():
    """Shown to catch: a bar left at 4/10 when the work converged early."""
    stream = io.StringIO()
    with progress(10, "fit", file=stream) as bar:
        for _ in range(4):
            bar.update()
        bar.stop("converged")
    assert bar.n == bar.total == 4 and "done: converged" in stream.getvalue()
    stream = io.StringIO()
    with pytest.raises(RuntimeError):
        with progress(10, "fit", file=stream) as bar:
            bar.update()
            raise RuntimeError("blew up")
    assert "stopped: RuntimeError" in stream.getvalue()
    stream = io.StringIO()
    with progress(10, "fit", file=stream) as bar:
        bar.update(3)
    assert "stopped after 3 of 10" in stream.getvalue()


def test_mesh_fit_reads_size_or_scale():
    parser = scene_parser("x", None, obj=Path("a.obj"), fit_size=0.3)
    fit = mesh_fit(parser.parse_args([]), (0.5, 0.5, 0.5))["fit"]
    assert fit.center == (0.5, 0.5, 0.5) and fit.size == 0.3
    placed = mesh_fit(parser.parse_args(["--scale", "0.01"]), (0.5, 0.4, 0.5))
    assert placed["scale"] == 0.01 and placed["fit"].size is None
    with pytest.raises(SystemExit):  # one or the other
        parser.parse_args(["--scale", "2", "--size", "0.3"])
    with pytest.raises(ValueError, match="--size"):
        mesh_fit(parser.parse_args(["--size", "-1"]), (0.5, 0.5, 0.5))


# ----------------------------------------------------------------------------- media
def test_gif_delays_are_real_and_the_gif_loops(tmp_path):
    """Shown to catch: duration passed in seconds (1 / fps), which Pillow reads as 0 ms."""
    from PIL import Image

    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 255, (31, 45, 3), dtype=np.uint8) for _ in range(4)]  # odd sides: MP4 pads
    written = write_animation(frames, tmp_path, "clip", fps=24)
    assert [p.name for p in written["pngs"]] == [f"frame_{i:04d}.png" for i in range(4)]
    assert gif_durations_ms(written["gif"]) == [40] * 4
    with Image.open(written["gif"]) as gif:
        assert gif.info.get("loop") == 0  # forever
    import imageio.v2 as imageio

    if written["mp4"] is None:  # no imageio-ffmpeg (the GPU machine): the note, no file
        assert_mp4(tmp_path / "clip.mp4")
        return
    with imageio.get_reader(written["mp4"]) as reader:
        assert reader.get_meta_data()["fps"] == pytest.approx(24)
        assert reader.count_frames() == 4


def test_gif_delay_rounding():
    assert gif_delay_ms(24) == 40 and gif_delay_ms(2) == 500 and gif_delay_ms(30) == 30
    assert gif_delay_ms(100) == 20  # browsers slow delays under 20 ms down to 100 ms
    with pytest.raises(ValueError):
        gif_delay_ms(0)
