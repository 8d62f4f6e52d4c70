"""Simulate a trained 3DGS scene (PhysGaussian): fill it with particles, drop it, re-export every frame.

    python -m scenes.simulate_3dgs --ply scene.ply      # any 3DGS PLY (Inria layout)
    python -m scenes.simulate_3dgs                       # no --ply: makes a trained-style one first

The splats are scaled into the simulation box (``--size``), their inside is filled with particles
(opacity-density grid + six-ray crossing vote, ``taichi_mpm.gaussian_fill``), the body is dropped
on the ground with ``--velocity`` and simulated with MLS-MPM; every frame each splat follows its
nearest particles (mu = x + F (X - X_p), cov = F cov0 F^T, SH rotated by polar(F)) and is written
as a standard 3DGS PLY (``frame_0000.ply`` ...) that common viewers open, plus a preview GIF.

Without --ply, the trained-style input (``input.ply``, written to --out) is the surface upsampling of
``--obj``: flattened Gaussians in a thin band under the surface with texture colours and a random
degree-1 SH term, the layout a 3DGS training run produces.
"""
from __future__ import annotations

from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import torch

from scenes import ASSETS
from scenes.cli import check_readable_file, run, scene_parser


def make_trained_style_ply(obj, path, n_gaussians: int, seed: int) -> None:
    """A trained-looking 3DGS PLY of a mesh: flattened surface Gaussians, texture colours, SH degree 1."""
    from bridge.gaussian_sim import splats_to_ply
    from bridge.upsampling import SurfaceConfig, bind_surface, synthesize_surface
    from render.ply import write_ply
    from render.sh import C0
    from taichi_mpm.sampling import load_mesh, sample_mesh

    mesh = load_mesh(str(obj))
    scale = 1.0 / float((mesh.bounds[1] - mesh.bounds[0]).max())
    inside = torch.as_tensor(sample_mesh(mesh, 0.05, scale=scale), dtype=torch.float64)
    binding = bind_surface(obj, inside, SurfaceConfig(n_gaussians=n_gaussians, flatten=0.2, seed=seed), scale=scale)
    eye = torch.eye(3, dtype=torch.float64).expand(len(inside), 3, 3)
    spacing = (mesh.area * scale ** 2 / n_gaussians) ** 0.5
    g = synthesize_surface(inside, eye, binding, 0.7 * spacing, 0.5 * spacing, dtype=torch.float64)
    sh = torch.zeros(len(g.means), 4, 3, dtype=torch.float64)
    sh[:, 0] = (g.colors - 0.5) / C0
    sh[:, 1:] = 0.05 * torch.randn(len(g.means), 3, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    write_ply(path, splats_to_ply(g.means, g.covars, g.opacities, sh))


def body(args):
    from bridge.gaussian_sim import advect_splats, bind_splats, fill_splats, load_splats, splats_to_ply
    from bridge.rasterization import rasterize
    from render.camera import Camera, stack_cameras
    from render.ply import write_ply
    from taichi_mpm import Elastic, MPMSolver, Plane
    from taichi_mpm.validation import check_int, check_positive

    # every argument checked before the input PLY is made or read (that takes a while)
    material = Elastic(E=args.E, nu=args.nu)
    if not np.isfinite(args.velocity).all():
        raise ValueError(f"--velocity must be 3 finite numbers, got {list(args.velocity)}")
    check_int("--gaussians", args.gaussians, 1)
    check_int("--width", args.width, 2)
    check_positive("--size", args.size)
    solver = MPMSolver(res=args.res, boundary="slip")
    if args.ply is None:
        args.ply = args.out / "input.ply"
        make_trained_style_ply(args.obj, args.ply, args.gaussians, args.seed)
        print(f"wrote a trained-style 3DGS PLY of {args.obj.name}: {args.ply}")
    check_readable_file(args.ply, "3DGS PLY")
    solver.add_collider(Plane(point=(0.0, 0.1, 0.0), normal=(0.0, 1.0, 0.0), friction=0.5))
    splats = load_splats(args.ply, size=args.size, center=(0.5, 0.45, 0.5), dtype=solver.torch_dtype)
    spacing = solver.dx / 2.0
    points = fill_splats(splats, spacing)
    solver.add_particles(points, material, velocity=tuple(args.velocity), volume=spacing ** 3)
    binding = bind_splats(splats, solver.positions(as_torch=True).clone())
    print(f"{len(splats)} Gaussians (SH degree {splats.sh_degree}), {len(points)} particles filling them")
    camera = Camera.look_at((0.5, 0.55, 1.5), (0.5, 0.3, 0.5), up=(0.0, 1.0, 0.0), width=args.width,
                            height=args.width * 3 // 4, fov_y_degrees=40.0)
    viewmats, Ks = stack_cameras([camera], solver.device)
    frames = []
    for frame in range(args.frames + 1):
        if frame:
            solver.step(1 / 30)
        x = solver.positions(as_torch=True)
        F = solver.deformation_gradients(as_torch=True)
        with torch.no_grad():
            means, covars, opacities, sh = advect_splats(x, F, splats, binding)
            image, _, _ = rasterize(means, None, None, opacities, sh, viewmats, Ks, camera.width, camera.height,
                                    sh_degree=splats.sh_degree, covars=covars,
                                    backgrounds=torch.ones(1, 3, device=x.device))
        write_ply(args.out / f"frame_{frame:04d}.ply", splats_to_ply(means, covars, opacities, sh))
        frames.append((image[0].clamp(0, 1) * 255).to(torch.uint8).cpu().numpy())
    imageio.mimsave(args.out / "preview.gif", frames, duration=1 / 15, loop=0)
    print(f"wrote {args.frames + 1} PLY frames and preview.gif to {args.out}")


def main(argv=None):
    parser = scene_parser("simulate_3dgs", __doc__, frames=30, obj=ASSETS / "checker_cube.obj")
    parser.add_argument("--ply", type=Path, default=None,
                        help="3DGS PLY to simulate (default: make a trained-style one from --obj)")
    parser.add_argument("--gaussians", type=int, default=20000, help="Gaussians of the generated input")
    parser.add_argument("--res", type=int, default=32, help="grid cells along the domain side")
    parser.add_argument("--size", type=float, default=0.3, help="largest extent of the object in the box of side 1")
    parser.add_argument("--E", type=float, default=3e4, help="Young's modulus")
    parser.add_argument("--nu", type=float, default=0.3, help="Poisson's ratio")
    parser.add_argument("--velocity", type=float, nargs=3, default=(0.5, -1.0, 0.0), help="initial velocity")
    parser.add_argument("--width", type=int, default=320, help="preview width (height is 3/4 of it)")
    return run(parser, argv, body)


if __name__ == "__main__":
    main()
