#!/usr/bin/env bash
# Set up .venv (first run: ~3 min, torch from this machine's local files) and run the test suite.
set -euo pipefail
cd "$(dirname "$0")"
source ./setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
exec .venv/bin/python -m pytest -q "$@"
