"""Material from multi-view video: recover E, nu and the initial velocity of a body from images alone.

A body (``--obj``, default the shipped textured checker cube) is thrown onto the ground with hidden
E, nu and v0 and filmed by 4 cameras. Starting from a wrong guess, Adam on (log E, logit nu, v0)
through the whole differentiable chain (bridge.PhysicsScene: MPM rollout -> surface upsampling ->
rasterizer) fits the rendered videos to the target videos (MSE over every frame and view). Adam's
step (--lr on log E and logit nu, --lr-velocity on v0) decays along a cosine to --lr-end of itself.

    python -m scenes.fit_material                  # CPU size: about 3 minutes on 2 cores
    python -m scenes.fit_material --res 48 --ppc 8 --gaussians 60000 --size 256 192 --iters 100 \\
        --frames 16 --every 2                      # GPU size: 3.5 minutes on an H200

Measured on an H200 (2026-11-27, the GPU-size command, ``bench/gpu_session.sh fit_material``): 9447
particles, 60000 surface Gaussians, 86 substeps a frame, 8 frames from 4 cameras at 256x192; 100
steps at 1.59 s a step (211 s with the first step's kernel compiles); recovered E 14994 (0.04%),
nu 0.3001 (0.03%), v0 (0.5999, -0.8006, 0.3001) (0.06%); image MSE 3.2e-2 -> 3.0e-7
(bench/results/fit_material_cuda.json).

Measured on the 2-core CPU machine (no GPU), the default command: 100 steps, 1.7-1.8 s a step, 183 s
wall on an idle machine (194 s and 203 s beside other jobs); recovered E 15042 (true 15000, start 40000: 0.3% error), nu 0.2988
(true 0.3, start 0.2: 0.4%), v0 (0.600, -0.798, 0.300) (true (0.6, -0.8, 0.3), start 0: 0.2%);
image MSE 2.6e-2 -> 8.6e-7. Errors (E / nu / v0) below are from result.json the same way.
The slow part is a valley of nearly constant p-wave modulus E (1 - nu) / ((1 + nu)(1 - 2 nu)): E and
nu trade off against each other along it, and the fit needs about 60 steps to walk it (30 steps, the
old default, stopped at 25% / 47% / 5% error; 60 steps at 5% / 6% / 1.5%; 80 steps within 1.3%).
Hidden E 3e4, nu 0.4, v0 (-0.4, -0.6, 0.5) from the same start: 0.2% / 0.4% / 0.02% (100 steps).
``--iters 60 --lr 0.12 --lr-velocity 0.12`` halves the time: 1.4% / 1.7% / 0.2% on the default scene,
2.0% / 3.2% / 1.5% on the one above.

With ``--experiments K`` the same material is filmed in K recordings (recording 0 is the throw above;
the others start from other heights and positions with other velocities, drawn from --seed): one
(log E, logit nu) is shared by all of them, each recording has its own unknown initial velocity (a
[K, 3] parameter), and the loss is the mean over recordings of each one's image MSE. Under torchrun
the recordings are split over the ranks (bridge.distributed): each rank simulates and renders only
its share, the gradients are summed in one all-reduce and every rank takes the same Adam step.

    python -m scenes.fit_material --experiments 4
    torchrun --nproc_per_node=2 -m scenes.fit_material --experiments 4

Writes to --out (rank 0): curves.png (image loss and parameter errors per iteration), fit.gif (target | fit,
camera 0 and 1, every frame, recording 0), result.json (true / start / recovered values and errors,
the first step's gradients, per-step wall times ``step_ms`` and, per rank, the time of its own
share before the all-reduce ``rank_compute_ms``).
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

from torch import nn

from bridge import distributed
from scenes import ASSETS
from scenes.cli import run_distributed, scene_parser

CURVE_COLORS = {"E": (200, 40, 40), "nu": (40, 140, 40), "v0": (40, 60, 200)}


def make_cameras(width: int, height: int, target=(0.5, 0.18, 0.5)):
    """Four cameras around the landing spot, 90 degrees apart, slightly above it."""
    from render.camera import Camera

    eyes = [(0.5 + 0.8 * math.cos(a), 0.5, 0.5 + 0.8 * math.sin(a)) for a in np.radians([90, 0, 225, 315])]
    return [Camera.look_at(eye, target, up=(0.0, 1.0, 0.0), width=width, height=height, fov_y_degrees=40.0)
            for eye in eyes]


def recordings(args) -> list:
    """K throws of the body: (center, true velocity) each. Recording 0 is the default throw; the
    others are drawn from --seed (height 0.3-0.4, +-0.06 sideways, velocity +-0.4 m/s per axis)."""
    out = [((0.5, 0.3, 0.5), tuple(float(v) for v in args.true_velocity))]
    for k in range(1, args.experiments):
        rng = np.random.default_rng([args.seed, k])
        center = (0.5 + rng.uniform(-0.06, 0.06), 0.3 + rng.uniform(0.0, 0.1), 0.5 + rng.uniform(-0.06, 0.06))
        velocity = np.asarray(args.true_velocity, float) + rng.uniform(-0.4, 0.4, 3)
        out.append((tuple(float(c) for c in center), tuple(float(v) for v in velocity)))
    return out


class SharedMaterial(nn.Module):
    """The fitted unknowns of K recordings of one material: log E and nu logit (one each, shared)
    and the initial velocity of every recording, ``velocity [K, 3]``. Every rank holds all of them,
    so all ranks take part in the same all-reduce even for recordings they do not simulate."""

    def __init__(self, E: float, nu: float, velocities, dtype, device):
        from bridge.physics_scene import BodyMaterial

        super().__init__()
        self.shared = BodyMaterial(E, nu, (0.0, 0.0, 0.0), learn=("E", "nu"), dtype=dtype, device=device)
        self.velocity = nn.Parameter(torch.as_tensor(np.asarray(velocities, float), dtype=dtype, device=device))

    @property
    def log_E(self) -> nn.Parameter:
        return self.shared.log_E

    @property
    def nu_logit(self) -> nn.Parameter:
        return self.shared.nu_logit

    @property
    def E(self) -> torch.Tensor:
        return self.shared.E

    @property
    def nu(self) -> torch.Tensor:
        return self.shared.nu

    def recording(self, k: int) -> nn.Module:
        """The material module PhysicsScene of recording k reads (E, nu shared; velocity row k)."""
        return _RecordingMaterial(self, k)


class _RecordingMaterial(nn.Module):
    def __init__(self, owner: SharedMaterial, k: int):
        super().__init__()
        self.owner, self.k = owner, k

    @property
    def E(self) -> torch.Tensor:
        return self.owner.E

    @property
    def nu(self) -> torch.Tensor:
        return self.owner.nu

    @property
    def velocity(self) -> torch.Tensor:
        return self.owner.velocity[self.k]


def build_scene(args, E: float, nu: float, velocity, learn, center=(0.5, 0.3, 0.5), material=None):
    from bridge.physics_scene import Body, PhysicsScene
    from bridge.upsampling import SurfaceConfig

    body = Body(args.obj, E=E, nu=nu, velocity=tuple(velocity), size=args.body_size, center=tuple(center),
                learn=learn, learn_surface=(), surface=SurfaceConfig(n_gaussians=args.gaussians, flatten=0.5))
    return PhysicsScene([body], res=args.res, particles_per_cell=args.ppc, frame_dt=1 / 30, ground=0.1,
                        friction=0.5, E_max=args.E_max, max_speed=args.max_speed,
                        materials=None if material is None else [material])


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


def _same_on_every_rank(params, info) -> None:
    """Cheap check that the ranks still hold identical parameters: rank 0's, broadcast, must equal
    each rank's own bit for bit (they get the same summed gradient and take the same Adam step)."""
    if not info.active:
        return
    mine = torch.cat([p.detach().reshape(-1) for p in params])
    ref = mine.clone()
    torch.distributed.broadcast(ref, src=0)
    if not torch.equal(ref, mine):
        raise RuntimeError(f"rank {info.rank}: parameters drifted from rank 0's")


