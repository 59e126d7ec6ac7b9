#!/usr/bin/env bash
# The fact-tracing table of issue 17 on a GPU machine, in one go: tools/bench_facts.py for seeds 0, 1 and 2 at the
# default size with the issue's recipe (every weight fine-tuned, lr 1e-4), seed 0 with the benchmark's CPU recipe
# (top 8 layers, its default lr) and tools/bench_normalize.py on the DataInf tasks, all at once (one small model
# leaves the GPU mostly idle, so the jobs share it). Each job's JSON, the logs and the rankings go to $OUT.
#
#   GGUF=/path/SmolLM2-135M-Instruct.Q4_1.gguf DATAINF=/path/datainf bash tools/gpu_facts.sh
#   EXTRA="--index-checkpoint final" LIGHT_JOB=0 ... # other bench_facts options for the seed jobs, no CPU-recipe job
#   bash tools/gpu_facts.sh --dry-run        # here, on the CPU, at a toy size (MODEL=an HF dir of a tiny model)
#
# The GGUF may come in parts (GGUF_PARTS="a b", concatenated), as a registry-less machine receives it; Python
# packages it lacks travel as wheels (WHEELS=folder), forvalue itself is used from this checkout.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
DIR="${OUT:-$(mktemp -d)}"
WORK="${WORK:-$(mktemp -d)}"
LIMIT="${JOB_SECONDS:-480}"
mkdir -p "$DIR" "$WORK"

source tools/gpu_env.sh  # PY, the carried wheels, forvalue from this checkout
# JAX_PLATFORMS: bm25s uses JAX when it is installed, and JAX takes most of the GPU memory of every process
export PYTHONUNBUFFERED=1 HF_HUB_DISABLE_PROGRESS_BARS=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}" JAX_PLATFORMS=cpu
if [[ -n "${GGUF_PARTS:-}" ]]; then
  GGUF="$WORK/model.gguf"
  cat $GGUF_PARTS > "$GGUF"
fi

if (( DRY )); then
  DEV=cpu; MODEL="${MODEL:?--dry-run needs MODEL=an HF directory of a tiny model}"
  SIZE=(--people 3 --fields 2 --templates 2 --epochs 2 --batch 4 --tailpatch-questions 2); FULL=(--top-layers 1)
  LIGHT=(--top-layers 1); NORM=(--data "${DATAINF:-}/grammars" --tokens response)
else
  DEV=cuda; MODEL="${GGUF:-}"
  SIZE=(); FULL=(--top-layers 0 --lr 1e-4); LIGHT=(); NORM=(--datainf "${DATAINF:-}")
fi
MODEL_ARGS=(); [[ -n "$MODEL" ]] && MODEL_ARGS=(--model "$MODEL")
# convert the GGUF once, before the jobs that read the converted copy start together
$PY -c "import sys; from forvalue.indexer.model import load_model; load_model(sys.argv[1] if len(sys.argv) > 1 else None)" \
  "${MODEL_ARGS[@]:1}" > "$DIR/logs.txt" 2>&1

job() {  # job NAME ARGS...: tools/bench_facts.py under the time limit, its JSON to $DIR/NAME.json
  local name=$1; shift
  timeout "$LIMIT" $PY tools/bench_facts.py "${MODEL_ARGS[@]}" --device "$DEV" "${SIZE[@]}" --out "$WORK/$name" --json \
    "$@" > "$DIR/$name.json" 2> "$WORK/$name.log"
  echo "$name rc=$?" >> "$WORK/status.txt"
}
for seed in 0 1 2; do job "facts-s$seed" --seed "$seed" "${FULL[@]}" ${EXTRA:-} & done
[[ "${LIGHT_JOB:-1}" == 1 ]] && job facts-light-s0 --seed 0 "${LIGHT[@]}" ${EXTRA:-} &
if [[ -n "${DATAINF:-}" ]]; then
  ( timeout "$LIMIT" $PY tools/bench_normalize.py "${MODEL_ARGS[@]}" --device "$DEV" "${NORM[@]}" --json \
      > "$DIR/normalize.json" 2> "$WORK/normalize.log"; echo "normalize rc=$?" >> "$WORK/status.txt" ) &
fi
wait
for f in "$WORK"/status.txt "$WORK"/*.log; do echo "=== $f"; grep -v "Loading weights\|it/s]" "$f" | tail -40; done >> "$DIR/logs.txt"
(cd "$WORK" && tar cf "$DIR/rankings.tar" $(ls -d */report-*.json 2>/dev/null)) 2>/dev/null
cat "$WORK/status.txt"
