# Set-up and the two commands of the README, on the tested set of packages (deployments/constraints.txt).
# torch goes in first and alone (STACK.md): a combined install that fails resolution can otherwise fall back to a
# multi-GB CUDA wheel.
PY ?= python3.11
VENV := .venv
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

AZURITE_VERSION ?= 3.35.0
AZURITE := $(VENV)/azurite/node_modules/.bin/azurite-blob

.PHONY: setup browser azurite run test test-all test-fast docs clean

# uv installs (make setup: 22 s with uv, about 150 s with pip here); it gets pip's configured indexes, wheel folders and constraints as
# flags (engine/worker_envs.py), since it reads no pip configuration.
UV_INSTALL = $(VENV)/bin/uv pip install -q --python $(VENV)/bin/python $$($(VENV)/bin/python -m engine.worker_envs uv-flags)

$(STAMP): pyproject.toml deployments/constraints.txt
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q uv -c deployments/constraints.txt
	$(UV_INSTALL) "$(TORCH_SPEC)"
	$(UV_INSTALL) -e '.[test]' -c deployments/constraints.txt
	$(VENV)/bin/uv pip uninstall -q --python $(VENV)/bin/python torchvision torchaudio torchcodec 2>/dev/null || true
	$(VENV)/bin/posttrain env build vllm
	touch $(STAMP)

setup: $(STAMP)

# The Prefect UI test drives Debian's chromium through Playwright (no browser download at test time).
browser:
	@command -v chromium >/dev/null || (apt-get update -q && apt-get install -y -q --no-install-recommends chromium)

# The az:// store tests run against Azurite, Microsoft's storage emulator, from npm (kept inside .venv).
$(AZURITE):
	@command -v npm >/dev/null || (apt-get update -q && apt-get install -y -q --no-install-recommends nodejs npm)
	npm install -q --prefix $(VENV)/azurite --no-audit --no-fund azurite@$(AZURITE_VERSION)

azurite: $(AZURITE)

run: setup
	$(VENV)/bin/posttrain run grpo-pipeline

# CI's command: every unit and integration test and the end-to-end tests that fit its 40-minute budget (the main job
# on its defaults, deployments, a hub-shaped recipe of each pipeline, bad input, secrets); --durations: the slowest
# tests in every run, so the budget stays visible
test: setup browser azurite
	$(VENV)/bin/python -m pytest -m "not extended" --durations=25

# everything, the end-to-end tests marked `extended` included (resume after SIGKILL, retries, LoRA, DPO, distillation,
# tool use, the reward model, the other recipes, gs:// and az:// stores, Ray job submission, many nodes): about 80 min here
test-all: setup browser azurite
	$(VENV)/bin/python -m pytest --durations=25

# the inner loop: unit and integration tiers, no end-to-end runs
test-fast: setup azurite
	$(VENV)/bin/python -m pytest --durations=10 tests/unit tests/integration

# the API reference, rendered from the docstrings into build/docs (tests/unit/test_api_docs.py checks the same render
# and every reference the docstrings make to our code)
docs: setup
	$(VENV)/bin/pdoc engine tasks flows -o build/docs

clean:
	rm -rf $(VENV) .posttrain build
