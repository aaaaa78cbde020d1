#!/usr/bin/env bash
# The fast tier on the newest torch this machine offers (2.14.1, a CUDA build that runs on CPU), in .venv-newest,
# beside the pinned torch 2.13 of scripts/test.sh; CI runs both. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
NEWEST_TORCH="${NEWEST_TORCH:-2.14.1}"
[ -x .venv-newest/bin/python ] || python3 -m venv .venv-newest
.venv-newest/bin/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$NEWEST_TORCH')" \
  2>/dev/null || .venv-newest/bin/pip install -q "torch==$NEWEST_TORCH"
.venv-newest/bin/pip install -q -c scripts/constraints.txt -e '.[dev]'
exec .venv-newest/bin/python -m pytest -m "not slow" "$@"
