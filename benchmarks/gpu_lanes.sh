#!/usr/bin/env bash
# One device call on a machine of several GPUs: lane i (one quoted list of gpu_session.sh
# stages) runs on GPU i, all lanes at once, logs under $OUT/lane<i>/.
#   bash benchmarks/gpu_lanes.sh "r50ln:250 zoo1:150" "zoo75:420 tune:170"
# Lanes share the machine's tuning cache (.devcache) and its CPUs: Inductor's compile workers
# are capped per lane so that one lane's compiles do not steal the host from another's timings.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl >/dev/null 2>&1
fi
lanes=$(nvidia-smi -L | wc -l)
[ "$#" -le "$lanes" ] || { echo "$# lanes but $lanes GPU(s)"; exit 2; }
i=0
for lane in "$@"; do
  # shellcheck disable=SC2086  # a lane is a space-separated list of stages
  CUDA_VISIBLE_DEVICES=$i OUT=$OUT/lane$i TORCHINDUCTOR_COMPILE_THREADS=${LANE_COMPILE_THREADS:-8} \
    bash benchmarks/gpu_session.sh $lane >"$OUT/lane$i.log" 2>&1 &
  i=$((i + 1))
done
wait
for j in $(seq 0 $((i - 1))); do echo "##### lane $j"; cat "$OUT/lane$j.log"; done
# The device tool returns a few files per call: every lane's stage logs travel in one archive.
tar czf "$OUT/lanes.tgz" -C "$OUT" $(cd "$OUT" && ls -d lane*/) && rm -rf "$OUT"/lane*/
cp .devcache/conv2d-tuning-*.json "$OUT"/ 2>/dev/null || true
