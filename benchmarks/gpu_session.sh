#!/usr/bin/env bash
# One device call: run the named stages in order, each under its own time limit, logs under $OUT.
#   bash benchmarks/gpu_session.sh "tests:240" "r50:300"      (device call: carry [".whl", ".devcache"])
# Stages: see the case below.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1 && [ ! -d /tmp/site/torch_pruning ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl >/dev/null 2>&1
fi
export PYTHONPATH=.:/tmp/site
# The conv tuner's disk cache travels between calls: `.devcache/` (git-ignored; name it in the
# device call's carry) holds what earlier calls tuned, and this call's file comes back in $OUT.
# Figures of fxsparse compile time taken with a warm cache say so in docs/benchmarks.md.
export FXSPARSE_CACHE_DIR=$PWD/.devcache; mkdir -p "$FXSPARSE_CACHE_DIR"
echo "tuning cache: $(ls "$FXSPARSE_CACHE_DIR" | wc -l) file(s) carried in"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
M="python3 benchmarks/models.py"
for spec in "$@"; do
  stage=${spec%%:*}; limit=${spec#*:}
  case $stage in
    tests) cmd="python3 -m pytest -v -rfE --tb=short -p no:cacheprovider -m gpu tests" ;;
    gpukernel) cmd="python3 -m pytest -q -rfE --tb=short -p no:cacheprovider -m gpu tests/test_gpu_kernel.py" ;;
    r50) cmd="$M --models resnet50 --keep 0.5 --batch 64,1 --json $OUT/r50.json" ;;
    r50b1) cmd="$M --models resnet50 --keep 0.5 --batch 1 --json $OUT/r50b1.json" ;;
    zoo64) cmd="$M --models resnet18,mobilenet_v2 --keep 0.5 --batch 64 --json $OUT/zoo64.json" ;;
    zoo1) cmd="$M --models resnet18,mobilenet_v2 --keep 0.5 --batch 1 --json $OUT/zoo1.json" ;;
    mb1) cmd="$M --models mobilenet_v2 --keep 0.5 --batch 1 --json $OUT/mb1.json" ;;
    mb64) cmd="$M --models mobilenet_v2 --keep 0.5 --batch 64 --json $OUT/mb64.json" ;;
    r50triton) cmd="$M --models resnet50 --keep 0.5 --batch 64 --lowering triton --json $OUT/r50triton.json" ;;
    r50ln) cmd="$M --models resnet50 --keep 0.5 --batch 64 --masks ln --json $OUT/r50ln.json" ;;
    r50lnlean) cmd="$M --models resnet50 --keep 0.5 --batch 64 --masks ln --variants frz,frzcg,fx,fxcg --json $OUT/r50lnlean.json" ;;
    zoo) cmd="$M --models resnet18,mobilenet_v2 --keep 0.5 --batch 64,1 --json $OUT/zoo.json" ;;
    zoo75) cmd="$M --models resnet50,resnet18,mobilenet_v2 --keep 0.25 --batch 64 --json $OUT/zoo75.json" ;;
    mbdense) cmd="$M --models mobilenet_v2 --keep 1.0 --batch 64 --json $OUT/mbdense.json" ;;
    dense) cmd="$M --models resnet50,resnet18,mobilenet_v2 --keep 1.0 --batch 64 --json $OUT/dense.json" ;;
    dense2) cmd="$M --models resnet18,mobilenet_v2 --keep 1.0 --batch 64 --json $OUT/dense2.json" ;;
    layers) cmd="python3 benchmarks/conv_layers.py --budget-s $((limit - 40)) --json $OUT/layers.json" ;;
    profile) cmd="python3 benchmarks/host_profile.py --model resnet50 --keep 0.5 --batch 1" ;;
    profmb1) cmd="python3 benchmarks/host_profile.py --model mobilenet_v2 --keep 0.5 --batch 1 --rounds 2 --cprofile 200" ;;
    profln) cmd="python3 benchmarks/host_profile.py --model resnet50 --keep 0.5 --batch 64 --masks ln --rounds 1" ;;
    split) cmd="python3 benchmarks/host_split.py --model mobilenet_v2 --batch 1 --rounds 5" ;;
    splitr50) cmd="python3 benchmarks/host_split.py --model resnet50 --batch 1 --rounds 5" ;;
    profdense) cmd="python3 benchmarks/host_profile.py --model resnet50 --keep 1.0 --batch 64 --rounds 2" ;;
    tune) cmd="python3 benchmarks/kernel_tune.py --json $OUT/tune.json" ;;
    ncu) cmd="python3 benchmarks/profile_kernels.py --json $OUT/ncu.json" ;;
    *) echo "unknown stage $stage"; continue ;;
  esac
  echo "=== $stage ($limit s): $cmd"
  t0=$(date +%s)
  timeout "$limit" $cmd >"$OUT/$stage.txt" 2>&1; rc=$?
  echo "=== $stage rc=$rc in $(( $(date +%s) - t0 )) s"
  tail -n "${TAIL:-25}" "$OUT/$stage.txt" | cut -c1-400
done
cp "$FXSPARSE_CACHE_DIR"/conv2d-tuning-*.json "$OUT"/ 2>/dev/null || true
