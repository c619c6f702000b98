#!/usr/bin/env bash
# Install what the tests need (into ./.venv) and run them on the CPU.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_env.sh test
export WANDB_MODE=disabled
# One test process per core (TEST_WORKERS to choose; 0 runs in this process): every test is single-threaded, and
# the files go to the workers whole, so a file's shared set-up runs once.
exec .venv/bin/python -m pytest -q -n "${TEST_WORKERS:-auto}" --dist loadfile tests "$@"
