"""Material identification: recover hidden material parameters from particle trajectories.

    python -m scenes.identify_material [--material jelly|sand|plasticine] [--iterations 30]

Measured on the 2-core CPU (2026-11-27, defaults): sand's friction angle 22 -> 35.000 degrees (true
35, 11 loss evaluations, 18 s); plasticine's yield stress 4000 -> 2000.0 Pa (true 2000, 7
evaluations, 31 s), both within 0.001 %.

Three experiments, each observed as particle positions at a few frames and fitted from a wrong
start by L-BFGS-B (scipy) with gradients from the checkpointed MPM backward (bridge.simulate):

  jelly       an elastic jelly (scenes/assets/jelly.obj) thrown at the floor: E, nu and the
              initial velocity (log E, logit nu, v0).
  sand        a Drucker-Prager sand column collapsing into a pile: the friction angle (log).
  plasticine  a von Mises cube thrown at the floor, flattened plastically: the yield stress (log).

The elastic moduli of sand and plasticine are taken as known (measured separately); only the
plastic parameter is hidden. Prints the recovered values and their relative errors; writes the
loss curve (loss.png) and the result (result.json) to --out.
"""
from __future__ import annotations

import json
import math
import time

import numpy as np
import torch

from scenes import ASSETS
from scenes.cli import progress, run, scene_parser
from scenes.plots import plot_loss

# material -> (parameter names fitted, their true defaults, their wrong starts)
EXPERIMENTS = {
    "jelly": {"true": {"E": 3e4, "nu": 0.32}, "guess": {"E": 1e4, "nu": 0.2}},
    "sand": {"true": {"friction_angle": 35.0}, "guess": {"friction_angle": 22.0}},
    "plasticine": {"true": {"yield_stress": 2.0e3}, "guess": {"yield_stress": 4.0e3}},
}
TRUE_VELOCITY = {"jelly": (0.8, -1.5, 0.4), "sand": (0.0, 0.0, 0.0), "plasticine": (0.4, -2.0, 0.0)}
# E / nu of the sand and the plasticine (known), and of the jelly's CFL bookkeeping: the largest E
# the optimisation may visit
# grid cells, particles per cell, substeps, observed frames when not given on the command line
SIZES = {"jelly": (24, 8.0, 240, 6), "sand": (16, 2.0, 150, 3), "plasticine": (16, 2.0, 150, 3)}
KNOWN = {"jelly": {"E": 2e5, "nu": 0.3, "density": 1000.0}, "sand": {"E": 4e4, "nu": 0.3, "density": 1600.0},
         "plasticine": {"E": 5e4, "nu": 0.35, "density": 1200.0}}


def build_scene(material: str, res: int, dt: float, ppc: float, seed: int = 0):
    """Solver with one body of the experiment, as a RolloutScene, and its positions [N, 3]."""
    from bridge.rollout import RolloutScene
    from taichi_mpm import Elastic, MPMSolver, Sand, VonMises

    k = KNOWN[material]
    solver = MPMSolver(res=res, dtype="float64", boundary="separate", friction=0.3)
    if material == "jelly":
        solver.add_mesh(str(ASSETS / "jelly.obj"), Elastic(E=k["E"], nu=k["nu"], density=k["density"]),
                        particles_per_cell=ppc, scale=0.28, translation=(0.5, 0.36, 0.5), seed=seed)
    elif material == "sand":
        floor = float(solver.valid_lower[1])
        solver.add_cube((0.42, floor + 0.01, 0.42), (0.16, 0.3, 0.16),
                        Sand(E=k["E"], nu=k["nu"], density=k["density"], friction_angle=30.0),
                        particles_per_cell=ppc, seed=seed)
    else:
        solver.add_cube((0.4, 0.3, 0.4), (0.2, 0.2, 0.2),
                        VonMises(E=k["E"], nu=k["nu"], density=k["density"], yield_stress=1e3),
                        particles_per_cell=ppc, seed=seed)
    scene = RolloutScene.from_solver(solver, dt=dt)
    return scene, solver.positions(as_torch=True).clone()


