# Sourced by the GPU scripts (gpu_check.sh, gpu_facts.sh) from the repository root once DRY is set: PY (python3,
# or .venv's python in a dry run here), the wheels in WHEELS (default .whl/, tools/gpu_wheels.sh) installed into
# /tmp/fv-site for a machine without a package registry, and forvalue used from this checkout when it is not
# installed (its folders linked as the forvalue package, as pyproject.toml maps them).
PY="${PYTHON:-python3}"
[[ -x .venv/bin/python && -z "${PYTHON:-}" && $DRY == 1 ]] && PY=.venv/bin/python
WHEELS="${WHEELS:-.whl}"
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/fv-site "$WHEELS"/*.whl \
    && export PYTHONPATH="/tmp/fv-site:${PYTHONPATH:-}"
fi
if ! $PY -c "import forvalue.indexer" 2>/dev/null; then
  mkdir -p /tmp/fv-src/forvalue
  for d in indexer server client proto; do ln -sfn "$PWD/$d" "/tmp/fv-src/forvalue/$d"; done
  export PYTHONPATH="/tmp/fv-src:${PYTHONPATH:-}"
fi
