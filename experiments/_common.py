"""Shared helpers of the end-to-end experiments: timing, byte counts, tables, result files.

Timing follows the rule of `experiments/bench_ops.py`: cases that are compared
are timed *interleaved* (every repeat times each case once, in a rotating
order, as the mean of a few back-to-back calls), and a ratio is only ever
formed between medians of the same run.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import subprocess
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np
from tqdm.auto import tqdm

import jq.calibration as cal

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


# ---------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------
def interleaved_latency(
    cases: dict[str, tuple[Callable, tuple]],
    repeats: int,
    min_seconds: float = 2e-3,
    desc: str = "latency",
    progress: bool = True,
) -> dict[str, dict[str, float]]:
    """Median seconds per call of each case, timed interleaved.

    Every case is warmed up (compiled) first, and its number of back-to-back
    calls per sample is chosen so that one sample lasts about `min_seconds`.
    Then each of `repeats` rounds times every case once; the order rotates by
    one case per round so that no case always follows the same neighbour.

    Args:
      cases: ``{name: (fn, args)}``; ``fn(*args)`` returns arrays.
      repeats: rounds (samples per case); at least 3.
      min_seconds: target duration of one sample.
      desc: tqdm label.
      progress: show a tqdm bar over the rounds.

    Returns:
      ``{name: {"median": s, "min": s, "max": s, "calls": n}}``, seconds per call.

    Raises:
      ValueError: `repeats` < 3 or `cases` is empty.
    """
    if repeats < 3:
        raise ValueError(f"interleaved_latency: repeats must be >= 3, got {repeats}")
    if not cases:
        raise ValueError("interleaved_latency: `cases` is empty")
    calls = {}
    for name, (fn, args) in cases.items():
        jax.block_until_ready(fn(*args))  # compile
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        one = max(time.perf_counter() - t0, 1e-7)
        calls[name] = int(min(1000, max(1, math.ceil(min_seconds / one))))
    names = list(cases)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in tqdm(range(repeats), desc=desc, unit="round", disable=not progress, leave=False):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            fn, args = cases[name]
            n = calls[name]
            t0 = time.perf_counter()
            for _ in range(n):
                out = fn(*args)
            jax.block_until_ready(out)
            samples[name].append((time.perf_counter() - t0) / n)
    return {
        n: {
            "median": float(np.median(s)),
            "min": float(np.min(s)),
            "max": float(np.max(s)),
            "calls": calls[n],
        }
        for n, s in samples.items()
    }


class Stopwatch:
    """Wall-clock seconds of named phases: ``with sw("train"): ...``; ``sw.times``."""

    def __init__(self):
        self.times: dict[str, float] = {}
        self._start = time.perf_counter()

    def __call__(self, name: str):
        sw = self

        class _Phase:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                sw.times[name] = sw.times.get(name, 0.0) + time.perf_counter() - self.t0

        return _Phase()

    def total(self) -> float:
        return time.perf_counter() - self._start


# ---------------------------------------------------------------------------------------
# sizes
# ---------------------------------------------------------------------------------------
def tree_nbytes(tree) -> int:
    """Bytes of all array leaves of a pytree (as stored)."""
    return int(
        sum(
            np.size(x) * np.dtype(x.dtype).itemsize
            for x in jax.tree_util.tree_leaves(tree)
            if hasattr(x, "dtype")
        )
    )


def tree_size(tree) -> int:
    """Number of elements of all array leaves of a pytree."""
    return int(sum(np.size(x) for x in jax.tree_util.tree_leaves(tree) if hasattr(x, "dtype")))


# ---------------------------------------------------------------------------------------
# tables and files
# ---------------------------------------------------------------------------------------
def _fmt(v, spec: str | None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if spec is None:
        return str(v)
    if callable(spec):
        return spec(v)
    return format(v, spec)


def markdown_table(rows: Sequence[dict], columns: Sequence[tuple[str, str, object]]) -> str:
    """A GitHub markdown table.

    Args:
      rows: one dict per row.
      columns: ``(key, header, format)``; format is a `format` spec such as
        ``".2f"``, a callable, or None for ``str``. Missing values print as ``-``.
    """
    head = "| " + " | ".join(h for _, h, _ in columns) + " |"
    align = "|" + "|".join("---" if i == 0 else "---:" for i in range(len(columns))) + "|"
    body = ["| " + " | ".join(_fmt(r.get(k), f) for k, _, f in columns) + " |" for r in rows]
    return "\n".join([head, align, *body])


def machine_info() -> dict:
    """Host, CPU and library versions, recorded next to every result."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    from jq import lowering

    feats = lowering.cpu_features().flags & {
        "avx2",
        "avx512_vnni",
        "avx_vnni",
        "amx_int8",
        "asimddp",
        "i8mm",
    }
    cpu += f", int8 features {' '.join(sorted(feats)) or 'none'}"
    import flax
    import optax

    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "backend": jax.default_backend(),
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "git": _git_rev(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
    }


def _git_rev() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=os.path.dirname(os.path.abspath(__file__)),
            timeout=5,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer, np.bool_)):
        return _jsonable(x.item())
    if isinstance(x, np.ndarray) or hasattr(x, "__jax_array__") or isinstance(x, jax.Array):
        return np.asarray(x).tolist()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def write_results(out_dir: str, name: str, payload: dict, markdown: str) -> tuple[str, str]:
    """Writes ``<out_dir>/<name>.json`` and ``<out_dir>/<name>.md``; returns both paths."""
    os.makedirs(out_dir, exist_ok=True)
    jpath = os.path.join(out_dir, f"{name}.json")
    mpath = os.path.join(out_dir, f"{name}.md")
    with open(jpath, "w") as f:
        json.dump(_jsonable(payload), f, indent=1)
        f.write("\n")
    with open(mpath, "w") as f:
        f.write(markdown.rstrip() + "\n")
    return jpath, mpath


#: The static-int8 calibrators every experiment compares, in table order.
CALIBRATORS = {
    "min-max": cal.MinMax(),
    "moving average": cal.MovingAverageMinMax(averaging_constant=0.01),
    "entropy": cal.Histogram(method="entropy"),
    "MSE": cal.Histogram(method="mse"),
    "percentile 99.99": cal.Histogram(method="percentile", percentile=99.99),
}
