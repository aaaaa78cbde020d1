#!/usr/bin/env bash
# Creates ./.venv with the CPU build of torch 2.13 and this project (editable, with dev extras).
# Real users install their own (CUDA) torch first; pyproject.toml does not pin it.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
python -c "import torch" 2>/dev/null || pip install -q torch==2.13.0
pip install -q -c scripts/constraints.txt -e '.[dev]'
