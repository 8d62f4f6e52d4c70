"""Material from multi-view video: recover E, nu and the initial velocity of a body from images alone.

A body (``--obj``, default the shipped textured checker cube) is thrown onto the ground with hidden
E, nu and v0 and filmed by 4 cameras. Starting from a wrong guess, Adam on (log E, logit nu, v0)
through the whole differentiable chain (bridge.PhysicsScene: MPM rollout -> surface upsampling ->
rasterizer) fits the rendered videos to the target videos (MSE over every frame and view).

    python -m scenes.fit_material                  # CPU size: a few minutes
    python -m scenes.fit_material --res 48 --ppc 8 --gaussians 60000 --size 256 192 --iters 150 \\
        --frames 24 --every 2                      # GPU size

Writes to --out: curves.png (image loss and parameter errors per iteration), fit.gif (target | fit,
camera 0 and 1, every frame), result.json (true / start / recovered values and errors).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

from scenes import ASSETS
from scenes.cli import run, scene_parser

CURVE_COLORS = {"E": (200, 40, 40), "nu": (40, 140, 40), "v0": (40, 60, 200)}


def make_cameras(width: int, height: int, target=(0.5, 0.18, 0.5)):
    """Four cameras around the landing spot, 90 degrees apart, slightly above it."""
    from render.camera import Camera

    eyes = [(0.5 + 0.8 * math.cos(a), 0.5, 0.5 + 0.8 * math.sin(a)) for a in np.radians([90, 0, 225, 315])]
    return [Camera.look_at(eye, target, up=(0.0, 1.0, 0.0), width=width, height=height, fov_y_degrees=40.0)
            for eye in eyes]


def build_scene(args, E: float, nu: float, velocity, learn):
    from bridge.physics_scene import Body, PhysicsScene
    from bridge.upsampling import SurfaceConfig

    body = Body(args.obj, E=E, nu=nu, velocity=tuple(velocity), size=args.body_size, center=(0.5, 0.3, 0.5),
                learn=learn, learn_surface=(), surface=SurfaceConfig(n_gaussians=args.gaussians, flatten=0.5))
    return PhysicsScene([body], res=args.res, particles_per_cell=args.ppc, frame_dt=1 / 30, ground=0.1,
                        friction=0.5, E_max=args.E_max, max_speed=args.max_speed)


def plot_curves(losses, history, truth, path: Path) -> None:
    """Two panels: log10 image loss; relative error of E, nu, |v0 - v0*| per iteration (log10)."""
    w, h, pad = 720, 300, 50
    img = Image.new("RGB", (w, 2 * h), "white")
    draw = ImageDraw.Draw(img)

    def panel(top, series, label):
        draw.rectangle([pad, top + pad, w - pad, top + h - pad], outline="black")
        values = np.log10(np.maximum(np.concatenate([np.asarray(s, float) for s in series.values()]), 1e-12))
        lo, hi = float(values.min()), float(values.max())
        hi = hi if hi > lo else lo + 1
        for name, s in series.items():
            y = np.log10(np.maximum(np.asarray(s, float), 1e-12))
            pts = [(pad + (w - 2 * pad) * i / max(len(y) - 1, 1), top + h - pad - (h - 2 * pad) * (v - lo) / (hi - lo))
                   for i, v in enumerate(y)]
            draw.line(pts, fill=CURVE_COLORS.get(name, (0, 0, 0)), width=2)
        draw.text((pad, top + 10), f"{label} (log10 {lo:.2f} .. {hi:.2f})  " +
                  "  ".join(f"{n}" for n in series), fill="black")

    panel(0, {"loss": losses}, "image MSE")
    errors = {"E": [abs(e / truth["E"] - 1) for e in history["E"]],
              "nu": [abs(n / truth["nu"] - 1) for n in history["nu"]],
              "v0": [float(np.linalg.norm(np.asarray(v) - truth["v0"]) / np.linalg.norm(truth["v0"]))
                     for v in history["v0"]]}
    panel(h, errors, "relative error: E red, nu green, v0 blue")
    img.save(path)


def body(args):
    if args.iters < 1 or args.every < 1 or args.frames < args.every:
        raise ValueError("--iters and --every must be >= 1 and --frames >= --every")
    width, height = args.size
    cameras = make_cameras(width, height)
    truth = {"E": args.true_E, "nu": args.true_nu, "v0": np.asarray(args.true_velocity, float)}
    frames = list(range(args.every, args.frames + 1, args.every))
    target_scene = build_scene(args, args.true_E, args.true_nu, args.true_velocity, learn=())
    with torch.no_grad():
        target, _, _ = target_scene(cameras, frames)
    fit = build_scene(args, args.start_E, args.start_nu, args.start_velocity, learn=("E", "nu", "velocity"))
    material = fit.materials[0]
    print(f"{fit.n_particles} particles, {fit.renderers[0].binding.n_gaussians} Gaussians, "
          f"{fit.substeps_per_frame} substeps/frame, frames {frames}, {len(cameras)} cameras {width}x{height}")
    optimizer = torch.optim.Adam([{"params": [material.log_E, material.nu_logit], "lr": args.lr},
                                  {"params": [material.velocity], "lr": args.lr}])
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.iters, eta_min=args.lr / 20)
    losses, history = [], {"E": [], "nu": [], "v0": []}
    for _ in (bar := tqdm(range(args.iters), desc="fit E, nu, v0 from video")):
        optimizer.zero_grad()
        images, _, _ = fit(cameras, frames)
        loss = (images - target).square().mean()
        loss.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():  # keep E under the E_max the substep was chosen for
            material.log_E.clamp_(max=math.log(fit.E_max))
        losses.append(loss.item())
        history["E"].append(material.E.item())
        history["nu"].append(material.nu.item())
        history["v0"].append(material.velocity.detach().cpu().double().numpy().tolist())
        bar.set_postfix(loss=f"{losses[-1]:.2e}", E=f"{history['E'][-1]:.4g}", nu=f"{history['nu'][-1]:.3f}",
                        v0=np.round(history["v0"][-1], 3).tolist())

    result = {"E": {"true": args.true_E, "start": args.start_E, "fit": history["E"][-1]},
              "nu": {"true": args.true_nu, "start": args.start_nu, "fit": history["nu"][-1]},
              "v0": {"true": list(args.true_velocity), "start": list(args.start_velocity), "fit": history["v0"][-1]},
              "loss": {"first": losses[0], "last": losses[-1]}}
    result["E"]["error"] = abs(result["E"]["fit"] / args.true_E - 1)
    result["nu"]["error"] = abs(result["nu"]["fit"] / args.true_nu - 1)
    result["v0"]["error"] = float(np.linalg.norm(np.asarray(history["v0"][-1]) - truth["v0"]) / np.linalg.norm(truth["v0"]))
    for name in ("E", "nu", "v0"):
        r = result[name]
        print(f"{name}: true {r['true']}, start {r['start']}, recovered {np.round(r['fit'], 4).tolist()} "
              f"(error {r['error']:.1%})")
    print(f"image loss {losses[0]:.3e} -> {losses[-1]:.3e}")

    (args.out / "result.json").write_text(json.dumps(result, indent=2))
    plot_curves(losses, history, truth, args.out / "curves.png")
    every_frame = list(range(0, args.frames + 1))
    with torch.no_grad():
        t_video, _, _ = target_scene(cameras[:2], every_frame)
        f_video, _, _ = fit(cameras[:2], every_frame)
    sides = torch.cat([torch.cat([t_video[:, c], f_video[:, c]], dim=2) for c in range(2)], dim=1)  # (T, 2H, 2W, 3)
    video = (sides.clamp(0, 1) * 255).to(torch.uint8).cpu().numpy()
    imageio.mimsave(args.out / "fit.gif", list(video), duration=1 / 15, loop=0)
    print(f"wrote {args.out}/curves.png, {args.out}/fit.gif (left: target, right: fit; rows: cameras 0, 1), "
          f"{args.out}/result.json")
    return result


def main(argv=None):
    parser = scene_parser("fit_material", __doc__, frames=12, obj=ASSETS / "checker_cube.obj")
    parser.add_argument("--res", type=int, default=20, help="grid cells along the domain side")
    parser.add_argument("--ppc", type=float, default=2.0, help="particles per grid cell")
    parser.add_argument("--gaussians", type=int, default=4000, help="surface Gaussians (M)")
    parser.add_argument("--size", type=int, nargs=2, default=(64, 48), metavar=("W", "H"), help="image size")
    parser.add_argument("--every", type=int, default=3, help="frame stride of the fitted video")
    parser.add_argument("--iters", type=int, default=30, help="optimisation steps")
    parser.add_argument("--lr", type=float, default=0.08, help="Adam step on log E, logit nu and v0")
    parser.add_argument("--body-size", type=float, default=0.22, help="largest extent of the body (domain is 1)")
    parser.add_argument("--true-E", type=float, default=1.5e4)
    parser.add_argument("--true-nu", type=float, default=0.3)
    parser.add_argument("--true-velocity", type=float, nargs=3, default=(0.6, -0.8, 0.3))
    parser.add_argument("--start-E", type=float, default=4e4)
    parser.add_argument("--start-nu", type=float, default=0.2)
    parser.add_argument("--start-velocity", type=float, nargs=3, default=(0.0, 0.0, 0.0))
    parser.add_argument("--E-max", type=float, default=8e4, help="stiffest E the substep stays stable for")
    parser.add_argument("--max-speed", type=float, default=4.0, help="fastest speed the CFL substep allows for")
    return run(parser, argv, body)


if __name__ == "__main__":
    main()
