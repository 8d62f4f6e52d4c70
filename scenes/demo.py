"""The main demo: a jelly mesh thrown onto a block of sand in a box, simulated with MLS-MPM and
rendered with Gaussian splatting.

    python -m scenes.demo                       # writes out/demo/{frame_*.png, demo.gif, overview.png}
    python -m scenes.demo --mesh my.obj --frames 96 --res 64
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import torch
from tqdm import tqdm

from scenes import ASSETS
from scenes.particle_render import body_colors, checker_floor, default_camera, render_particles
from taichi_mpm import Elastic, MPMSolver, Sand


def build_scene(mesh: Path, res: int, particles_per_cell: float) -> tuple[MPMSolver, np.ndarray]:
    """The solver with its bodies, and the body index of every particle (by particle id)."""
    solver = MPMSolver(res=res, boundary="slip", friction=0.4)
    floor = float(solver.valid_lower[1])  # particles must stay a cell inside the box
    counts = [
        solver.add_mesh(mesh, Elastic(E=2e4, nu=0.3, density=1000.0), particles_per_cell,
                        scale=0.24, translation=(0.38, 0.5, 0.5), velocity=(0.6, -0.5, 0.0)),
        solver.add_cube((0.5, floor + 0.005, 0.32), (0.3, 0.2, 0.36), Sand(E=1e5, density=1600.0), particles_per_cell),
    ]
    return solver, np.repeat(np.arange(len(counts)), counts)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mesh", type=Path, default=ASSETS / "jelly.obj", help="OBJ (or any trimesh format) to drop")
    parser.add_argument("--frames", type=int, default=48)
    parser.add_argument("--fps", type=float, default=24.0)
    parser.add_argument("--res", type=int, default=40, help="grid cells along the box side")
    parser.add_argument("--ppc", type=float, default=8, help="particles per grid cell")
    parser.add_argument("--size", type=int, nargs=2, default=(480, 360), metavar=("W", "H"))
    parser.add_argument("--out", type=Path, default=Path("out/demo"))
    args = parser.parse_args(argv)

    solver, body = build_scene(args.mesh, args.res, args.ppc)
    args.out.mkdir(parents=True, exist_ok=True)
    camera = default_camera(*args.size)
    radius = 0.5 * solver.dx / args.ppc ** (1 / 3)
    floor = checker_floor(solver.lower[[0, 2]], solver.lower[[0, 2]] + 1.0, height=solver.valid_lower[1],
                          device=solver.device)
    colors_by_id = torch.as_tensor(body_colors(body), dtype=torch.float32, device=solver.device)
    print(f"{solver.n_particles} particles ({np.bincount(body).tolist()} per body), grid {solver.grid_shape}, "
          f"Taichi on {solver.device}")

    frames, substeps, start = [], 0, time.perf_counter()
    for frame in tqdm(range(args.frames + 1), desc="simulate+render", unit="frame"):
        if frame:
            substeps += solver.step(1.0 / args.fps)
        ids = solver.particle_ids(as_torch=True).long()
        image = render_particles(solver.positions(as_torch=True), solver.deformation_gradients(as_torch=True),
                                 radius, colors_by_id[ids], camera, floor=floor)
        imageio.imwrite(args.out / f"frame_{frame:04d}.png", image)
        frames.append(image)
    elapsed = time.perf_counter() - start

    imageio.mimsave(args.out / "demo.gif", frames, duration=1.0 / args.fps, loop=0)
    picks = np.linspace(0, len(frames) - 1, 4).round().astype(int)
    imageio.imwrite(args.out / "overview.png", np.concatenate([frames[i] for i in picks], axis=1))
    print(f"{args.frames} frames, {substeps} substeps in {elapsed:.1f} s; wrote {args.out}/demo.gif, "
          f"{args.out}/overview.png and {len(frames)} frame PNGs")


if __name__ == "__main__":
    main()
