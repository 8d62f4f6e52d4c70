"""Shape morphing (the DiffMPMLib3D workflow, in torch): turn one mesh into another with F controls.

    python -m scenes.shape_morph [--obj A.obj] [--target B.obj] [--episodes 8] [--out out/shape_morph]

Both meshes are sampled into particles on one lattice, scaled by one factor and centred in the
domain. The source is a soft elastic body; per-particle deformation-gradient controls dFc act
every ``--stride`` substeps (F <- (I + dt C)(F + dFc), Xu, Song, Levin and Hyde). Each episode
simulates ``--steps`` substeps and optimises its controls (Adam, or gradient descent with
backtracking line search) so that the grid mass of the last state matches the target's,
loss = 0.5 * sum over grid nodes (m - m_target)^2; the last state of an episode starts the next
(receding horizon). Writes the loss curve, one image per episode (episode_*.png, morph.mp4,
morph.gif), the particles at the end of every episode (particles_*.ply) and result.json; prints the
IoU of occupied grid cells with the target. ``--obj`` is the source mesh (``--source`` also works).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from scenes import ASSETS
from scenes.cli import check_readable_file, progress, run, scene_parser
from scenes.media import write_animation
from scenes.plots import plot_loss


# ----------------------------------------------------------------------------- set-up
def sample_pair(source: Path, target: Path, spacing: float, size: float, center):
    """Particles [N, 3] of both meshes on one lattice, one common scale (largest side = size)."""
    from taichi_mpm.sampling import load_mesh, sample_mesh

    meshes = [load_mesh(str(p)) for p in (source, target)]
    scale = size / max(float(np.max(m.bounds[1] - m.bounds[0])) for m in meshes)
    points = []
    for mesh in meshes:
        mid = (mesh.bounds[0] + mesh.bounds[1]) / 2
        points.append(sample_mesh(mesh, spacing, scale=scale, translation=np.asarray(center) - scale * mid))
    return points


def occupancy(mass: torch.Tensor, full_node_mass: float) -> torch.Tensor:
    """Grid nodes holding at least half the mass of a node inside a filled region."""
    return mass > 0.5 * full_node_mass


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a & b).sum()) / max(float((a | b).sum()), 1.0)


# ----------------------------------------------------------------------------- pictures
def render(points: np.ndarray, target: np.ndarray, size: int = 320) -> np.ndarray:
    """Two orthographic views (front: x-y, side: z-y) of the particles, depth-shaded, over the
    target's silhouette in grey. Returns an [size, 2 size, 3] uint8 image of the unit box."""
    image = np.full((size, 2 * size, 3), 255, dtype=np.uint8)
    for view, (u, v, depth) in enumerate(((0, 1, 2), (2, 1, 0))):
        panel = image[:, view * size:(view + 1) * size]
        for pts, base in ((target, None), (points, np.array([70, 130, 200]))):
            px = np.clip((pts[:, u] * size).astype(int), 0, size - 2)
            py = np.clip(((1 - pts[:, v]) * size).astype(int), 0, size - 2)
            if base is None:
                color = np.full((len(pts), 3), 215)
                order = np.arange(len(pts))
            else:  # far particles first, near ones drawn over them, darker with distance
                d = pts[:, depth]
                order = np.argsort(d) if view == 0 else np.argsort(-d)
                t = (d - d.min()) / max(d.max() - d.min(), 1e-9)
                shade = (0.55 + 0.45 * (t if view == 0 else 1 - t))[:, None]
                color = (base * shade).astype(np.uint8)
            for dy in (0, 1):
                for dx in (0, 1):
                    panel[py[order] + dy, px[order] + dx] = color[order]
        panel[:, -1] = 0
    return image


