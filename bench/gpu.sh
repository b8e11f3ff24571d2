#!/bin/bash
# Every GPU check and timing in one run (the figures in BENCHMARKS.md come from it):
#
#     bash bench/gpu.sh                  # every step; needs checkpoints/smollm2-135m-instruct/tokenizer*.json
#     bash bench/gpu.sh kernels decode   # some steps (decode and sft make the random model themselves)
#
# Each step has its own time limit, so one slow step cannot hide the others; logs go to $OUT (or
# ./gpu-logs). Real weights are not needed: decode and SFT use a random Qwen2.5-1.5B-shaped model.
set -u
OUT=${OUT:-gpu-logs}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
TOK=checkpoints/smollm2-135m-instruct

STEPS=" ${*:-tests test_compile decode kernels sft} "

step() {  # step NAME SECONDS COMMAND...: runs only if NAME was asked for
    local name=$1 limit=$2
    shift 2
    [[ $STEPS == *" $name "* || $name == random_model ]] || return 0
    echo "=== $name ($(date +%T), limit ${limit}s): $*"
    timeout -k 5 "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$OUT/$name.log"
    echo "=== $name rc=$rc"
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader
$PY -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
step tests 100 $PY -m pytest -q -p no:cacheprovider -m gpu tests/test_kernels.py
step test_compile 60 $PY -m pytest -q -p no:cacheprovider tests/test_sample.py -k compiled
[[ $STEPS == *" decode "* || $STEPS == *" sft "* ]] && step random_model 40 $PY bench/random_model.py --shape qwen2.5-1.5b --tokenizer-from $TOK --out /tmp/qwen1.5b
step decode 200 $PY bench/decode.py --model /tmp/qwen1.5b --dtypes bfloat16 --samples 64 --new-tokens 256 --repeats 2 --compile
step kernels 90 $PY bench/kernels.py --quick
step sft 90 $PY bench/sft.py --model /tmp/qwen1.5b --lengths 4096 --dtypes bfloat16 --quick
