#!/usr/bin/env bash
# The README's main job: set up a venv with jq[experiments] and run the digits demo.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[experiments]"
.venv/bin/python experiments/digits.py "$@"
