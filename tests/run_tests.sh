#!/usr/bin/env bash
# Set up .venv (reused when present), lint, and run the CPU test suite.
# Extra arguments go to pytest (e.g. `bash tests/run_tests.sh tests/unit -x`).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
source tools/setup_venv.sh
ruff check .
ruff format --check .
export PYTHONWARNINGS=ignore
python -m pytest -q -m "not gpu" "${@:-tests}"
