#!/usr/bin/env bash
# Install what the tests need (into ./.venv) and run them on the CPU.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_env.sh test
export WANDB_MODE=disabled
exec .venv/bin/python -m pytest -q tests "$@"
