"""Markdown tables of the benchmark results in bench/results/, for the README.

    python bench/report.py                    # print the tables
    python bench/report.py --readme README.md # rewrite the block between the bench markers
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def load(name: str):
    path = RESULTS / name
    return json.loads(path.read_text()) if path.exists() else None


def raster_table() -> str:
    d = load("raster.json")
    if d is None:
        return ""
    w, h = d["resolution"]
    rows = [f"**Rasterization** (`bench/raster.py`), {d['device']}, {d['date'][:10]}, {w}x{h}, SH degree "
            f"{d['sh_degree']}, median of {d['iters']}; peer: gsplat 1.5.3 on the same Gaussians in the same run."
            + noted(d),
            "", "| scene | Gaussians | ours fwd / bwd (ms) | gsplat fwd / bwd (ms) | fwd+bwd vs gsplat | peak MB ours / gsplat |",
            "|---|---|---|---|---|---|"]
    for name, s in d["scenes"].items():
        o, g = s["ours"], s["gsplat"]
        rows.append(f"| {name} | {s['num_gaussians']:,} | {o['forward_ms']:.2f} / {o['backward_ms']:.2f} | "
                    f"{g['forward_ms']:.2f} / {g['backward_ms']:.2f} | **{s['ratio_fwd_bwd']:.2f}x** | "
                    f"{o['peak_mem_mb']:.0f} / {g['peak_mem_mb']:.0f} |")
    return "\n".join(rows)


def noted(d: dict) -> str:
    """A results file's "note", as a sentence to append to its table's caption ("" without one)."""
    return f" Note: {d['note']}." if d.get("note") else ""


def raster_grid_table() -> str:
    d = load("raster_grid.json")
    if d is None or d.get("quick"):
        return ""
    calls = sorted(r["ours"]["calls"] for r in d["rows"] if "calls" in r["ours"])
    median_of = (f"median of {calls[0]}-{calls[-1]} calls (small rows more), ours and the peer's interleaved"
                 if calls else f"median of {d['iters']}")
    rows = [f"**Rasterization, camera batches** (`bench/raster.py --grid`), {d['device']}, {d['date'][:10]}: "
            f"forward+backward of one batched call, SH degree {d['sh_degree']}, {median_of}; peer: "
            f"gsplat 1.5.3's `rasterization` on the same inputs, same run. GPU time from CUDA events; host: time "
            f"until the call returns (ours).", "",
            "| Gaussians | scene | cameras | image | mode | ours (ms) | gsplat (ms) | ours vs gsplat | ours host (ms) |"
            + (f" {d['other_run'].get('label', 'other run')} |" if "other_run" in d else ""),
            "|---|---|---|---|---|---|---|---|---|" + ("---|" if "other_run" in d else "")]
    ratios = sorted(r["ratio"] for r in d["rows"] if "ratio" in r)
    if ratios:
        rows[0] += (f" {sum(x <= 1.0 for x in ratios)} of {len(ratios)} rows at or under 1.0x, median "
                    f"{ratios[len(ratios) // 2]:.2f}x, range {ratios[0]:.2f}-{ratios[-1]:.2f}x."
                    + noted(d))
    for r in d["rows"]:
        o, g = r["ours"], r.get("gsplat")
        row = (f"| {r['gaussians']:,} | {r['distribution']} | {r['cameras']} | {r['width']}x{r['height']} | "
               f"{r['mode']} | ")
        if g:
            other = f" {r['ratio_other_run']:.2f}x |" if "ratio_other_run" in r else ""
            rows.append(row + f"{o['gpu_ms']:.2f} | {g['gpu_ms']:.2f} | **{r['ratio']:.2f}x** | {o['host_ms']:.2f} |"
                        + other)
        else:
            rows.append(row + f"{o['gpu_ms']:.2f} | | | {o['host_ms']:.2f} |")
    return "\n".join(rows)


def mpm_forward_table() -> str:
    d = load("mpm_forward_cuda.json")
    if d is None:
        return ""
    peers = "the plain reference substep in `bench/mpm_reference.py`"
    if any("taichi_elements" in r["ms_per_substep"] for r in d["results"]):
        peers += " and taichi_elements' solver (`bench/mpm_peer_taichi_elements.py`)"
    not_run = sorted({f"{p}: {why}" for r in d["results"] for p, why in r.get("peers_not_run", {}).items()})
    rows = [f"**MPM forward** (`bench/mpm_forward.py`), {d['device']}, {d['date'][:10]}, {d['material']}; "
            f"peers: {peers}, same run. Particles in lattice order as sampled, or shuffled."
            + (f" Not run: {'; '.join(not_run)}." if not_run else "")
            + noted(d),
            "", "| grid | particles | variant | ms / substep | G particle-steps/s |", "|---|---|---|---|---|"]
    for r in d["results"]:
        for variant, ms in r["ms_per_substep"].items():
            rows.append(f"| {r['res']}^3 | {r['particles']:,} | {variant} | {ms:.2f} | "
                        f"{r['particle_steps_per_s'][variant] / 1e9:.2f} |")
    return "\n".join(rows)


def mpm_backward_table() -> str:
    d = load("mpm_backward_cuda.json")
    if d is None:
        return ""
    rows = [f"**MPM backward** (`bench/mpm_backward.py`), {d['device']}, {d['date'][:10]}: checkpointed "
            f"`bridge.simulate`, fixed-corotated cube, float32; memory is torch's peak allocation (the rollout's "
            f"own share in brackets) against storing every substep."
            + noted(d), "",
            "| particles | substeps | K | forward (s) | backward (s) | backward / forward | peak GB | store-everything GB "
            "| ms a substep: rollout forward without grad / solver |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in d["rows"]:
        solver = f"{r['solver_ms_per_substep']:.3f}" if "solver_ms_per_substep" in r else "not measured"
        speeds = f"{1e3 * r['forward_nograd_s'] / r['substeps']:.3f} / {solver}"
        rows.append(f"| {r['particles']:,} | {r['substeps']} | {r['checkpoint_every']} | {r['forward_s']:.2f} | "
                    f"{r['backward_s']:.2f} | {r['backward_over_forward']:.2f}x | {r['peak_torch_allocated_GB']:.2f} "
                    f"({r['peak_rollout_GB']:.2f}) | {r['store_everything_GB']:.0f} | {speeds} |")
    return "\n".join(rows)


def image2d_table() -> str:
    d = load("image2d_cuda.json")
    if d is None:
        return ""
    with_pre = "gsplat_preprocess_ms" in d["render"][0]  # results before 2026-11-28 lack the column
    rows = [f"**2D image fitting** (`bench/image2d.py`), {d['device']}, {d['date'][:10]}: one forward+backward of "
            f"`bridge.splat2d` (preprocess, binning, blending, both backward kernels) beside gsplat 1.5.3's "
            f"isect_tiles + rasterize_to_pixels on the same 2D Gaussians, same run (median ms"
            + (", calls interleaved" if with_pre else "") + "). "
            "gsplat: conics and radii computed once, outside the timed call"
            + ("; gsplat + preprocess: computed from the Cholesky factors in torch inside each call, "
               "gradients to the factors (the job ours does)." if with_pre else "."), "",
            "| Gaussians | image | ours alpha (ms) | ours sum (ms) | gsplat (ms) | ours alpha vs gsplat |"
            + (" gsplat + preprocess (ms) | ours alpha vs it |" if with_pre else ""),
            "|---|---|---|---|---|---|" + ("---|---|" if with_pre else "")]
    for r in d["render"]:
        rows.append(f"| {r['n']:,} | {r['width']}x{r['height']} | {r['ours_alpha_ms']:.2f} | {r['ours_sum_ms']:.2f} | "
                    f"{r['gsplat_ms']:.2f} | **{r['ours_alpha_vs_gsplat']:.2f}x** |"
                    + (f" {r['gsplat_preprocess_ms']:.2f} | **{r['ours_alpha_vs_gsplat_preprocess']:.2f}x** |"
                       if with_pre else ""))
    for f in d.get("fit", []):
        how = "grown from 1/4" if f["grow"] else "all from the start"
        rows.append(f"\nFitting {f['image']} with {f['num_gaussians']:,} Gaussians ({how}, {f['loss']}, {f['mode']} mode): "
                    f"{f['final_psnr']:.1f} dB after {f['iterations']} steps in {f['seconds']:.2f} s "
                    f"({f['it_per_s']:.0f} it/s).")
    return "\n".join(rows)


def transient_table() -> str:
    d = load("transient_cuda.json")
    if d is None:
        return ""
    r, ratio = d["rows"], d["ratios"]
    nt, nphi = d["directions"]
    rows = [f"**NLOS transient rendering** (`bench/transient.py`), {d['device']}, {d['date'][:10]}: "
            f"{d['gaussians']:,} Gaussians, {nt}x{nphi} directions, {d['bins']} bins, forward+backward; peer: the "
            f"pure-torch autograd implementation of the same renderer (`bridge.transient_reference`), same run.", "",
            "| workload | ours (ms) | ours peak MiB | pure torch (ms) | pure torch peak MiB | speed-up | memory |",
            "|---|---|---|---|---|---|---|",
            f"| one scan point | {r['single ours']['ms']:.1f} | {r['single ours']['peak_mib']:.0f} | "
            f"{r['single torch']['ms']:.0f} | {r['single torch']['peak_mib']:.0f} | **{ratio['single_speedup']:.0f}x** | "
            f"**{ratio['single_memory_ratio']:.0f}x less** |",
            f"| 4x4 confocal scan | {r['scan 4x4 ours']['ms']:.1f} | {r['scan 4x4 ours']['peak_mib']:.0f} | "
            f"{r['scan 4x4 torch']['ms']:.0f} | {r['scan 4x4 torch']['peak_mib']:.0f} | **{ratio['scan_sub_speedup']:.0f}x** | "
            f"**{ratio['scan_sub_memory_ratio']:.0f}x less** |",
            f"| {d['scan'][0]}x{d['scan'][1]} confocal scan | {r['scan 32x32 ours']['ms']:.0f} | "
            f"{r['scan 32x32 ours']['peak_mib']:.0f} | does not fit | | | |"]
    return "\n".join(rows)


def _first_gradient_device(d: dict) -> str:
    """A first_gradient file's device cell: the device (its cores on the CPU) and its note."""
    where = f"{d['device']} ({d['cpu_count']} cores)" if d["arch"] == "cpu" else d["device"]
    return where + (f" ({d['note']})" if d.get("note") else "")


