#!/usr/bin/env bash
# Set up .venv (reused when present) and run the end-to-end demo on CPU:
# built-in corpus -> curation -> tokenizer -> indexed dataset -> TP2 x PP2 x DP2 training.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
source tools/setup_venv.sh
export PYTHONWARNINGS=ignore
python examples/quickstart.py "$@"
