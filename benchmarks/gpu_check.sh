#!/usr/bin/env bash
# One prepared run on a lent GPU, everything written under $OUT (default results/gpu):
#   1. tests/gpu (parity on CUDA, the copy stream, the hot path's counters),
#   2. the pinned copy bandwidth probe,
#   3. one generation table: an OPT-6.7B-shaped fp16 model with random weights, device budget a
#      quarter of the weights, batch 32, prompt 512, 32 new tokens: auto, all-KV, all-ACT, and
#      Accelerate's offload if accelerate is installed there,
#   4. last, if time is left: the quantized policies on an OPT-1.3B-shaped model (int8 and int4
#      weights, int4 weights with int8 cache blocks) beside auto, a quarter of the weights.
# Each part has its own time limit; the first three fit in 10 minutes on one H200, and the fourth
# comes last so that the run's own limit can only cut it.
#
# The GPU machine has torch and transformers and no package registry: build the rest here with
# `make gpu-deps` (pure-Python wheels into .gpu-deps/) and carry that folder with the run, e.g.
#   run(command="OUT=$OUT bash benchmarks/gpu_check.sh", carry=[".gpu-deps"], timeout_s=600)
set -u
OUT=${OUT:-results/gpu}
mkdir -p "$OUT"
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
export PYTHONPATH="$ROOT:$ROOT/.gpu-deps${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}

step() {  # step NAME SECONDS COMMAND...: run it, log to $OUT/NAME.txt, record its exit status
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
    local rc=$?
    echo "$name: exit $rc in $((SECONDS - start)) s (limit $limit s)" | tee -a "$OUT/summary.txt"
}

: > "$OUT/summary.txt"
{ nvidia-smi; $PY -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'transformers', transformers.__version__)"; } > "$OUT/environment.txt" 2>&1

step gpu-tests 240 $PY -m pytest -q -p no:cacheprovider tests/gpu --junitxml="$OUT/gpu-tests.xml"
step bandwidth 45 $PY benchmarks/bandwidth.py --device cuda --mib 512 --repeat 10 --json "$OUT/bandwidth.json"
step generation 300 $PY benchmarks/generation.py --device cuda --models opt-6.7b --budget-fraction 0.25 \
    --batch 32 --prompt 512 --new-tokens 32 --policy auto --policy all-kv --policy all-act --policy accelerate \
    --json "$OUT/generation.json"
step quantized 70 $PY benchmarks/generation.py --device cuda --models opt-1.3b --budget-fraction 0.25 \
    --batch 32 --prompt 512 --new-tokens 16 --policy auto --policy int8-weights --policy int4-weights \
    --policy int4-int8-cache --json "$OUT/quantized.json"
cat "$OUT/summary.txt"
tail -n 30 "$OUT/generation.txt"