# ----------------------------------------------------------------------------- optimisation
class Episode:
    """One receding-horizon episode: loss(controls) from a fixed start state."""

    def __init__(self, scene, start, material, steps: int, target_mass: torch.Tensor):
        self.scene, self.start, self.material, self.steps = scene, start, material, steps
        self.target_mass = target_mass
        self.norm = 0.5 * float((target_mass ** 2).sum())

    def rollout(self, controls):
        from bridge.rollout import simulate

        x, v, C, F = self.start
        return simulate(self.scene, x, v, self.material, self.steps, [self.steps], controls=controls, C0=C, F0=F)

    def loss(self, controls) -> torch.Tensor:
        """0.5 * sum (m - m_target)^2 over the grid, divided by 0.5 * sum m_target^2."""
        from bridge.rollout import grid_mass

        m = grid_mass(self.rollout(controls).x[-1], self.scene)
        return 0.5 * ((m - self.target_mass) ** 2).sum() / self.norm


def optimize_adam(episode: Episode, controls: torch.Tensor, iterations: int, lr: float, losses: list, bar,
                  max_control: float):
    controls = controls.clone().requires_grad_()
    optimizer = torch.optim.Adam([controls], lr=lr)
    best = (float("inf"), controls.detach().clone())
    for _ in range(iterations):
        optimizer.zero_grad()
        loss = episode.loss(controls)
        loss.backward()
        losses.append(loss.item())
        if loss.item() < best[0]:
            best = (loss.item(), controls.detach().clone())
        optimizer.step()
        with torch.no_grad():  # a few particles with huge controls get shot out of the body
            controls.clamp_(-max_control, max_control)
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    return best[1]


def optimize_gd(episode: Episode, controls: torch.Tensor, iterations: int, lr: float, losses: list, bar,
                max_control: float):
    """Gradient descent with Armijo backtracking; the accepted step doubles for the next try."""
    step = lr
    controls = controls.clone()
    for _ in range(iterations):
        c = controls.clone().requires_grad_()
        loss = episode.loss(c)
        loss.backward()
        losses.append(loss.item())
        grad = c.grad
        g2 = float((grad ** 2).sum())
        with torch.no_grad():
            while step > 1e-12:
                trial = (controls - step * grad).clamp(-max_control, max_control)
                if episode.loss(trial).item() <= loss.item() - 1e-4 * step * g2:
                    controls = trial
                    break
                step *= 0.5
        step *= 2.0
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", step=f"{step:.2g}")
    return controls


