"""Second peer of bench/mpm_forward.py: taichi_elements' MPMSolver on the same cube, in its own process.

taichi_elements (github.com/taichi-dev/taichi_elements, MIT) is not on PyPI: copy its ``engine/``
folder from a checkout into ``.peers/taichi_elements/`` (git-ignored; carry it to the GPU machine)
or pass ``--engine DIR``; from a clone or snapshot REPO:
``mkdir -p .peers/taichi_elements && git -C REPO archive HEAD engine LICENSE | tar -x -C .peers/taichi_elements``. Its solver keeps particles in a dynamic SNode, a sparse pointer grid with
block-local storage (``use_bls``), and takes the SVD of F for every material. It runs in a separate
process because it allocates Taichi fields in its own runtime.

Settings matched to bench/mpm_forward.py: the same particle positions, per-particle volume and
velocity, E, nu, density, gravity and dt; its own boundary (a sticky box of 3 cells, as ours). The
substep is its ``step()`` minus the per-substep statistics (the max-velocity reduction and the
progress dot, which would add a host sync to every substep): deactivate the grid, build the
particle-id lists, p2g, grid update, boundaries, g2p.

    python bench/mpm_peer_taichi_elements.py --res 128 --side 100 --substeps 100 --dt 1e-4 [--arch cuda]

Prints one JSON line: ms_per_substep, particles, and what was run.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mpm_forward import MATERIAL, VELOCITY, cube  # noqa: E402

DEFAULT_ENGINE = Path(__file__).resolve().parents[1] / ".peers" / "taichi_elements"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", type=Path, default=DEFAULT_ENGINE, help="folder holding taichi_elements' engine/")
    parser.add_argument("--res", type=int, required=True)
    parser.add_argument("--side", type=int, required=True, help="particles per cube side (2 per cell)")
    parser.add_argument("--substeps", type=int, required=True)
    parser.add_argument("--dt", type=float, required=True)
    parser.add_argument("--arch", choices=("cpu", "cuda"), default="cuda")
    args = parser.parse_args()
    if not (args.engine / "engine" / "mpm_solver.py").is_file():
        sys.exit(f"no taichi_elements engine under {args.engine} (copy engine/ from its repository there)")
    import taichi as ti

    ti.init(arch=getattr(ti, args.arch), **({"device_memory_fraction": 0.5} if args.arch == "cuda" else {}))
    sys.path.insert(0, str(args.engine))
    from engine.mpm_solver import MPMSolver as ElementsSolver

    positions, spacing = cube(args.res, args.side)
    solver = ElementsSolver(res=(args.res,) * 3, size=1, use_voxelizer=False, support_plasticity=False)
    # material constants are Python attributes baked into its kernels at their first compile
    solver.E, solver.nu = MATERIAL.E, MATERIAL.nu
    solver.mu_0 = MATERIAL.E / (2 * (1 + MATERIAL.nu))
    solver.lambda_0 = MATERIAL.E * MATERIAL.nu / ((1 + MATERIAL.nu) * (1 - 2 * MATERIAL.nu))
    solver.p_rho, solver.p_vol = MATERIAL.density, spacing ** 3
    solver.p_mass = solver.p_vol * solver.p_rho
    solver.add_particles(particles=positions.astype("float32"), material=ElementsSolver.material_elastic,
                         velocity=VELOCITY)

    def substep(dt: float) -> None:
        solver.grid.deactivate_all()
        solver.build_pid(solver.pid, solver.grid_m, 0.5)
        solver.p2g(dt)
        solver.grid_normalization_and_gravity(dt, solver.grid_v, solver.grid_m)
        for post in solver.grid_postprocess:
            post(solver.t, dt, solver.grid_v)
        solver.t += dt
        solver.g2p(dt)

    for _ in range(8):  # compiles
        substep(args.dt)
    ti.sync()
    start = time.perf_counter()
    for _ in range(args.substeps):
        substep(args.dt)
    ti.sync()
    seconds = (time.perf_counter() - start) / args.substeps
    x = solver.particle_info()["position"]
    print(json.dumps({"ms_per_substep": 1e3 * seconds, "particles": int(solver.n_particles[None]),
                      "finite": bool(abs(x).max() < 10), "substeps_timed": args.substeps,
                      "settings": "taichi_elements engine/mpm_solver.py, use_bls, sparse grid, no g2p2g"}))


if __name__ == "__main__":
    main()
