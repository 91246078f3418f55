#!/usr/bin/env bash
# The GPU half of the benchmark section in one run: every side-by-side figure of issue 10 with
# `--device cuda`, plus the test that needs a CUDA device. Made for a lent machine's short lease
# (at most 10 minutes with every limit reached; far less on one H200): each step has its own time
# limit, and a step that fails or runs out of time is reported and the next one runs.
#
#   bash benchmarks/gpu_checks.sh                 # writes $OUT (or gpu-results/): checks.log + JSON files
#   DEVICE=cpu QUICK=1 bash benchmarks/gpu_checks.sh   # smoke run of the script itself, on any machine
#
# Needs torch, transformers, safetensors and peft importable; deltatune itself is read from src/
# (no install), so a machine with those packages and no network runs it as it is.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-results}
DEVICE=${DEVICE:-cuda}
PYTHON=${PYTHON:-python3}
QUICK=${QUICK:+--quick}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
LOG="$OUT/checks.log"
: >"$LOG"
failed=()

step() {  # step NAME SECONDS COMMAND...: run it, log its output, remember a failure
    local name=$1 seconds=$2
    shift 2
    echo "== $name ($(date -u +%H:%M:%S), limit ${seconds}s): $*" | tee -a "$LOG"
    timeout "$seconds" "$@" 2>&1 | grep -v "GGUF tensors" | tee -a "$LOG"
    local status=${PIPESTATUS[0]}
    [ "$status" -eq 0 ] || { failed+=("$name (exit $status)"); echo "!! $name: exit $status" | tee -a "$LOG"; }
}

step environment 60 "$PYTHON" -c "import torch, transformers, peft; print('torch', torch.__version__, \
'transformers', transformers.__version__, 'peft', peft.__version__); \
print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')"
step cuda-tests 90 "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_memory.py
step lora-27M 90 "$PYTHON" benchmarks/lora_vs_peft.py --device "$DEVICE" --models llama27M --batch 8 --seq 128 \
    --prompt-fraction 0.5 --targets both --skip-full --rounds 20 --warmup 3 --json "$OUT/lora_27M.json" $QUICK
step lora-135M 100 "$PYTHON" benchmarks/lora_vs_peft.py --device "$DEVICE" --models smollm135M --batch 4 --seq 256 \
    --prompt-fraction 0.5 --targets both --skip-full --rounds 20 --warmup 3 --json "$OUT/lora_135M.json" $QUICK
step prompt-135M 80 "$PYTHON" benchmarks/prompt_vs_peft.py --device "$DEVICE" --models smollm135M --batch 4 \
    --seq 256 --rounds 10 --warmup 2 --json "$OUT/prompt_135M.json" $QUICK
step decode-27M 60 "$PYTHON" benchmarks/decode_overhead.py --device "$DEVICE" --model llama27M --rounds 10 \
    --json "$OUT/decode_27M.json" $QUICK
step decode-135M 60 "$PYTHON" benchmarks/decode_overhead.py --device "$DEVICE" --model smollm135M --rounds 10 \
    --json "$OUT/decode_135M.json" $QUICK
step mixed-27M 45 "$PYTHON" benchmarks/mixed_adapters.py --device "$DEVICE" --rounds 10 --json "$OUT/mixed_27M.json" $QUICK

echo "== done: ${#failed[@]} step(s) failed${failed:+: ${failed[*]}}" | tee -a "$LOG"
[ "${#failed[@]}" -eq 0 ]