def model_for(material: str, scene, values: dict, velocity):
    """PhysicalParameters learning the experiment's hidden parameters (others are buffers)."""
    from bridge.modules import PhysicalParameters

    k = KNOWN[material]
    if material == "jelly":
        return PhysicalParameters(scene, E=values["E"], nu=values["nu"], velocity=velocity,
                                  learn=("E", "nu", "velocity"))
    name = next(iter(EXPERIMENTS[material]["true"]))
    return PhysicalParameters(scene, E=k["E"], nu=k["nu"], velocity=velocity, plastic={name: values[name]},
                              learn=(name,))


def current(material: str, model) -> dict:
    params = model.material()
    return {name: float(params[name].reshape(-1)[0]) for name in EXPERIMENTS[material]["true"]}


def body(args) -> dict:
    experiment = EXPERIMENTS[args.material]
    for key, value in zip(("res", "ppc", "substeps", "frames"), SIZES[args.material]):
        if getattr(args, key) is None:
            setattr(args, key, value)
    true_values = dict(experiment["true"])
    for name, value in (args.true or []):
        true_values[name] = value
    guess = dict(experiment["guess"])
    for name, value in (args.guess or []):
        guess[name] = value
    unknown = (set(true_values) | set(guess)) - set(experiment["true"])
    if unknown:
        raise ValueError(f"--material {args.material} fits {sorted(experiment['true'])}, not {sorted(unknown)}")
    if args.iterations < 1 or args.substeps < 1 or args.frames < 1:
        raise ValueError("--iterations, --substeps and --frames must be >= 1")

    scene, x0 = build_scene(args.material, args.res, args.dt, args.ppc, args.seed)
    T = args.substeps
    frames = sorted({round(T * (i + 1) / args.frames) for i in range(args.frames)})
    velocity = TRUE_VELOCITY[args.material]
    truth = model_for(args.material, scene, true_values, velocity)
    with torch.no_grad():
        observed = truth(x0, T, frames).x
        noise = torch.randn(observed.shape, generator=torch.Generator().manual_seed(args.seed), dtype=observed.dtype)
        observed = observed + args.noise * scene.dx * noise.to(observed.device)
    print(f"{args.material}: {scene.n_particles} particles, grid {scene.grid_shape}, {T} substeps of {args.dt:g} s, "
          f"observed frames {frames}, observation noise {args.noise:g} cells")

    model = model_for(args.material, scene, guess, (0.0, 0.0, 0.0) if args.material == "jelly" else velocity)
    scale = 1.0 / (scene.dx ** 2 * observed.numel() / 3)  # mean squared error in cells^2
    losses = []
    params = list(model.parameters())
    # Bounds keep every probe simulable at the fixed dt and physical: the optimiser works on logs
    # (and logit nu, v0 for the jelly)
    if args.material == "jelly":
        bounds = [(math.log(1e3), math.log(KNOWN["jelly"]["E"]))] + [(-6.0, 6.0)] + [(-5.0, 5.0)] * 3
    elif args.material == "sand":
        bounds = [(math.log(5.0), math.log(60.0))]
    else:
        bounds = [(math.log(50.0), math.log(5e4))]

    def loss_and_grad(vector: np.ndarray):
        torch.nn.utils.vector_to_parameters(torch.as_tensor(vector, dtype=x0.dtype, device=x0.device), params)
        model.zero_grad()
        loss = scale * ((model(x0, T, frames).x - observed) ** 2).sum()
        loss.backward()
        losses.append(loss.item())
        grad = torch.cat([p.grad.reshape(-1) for p in params])
        return loss.item(), grad.double().cpu().numpy()

    start = time.time()
    import scipy.optimize

    with progress(args.iterations, f"identify {args.material}") as bar:
        def step(_):
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3e}", **{k: f"{v:.5g}" for k, v in current(args.material, model).items()})

        x_start = torch.nn.utils.parameters_to_vector(params).detach().double().cpu().numpy()
        fit = scipy.optimize.minimize(loss_and_grad, x_start, jac=True, method="L-BFGS-B", bounds=bounds,
                                      callback=step, options={"maxiter": args.iterations, "ftol": 1e-14,
                                                              "gtol": 1e-10})
        if bar.n < args.iterations:  # L-BFGS-B stopped early: say why instead of a bar left at 45%
            bar.stop(f"{'converged' if fit.success else 'stopped'}: {fit.message}")
    torch.nn.utils.vector_to_parameters(torch.as_tensor(fit.x, dtype=x0.dtype, device=x0.device), params)
    elapsed = time.time() - start
    recovered = current(args.material, model)
    errors = {k: abs(recovered[k] - true_values[k]) / abs(true_values[k]) for k in true_values}
    result = {"material": args.material, "true": true_values, "guess": guess, "recovered": recovered,
              "relative_error": errors}
    if args.material == "jelly":
        v = model.velocity[0].tolist()
        result["true"]["v0"], result["guess"]["v0"], result["recovered"]["v0"] = list(velocity), [0.0] * 3, v
        errors["v0"] = float(np.linalg.norm(np.subtract(v, velocity)) / np.linalg.norm(velocity))
    result.update(final_loss_cells2=float(fit.fun), optimizer_message=str(fit.message), iterations=int(fit.nit),
                  loss_evaluations=len(losses), losses=losses, seconds=elapsed, n_particles=scene.n_particles,
                  substeps=T, frames=frames, noise_cells=args.noise)
    (args.out / "result.json").write_text(json.dumps(result, indent=2))
    plot_loss(losses, args.out / "loss.png", "trajectory MSE [cells^2]", "loss evaluations")
    for name in true_values:
        value = result["recovered"][name]
        shown = np.round(value, 5).tolist() if isinstance(value, list) else f"{value:.6g}"
        print(f"recovered {name} = {shown} (true {result['true'][name]}, error {100 * errors[name]:.3f}%)")
    print(f"{len(losses)} loss evaluations in {elapsed:.1f} s ({fit.message}); wrote {args.out}/result.json, loss.png")
    return result


