#!/usr/bin/env bash
# One command for an accelerator machine (about 9 minutes on a GPU): the test suite on
# the default backend, an int8 exactness sweep, the ops benchmark and the bf16 / int8 /
# fp8 benchmark (experiments/bench_gpu.py, at most 4 minutes), summarised in summary.json
# and summary.md (see experiments/device_check.py).
#
#   bash scripts/device_check.sh [OUTDIR] [device_check.py options, e.g. --quick --stages env,gpu]
#
# OUTDIR defaults to $OUT (the device tool's output folder) or experiments/results/device.
# Uses .venv/bin/python when present, else $PYTHON or python3 with the checkout on
# PYTHONPATH (the device image has jax, flax, optax, chex, pytest and hypothesis).
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${1:-${OUT:-experiments/results/device}}
if [ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ]; then PY=.venv/bin/python; else PY=${PYTHON:-python3}; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUTDIR"
"$PY" -c "import jax; print('jax', jax.__version__, jax.devices())"
exec "$PY" experiments/device_check.py --out "$OUTDIR" "${@:2}"