def _first_gradient_code(d: dict, run: dict) -> str:
    """A first_gradient run's code cell: the earlier checkout's label or "now"."""
    return {"before": d.get("before", "before"), "this tree": "now"}.get(run["code"], run["code"])


def first_gradient_table() -> str:
    parts = []
    for name in ("first_gradient_cpu.json", "first_gradient_cuda.json", "first_gradient_cpu_von_mises.json",
                 "first_gradient_cuda_von_mises.json", "first_gradient_cpu_sand.json", "first_gradient_cuda_sand.json",
                 "first_gradient_cpu_snow.json", "first_gradient_cuda_snow.json"):
        d = load(name)
        if d is None:
            continue
        shown = [r for r in d["runs"] if r["cache"] == "cold" or r["code"] == "this tree"]
        if not parts:
            parts += [f"**Time to the first gradient** (`bench/first_gradient.py`): a fresh process, empty Taichi "
                      f"cache, {d['scene']}: set-up, first forward, first backward (wall seconds; every kernel "
                      f"compiles inside these); and the next process, which finds them in Taichi's cache.", "",
                      "| device | material | code | set-up (s) | forward (s) | backward (s) | total (s) | 'Loading variable' warnings |",
                      "|---|---|---|---|---|---|---|---|"]
        where = _first_gradient_device(d)
        for r in shown:
            code = _first_gradient_code(d, r)
            if r["cache"] == "warm":
                code += ", next process (kernels cached)"
            parts.append(f"| {where}, {r.get('date', d['date'])[:10]} | {d.get('material', 'elastic')} | {code} | "
                         f"{r['setup_s']:.1f} | {r['forward_s']:.1f} | "
                         f"{r['backward_s']:.1f} | **{r['total_s']:.1f}** | {r['loading_variable_warnings']} |")
    return "\n".join(parts)


