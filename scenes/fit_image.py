"""Fit one image with N 2D Gaussians (GaussianImage) and save them in a compact file.

    python -m scenes.fit_image --input photo.png --num-gaussians 10000 --iters 5000 --loss l2
    python -m scenes.fit_image --render out/fit_image/gaussians.npz --scale 2

Writes into --out: reconstruction.png, comparison.png (target | reconstruction), psnr.png (PSNR over
iterations), gaussians.npz (16 bytes a Gaussian: 16-bit positions, float16 factors and colours) and
fit.json (PSNR, time, settings). --render turns a gaussians.npz back into an image at any --scale.
"""
from __future__ import annotations

import json
import math
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps, UnidentifiedImageError

from bridge.splat2d import GaussianImage
from taichi_mpm.runtime import device
from taichi_mpm.validation import check_int, check_positive

from .cli import check_readable_file, run, scene_parser

LOSSES = ("l2", "l1+ssim")
SSIM_WEIGHT = 0.2  # loss = 0.8 L1 + 0.2 (1 - SSIM), as 3DGS


def load_image(path: Path) -> torch.Tensor:
    """(H, W, 3) float32 in [0, 1] on the Taichi device, turned as the file's EXIF orientation says
    (phone photos: as viewers show them); ValueError if the file is not an image. See unit_rgb."""
    check_readable_file(path, "image")
    try:
        with Image.open(path) as im:
            rgb = unit_rgb(ImageOps.exif_transpose(im), path)
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"not an image file: {path} ({error.__class__.__name__})") from None
    if rgb.size == 0:
        raise ValueError(f"image is empty: {path}")
    return torch.from_numpy(rgb).to(device())


def unit_rgb(im: Image.Image, path: Path) -> np.ndarray:
    """(H, W, 3) float32 in [0, 1]: 8-bit images over 255, 16-bit greyscale over 65535 (PIL's own
    conversion to RGB would clip it at 255), float greyscale (TIFF) as it is, clipped to [0, 1] with
    a warning; alpha is dropped."""
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        grey = np.asarray(im, dtype=np.float32)
        if im.mode == "F":
            if not np.isfinite(grey).all():
                raise ValueError(f"image has NaN or infinite values: {path}")
            if grey.size and (grey.min() < 0.0 or grey.max() > 1.0):
                warnings.warn(f"{path}: float values in [{grey.min():.3g}, {grey.max():.3g}] clipped to [0, 1]")
        else:  # 32-bit integer images hold 8- or 16-bit data as PIL reads them
            grey = grey / (65535.0 if im.mode.startswith("I;16") or grey.max(initial=0) > 255 else 255.0)
        return np.repeat(np.clip(grey, 0.0, 1.0)[..., None], 3, axis=2)
    return np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0


def save_image(image: torch.Tensor, path: Path) -> None:
    Image.fromarray((image.detach().clamp(0, 1) * 255).round().byte().cpu().numpy()).save(path)


def psnr(image: torch.Tensor, target: torch.Tensor) -> float:
    mse = ((image.detach().clamp(0, 1) - target) ** 2).mean().item()
    return float("inf") if mse == 0 else -10.0 * float(np.log10(mse))


def check_loss(kind: str, target: torch.Tensor) -> None:
    """ValueError for a loss name not in LOSSES, or l1+ssim on an image with a side of one pixel
    (pytorch_msssim squeezes such an axis away and fails mid-fit)."""
    if kind not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {kind!r}")
    if kind == "l1+ssim" and min(target.shape[:2]) < 2:
        raise ValueError(f"loss 'l1+ssim' needs an image of at least 2x2 pixels (SSIM's window), got "
                         f"{target.shape[1]}x{target.shape[0]}; use 'l2'")


