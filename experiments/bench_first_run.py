"""The first run: cold and warm times of `jq.calibrate` and `jq.convert` on the digits CNN.

Every measurement runs in a fresh Python process (nothing compiled yet, XLA's
persistent cache off), timed from after the imports and the model's float
initialisation: the first `jq.calibrate` over the calibration batches (cold),
a second identical call (warm), then the first and second `jq.convert`. The
CNN is `experiments/digits.py`'s (Conv 32 -> Conv 64 / 2 -> Dense 128 ->
Dense 10 on 8x8 digits), the rules `jq.presets.w8a8_static()` (int8 per-channel
weights, static int8 activations, min-max), the batches 8 x 64 training
images of scikit-learn's digits. Weights are the initial ones: the times do
not depend on their values.

Three ways to do `convert`'s arithmetic are compared, each in its own processes:

* ``host`` (this release): every weight and activation parameter computed by
  numpy on the host, bit-identical to XLA:CPU (`jq.hosteval`), no compilation;
* ``one jit``: the same function compiled once by XLA (`quantize_leaves_jit`);
* ``eager ops``: the same function run op by op (what `convert` did before:
  each jnp op of `quantize` / `qparams_from_*` compiled on its own).

Run: ``python experiments/bench_first_run.py [--repeats 3]``; writes
``experiments/results/first_run.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

MODES = ("host", "one jit", "eager ops")
LABELS = {
    "host": "numpy on the host (this release)",
    "one jit": "one jitted function",
    "eager ops": "eager ops (before)",
}


def worker(mode: str) -> dict:
    """One fresh process: returns the times (seconds) and the number of XLA compilations."""
    import logging
    import time

    import jax
    from digits import CNN, load_data

    import jq

    conv = sys.modules["jq.flax.convert"]  # (jq.flax.convert is also the function's name)

    if mode == "one jit":
        conv.host_eval = lambda fn, *a: None
    elif mode == "eager ops":
        conv.quantize_leaves = conv.quantize_leaves_jit.__wrapped__

    compiles = []

    class Count(logging.Handler):
        def emit(self, record):
            if "Finished XLA compilation" in record.getMessage():
                compiles.append(1)

    jax.config.update("jax_log_compiles", True)
    logging.getLogger("jax").addHandler(Count(level=logging.DEBUG))
    logging.getLogger("jax").propagate = False

    xtr, _, _, _ = load_data()
    batches = [xtr[i : i + 64] for i in range(0, 8 * 64, 64)]
    model = CNN()
    variables = jax.block_until_ready(model.init(jax.random.key(0), batches[0][:1]))
    rules = jq.presets.w8a8_static()
    out = {}
    for phase in ("calibrate", "convert"):
        for temp in ("cold", "warm"):
            compiles.clear()
            t = time.perf_counter()
            if phase == "calibrate":
                stats = jq.calibrate(model, variables, rules, batches, progress=False)
                jax.block_until_ready(stats.states)
            else:
                qv = jq.convert(model, variables, rules, stats)
                jax.block_until_ready(jax.tree_util.tree_leaves(qv))
            out[f"{phase}_{temp}_s"] = time.perf_counter() - t
            out[f"{phase}_{temp}_compiles"] = len(compiles)
    return out


def run(repeats: int) -> dict:
    env = {**os.environ, "JAX_ENABLE_COMPILATION_CACHE": "false", "JAX_PLATFORMS": "cpu"}
    runs = {m: [] for m in MODES}
    for _ in range(repeats):
        for mode in MODES:  # interleaved: load on the shared machine hits every mode alike
            p = subprocess.run(
                [sys.executable, os.path.abspath(__file__), "--worker", mode],
                capture_output=True,
                text=True,
                env=env,
                check=True,
            )
            runs[mode].append(json.loads(p.stdout.strip().splitlines()[-1]))
    rows = []
    for mode in MODES:
        row = {"mode": LABELS[mode]}
        for k in runs[mode][0]:
            row[k] = float(np.median([r[k] for r in runs[mode]]))
        rows.append(row)
    return {"rows": rows, "runs": runs, "repeats": repeats}


def render(result: dict, info: dict) -> str:
    from _common import markdown_table

    cols = [
        ("mode", "convert's arithmetic", None),
        ("calibrate_cold_s", "calibrate cold (s)", ".2f"),
        ("calibrate_warm_s", "calibrate warm (s)", ".3f"),
        ("convert_cold_s", "convert cold (s)", ".2f"),
        ("convert_cold_compiles", "XLA compilations (cold convert)", ".0f"),
        ("convert_warm_s", "convert warm (s)", ".3f"),
    ]
    host = result["rows"][0]
    return "\n".join(
        [
            "# First run: cold and warm calibrate / convert (digits CNN)",
            "",
            f"Medians of {result['repeats']} fresh processes per row, interleaved; timed after the "
            "imports. `jq.presets.w8a8_static()` on experiments/digits.py's CNN, 8 calibration "
            "batches of 64. Written by `experiments/bench_first_run.py`.",
            "",
            markdown_table(result["rows"], cols),
            "",
            f"Cold `jq.convert`: **{host['convert_cold_s']:.2f} s** (target: at most 1.5 s on 2 "
            "cores). The compilations left are small eager ops that read the observers' ranges; "
            "a cold calibration is dominated by compiling its one step (the model's forward "
            "pass with the observers), which a second call with the same model and rules reuses.",
            "",
            f"Machine: {info['cpu']}, {info['cpu_count']} cores, jax {info['jax']}, "
            f"load average {info['load_avg_1m']} (shared machine), {info['date_utc']} UTC, "
            f"git {info['git']}.",
        ]
    )


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--worker", choices=MODES)
    a = ap.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(a.worker)))
        return
    from _common import RESULTS_DIR, machine_info, write_results

    result = run(a.repeats)
    info = machine_info()
    md = render(result, info)
    write_results(RESULTS_DIR, "first_run", {**result, "machine": info}, md)
    print(md)


if __name__ == "__main__":
    main()