def first_render_table() -> str:
    """bench/first_gradient.py --workload raster / splat2d: a fresh process's first render gradient."""
    rows = []
    for arch in ("cpu", "cuda"):
        for workload in ("raster", "splat2d"):
            d = load(f"first_gradient_{arch}_{workload}.json")
            if d is None:
                continue
            if not rows:
                rows += ["**Time to the first render gradient** (`bench/first_gradient.py --workload raster|splat2d`): "
                         "a fresh process, empty Taichi cache: set-up (imports, inputs), first forward, first backward "
                         "(wall seconds, every kernel compiling inside them); and the next process, on the cache.", "",
                         "| device | workload | code | cache | set-up (s) | forward (s) | backward (s) | total (s) |",
                         "|---|---|---|---|---|---|---|---|"]
            where = _first_gradient_device(d)
            for r in d["runs"]:
                code = _first_gradient_code(d, r)
                rows.append(f"| {where}, {d['date'][:10]} | {d['scene']} | {code} | {r['cache']} | {r['setup_s']:.1f} | "
                            f"{r['forward_s']:.1f} | {r['backward_s']:.1f} | **{r['total_s']:.1f}** |")
    return "\n".join(rows)


def demo_time_table() -> str:
    d = load("demo_time.json")
    if d is None:
        return ""
    runs = d["runs"]
    return (f"**Demo time** (`bench/demo_time.py`, `{d['command'].strip()}` in a fresh process), {d['device']}, "
            f"{d['date'][:10]}: {runs['cold']['seconds']:.0f} s with an empty Taichi cache (load average "
            f"{runs['cold']['load_before']:.1f} before), {runs['warm']['seconds']:.0f} s on the next run.")


