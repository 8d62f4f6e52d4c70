"""Interactive viewer: watch a simulation live, rendered by the Gaussian-splatting rasterizer.

    python -m scenes.viewer                       # the demo scene in a Taichi GUI window
    python -m scenes.viewer --mesh bunny.obj
    python -m scenes.viewer --headless 30 --out out/viewer   # no window: 30 frames to PNG

Mouse drag orbits the camera, the wheel (or W/S) zooms, Space pauses, R restarts, P saves a
screenshot, Esc quits. Uses ``ti.GUI``, which needs no Vulkan.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import taichi as ti
import torch

from render.camera import Camera
from scenes import ASSETS
from scenes.demo import build_scene
from scenes.particle_render import body_colors, checker_floor, render_particles


@dataclass
class OrbitCamera:
    """Spherical coordinates around a target, y up."""

    target: tuple = (0.5, 0.25, 0.5)
    azimuth: float = 0.75
    elevation: float = 0.35
    distance: float = 1.8

    def drag(self, dx: float, dy: float) -> None:
        self.azimuth -= 3.0 * dx
        self.elevation = float(np.clip(self.elevation - 3.0 * dy, -1.4, 1.4))

    def zoom(self, factor: float) -> None:
        self.distance = float(np.clip(self.distance * factor, 0.3, 10.0))

    def camera(self, width: int, height: int) -> Camera:
        ce = math.cos(self.elevation)
        offset = (ce * math.sin(self.azimuth), math.sin(self.elevation), ce * math.cos(self.azimuth))
        eye = tuple(t + self.distance * o for t, o in zip(self.target, offset))
        return Camera.look_at(eye, self.target, up=(0.0, 1.0, 0.0), width=width, height=height, fov_y_degrees=40.0)


def to_gui(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8, row 0 at the top -> ti.GUI's (W, H, 3) float, row 0 at the bottom."""
    return np.ascontiguousarray(np.flipud(image).transpose(1, 0, 2), dtype=np.float32) / 255.0


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mesh", type=Path, default=ASSETS / "jelly.obj")
    parser.add_argument("--res", type=int, default=40)
    parser.add_argument("--ppc", type=float, default=8)
    parser.add_argument("--fps", type=float, default=30.0, help="simulated frames per second of sim time")
    parser.add_argument("--size", type=int, nargs=2, default=(640, 480), metavar=("W", "H"))
    parser.add_argument("--headless", type=int, default=0, metavar="N", help="no window: render N frames to --out")
    parser.add_argument("--out", type=Path, default=Path("out/viewer"))
    args = parser.parse_args(argv)
    width, height = args.size

    def reset():
        solver, body = build_scene(args.mesh, args.res, args.ppc)
        colors = torch.as_tensor(body_colors(body), dtype=torch.float32, device=solver.device)
        return solver, colors

    solver, colors = reset()
    radius = 0.5 * solver.dx / args.ppc ** (1 / 3)
    floor = checker_floor(solver.lower[[0, 2]], solver.lower[[0, 2]] + 1.0, height=solver.valid_lower[1],
                          device=solver.device)
    orbit = OrbitCamera()
    gui = ti.GUI("taichi-mpm-splat viewer", res=(width, height), show_gui=args.headless == 0, fast_gui=False)
    args.out.mkdir(parents=True, exist_ok=True)
    paused, dragging, last_cursor, frame = False, False, None, 0
    image = np.zeros((height, width, 3), np.uint8)
    while gui.running:
        for e in gui.get_events():
            if e.key == ti.GUI.ESCAPE and e.type == ti.GUI.PRESS:
                gui.running = False
            elif e.key == ti.GUI.SPACE and e.type == ti.GUI.PRESS:
                paused = not paused
            elif e.key == "r" and e.type == ti.GUI.PRESS:
                solver, colors = reset()
            elif e.key == "p" and e.type == ti.GUI.PRESS:
                gui.set_image(to_gui(image))
                path = args.out / f"screenshot_{frame:05d}.png"
                gui.show(str(path))
                print(f"saved {path}")
            elif e.key in ("w", "s") and e.type == ti.GUI.PRESS:
                orbit.zoom(0.9 if e.key == "w" else 1.1)
            elif e.key == ti.GUI.WHEEL:
                orbit.zoom(0.9 if e.delta[1] > 0 else 1.1)
            elif e.key == ti.GUI.LMB:
                dragging = e.type == ti.GUI.PRESS
                last_cursor = gui.get_cursor_pos()
        if dragging:
            cursor = gui.get_cursor_pos()
            orbit.drag(cursor[0] - last_cursor[0], cursor[1] - last_cursor[1])
            last_cursor = cursor
        if not paused:
            solver.step(1.0 / args.fps)
        ids = solver.particle_ids(as_torch=True).long()
        image = render_particles(solver.positions(as_torch=True), solver.deformation_gradients(as_torch=True),
                                 radius, colors[ids], orbit.camera(width, height), floor=floor)
        gui.set_image(to_gui(image))
        gui.text(f"t = {solver.time:.2f} s  {solver.n_particles} particles  {'paused' if paused else ''}",
                 pos=(0.02, 0.97), color=0x202020)
        frame += 1
        if args.headless:
            gui.show(str(args.out / f"viewer_{frame:04d}.png"))
            if frame >= args.headless:
                break
        else:
            gui.show()


if __name__ == "__main__":
    main()
