"""Every scene writes its pictures through here: PNG frames, an MP4 and a looping GIF with the right timing.

    paths = write_animation(frames, out_dir, "demo", fps=24)   # frame_0000.png ..., demo.mp4, demo.gif

Why one helper: imageio's GIF writer (Pillow plugin) takes ``duration`` in milliseconds, and passing
seconds (``1 / fps``) silently gave every GIF a frame delay of 0. GIF delays are stored in
hundredths of a second and browsers replace delays under 20 ms by 100 ms, so the delay is rounded
to 10 ms and kept at 20 ms or more. The MP4 (H.264 through imageio-ffmpeg, yuv420p so every player
opens it) needs even sides: odd frames are padded by one row / column of their edge pixels.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

GIF_MIN_DELAY_MS = 20  # browsers show shorter GIF delays as 100 ms


def gif_delay_ms(fps: float) -> int:
    """Per-frame GIF delay for ``fps``: a multiple of 10 ms (GIF's unit), at least 20 ms."""
    if not (fps > 0 and np.isfinite(fps)):
        raise ValueError(f"fps must be a positive finite number, got {fps!r}")
    return max(GIF_MIN_DELAY_MS, int(round(100.0 / fps)) * 10)


def _as_uint8_frames(frames: Sequence[np.ndarray]) -> list[np.ndarray]:
    if len(frames) == 0:
        raise ValueError("no frames to write")
    out = []
    for i, frame in enumerate(frames):
        frame = np.asarray(frame)
        if frame.ndim != 3 or frame.shape[2] not in (3, 4) or frame.dtype != np.uint8:
            raise ValueError(f"frame {i} must be an (H, W, 3|4) uint8 image, got {frame.shape} {frame.dtype}")
        if frame.shape != np.shape(frames[0]):
            raise ValueError(f"frame {i} has shape {frame.shape}, frame 0 has {np.shape(frames[0])}")
        out.append(frame[..., :3])
    return out


def write_pngs(frames: Sequence[np.ndarray], folder: Path, prefix: str = "frame", start: int = 0) -> list[Path]:
    """Write ``{prefix}_{i:04d}.png``; returns the paths."""
    import imageio.v3 as iio

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, frame in enumerate(_as_uint8_frames(frames), start):
        path = folder / f"{prefix}_{i:04d}.png"
        iio.imwrite(path, frame)
        paths.append(path)
    return paths


def write_gif(frames: Sequence[np.ndarray], path: Path, fps: float) -> Path:
    """A GIF that loops forever, each frame shown ``gif_delay_ms(fps)`` ms."""
    import imageio.v3 as iio

    iio.imwrite(path, np.stack(_as_uint8_frames(frames)), extension=".gif", plugin="pillow",
                duration=gif_delay_ms(fps), loop=0)
    return Path(path)


def write_mp4(frames: Sequence[np.ndarray], path: Path, fps: float) -> Optional[Path]:
    """An H.264 MP4 at ``fps``; None (and a one-line note) when imageio-ffmpeg is not installed."""
    try:
        import imageio_ffmpeg  # noqa: F401  (the ffmpeg binary imageio's writer runs)
    except ImportError:
        print(f"note: {path} not written: pip install imageio-ffmpeg for MP4 output")
        return None
    import imageio.v2 as imageio

    frames = _as_uint8_frames(frames)
    h, w = frames[0].shape[:2]
    pad = ((0, h % 2), (0, w % 2), (0, 0))
    with imageio.get_writer(path, format="FFMPEG", fps=fps, codec="libx264", pixelformat="yuv420p",
                            macro_block_size=2, output_params=["-movflags", "+faststart"]) as writer:
        for frame in frames:
            writer.append_data(np.pad(frame, pad, mode="edge"))
    return Path(path)


def write_animation(frames: Sequence[np.ndarray], folder: Path, name: str, fps: float,
                    pngs: bool = True, prefix: str = "frame") -> dict[str, object]:
    """PNG frames (optional), ``{name}.mp4`` and ``{name}.gif`` in ``folder``.

    Returns {"pngs": [paths], "mp4": path or None, "gif": path}.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    frames = _as_uint8_frames(frames)
    return {"pngs": write_pngs(frames, folder, prefix) if pngs else [],
            "mp4": write_mp4(frames, folder / f"{name}.mp4", fps),
            "gif": write_gif(frames, folder / f"{name}.gif", fps)}


def gif_durations_ms(path: Path) -> list[int]:
    """The delay of every frame of a GIF in ms, as a viewer reads it (for tests and checks)."""
    from PIL import Image

    durations = []
    with Image.open(path) as image:
        for index in range(getattr(image, "n_frames", 1)):
            image.seek(index)
            durations.append(int(image.info.get("duration", 0)))
    return durations
