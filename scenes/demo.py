"""Demo: a jelly mesh thrown onto a block of sand, simulated with MLS-MPM and rendered with Gaussian splatting.

    python -m scenes.demo                       # out/demo/: frame_*.png, demo.mp4, demo.gif, overview.png
    python -m scenes.demo --obj bunny.obj       # any mesh trimesh reads: centred and sized into the box
    python -m scenes.demo --obj part.stl --scale 0.001 --frames 96 --res 64 --ply

The mesh's bounding box is centred at the drop point and its largest side set to ``--size`` (m),
whatever its units and origin; ``--scale`` keeps its own units times a factor instead. ``--ply``
also writes the particles of every frame (particles_*.ply: position, velocity, material, id) and the
last rendered scene as a 3DGS PLY (scene_gaussians.ply) that splat viewers open.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from scenes import ASSETS
from scenes.cli import mesh_fit, progress, run, scene_parser
from scenes.media import write_animation
from scenes.particle_render import (body_colors, checker_floor, default_camera, gaussians_to_ply, render_gaussians,
                                    scene_gaussians)
from taichi_mpm import Elastic, MPMSolver, Sand

DROP_POINT = (0.38, 0.5, 0.5)  # where the jelly's bounding box is centred
JELLY_SIZE = 0.24  # its largest side [m]


def build_scene(mesh: Path, res: int, particles_per_cell: float, placement: Optional[dict] = None,
                ) -> tuple[MPMSolver, np.ndarray]:
    """The solver with its bodies, and the body index of every particle (by particle id).

    placement: add_mesh keywords placing the mesh (default: centred at DROP_POINT, largest side JELLY_SIZE).
    """
    solver = MPMSolver(res=res, boundary="slip", friction=0.4)
    floor = float(solver.valid_lower[1])  # particles must stay a cell inside the box
    placement = placement or {"fit": (DROP_POINT, JELLY_SIZE)}
    counts = [
        solver.add_mesh(mesh, Elastic(E=2e4, nu=0.3, density=1000.0), particles_per_cell,
                        velocity=(0.6, -0.5, 0.0), **placement),
        solver.add_cube((0.5, floor + 0.005, 0.32), (0.3, 0.2, 0.36), Sand(E=1e5, density=1600.0), particles_per_cell),
    ]
    return solver, np.repeat(np.arange(len(counts)), counts)


def parser():
    p = scene_parser("demo", __doc__, frames=48, obj=ASSETS / "jelly.obj", fit_size=JELLY_SIZE)
    p.add_argument("--fps", type=float, default=24.0, help="frames per second of simulated time and of the video")
    p.add_argument("--res", type=int, default=40, help="grid cells along the box side")
    p.add_argument("--ppc", type=float, default=8, help="particles per grid cell")
    p.add_argument("--width", type=int, default=480, help="image width [px]")
    p.add_argument("--height", type=int, default=360, help="image height [px]")
    p.add_argument("--ply", action="store_true", help="also write particles_*.ply per frame and scene_gaussians.ply")
    return p


def body(args) -> dict:
    start = time.perf_counter()
    if args.fps <= 0 or args.width < 8 or args.height < 8:
        raise ValueError("--fps must be > 0 and --width / --height at least 8 pixels")
    solver, bodies = build_scene(args.obj, args.res, args.ppc, mesh_fit(args, DROP_POINT))
    camera = default_camera(args.width, args.height)
    radius = 0.5 * solver.dx / args.ppc ** (1 / 3)
    floor = checker_floor(solver.lower[[0, 2]], solver.lower[[0, 2]] + 1.0, height=solver.valid_lower[1],
                          device=solver.device)
    colors_by_id = torch.as_tensor(body_colors(bodies), dtype=torch.float32, device=solver.device)
    print(f"{solver.n_particles} particles ({np.bincount(bodies).tolist()} per body), grid {solver.grid_shape}, "
          f"Taichi on {solver.device}")

    frames, substeps, loop_start = [], 0, time.perf_counter()
    with progress(args.frames + 1, "simulate+render", unit="frame") as bar:
        for frame in range(args.frames + 1):
            if frame:
                substeps += solver.step(1.0 / args.fps)
            ids = solver.particle_ids(as_torch=True).long()
            g = scene_gaussians(solver.positions(as_torch=True), solver.deformation_gradients(as_torch=True),
                                radius, colors_by_id[ids], floor)
            frames.append(render_gaussians(g, camera))
            if args.ply:
                solver.export_ply(args.out / f"particles_{frame:04d}.ply")
            bar.update()
    loop_seconds = time.perf_counter() - loop_start

    from render.ply import write_ply

    written = write_animation(frames, args.out, "demo", args.fps)
    if args.ply:
        write_ply(args.out / "scene_gaussians.ply", gaussians_to_ply(g))
    picks = np.linspace(0, len(frames) - 1, 4).round().astype(int)
    import imageio.v3 as iio

    iio.imwrite(args.out / "overview.png", np.concatenate([frames[i] for i in picks], axis=1))
    total = time.perf_counter() - start
    videos = ", ".join(str(p) for p in (written["mp4"], written["gif"]) if p is not None)
    print(f"{args.frames} frames, {substeps} substeps: simulate+render {loop_seconds:.1f} s, scene total "
          f"{total:.1f} s; wrote {videos}, {args.out}/overview.png and {len(frames)} frame PNGs"
          + (f", {len(frames)} particle PLYs and scene_gaussians.ply" if args.ply else ""))
    return {"particles": solver.n_particles, "substeps": substeps, "seconds": total, "loop_seconds": loop_seconds,
            "frames": len(frames)}


def main(argv=None):
    return run(parser(), argv, body)


if __name__ == "__main__":
    main()