def body(args, info=distributed.DistInfo()):
    if args.iters < 1 or args.every < 1 or args.frames < args.every:
        raise ValueError("--iters and --every must be >= 1 and --frames >= --every")
    if not (args.lr > 0 and args.lr_velocity > 0 and 0 < args.lr_end <= 1):
        raise ValueError(f"--lr and --lr-velocity must be > 0 and --lr-end in (0, 1], got "
                         f"{args.lr}, {args.lr_velocity}, {args.lr_end}")
    if args.experiments < 1 or args.sync_check < 1:
        raise ValueError(f"--experiments and --sync-check must be >= 1, got {args.experiments}, {args.sync_check}")
    width, height = args.size
    cameras = make_cameras(width, height)
    frames = list(range(args.every, args.frames + 1, args.every))
    throws = recordings(args)
    K, single = len(throws), len(throws) == 1
    mine = distributed.shard(list(range(K)), info)  # contiguous: rank 0 always owns recording 0
    targets, scenes = {}, {}
    from taichi_mpm.runtime import device

    # float32: PhysicsScene's default simulation dtype, which the scenes below read these in
    material = SharedMaterial(args.start_E, args.start_nu, [args.start_velocity] * K, torch.float32, device())
    for k in mine:
        center, velocity = throws[k]
        target_scene = build_scene(args, args.true_E, args.true_nu, velocity, learn=(), center=center)
        with torch.no_grad():
            targets[k] = (target_scene(cameras, frames)[0], target_scene if k == 0 else None)  # 0: for fit.gif
        scenes[k] = build_scene(args, args.start_E, args.start_nu, args.start_velocity, learn=(), center=center,
                                material=material.recording(k))
    truth_v0 = np.asarray([v for _, v in throws], float)
    truth = {"E": args.true_E, "nu": args.true_nu, "v0": truth_v0[0] if single else truth_v0}
    probe = scenes[mine[0]] if mine else None
    if probe is not None and info.is_main:
        print(f"{probe.n_particles} particles, {probe.renderers[0].binding.n_gaussians} Gaussians, "
              f"{probe.substeps_per_frame} substeps/frame, frames {frames}, {len(cameras)} cameras "
              f"{width}x{height}, {K} recording(s) over {info.world_size} process(es)")
    params = [material.log_E, material.nu_logit, material.velocity]
    optimizer = torch.optim.Adam([{"params": params[:2], "lr": args.lr},
                                  {"params": params[2:], "lr": args.lr_velocity}])
    schedule = torch.optim.lr_scheduler.LambdaLR(  # cosine from 1 down to --lr-end times each group's step
        optimizer, lambda it: args.lr_end + (1 - args.lr_end) * 0.5 * (1 + math.cos(math.pi * it / args.iters)))
    losses, history, step_ms, compute_ms, sync_ms, gradient = [], {"E": [], "nu": [], "v0": []}, [], [], [], None
    for it in (bar := tqdm(range(args.iters), desc="fit E, nu, v0 from video", disable=not info.is_main)):
        start = time.perf_counter()
        optimizer.zero_grad()
        loss = torch.zeros((), dtype=torch.float64, device=device())
        for k in mine:  # each recording's MSE / K: summed over ranks this is the mean over all K
            images, _, _ = scenes[k](cameras, frames)
            loss = loss + (images - targets[k][0]).square().mean().double() / K
        if mine:
            loss.backward()
        if device().type == "cuda":
            torch.cuda.synchronize()
        computed = time.perf_counter()
        compute_ms.append(1e3 * (computed - start))  # this rank's own share, before waiting
        distributed.sum_gradients(params, info)
        total = distributed.all_sum(loss, info).item()
        sync_ms.append(1e3 * (time.perf_counter() - computed))  # waiting for the others + the all-reduces
        if gradient is None:
            gradient = {"log_E": material.log_E.grad.item(), "nu_logit": material.nu_logit.grad.item(),
                        "velocity": material.velocity.grad.cpu().double().tolist()}
        optimizer.step()
        schedule.step()
        with torch.no_grad():  # keep E under the E_max the substep was chosen for
            material.log_E.clamp_(max=math.log(args.E_max))
        if (it + 1) % args.sync_check == 0 or it + 1 == args.iters:
            _same_on_every_rank(params, info)
        step_ms.append(1e3 * (time.perf_counter() - start))
        losses.append(total)
        history["E"].append(material.E.item())
        history["nu"].append(material.nu.item())
        v0 = material.velocity.detach().cpu().double().numpy()
        history["v0"].append((v0[0] if single else v0).tolist())
        bar.set_postfix(loss=f"{losses[-1]:.2e}", E=f"{history['E'][-1]:.4g}", nu=f"{history['nu'][-1]:.3f}",
                        v0=np.round(history["v0"][-1], 3).tolist())
    rank_compute_ms = distributed.gather_object(compute_ms, info)
    rank_cpus = distributed.gather_object(distributed.format_cpulist(os.sched_getaffinity(0))
                                          if hasattr(os, "sched_getaffinity") else None, info)
    if not info.is_main:
        return None

    true_v0 = truth["v0"].tolist()
    start_v0 = list(args.start_velocity) if single else [list(args.start_velocity)] * K
    result = {"E": {"true": args.true_E, "start": args.start_E, "fit": history["E"][-1]},
              "nu": {"true": args.true_nu, "start": args.start_nu, "fit": history["nu"][-1]},
              "v0": {"true": true_v0, "start": start_v0, "fit": history["v0"][-1]},
              "loss": {"first": losses[0], "last": losses[-1]},
              "experiments": K, "world_size": info.world_size, "gradient": gradient, "step_ms": step_ms,
              "rank_compute_ms": rank_compute_ms, "rank_cpus": rank_cpus, "sync_ms": sync_ms}
    result["E"]["error"] = abs(result["E"]["fit"] / args.true_E - 1)
    result["nu"]["error"] = abs(result["nu"]["fit"] / args.true_nu - 1)
    fit_v0 = np.asarray(history["v0"][-1]).reshape(K, 3)
    result["v0"]["error"] = float(np.mean(np.linalg.norm(fit_v0 - truth_v0, axis=1) / np.linalg.norm(truth_v0, axis=1)))
    for name in ("E", "nu", "v0"):
        r = result[name]
        print(f"{name}: true {np.round(r['true'], 4).tolist()}, start {r['start']}, "
              f"recovered {np.round(r['fit'], 4).tolist()} (error {r['error']:.1%})")
    print(f"image loss {losses[0]:.3e} -> {losses[-1]:.3e}; {np.median(step_ms):.0f} ms per step (median)")

    (args.out / "result.json").write_text(json.dumps(result, indent=2))
    plot_curves(losses, history, truth, args.out / "curves.png")
    if args.no_video:
        print(f"wrote {args.out}/curves.png, {args.out}/result.json")
        return result
    every_frame = list(range(0, args.frames + 1))
    with torch.no_grad():
        t_video, _, _ = targets[0][1](cameras[:2], every_frame)
        f_video, _, _ = scenes[0](cameras[:2], every_frame)
    sides = torch.cat([torch.cat([t_video[:, c], f_video[:, c]], dim=2) for c in range(2)], dim=1)  # (T, 2H, 2W, 3)
    video = (sides.clamp(0, 1) * 255).to(torch.uint8).cpu().numpy()
    imageio.mimsave(args.out / "fit.gif", list(video), duration=1 / 15, loop=0)
    print(f"wrote {args.out}/curves.png, {args.out}/fit.gif (left: target, right: fit; rows: cameras 0, 1; "
          f"recording 0), {args.out}/result.json")
    return result


