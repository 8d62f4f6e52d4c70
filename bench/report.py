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
            f"{d['sh_degree']}, median of {d['iters']}; peer: gsplat 1.5.3 on the same Gaussians in the same run.",
            "", "| scene | Gaussians | ours fwd / bwd (ms) | gsplat fwd / bwd (ms) | fwd+bwd vs gsplat | peak MB ours / gsplat |",
            "|---|---|---|---|---|---|"]
    for name, s in d["scenes"].items():
        o, g = s["ours"], s["gsplat"]
        rows.append(f"| {name} | {s['num_gaussians']:,} | {o['forward_ms']:.2f} / {o['backward_ms']:.2f} | "
                    f"{g['forward_ms']:.2f} / {g['backward_ms']:.2f} | **{s['ratio_fwd_bwd']:.2f}x** | "
                    f"{o['peak_mem_mb']:.0f} / {g['peak_mem_mb']:.0f} |")
    return "\n".join(rows)


def mpm_forward_table() -> str:
    d = load("mpm_forward_cuda.json")
    if d is None:
        return ""
    rows = [f"**MPM forward** (`bench/mpm_forward.py`), {d['device']}, {d['date'][:10]}, {d['material']}; "
            f"peer: the plain reference substep in `bench/mpm_reference.py`, same run. Particles in lattice "
            f"order as sampled, or shuffled.",
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
            f"own share in brackets) against storing every substep.", "",
            "| particles | substeps | K | forward (s) | backward (s) | backward / forward | peak GB | store-everything GB |",
            "|---|---|---|---|---|---|---|---|"]
    for r in d["rows"]:
        rows.append(f"| {r['particles']:,} | {r['substeps']} | {r['checkpoint_every']} | {r['forward_s']:.2f} | "
                    f"{r['backward_s']:.2f} | {r['backward_over_forward']:.2f}x | {r['peak_torch_allocated_GB']:.2f} "
                    f"({r['peak_rollout_GB']:.2f}) | {r['store_everything_GB']:.0f} |")
    return "\n".join(rows)


def report() -> str:
    return "\n\n".join(t for t in (raster_table(), mpm_forward_table(), mpm_backward_table()) if t)


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
