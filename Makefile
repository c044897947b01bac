# The two commands of the README: `make train` and `make test`. Both set up .venv first.
PY := .venv/bin/python

.PHONY: setup sync test test-fast train demo lint

setup:  ## create .venv and install the project (fast when already done)
	bash scripts/setup.sh

sync: setup  ## regenerate exercises/ and solutions/ from their single source
	.venv/bin/lora-rlhf sync

# Two pytest workers (2 cores); --dist loadfile keeps each file's shared fixtures in one worker.
# Bytecode is cached (__pycache__/, ignored by git) even where the environment sets
# PYTHONDONTWRITEBYTECODE: else every worker, fork server and subprocess compiles the package and
# the tests anew (~3 CPU-s each; README, "Test suite").
test: setup  ## run the whole test suite (what CI runs)
	PYTHONDONTWRITEBYTECODE= $(PY) -m pytest -q -n 2 --dist loadfile --durations=10

test-fast: setup  ## the quick suite students run while working: everything but the embedded-model tests
	PYTHONDONTWRITEBYTECODE= $(PY) -m pytest -q -n 2 --dist loadfile -m "not slow"

train: setup  ## the main job: RLHF with LoRA on the embedded model (outputs in runs/<timestamp>)
	.venv/bin/lora-rlhf train

demo: setup  ## greedy continuation from the embedded SmolLM2-135M
	$(PY) scripts/demo.py

lint: setup  ## ruff lint and format check
	$(PY) -m ruff check src tests scripts
	$(PY) -m ruff format --check src tests scripts
