#!/usr/bin/env bash
# The README's test command: set up a venv with jq[test] and run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[test,hf]"
# lint: the same ruff checks and formatting everywhere
.venv/bin/ruff check jq tests experiments scripts
.venv/bin/ruff format --check jq tests experiments scripts
# one XLA compilation cache for this run's processes (tests/conftest.py), removed at exit
JQ_TEST_XLA_CACHE=$(mktemp -d)
export JQ_TEST_XLA_CACHE
trap 'rm -rf "$JQ_TEST_XLA_CACHE"' EXIT
# --durations=25: the slowest tests of each invocation, so that a slow one shows in every run.
# --dist loadfile: each file runs in one worker, so a module-scoped fixture (an experiment's
# tiny end-to-end run) is built once and a file's tests share the compilations of its
# shapes (measured on tests/ops + quantize + qparams + calibration: 7% less CPU than load)
.venv/bin/python -m pytest -q -n 2 --dist loadfile --durations=25 tests --ignore=tests/sharded
# the main suite keeps one device; the sharded tests need 8 simulated CPU devices and so
# run in separate processes (tests/sharded/conftest.py fails clearly if they get fewer)
XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=8" .venv/bin/python -m pytest -q -n 2 --durations=25 tests/sharded
