#!/bin/bash
# Every GPU check and timing in one run (the figures in BENCHMARKS.md come from it):
#
#     bash bench/gpu.sh                  # every step; needs checkpoints/smollm2-135m-instruct/tokenizer*.json
#     bash bench/gpu.sh kernels sft      # some steps (decode, sft and long make the random model themselves)
#     DEADLINE=900 bash bench/gpu.sh     # seconds for the whole call (default 660: 11 of a 15-minute lease)
#
# Steps, most wanted first: kernels (attention fwd and fwd+bwd vs SDPA flash at D=128/64, T=2k/8k/16k,
# one or four packed documents; RMSNorm and fused loss timings), sft (one step of a random
# Qwen2.5-1.5B-shaped model at T=8192 vs transformers with SDPA: tokens/s, MFU, first loss), long (rows
# of 8k and 32k tokens with --grad-checkpointing: peak GB, tokens/s, the longest row that fits), tests
# (pytest -m gpu, every file), decode (compiled decoding vs transformers), test_compile.
# Each step has its own time limit, cut to what is left of DEADLINE, so a slow step cannot hide the
# others; logs go to $OUT (or ./gpu-logs). Real weights are not needed: the random model stands in.
set -u
OUT=${OUT:-gpu-logs}
DEADLINE=${DEADLINE:-660}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
TOK=checkpoints/smollm2-135m-instruct
MODEL=/tmp/qwen1.5b

STEPS=" ${*:-kernels sft long tests decode test_compile} "

step() {  # step NAME SECONDS COMMAND...: runs only if NAME was asked for, within what is left of DEADLINE
    local name=$1 limit=$2 left=$((DEADLINE - SECONDS - 5))
    shift 2
    [[ $STEPS == *" $name "* ]] || return 0
    (( limit > left )) && limit=$left
    if (( limit < 20 )); then
        echo "=== $name skipped: ${left}s left of DEADLINE=${DEADLINE}s"
        return 0
    fi
    echo "=== $name ($(date +%T), limit ${limit}s): $*"
    timeout -k 5 "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 40 "$OUT/$name.log"
    echo "=== $name rc=$rc"
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader
$PY -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
step kernels 240 $PY bench/kernels.py
[[ $STEPS == *" sft "* || $STEPS == *" long "* || $STEPS == *" decode "* ]] && STEPS="$STEPS random_model "
step random_model 40 $PY bench/random_model.py --shape qwen2.5-1.5b --tokenizer-from $TOK --out $MODEL
step sft 150 $PY bench/sft.py --model $MODEL --lengths 8192 --dtypes bfloat16 --quick
step long 180 $PY bench/sft.py --model $MODEL --impls ours --lengths 8192 32768 --dtypes bfloat16 --quick \
    --grad-checkpointing --longest
step tests 120 $PY -m pytest -q -p no:cacheprovider -m gpu tests
step decode 180 $PY bench/decode.py --model $MODEL --dtypes bfloat16 --samples 64 --new-tokens 256 --repeats 2 --compile
step test_compile 60 $PY -m pytest -q -p no:cacheprovider tests/test_sample.py -k compiled
echo "=== done in ${SECONDS}s"
