"""Small PNG plots for the scenes (PIL only, no plotting library)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw


def plot_loss(losses: Sequence[float], path: Path, label: str, x_label: str = "iterations",
              markers: Sequence[int] = ()) -> None:
    """Log-scale loss curve; ``markers`` are x positions drawn as grey vertical lines (e.g. episode ends)."""
    w, h, pad = 720, 400, 50
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    y = np.log10(np.maximum(np.asarray(losses, dtype=float), 1e-300))
    lo, hi = float(y.min()), float(y.max())
    hi = hi if hi > lo else lo + 1
    to_x = lambda i: pad + (w - 2 * pad) * i / max(len(y) - 1, 1)  # noqa: E731
    ys = h - pad - (h - 2 * pad) * (y - lo) / (hi - lo)
    draw.rectangle([pad, pad, w - pad, h - pad], outline="black")
    for m in markers:
        draw.line([(to_x(m), pad), (to_x(m), h - pad)], fill=(200, 200, 200))
    draw.line([(to_x(i), float(v)) for i, v in enumerate(ys)], fill=(200, 40, 40), width=2)
    draw.text((pad, 10), f"{label} (log10 from {lo:.2f} to {hi:.2f})", fill="black")
    draw.text((pad, h - pad + 10), f"{x_label} 0 .. {len(y) - 1}", fill="black")
    img.save(path)
