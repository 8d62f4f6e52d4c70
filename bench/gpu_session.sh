#!/usr/bin/env bash
# One call on the GPU machine that checks the CUDA path and re-times the benchmarks, each step
# under its own timeout (see shared/device/README.md for the carried wheels in .whl/):
#     . .whl/env.sh && bash bench/gpu_session.sh [mpm_forward] [mpm_backward] [raster] [tests] [demo]
# With no arguments it runs mpm_forward, tests and demo. JSON goes to $OUT (or bench/results).
set -uo pipefail
out=${OUT:-bench/results}
steps=${*:-mpm_forward tests demo}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
for step in $steps; do
  echo "=== $step"
  start=$(date +%s)
  case $step in
    tests)        TAICHI_MPM_ARCH=cuda timeout 180 python3 -m pytest -q -x -p no:cacheprovider \
                    tests/test_runtime.py tests/test_mpm_api.py tests/test_mpm_physics.py ;;
    mpm_forward)  timeout 240 python3 bench/mpm_forward.py --out "$out/mpm_forward_cuda.json" ;;
    mpm_backward) timeout 400 python3 bench/mpm_backward.py --out "$out/mpm_backward_cuda.json" ;;
    raster)       MAX_JOBS=16 timeout 400 python3 bench/raster.py --out "$out/raster.json" ;;
    demo)         timeout 150 python3 -m scenes.demo --frames 48 --out /tmp/demo ;;
    *)            echo "unknown step $step" >&2 ;;
  esac
  echo "=== $step: exit $? in $(( $(date +%s) - start )) s"
done
