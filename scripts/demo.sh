#!/usr/bin/env bash
# The main job: a short training that checkpoints, is killed (kill -9), resumes, and checks the resume was exact.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m latentwire.demo "$@"
