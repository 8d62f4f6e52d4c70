"""Physics from pictures: recover a jelly's initial velocity and stiffness from rendered images.

The whole differentiable pipeline in one loop:

    v0, E --bridge.simulate (MPM, checkpointed)--> x_t, F_t at a few frames
          --bridge.particles_to_gaussians--> Gaussians --bridge.rasterize (2 cameras)--> images
          --MSE against the target images--> loss.backward() --> d loss / d v0, d loss / d log E

Target images come from the same pipeline with hidden values; the fit starts from a wrong guess.

    python -m scenes.fit_from_images            # writes out/fit_from_images/{fit.png, loss.png}
"""
from __future__ import annotations

import argparse
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import torch
from tqdm import tqdm

from bridge.modules import PhysicalParameters
from bridge.rasterization import rasterize
from bridge.rollout import RolloutScene
from bridge.surface import particles_to_gaussians
from render.camera import Camera, stack_cameras
from scenes import ASSETS
from scenes.plots import plot_loss
from taichi_mpm import Elastic, MPMSolver

COLOR = (0.9, 0.35, 0.3)


def render_frames(traj, radius: float, viewmats, Ks, width: int, height: int) -> torch.Tensor:
    """(n_frames, n_cameras, H, W, 3) images of every frame of a trajectory, differentiably."""
    images = []
    for x, F in zip(traj.x, traj.F):
        g = particles_to_gaussians(x, F, radius, COLOR, opacity=0.9)
        image, _, _ = rasterize(g.means, None, None, g.opacities, g.colors, viewmats, Ks, width, height,
                                covars=g.covars, backgrounds=torch.ones(len(viewmats), 3, device=x.device))
        images.append(image)
    return torch.stack(images)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mesh", type=Path, default=ASSETS / "jelly.obj")
    parser.add_argument("--res", type=int, default=20)
    parser.add_argument("--duration", type=float, default=0.2, help="simulated seconds per rollout")
    parser.add_argument("--iters", type=int, default=60)
    parser.add_argument("--size", type=int, nargs=2, default=(96, 72), metavar=("W", "H"))
    parser.add_argument("--true-velocity", type=float, nargs=3, default=(0.8, -1.0, -0.5))
    parser.add_argument("--true-E", type=float, default=2e4)
    parser.add_argument("--start-E", type=float, default=6e4, help="the fit's initial guess of E")
    parser.add_argument("--out", type=Path, default=Path("out/fit_from_images"))
    args = parser.parse_args(argv)
    width, height = args.size

    # the stiffest E the fit may visit sets the substep (CFL), so build the scene with it
    solver = MPMSolver(res=args.res)
    solver.add_mesh(args.mesh, Elastic(E=2 * max(args.true_E, args.start_E), nu=0.3), particles_per_cell=4,
                    scale=0.3, translation=(0.4, 0.3, 0.5))
    dt = solver.stable_dt(max_speed=2.0 * float(np.linalg.norm(args.true_velocity)) + 2.0)
    scene = RolloutScene.from_solver(solver, dt=dt)
    n_substeps = int(np.ceil(args.duration / dt))
    x0 = solver.positions(as_torch=True).clone()
    radius = 0.5 * solver.dx / 4 ** (1 / 3)
    frames = [n_substeps // 3, 2 * n_substeps // 3, n_substeps]  # the jelly lands between the first two
    cameras = [Camera.look_at(eye, (0.5, 0.25, 0.5), up=(0.0, 1.0, 0.0), width=width, height=height,
                              fov_y_degrees=45.0) for eye in ((0.5, 0.4, 1.25), (1.25, 0.4, 0.5))]
    viewmats, Ks = stack_cameras(cameras, x0.device)
    print(f"{scene.n_particles} particles, {n_substeps} substeps of {dt:.2e} s, frames {frames}, "
          f"{len(cameras)} cameras {width}x{height}")

    truth = PhysicalParameters(scene, E=args.true_E, nu=0.3, velocity=args.true_velocity, learn=())
    with torch.no_grad():
        target = render_frames(truth(x0, n_substeps, frames), radius, viewmats, Ks, width, height)

    guess = PhysicalParameters(scene, E=args.start_E, nu=0.3, velocity=(0.0, 0.0, 0.0),
                               learn=("E", "velocity"))
    optimizer = torch.optim.Adam(guess.parameters(), lr=0.1)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.iters, eta_min=0.005)
    losses = []
    for _ in (bar := tqdm(range(args.iters), desc="fit v0, E from images")):
        optimizer.zero_grad()
        images = render_frames(guess(x0, n_substeps, frames), radius, viewmats, Ks, width, height)
        loss = (images - target).square().mean()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.2e}", E=f"{guess.E.item():.3g}",
                        v=np.round(guess.velocity.detach().cpu().double().numpy().ravel(), 2).tolist())

    v_fit = guess.velocity.detach().cpu().double().numpy().ravel()
    v_true = np.asarray(args.true_velocity)
    print(f"initial velocity: true {v_true.tolist()}, recovered {np.round(v_fit, 3).tolist()} "
          f"(error {np.linalg.norm(v_fit - v_true) / np.linalg.norm(v_true):.1%})")
    print(f"E: true {args.true_E:.4g}, start {args.start_E:.4g}, recovered {guess.E.item():.4g} "
          f"(error {abs(guess.E.item() / args.true_E - 1):.1%})")
    print(f"image loss {losses[0]:.3e} -> {losses[-1]:.3e}")

    args.out.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        fitted = render_frames(guess(x0, n_substeps, frames), radius, viewmats, Ks, width, height)
    rows = [torch.cat(list(imgs[:, 0]), dim=1) for imgs in (target, fitted)]  # camera 0, frames side by side
    picture = (torch.cat(rows, dim=0).clamp(0, 1) * 255).to(torch.uint8).cpu().numpy()
    imageio.imwrite(args.out / "fit.png", picture)
    plot_loss(losses, args.out / "loss.png", "image MSE")
    print(f"wrote {args.out}/fit.png (top: target frames, bottom: fitted) and {args.out}/loss.png")


if __name__ == "__main__":
    main()
