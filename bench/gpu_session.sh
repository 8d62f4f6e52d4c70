#!/usr/bin/env bash
# One call on the GPU machine that checks the CUDA path and re-times the benchmarks, each step
# under its own timeout (see shared/device/README.md for the carried wheels in .whl/):
#     . .whl/env.sh && bash bench/gpu_session.sh [mpm_forward] [mpm_backward] [raster] [raster_grid] [image2d] [e2e]
#                                             [e2e_compare] [multigpu] [profile] [fit_material]
#                                             [first_gradient] [first_render] [ncu_forward] [ncu_backward]
#                                             [host_sections] [ptx]
#                                             [tests] [demo]
#                                             [-- PYTEST_ARGS...]
# With no step it runs mpm_forward, tests and demo. JSON goes to $OUT (or bench/results).
# The wheels: ../shared/device/prepare.sh gsplat==1.5.3 pytorch-msssim (scenes.fit_image and
# scenes.fit_gaussians import pytorch_msssim; without it their tests fail on the GPU machine).
# mpm_forward's second peer, taichi_elements, runs where .peers/taichi_elements/engine exists: name
# .peers in the device call's carry (see bench/mpm_peer_taichi_elements.py).
#
# tests: the WHOLE pytest suite (tests/) with TAICHI_MPM_ARCH=cuda, so every test builds its tensors
#   on the GPU and the CUDA-only kernels (the tile-per-block blending) run; arguments after "--"
#   replace "tests/" (e.g. `bash bench/gpu_session.sh tests -- tests/test_render_pipeline.py`).
#   Run it whenever a kernel changes. The failures' tracebacks land in $out/tests_cuda.xml.
# Exit status: 0 only when every step exited 0; a failed test, a timeout (124) or an unknown step
# makes the script exit 1 after running the remaining steps, with a summary of the failed steps.
set -uo pipefail
out=${OUT:-bench/results}
steps=()
pytest_args=()
while [ $# -gt 0 ]; do
  if [ "$1" = "--" ]; then shift; pytest_args=("$@"); break; fi
  steps+=("$1"); shift
done
[ ${#steps[@]} -eq 0 ] && steps=(mpm_forward tests demo)
[ ${#pytest_args[@]} -eq 0 ] && pytest_args=(tests/)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
# The carried wheels are installed without byte-compiling: each new process would then compile
# taichi's modules again and print a SyntaxWarning of taichi/tools/image.py on stderr, which fails the
# tests that want a CLI error in one stderr line. Compiled once here, no process prints it.
python3 -m compileall -q "$(python3 -c 'import os, taichi; print(os.path.dirname(taichi.__file__))' 2>/dev/null)" \
  >/dev/null 2>&1 || true
failed=()
for step in "${steps[@]}"; do
  echo "=== $step"
  start=$(date +%s)
  case $step in
    tests)        # pytest-xdist where present: one file per worker, so each compiles only its own kernels
                  # (whole suite, H200: 257 s with 16 workers; over 540 s in one process, cold cache)
                  parallel=(); python3 -c "import xdist" 2>/dev/null && parallel=(-n 14 --dist loadfile)
                  TAICHI_MPM_ARCH=cuda timeout 540 python3 -m pytest -q -ra -p no:cacheprovider "${parallel[@]}" \
                    --junitxml="$out/tests_cuda.xml" "${pytest_args[@]}" ;;
    mpm_forward)  timeout 420 python3 bench/mpm_forward.py --out "$out/mpm_forward_cuda.json" ;;
    mpm_backward) timeout 400 python3 bench/mpm_backward.py --out "$out/mpm_backward_cuda.json" ;;
    raster)       MAX_JOBS=16 timeout 400 python3 bench/raster.py --out "$out/raster.json" ;;
    raster_grid)  MAX_JOBS=16 timeout 540 python3 bench/raster.py --grid --iters 5 --out "$out/raster_grid.json" ;;
    image2d)      MAX_JOBS=16 timeout 300 python3 bench/image2d.py --out "$out/image2d_cuda.json" ;;
    fit_material) timeout 540 python3 -m scenes.fit_material --res 48 --ppc 8 --gaussians 60000 --size 256 192 \
                    --iters 100 --frames 16 --every 2 --out "$out/fit_material" ;;  # the GPU-size recovery
    first_gradient) TAICHI_MPM_ARCH=cuda timeout 300 python3 bench/first_gradient.py --out "$out/first_gradient_cuda.json" ;;
    first_render) ( set -e; for w in raster splat2d; do TAICHI_MPM_ARCH=cuda timeout 200 python3 bench/first_gradient.py \
                    --workload $w --out "$out/first_gradient_cuda_$w.json"; done ) ;;
    profile)      timeout 300 python3 bench/profile_gpu.py --out "$out/profile.txt" ;;
    host_sections) timeout 200 python3 bench/host_sections.py --out "$out/host_sections_cuda.json" ;;
    ptx)          timeout 200 python3 bench/ptx_registers.py dump "$out/ptx" ;;  # then, anywhere: ptx_registers.py count
    ncu_forward)  timeout 240 python3 bench/ncu_table.py mpm_forward --out "$out/ncu_mpm_forward.txt" ;;  # needs ncu
    ncu_backward) timeout 240 python3 bench/ncu_table.py mpm_backward --out "$out/ncu_mpm_backward.txt" ;;
    e2e)          timeout 300 python3 bench/e2e_step.py --out "$out/e2e_step_cuda.json" ;;
    e2e_compare)  # E2E_SETTINGS: the settings to interleave (default: grouped launches against one a launch)
                  timeout 400 python3 bench/e2e_step.py --compare ${E2E_SETTINGS:-default grouped=0} --rounds 20 \
                    --out "$out/e2e_compare_cuda.json" ;;
    multigpu)     timeout 540 python3 bench/multigpu.py --out "$out/multigpu.json" ;;  # on a 2- or 4-GPU kind
    demo)         timeout 150 python3 -m scenes.demo --frames 48 --out /tmp/demo ;;
    *)            echo "unknown step $step" >&2; false ;;
  esac
  status=$?
  echo "=== $step: exit $status in $(( $(date +%s) - start )) s"
  [ $status -ne 0 ] && failed+=("$step (exit $status)")
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "FAILED steps: ${failed[*]}" >&2
  exit 1
fi
echo "all steps passed"
