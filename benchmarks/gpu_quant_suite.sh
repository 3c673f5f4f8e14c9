#!/usr/bin/env bash
# Weight-only quantization on one GPU in one call (random 7B-shaped weights, a projection): the batch-1
# product kernels' GPU tests, their per-layer times with and without the experimental bf16-pair int4 path
# (SPECINFER_INT4_PAIRS=1), and the 7B-shaped decode step in bf16, int8 and int4. About 11 minutes on an H100
# (estimated), more than one device call allows: run `gpu_tests kernels kernels_pairs` and `step` as two calls.
#
#   bash benchmarks/gpu_quant_suite.sh [OUT] [STEPS]
#
# STEPS picks some of gpu_tests, kernels, kernels_pairs, step (default: all). Tables and logs go to OUT
# (default docs/benchmarks).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-docs/benchmarks}
steps=${2:-gpu_tests kernels kernels_pairs step}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
status=0
run() {  # name, command...: run it, keep its log, carry on after a failure
    local name=$1; shift
    [[ " $steps " == *" $name "* ]] || return 0
    echo "+ $*" | tee "$out/$name.log"
    "$@" >>"$out/$name.log" 2>&1 || { status=1; echo "  failed: see $out/$name.log"; }
    grep -E '^\| |^(qkv|o|gate_up|down) 1|passed|failed|skipped' "$out/$name.log" | tail -16
}
run gpu_tests python -m pytest -q -m gpu tests/test_decode_gemv.py tests/test_tree_attention.py --tb=short
run kernels python benchmarks/quant_kernels.py --device cuda --dtype bfloat16 --rows 1 --group-size 64 \
    --tag gpu_bf16 --out "$out"
run kernels_pairs env SPECINFER_INT4_PAIRS=1 python benchmarks/quant_kernels.py --device cuda --dtype bfloat16 \
    --rows 1 --group-size 64 --tag gpu_bf16_int4_pairs --out "$out"
run step python benchmarks/scale_study.py --device cuda --compile --dtype bfloat16 --sections bandwidth,incremental,quant \
    --batches 1 --tree-sizes 16 --expansion 2,2,1 --out "$out"
exit $status
