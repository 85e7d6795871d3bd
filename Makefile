# Two commands for a new user:  `make demo` (the comparison table on the built-in data) and
# `make test`. Both build .venv first if it is missing or older than pyproject.toml.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Without an NVIDIA GPU, pin the CPU build of torch that machines like ours carry locally
# (plain `torch` would pull the multi-GB CUDA build); with a GPU, pip picks the normal CUDA build.
TORCH_PIN := $(if $(shell command -v nvidia-smi 2>/dev/null),,-c .ci/constraints-cpu.txt)

.PHONY: demo test test-fast mutate env clean

$(STAMP): pyproject.toml .ci/constraints-cpu.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(TORCH_PIN) -e '.[extract,dev,tracking,distributed]'
	$(BIN)/python -m pip install -q --no-deps openai-whisper
	touch $(STAMP)

env: $(STAMP)

demo: $(STAMP)
	$(BIN)/python cli.py compare --cache av --seeds 3 --epochs 30 --name demo

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

# The fast head tests only (under a minute): what mutation testing runs for every mutant.
test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m heads_fast

# Mutation testing of heads/methods, heads/metrics.py, heads/train/evaluation.py and heads/blocks/order.py against the
# fast tests ([tool.mutmut] in pyproject.toml). One worker by default (MUTATE_JOBS=n for more);
# survivors: `$(BIN)/mutmut results`, `$(BIN)/mutmut show NAME`; see tests/MUTANTS.md.
MUTATE_JOBS ?= 1
MUTANTS ?= 'heads.methods.*' 'heads.metrics.*' 'heads.train.evaluation.*' 'heads.blocks.order.*'
mutate: $(STAMP)
	rm -rf mutants
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 $(BIN)/mutmut run --max-children $(MUTATE_JOBS) $(MUTANTS)

clean:
	rm -rf $(VENV) runs data/builtin
