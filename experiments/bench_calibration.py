"""Benchmark: one calibration step (update + range) on a 1M-element tensor, 2048 bins.

jitted jq vs NumPy (the same histogram + selection in plain NumPy) vs ONNX
Runtime's calibration code (when importable), side by side in one process on
the same data, interleaved repeats, medians.

    /work/refvenv/bin/python experiments/bench_calibration.py   # with ORT
    /work/venv/bin/python experiments/bench_calibration.py      # without

ORT's histogram methods are timed at the collector level
(``HistogramCollector.collect`` + ``compute_collection_result``, i.e. without
running an ONNX session); its min-max through ``MinMaxCalibrater`` on an
identity-like model (``collect_data`` + ``compute_data``), which includes the
session run that computes the reductions. Writes the table into
``experiments/results/calibration.md`` between the bench markers.
"""

from __future__ import annotations

import contextlib
import io
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings

import jax
import numpy as np

import jq.calibration as cal

N = 1 << 20
NUM_BINS = 2048
PERCENTILE = 99.99
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "calibration.md")


def jq_step(obs, x):
    update = jax.jit(obs.update)
    state1 = jax.block_until_ready(update(obs.init(x), x))

    def run():
        state = jax.block_until_ready(update(state1, x))
        return obs.range(state)

    def run_update():
        return jax.block_until_ready(update(state1, x))

    return run, run_update


def numpy_minmax(x):
    return lambda: (x.min(), x.max())


def numpy_percentile(x):
    def run():
        amax = float(np.abs(x).max())
        hist, edges = np.histogram(x, NUM_BINS, range=(-amax, amax))
        cdf = np.cumsum(hist) / hist.sum()
        cut = (100.0 - PERCENTILE) / 200.0
        return edges[np.searchsorted(cdf, cut)], edges[np.searchsorted(cdf, 1 - cut)]

    return run


def ort_fns(x):
    try:
        from onnxruntime.quantization.calibrate import HistogramCollector  # noqa: F401
    except ImportError:
        return {}
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from make_calibration_fixtures import _Batches, _identity_model
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

    tmp = tempfile.mkdtemp()
    model = os.path.join(tmp, "m.onnx")
    _identity_model(model, x.ndim)

    def minmax():
        c = create_calibrator(model, None, os.path.join(tmp, "aug.onnx"), CalibrationMethod.MinMax)
        t0 = time.perf_counter()
        c.collect_data(_Batches(x))
        out = c.compute_data()
        return time.perf_counter() - t0, out

    def hist(method, **kw):
        def run():
            col = HistogramCollector(
                method=method,
                symmetric=False,
                num_bins=NUM_BINS,
                num_quantized_bins=kw.get("nq", 255),
                percentile=PERCENTILE,
                scenario="same",
            )
            with contextlib.redirect_stdout(io.StringIO()):
                t0 = time.perf_counter()
                col.collect({"x": x})
                out = col.compute_collection_result()
            return time.perf_counter() - t0, out

        return run

    return {
        "minmax": minmax,
        "percentile": hist("percentile"),
        "entropy": hist("entropy"),
    }


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    dt = time.perf_counter() - t0
    if (
        isinstance(out, tuple)
        and len(out) == 2
        and isinstance(out[0], float)
        and not isinstance(out[1], float)
    ):
        return out[0]  # the function timed itself (ORT: excludes calibrator construction)
    return dt


def main(repeats: int = 11):
    warnings.filterwarnings("ignore")
    x = np.random.default_rng(0).standard_normal(N).astype(np.float32).reshape(1024, 1024)
    impls = {}
    for name, obs in {
        "minmax": cal.MinMax(),
        "percentile": cal.Histogram(NUM_BINS, "percentile", PERCENTILE),
        "entropy": cal.Histogram(NUM_BINS, "entropy"),
        "mse": cal.Histogram(NUM_BINS, "mse"),
    }.items():
        run, run_update = jq_step(obs, x)
        impls[(name, "jq (jit)")] = run
        impls[(name, "jq update only")] = run_update
    impls[("minmax", "numpy")] = numpy_minmax(x)
    impls[("percentile", "numpy")] = numpy_percentile(x)
    for name, fn in ort_fns(x).items():
        impls[(name, "onnxruntime")] = fn
    times = {k: [] for k in impls}
    for fn in impls.values():  # warm up (compiles)
        fn()
    for r in range(repeats):
        for k, fn in impls.items():
            if k[1] == "onnxruntime" and k[0] == "entropy" and r >= 3:
                continue  # seconds per call: three repeats are enough
            times[k].append(timed(fn))
    med = {k: statistics.median(v) for k, v in times.items()}
    versions = f"jax {jax.__version__}, numpy {np.__version__}"
    if any(k[1] == "onnxruntime" for k in impls):
        import onnxruntime

        versions += f", onnxruntime {onnxruntime.__version__}"
    lines = [
        f"1M float32 values (N(0, 1), shape 1024x1024), {NUM_BINS} bins, one update + range; "
        f"median of {repeats} interleaved repeats (ORT entropy: 3). "
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs; {versions}.",
        "",
        "| method | implementation | time (ms) | vs jq (jit) |",
        "|---|---|---:|---:|",
    ]
    for name in ("minmax", "percentile", "entropy", "mse"):
        base = med[(name, "jq (jit)")]
        for impl in ("jq (jit)", "jq update only", "numpy", "onnxruntime"):
            if (name, impl) in med:
                t = med[(name, impl)]
                lines.append(f"| {name} | {impl} | {1e3 * t:.2f} | {t / base:.2f}x |")
    table = "\n".join(lines)
    print(table)
    if os.path.exists(RESULTS):
        text = open(RESULTS).read()
        start, end = "<!-- bench:start -->", "<!-- bench:end -->"
        if start in text and end in text:
            head, rest = text.split(start, 1)
            _, tail = rest.split(end, 1)
            with open(RESULTS, "w") as f:
                f.write(head + start + "\n" + table + "\n" + end + tail)
            print("updated", RESULTS)


if __name__ == "__main__":
    main()
