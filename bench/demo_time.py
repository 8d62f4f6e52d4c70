"""How long `python -m scenes.demo` takes, as a user sees it: a fresh process, wall clock from start to exit.

    python bench/demo_time.py            # default demo, cold then warm Taichi kernel cache
    python bench/demo_time.py --quick    # tiny demo (CI check of this script)

"cold" runs with an empty Taichi offline cache (what a fresh clone sees: every kernel compiles),
"warm" runs again with that cache filled. Prints a table and writes bench/results/demo_time[_quick].json
with the machine, the date and the load average before each run (a shared machine inflates the time;
the README number should come from an idle one). There is no peer to compare with: this is the
README's "N s on a 2-core CPU" figure, measured rather than typed.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_demo(args: list[str], cache: Path, out: Path) -> dict:
    env = dict(os.environ, TI_OFFLINE_CACHE_FILE_PATH=str(cache), TAICHI_MPM_ARCH=os.environ.get("TAICHI_MPM_ARCH", "cpu"))
    load = os.getloadavg()[0]
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "scenes.demo", *args, "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"demo failed:\n{done.stderr[-3000:]}")
    summary = [line for line in done.stdout.splitlines() if "substeps" in line and "frames" in line]
    return {"seconds": round(seconds, 2), "load_before": round(load, 2), "summary": summary[-1] if summary else ""}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny demo: 2 frames, 20^3 grid, 64x48 images")
    args = parser.parse_args(argv)
    demo_args = ["--frames", "2", "--res", "20", "--width", "64", "--height", "48"] if args.quick else []
    with tempfile.TemporaryDirectory() as tmp:
        cache, out = Path(tmp) / "taichi_cache", Path(tmp) / "out"
        runs = {"cold": run_demo(demo_args, cache, out), "warm": run_demo(demo_args, cache, out)}
    result = {"name": "demo_time", "command": "python -m scenes.demo " + " ".join(demo_args),
              "device": f"{cpu_name()}, {os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d"),
              "quick": args.quick, "runs": runs}
    print(f"`{result['command'].strip()}` on {result['device']}, {result['date']}")
    print("| Taichi cache | wall s | load avg before | demo's own summary |")
    print("|---|---|---|---|")
    for name, r in runs.items():
        print(f"| {name} | {r['seconds']:.1f} | {r['load_before']:.2f} | {r['summary']} |")
    path = ROOT / "bench" / "results" / ("demo_time_quick.json" if args.quick else "demo_time.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path.relative_to(ROOT)}")
    return result


if __name__ == "__main__":
    main()