def e2e_table() -> str:
    d = load("e2e_step_cuda.json")
    if d is None:
        return ""
    w = d["workload"]
    rows = [f"**One optimisation step of the whole chain** (`bench/e2e_step.py`), {d['device']}, {d['date'][:10]}: "
            f"{w['particles']:,} particles, {w['substeps']} substeps, {w['frames']} frames x {w['views']} views at "
            f"{w['size']}x{w['size']}, full backward; median of {w['repeats']}"
            + (f"; code: {d['code']}" if "code" in d else "") + "." + noted(d), "",
            "| Gaussians | step (ms; range) | sim forward | upsampling | rendering | render+upsample backward | "
            "sim backward | peak GB |", "|---|---|---|---|---|---|---|---|"]
    names = {"surface": f"{w['gaussians']:,} surface (synthesize_surface)", "per_particle": "one per particle"}
    for r in d["rows"]:
        spread = f" ({min(r['steps_ms']):.0f}-{max(r['steps_ms']):.0f})" if "steps_ms" in r else ""
        rows.append(f"| {names.get(r['variant'], r['variant'])} | **{r['step_ms']:.0f}**{spread} | {r['sim_fwd_ms']:.0f} | "
                    f"{r['upsample_fwd_ms']:.1f} | {r['render_fwd_ms']:.1f} | {r['render_upsample_bwd_ms']:.1f} | "
                    f"{r['sim_bwd_ms']:.0f} | {r['peak_GB']:.2f} |")
    return "\n".join(rows)


def multigpu_table(name: str) -> str:
    d = load(name)
    if d is None:
        return ""
    args = " ".join(d["scene_args"])
    rows = [f"**Multi-GPU material fit** (`bench/multigpu.py`), {d['device']} x "
            f"{max(r['gpus'] for r in d['rows'])}, {d['backend']}, {d['date'][:10]}: one optimisation step of "
            f"`scenes.fit_material --experiments {d['experiments']} {args}` under torchrun, median over steps "
            f"{d['warmup'] + 1}-{d['iters']}"
            + (f", the median of {d['repeats']} interleaved runs (each run's own speedup in brackets)"
               if d.get("repeats", 1) > 1 else "")
            + "; speedup over one process in the same run; each rank's own share "
            "(its simulation and rendering, before the all-reduce), fastest and slowest rank."
            + noted(d), "",
            "| GPUs | step (ms) | speedup | ranks' own share (ms) |", "|---|---|---|---|"]
    for r in d["rows"]:
        share = r.get("rank_compute_ms", [])
        spread = (" (" + ", ".join(f"{x:.2f}x" for x in r["runs_speedup"]) + ")") if len(r.get("runs_speedup", [])) > 1 else ""
        rows.append(f"| {r['gpus']} | {r['step_ms']:.0f} | **{r['speedup']:.2f}x**{spread} | "
                    + (f"{min(share):.0f} - {max(share):.0f}" if share else "") + " |")
    others = d.get("other_runs_same_day", [])
    if others:
        rows.append("\nOther runs the same day, same workload: " + "; ".join(
            f"{o['note']}: " + ", ".join(f"{r['speedup']:.2f}x at {r['gpus']}" for r in o["rows"] if r["gpus"] > 1)
            for o in others) + f". {d.get('note_variance', '')}")
    return "\n".join(rows)


def report() -> str:
    tables = (raster_table(), raster_grid_table(), image2d_table(), transient_table(), mpm_forward_table(),
              mpm_backward_table(), e2e_table(), multigpu_table("multigpu_h200x4.json"), multigpu_table("multigpu.json"),
              first_gradient_table(), first_render_table(), demo_time_table())
    return "\n\n".join(t for t in tables if t)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--readme", type=Path, help="rewrite the benchmark block of this README")
    args = parser.parse_args()
    text = report()
    print(text)
    if args.readme:
        readme = args.readme.read_text()
        if START not in readme or END not in readme:
            raise SystemExit(f"{args.readme} has no {START} ... {END} block")
        new = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: f"{START}\n{text}\n{END}", readme, flags=re.S)
        args.readme.write_text(new)


if __name__ == "__main__":
    main()
