"""Parameter identification: recover a jelly's E, nu and initial velocity from its trajectory.

    python -m scenes.identify_material [--res 24] [--iterations 30] [--out out/identify_material]

A jelly (scenes/assets/jelly.obj) is thrown at the floor with hidden E, nu and initial velocity;
the particle positions at a few frames are the observations. Starting from a wrong guess, L-BFGS-B (scipy; gradients from the MPM backward)
on (log E, logit nu, v0) through :func:`bridge.simulate` (checkpointed MPM backward) fits the
simulated trajectory to the observed one. Prints the recovered values and their relative errors;
writes the loss curve (PNG) and the result (JSON) to --out.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import scipy.optimize
import torch
from tqdm import tqdm

from scenes import ASSETS
from scenes.plots import plot_loss


def build_scene(res: int, dt: float, mesh: Path, ppc: float):
    """Solver with one jelly body, as a RolloutScene, and its particle positions [N, 3]."""
    from bridge.rollout import RolloutScene
    from taichi_mpm import Elastic, MPMSolver

    solver = MPMSolver(res=res, dtype="float64", boundary="separate", friction=0.3)
    # E here only sets the solver's CFL bookkeeping: the largest E the optimisation may visit
    solver.add_mesh(str(mesh), Elastic(E=2e5, nu=0.3, density=1000.0), particles_per_cell=ppc,
                    scale=0.28, translation=(0.5, 0.36, 0.5))
    scene = RolloutScene.from_solver(solver, dt=dt)
    return scene, solver.positions(as_torch=True).clone()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mesh", type=Path, default=ASSETS / "jelly.obj")
    parser.add_argument("--res", type=int, default=24, help="grid cells along the domain side")
    parser.add_argument("--ppc", type=float, default=8.0, help="particles per cell")
    parser.add_argument("--dt", type=float, default=1e-3)
    parser.add_argument("--substeps", type=int, default=240, help="simulated substeps")
    parser.add_argument("--frames", type=int, default=6, help="observed frames (evenly spaced)")
    parser.add_argument("--true-E", type=float, default=3e4)
    parser.add_argument("--true-nu", type=float, default=0.32)
    parser.add_argument("--true-v", type=float, nargs=3, default=(0.8, -1.5, 0.4))
    parser.add_argument("--guess-E", type=float, default=1e4)
    parser.add_argument("--guess-nu", type=float, default=0.2)
    parser.add_argument("--iterations", type=int, default=60, help="L-BFGS-B iterations (at most)")
    parser.add_argument("--noise", type=float, default=0.0,
                        help="std of Gaussian noise added to the observed positions, in grid cells")
    parser.add_argument("--out", type=Path, default=Path("out/identify_material"))
    args = parser.parse_args(argv)

    from bridge.modules import PhysicalParameters

    scene, x0 = build_scene(args.res, args.dt, args.mesh, args.ppc)
    T = args.substeps
    frames = sorted({round(T * (i + 1) / args.frames) for i in range(args.frames)})
    truth = PhysicalParameters(scene, E=args.true_E, nu=args.true_nu, velocity=args.true_v)
    with torch.no_grad():
        observed = truth(x0, T, frames).x
        noise = torch.randn(observed.shape, generator=torch.Generator().manual_seed(0), dtype=observed.dtype)
        observed = observed + args.noise * scene.dx * noise.to(observed.device)
    print(f"jelly: {scene.n_particles} particles, grid {scene.grid_shape}, {T} substeps of {args.dt:g} s, "
          f"observed frames {frames}, observation noise {args.noise:g} cells")

    model = PhysicalParameters(scene, E=args.guess_E, nu=args.guess_nu, velocity=(0.0, 0.0, 0.0))
    scale = 1.0 / (scene.dx ** 2 * observed.numel() / 3)  # mean squared error in cells^2
    losses = []

    def closure():
        model.zero_grad()
        loss = scale * ((model(x0, T, frames).x - observed) ** 2).sum()
        loss.backward()
        losses.append(loss.item())
        return loss

    # Bounds keep every probe simulable at the fixed dt (the solver above was sized for E <= 2e5)
    # and nu inside (0, NU_MAX); the optimiser works on (log E, logit(nu / NU_MAX), v0).
    params = list(model.parameters())
    bounds = [(math.log(1e3), math.log(2e5))] + [(-6.0, 6.0)] + [(-5.0, 5.0)] * 3
    start = time.time()
    bar = tqdm(total=args.iterations, desc="identify")

    def loss_and_grad(vector: np.ndarray):
        torch.nn.utils.vector_to_parameters(torch.as_tensor(vector, dtype=x0.dtype, device=x0.device), params)
        loss = closure()
        grad = torch.cat([p.grad.reshape(-1) for p in params])
        return loss.item(), grad.double().cpu().numpy()

    def progress(_):
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3e}", E=f"{model.E.item():.4g}", nu=f"{model.nu.item():.4f}")

    x_start = torch.nn.utils.parameters_to_vector(params).detach().double().cpu().numpy()
    fit = scipy.optimize.minimize(loss_and_grad, x_start, jac=True, method="L-BFGS-B", bounds=bounds,
                                  callback=progress, options={"maxiter": args.iterations, "ftol": 1e-16, "gtol": 1e-12})
    torch.nn.utils.vector_to_parameters(torch.as_tensor(fit.x, dtype=x0.dtype, device=x0.device), params)
    bar.close()
    elapsed = time.time() - start
    E, nu, v = model.E.item(), model.nu.item(), model.velocity[0].tolist()
    result = {
        "true": {"E": args.true_E, "nu": args.true_nu, "v0": list(args.true_v)},
        "guess": {"E": args.guess_E, "nu": args.guess_nu, "v0": [0.0, 0.0, 0.0]},
        "recovered": {"E": E, "nu": nu, "v0": v},
        "relative_error": {"E": abs(E - args.true_E) / args.true_E, "nu": abs(nu - args.true_nu) / args.true_nu,
                           "v0": float(np.linalg.norm(np.subtract(v, args.true_v)) / np.linalg.norm(args.true_v))},
        "final_loss_cells2": float(fit.fun), "optimizer_message": str(fit.message), "loss_evaluations": len(losses), "losses": losses, "seconds": elapsed,
        "n_particles": scene.n_particles, "substeps": T, "frames": frames, "noise_cells": args.noise,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "result.json").write_text(json.dumps(result, indent=2))
    plot_loss(losses, args.out / "loss.png", "trajectory MSE [cells^2]", "loss evaluations")
    err = result["relative_error"]
    print(f"recovered E  = {E:.6g} (true {args.true_E:g}, error {100 * err['E']:.3f}%)")
    print(f"recovered nu = {nu:.6g} (true {args.true_nu:g}, error {100 * err['nu']:.3f}%)")
    print(f"recovered v0 = {np.round(v, 5).tolist()} (true {list(args.true_v)}, error {100 * err['v0']:.3f}%)")
    print(f"{len(losses)} loss evaluations in {elapsed:.1f} s; wrote {args.out}/result.json, loss.png")
    return result


if __name__ == "__main__":
    main()
