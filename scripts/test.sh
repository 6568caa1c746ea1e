#!/usr/bin/env bash
# The README's second command: set up .venv/ when missing, then run the whole test suite.
# Extra arguments go to pytest (e.g. `scripts/test.sh -m "not slow"`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/system-deps.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MPLBACKEND=Agg GRADIO_ANALYTICS_ENABLED=False
exec .venv/bin/python -m pytest -q "$@"
