# The two commands of the README: `make train` and `make test`. Both set up .venv first.
PY := .venv/bin/python

.PHONY: setup sync test train demo lint

setup:  ## create .venv and install the project (fast when already done)
	bash scripts/setup.sh

sync: setup  ## regenerate exercises/ and solutions/ from their single source
	.venv/bin/lora-rlhf sync

test: setup  ## run the test suite
	$(PY) -m pytest -q --durations=10

# TODO(cli): run `.venv/bin/lora-rlhf train` here once the CLI lands; until then, the demo.
train: setup  ## the main job
	$(PY) scripts/demo.py

demo: setup  ## greedy continuation from the embedded SmolLM2-135M
	$(PY) scripts/demo.py

lint: setup  ## ruff lint and format check
	$(PY) -m ruff check src tests scripts
	$(PY) -m ruff format --check src tests scripts