def main(argv=None):
    parser = scene_parser("fit_material", __doc__, frames=12, obj=ASSETS / "checker_cube.obj", distributed=True)
    parser.add_argument("--res", type=int, default=20, help="grid cells along the domain side")
    parser.add_argument("--ppc", type=float, default=2.0, help="particles per grid cell")
    parser.add_argument("--gaussians", type=int, default=4000, help="surface Gaussians (M)")
    parser.add_argument("--size", type=int, nargs=2, default=(64, 48), metavar=("W", "H"), help="image size")
    parser.add_argument("--every", type=int, default=3, help="frame stride of the fitted video")
    parser.add_argument("--iters", type=int, default=100, help="optimisation steps")
    parser.add_argument("--lr", type=float, default=0.08, help="Adam step on log E and logit nu")
    parser.add_argument("--lr-velocity", type=float, default=0.08, help="Adam step on v0 [m/s]")
    parser.add_argument("--lr-end", type=float, default=0.05, help="cosine decay to this fraction of the steps")
    parser.add_argument("--body-size", type=float, default=0.22, help="largest extent of the body (domain is 1)")
    parser.add_argument("--true-E", type=float, default=1.5e4)
    parser.add_argument("--true-nu", type=float, default=0.3)
    parser.add_argument("--true-velocity", type=float, nargs=3, default=(0.6, -0.8, 0.3))
    parser.add_argument("--start-E", type=float, default=4e4)
    parser.add_argument("--start-nu", type=float, default=0.2)
    parser.add_argument("--start-velocity", type=float, nargs=3, default=(0.0, 0.0, 0.0))
    parser.add_argument("--E-max", type=float, default=8e4, help="stiffest E the substep stays stable for")
    parser.add_argument("--max-speed", type=float, default=4.0, help="fastest speed the CFL substep allows for")
    parser.add_argument("--experiments", type=int, default=1,
                        help="recordings of the same material (split over the ranks under torchrun)")
    parser.add_argument("--sync-check", type=int, default=10,
                        help="under torchrun, check every N steps that all ranks hold the same parameters")
    parser.add_argument("--no-video", action="store_true", help="skip fit.gif (benchmarks)")
    return run_distributed(parser, argv, body)


if __name__ == "__main__":
    main()