def image_loss(image: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "l2":
        return ((image - target) ** 2).mean()
    from pytorch_msssim import ssim

    nchw = lambda t: t.permute(2, 0, 1)[None]  # noqa: E731
    return ((1 - SSIM_WEIGHT) * (image - target).abs().mean()
            + SSIM_WEIGHT * (1 - ssim(nchw(image), nchw(target), data_range=1.0)))


PARAM_LR = {"means": 10.0, "chol": 5.0, "colors": 1.0, "opacity_logits": 5.0}  # x lr: px-sized steps


def make_optimizer(model: GaussianImage, lr: float, old: Optional[torch.optim.Optimizer] = None) -> torch.optim.Adam:
    """Adam, one group per parameter (positions and factors move in pixels, so their rates are larger).
    With `old` (the optimiser before grow_), each kept Gaussian keeps its moments; new ones start at 0."""
    params = {name: p for name, p in model.named_parameters()}
    opt = torch.optim.Adam([dict(params=[p], lr=lr * PARAM_LR[name], name=name) for name, p in params.items()],
                           lr=lr, eps=1e-15)
    if old is not None:
        for group in old.param_groups:
            state = old.state.get(group["params"][0])
            new = params[group["name"]]
            if state:
                pad = lambda t: torch.cat([t, t.new_zeros(new.shape[0] - t.shape[0], *t.shape[1:])])  # noqa: E731
                opt.state[new] = {"step": state["step"], "exp_avg": pad(state["exp_avg"]),
                                  "exp_avg_sq": pad(state["exp_avg_sq"])}
    return opt


def fit(model: GaussianImage, target: torch.Tensor, iters: int, loss: str = "l2", lr: float = 0.03,
        target_psnr: Optional[float] = None, every: int = 10,
        progress: Optional[Callable[[int, float, float], None]] = None,
        grow_to: Optional[int] = None, grow_every: Optional[int] = None) -> Dict[str, List[float]]:
    """Adam on the Gaussians for `iters` steps (or until target_psnr), learning rates on a cosine
    schedule down to 5%. With grow_to, Gaussians are added where the error is largest every
    `grow_every` steps (default iters / 40: 20 batches) in the first half of the run, in equal
    batches, until there are grow_to.
    Returns the PSNR log {"iteration", "psnr", "seconds", "gaussians"} recorded every `every` steps
    and at the end."""
    check_loss(loss, target)
    opt = make_optimizer(model, lr)
    grow_every = grow_every or max(1, iters // 40)
    grow_steps = max(1, (iters // 2) // max(grow_every, 1))
    batch = 0 if grow_to is None else -(-(grow_to - model.means.shape[0]) // grow_steps)
    log: Dict[str, List[float]] = {"iteration": [], "psnr": [], "seconds": [], "gaussians": []}
    start = time.perf_counter()
    for it in range(1, iters + 1):
        factor = 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (it - 1) / max(iters, 1)))
        for group in opt.param_groups:
            group["lr"] = lr * PARAM_LR[group["name"]] * factor
        image = model()
        image_loss(image, target, loss).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.clamp_()
        if batch > 0 and it % grow_every == 0 and it <= iters // 2 and model.means.shape[0] < grow_to:
            model.grow_(target, min(batch, grow_to - model.means.shape[0]))
            opt = make_optimizer(model, lr, opt)
        if it % every == 0 or it == iters:
            value = psnr(image, target)  # of this step's render (one sync)
            seconds = time.perf_counter() - start
            log["iteration"].append(it)
            log["psnr"].append(value)
            log["seconds"].append(seconds)
            log["gaussians"].append(model.means.shape[0])
            if progress is not None:
                progress(it, value, seconds)
            if target_psnr is not None and value >= target_psnr:
                break
    return log


def plot_psnr(iterations: List[float], values: List[float], path: Path) -> None:
    """PSNR (dB, linear axis) against iterations."""
    w, h, pad = 720, 400, 50
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    y = np.asarray(values, dtype=float)
    lo, hi = float(np.floor(y.min())), float(np.ceil(y.max()))
    hi = hi if hi > lo else lo + 1
    x_max = max(iterations[-1], 1)
    to_xy = lambda i, v: (pad + (w - 2 * pad) * i / x_max, h - pad - (h - 2 * pad) * (v - lo) / (hi - lo))  # noqa: E731
    draw.rectangle([pad, pad, w - pad, h - pad], outline="black")
    if len(y) > 1:
        draw.line([to_xy(i, v) for i, v in zip(iterations, y)], fill=(40, 80, 200), width=2)
    draw.text((pad, 10), f"PSNR (dB) from {lo:.0f} to {hi:.0f}; final {y[-1]:.2f} dB", fill="black")
    draw.text((pad, h - pad + 10), f"iterations 0 .. {int(x_max)}", fill="black")
    img.save(path)


def render_file(args) -> None:
    check_readable_file(args.render, "Gaussians file")
    scale = check_positive("--scale", args.scale)
    try:
        model = GaussianImage.load(args.render, device=device())
    except (OSError, EOFError) as error:  # np.load on a file that is no .npz
        raise ValueError(f"cannot read {args.render}: {error}") from None
    with torch.no_grad():
        image = model(scale=scale, validate=True)
    path = args.out / f"render_x{scale:g}.png"
    save_image(image, path)
    print(f"{model.means.shape[0]} Gaussians -> {image.shape[1]}x{image.shape[0]} image: {path}")


def body(args) -> None:
    if args.render is not None:
        return render_file(args)
    if args.input is None:
        raise ValueError("give --input IMAGE to fit, or --render FILE to render a saved fit")
    num = check_int("--num-gaussians", args.num_gaussians, 1)
    iters = check_int("--iters", args.iters, 1)
    check_positive("--lr", args.lr)
    target = load_image(args.input)
    check_loss(args.loss, target)
    from tqdm import tqdm

    model = GaussianImage.from_image(target, max(1, num // 4) if args.grow else num, mode=args.mode, opacity=args.mode == "alpha",
                                     generator=torch.Generator().manual_seed(args.seed))
    model(validate=True)  # checks the start once; the loop skips the sync
    bar = tqdm(total=iters, unit="it", desc="fit")

    def progress(it, value, seconds):
        bar.update(it - bar.n)
        bar.set_postfix_str(f"PSNR {value:.2f} dB, {model.means.shape[0]} Gaussians")

    log = fit(model, target, iters, args.loss, args.lr, args.target_psnr, progress=progress,
              grow_to=num if args.grow else None)
    bar.close()
    with torch.no_grad():
        final = model()
    save_image(final, args.out / "reconstruction.png")
    save_image(torch.cat([target, final.clamp(0, 1)], 1), args.out / "comparison.png")
    plot_psnr(log["iteration"], log["psnr"], args.out / "psnr.png")
    model.save(args.out / "gaussians.npz")
    stored = GaussianImage.load(args.out / "gaussians.npz", device=device())
    with torch.no_grad():
        stored_psnr = psnr(stored(), target)
    summary = dict(input=str(args.input), width=target.shape[1], height=target.shape[0], num_gaussians=model.means.shape[0],
                   iterations=int(log["iteration"][-1]), mode=args.mode, loss=args.loss, lr=args.lr,
                   psnr=psnr(final, target), psnr_compact_file=stored_psnr, seconds=log["seconds"][-1],
                   file_bytes=(args.out / "gaussians.npz").stat().st_size, log=log)
    (args.out / "fit.json").write_text(json.dumps(summary, indent=1))
    print(f"PSNR {summary['psnr']:.2f} dB ({stored_psnr:.2f} dB from the {summary['file_bytes']} byte file) "
          f"after {summary['iterations']} iterations, {summary['seconds']:.1f} s; outputs in {args.out}")


def main(argv=None):
    parser = scene_parser("fit_image", __doc__)
    parser.add_argument("--input", type=Path, help="image to fit (PNG, JPEG, ...)")
    parser.add_argument("--num-gaussians", type=int, default=10000, help="Gaussians at the end of the fit")
    parser.add_argument("--iters", type=int, default=5000, help="Adam steps (cosine learning-rate schedule)")
    parser.add_argument("--loss", choices=LOSSES, default="l2")
    parser.add_argument("--mode", choices=("sum", "alpha"), default="sum",
                        help="sum: order-free accumulated sum (GaussianImage); alpha: front-to-back compositing")
    parser.add_argument("--lr", type=float, default=0.03, help="colour learning rate (positions 10x, factors 5x)")
    parser.add_argument("--grow", action="store_true",
                        help="start with a quarter of the Gaussians and add the rest where the error is largest")
    parser.add_argument("--target-psnr", type=float, default=None, help="stop once the PSNR reaches this (dB)")
    parser.add_argument("--render", type=Path, default=None, help="render a saved gaussians.npz instead of fitting")
    parser.add_argument("--scale", type=float, default=1.0, help="resolution factor for --render")
    return run(parser, argv, body)


if __name__ == "__main__":
    main()