# ----------------------------------------------------------------------------- main
def parser():
    parser = scene_parser("shape_morph", __doc__, obj=ASSETS / "morph_sphere.obj")
    parser.add_argument("--source", type=Path, dest="obj", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    parser.add_argument("--target", type=Path, default=ASSETS / "morph_peanut.obj", help="mesh to morph into")
    parser.add_argument("--res", type=int, default=32, help="grid cells along the domain side")
    parser.add_argument("--ppc", type=float, default=8.0, help="particles per cell")
    parser.add_argument("--size", type=float, default=0.5, help="largest side of the two shapes [m]")
    parser.add_argument("--E", type=float, default=5e3, help="Young's modulus of the source [Pa]")
    parser.add_argument("--nu", type=float, default=0.3, help="Poisson's ratio of the source")
    parser.add_argument("--dt", type=float, default=2e-3, help="substep [s]")
    parser.add_argument("--episodes", type=int, default=10, help="receding-horizon episodes")
    parser.add_argument("--steps", type=int, default=40, help="substeps per episode")
    parser.add_argument("--stride", type=int, default=10, help="substeps between F controls")
    parser.add_argument("--iterations", type=int, default=10, help="optimisation iterations per episode")
    parser.add_argument("--optimizer", choices=("adam", "gd"), default="adam", help="optimiser")
    parser.add_argument("--lr", type=float, default=None, help="Adam lr (default 1e-2) / initial GD step (1e-2)")
    parser.add_argument("--max-control", type=float, default=0.02, help="bound on each entry of dFc")
    return parser


def main(argv=None) -> dict:
    return run(parser(), argv, body)


def body(args) -> dict:
    check_readable_file(args.target, "target mesh")
    for name in ("episodes", "steps", "stride", "iterations"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    args.source = args.obj
    from bridge.rollout import RolloutScene, grid_mass
    from taichi_mpm import Elastic, MPMSolver
    from taichi_mpm.ply import write_particles_ply

    solver = MPMSolver(res=args.res, dtype="float64", gravity=(0.0, 0.0, 0.0), boundary="sticky")
    spacing = solver.dx / args.ppc ** (1.0 / 3.0)
    source, target = sample_pair(args.source, args.target, spacing, args.size, (0.5, 0.5, 0.5))
    density = 1000.0
    solver.add_particles(source, Elastic(E=args.E, nu=args.nu, density=density), volume=spacing ** 3)
    scene = RolloutScene.from_solver(solver, dt=args.dt, control_stride=args.stride)
    dev, dtype = scene.density.device, scene.dtype
    target_x = torch.as_tensor(target, dtype=dtype, device=dev)
    target_mass = grid_mass(target_x, scene, torch.full((len(target),), density * spacing ** 3, dtype=dtype, device=dev))
    full_node = density * solver.dx ** 3
    target_occupied = occupancy(target_mass, full_node)
    material = {"E": torch.tensor(args.E, dtype=dtype), "nu": torch.tensor(args.nu, dtype=dtype)}
    n = scene.n_particles
    state = (solver.positions(as_torch=True).clone(), torch.zeros((n, 3), dtype=dtype, device=dev),
             torch.zeros((n, 3, 3), dtype=dtype, device=dev), torch.eye(3, dtype=dtype, device=dev).expand(n, 3, 3))
    print(f"source {args.source.name}: {n} particles; target {args.target.name}: {len(target)} particles; "
          f"grid {scene.grid_shape}; {args.episodes} episodes x {args.steps} substeps, controls every {args.stride}")
    iou_start = iou(occupancy(grid_mass(state[0], scene), full_node), target_occupied)
    frames = [render(state[0].cpu().numpy(), target)]

    optimize = optimize_adam if args.optimizer == "adam" else optimize_gd
    lr = args.lr if args.lr is not None else 1e-2
    losses, episode_ends, episode_log = [], [], []
    controls = torch.zeros((scene.n_controls(args.steps), n, 3, 3), dtype=dtype, device=dev)
    start_time = time.time()
    with progress(args.episodes * args.iterations, "shape morph") as bar:
        for episode_index in range(args.episodes):
            episode = Episode(scene, state, material, args.steps, target_mass)
            controls = optimize(episode, controls, args.iterations, lr, losses, bar, args.max_control)  # warm start
            with torch.no_grad():
                traj = episode.rollout(controls)
                state = tuple(t[-1].clone() for t in traj)
                mass = grid_mass(state[0], scene)
                final_loss = (0.5 * ((mass - target_mass) ** 2).sum() / episode.norm).item()
            score = iou(occupancy(mass, full_node), target_occupied)
            episode_ends.append(len(losses) - 1)
            episode_log.append({"episode": episode_index, "loss": final_loss, "iou": score})
            frames.append(render(state[0].cpu().numpy(), target))
            write_particles_ply(args.out / f"particles_{episode_index:04d}.ply", state[0].cpu().numpy(),
                                {"velocity": state[1].cpu().numpy()})
            bar.write(f"episode {episode_index}: relative loss {final_loss:.4f}, IoU {score:.4f}")
    elapsed = time.time() - start_time

    write_animation(frames, args.out, "morph", fps=2, prefix="episode")
    plot_loss(losses, args.out / "loss.png", "relative grid-mass loss; grey: episode ends",
              "optimisation iterations", markers=episode_ends)
    final_x = state[0].cpu().numpy()
    write_particles_ply(args.out / "final_particles.ply", final_x, {"velocity": state[1].cpu().numpy()})
    np.save(args.out / "final_particles.npy", final_x)
    result = {"source": str(args.source), "target": str(args.target), "n_particles": n,
              "iou_start": iou_start, "iou_final": episode_log[-1]["iou"], "episodes": episode_log,
              "losses": losses, "seconds": elapsed, "optimizer": args.optimizer, "lr": lr,
              "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    (args.out / "result.json").write_text(json.dumps(result, indent=2))
    print(f"IoU of occupied cells with the target: {iou_start:.4f} at the start -> {result['iou_final']:.4f} "
          f"after {args.episodes} episodes ({elapsed:.0f} s); wrote {args.out}/")
    return result


if __name__ == "__main__":
    main()
