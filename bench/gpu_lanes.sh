#!/usr/bin/env bash
# On a machine of several GPUs, run groups of gpu_session.sh steps side by side, one group (lane) per
# GPU, so that one device call checks and times what one GPU would do in several calls:
#     . .whl/env.sh && bash bench/gpu_lanes.sh "tests" "e2e mpm_backward" "raster_grid" "image2d mpm_forward"
# Lane i runs on GPU i (CUDA_VISIBLE_DEVICES=i). Each lane's output goes to /tmp/lane_i.log; at the end
# every lane's step summaries and its last lines are printed, and all logs are joined into $OUT/lanes.log.
# GPU timings are the lane's own GPU; the host's CPUs are shared, so host-bound figures may be inflated.
# Every lane stops after LANE_TIMEOUT seconds (default 560: one 10-minute device call).
# Exit status: 0 only when every lane passed.
set -uo pipefail
set -m  # each lane in its own process group, so that the deadline stops its steps' children too
out=${OUT:-bench/results}
mkdir -p "$out"
lanes=("$@")
pids=()
i=0
for lane in "$@"; do
  # shellcheck disable=SC2086  (a lane is a space-separated list of steps)
  CUDA_VISIBLE_DEVICES=$i bash bench/gpu_session.sh $lane >"/tmp/lane_$i.log" 2>&1 &
  pids+=($!)
  i=$((i + 1))
done
(sleep "${LANE_TIMEOUT:-560}"; for pid in "${pids[@]}"; do kill -- -"$pid" 2>/dev/null; done) &
watchdog=$!
status=0
for j in "${!pids[@]}"; do
  wait "${pids[$j]}" || status=1
done
kill -- -"$watchdog" 2>/dev/null
: >"$out/lanes.log"
for j in "${!pids[@]}"; do
  { echo "##### lane $j (GPU $j): ${lanes[$j]}"; cat "/tmp/lane_$j.log"; } >>"$out/lanes.log"
  echo "##### lane $j: ${lanes[$j]}"
  grep -E "^=== .*exit|passed|failed|FAILED" "/tmp/lane_$j.log" | tail -8
done
exit $status