def _named_value(text: str):
    name, _, value = text.partition("=")
    if not value:
        raise ValueError(f"expected NAME=VALUE, got {text!r}")
    return name, float(value)


def main(argv=None) -> dict:
    parser = scene_parser("identify_material", __doc__, frames=None)
    parser.add_argument("--frames", type=int, default=None, help="observed frames, evenly spaced "
                        "(default per material: " + ", ".join(f"{m} {v[3]}" for m, v in SIZES.items()) + ")")
    parser.add_argument("--material", choices=sorted(EXPERIMENTS), default="jelly", help="which experiment")
    parser.add_argument("--res", type=int, default=None, help="grid cells along the domain side "
                        "(default per material: " + ", ".join(f"{m} {v[0]}" for m, v in SIZES.items()) + ")")
    parser.add_argument("--ppc", type=float, default=None, help="particles per cell (default: jelly 8, else 2)")
    parser.add_argument("--dt", type=float, default=1e-3)
    parser.add_argument("--substeps", type=int, default=None, help="simulated substeps (default: jelly 240, else 150)")
    parser.add_argument("--true", type=_named_value, action="append", metavar="NAME=VALUE",
                        help="override a hidden value, e.g. friction_angle=30 (defaults: "
                             + "; ".join(f"{m}: {e['true']}" for m, e in EXPERIMENTS.items()) + ")")
    parser.add_argument("--guess", type=_named_value, action="append", metavar="NAME=VALUE",
                        help="override the wrong start, e.g. yield_stress=5000")
    parser.add_argument("--iterations", type=int, default=60, help="L-BFGS-B iterations (at most)")
    parser.add_argument("--noise", type=float, default=0.0,
                        help="std of Gaussian noise added to the observed positions, in grid cells")
    return run(parser, argv, body)


if __name__ == "__main__":
    main()
