"""Deployment round trip: export a quantized model, reload it in a fresh process, compare.

Two entry points:

* ``round_trip(model, qvars, x, path)`` (for the demos): writes the artifact to
  `path` and the inputs and expected outputs (``jax.jit`` of ``jq.apply``) to
  ``path + ".io.npz"``, then runs this file in a fresh Python process that
  imports only jax, numpy and jq, loads the artifact and compares. Returns the
  child's JSON report plus the artifact size.
* ``python experiments/deploy_check.py ARTIFACT IO.npz`` (the fresh process):
  prints one JSON line ``{"ok", "bit_identical", "max_abs_diff",
  "pred_agreement", "n", "flax_imported", "backend"}``; exit status 0 iff ok
  (outputs bit-identical and Flax never imported).
* ``python experiments/deploy_check.py --sizes`` measures artifact sizes,
  embedded vs separate weights, and writes ``experiments/results/deploy_sizes.json``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time


def _child(artifact: str, io_path: str) -> int:
    import jax
    import numpy as np

    import jq.deploy

    io = np.load(io_path, allow_pickle=False)
    xs = [io[k] for k in sorted(k for k in io.files if k.startswith("x"))]
    want = io["y"]
    f = jq.deploy.load_exported(artifact)
    got = np.asarray(f(*xs))
    same_shape = got.shape == want.shape and got.dtype == want.dtype
    bit = bool(same_shape and np.array_equal(got, want))
    diff = float(np.max(np.abs(got.astype(np.float64) - want))) if same_shape and got.size else None
    agree = None
    if same_shape and got.ndim >= 2:
        agree = float(np.mean(np.argmax(got, -1) == np.argmax(want, -1)))
    flax_imported = any(m == "flax" or m.startswith("flax.") for m in sys.modules)
    rep = {
        "ok": bit and not flax_imported,
        "bit_identical": bit,
        "max_abs_diff": diff,
        "pred_agreement": agree,
        "n": int(got.shape[0]) if got.ndim else 1,
        "flax_imported": flax_imported,
        "backend": jax.default_backend(),
        "platforms": list(f.platforms),
        "weights_mode": f.manifest["weights_mode"],
    }
    print(json.dumps(rep))
    return 0 if rep["ok"] else 1


def round_trip(
    model,
    qvars,
    x,
    path: str,
    *,
    weights: str = "embedded",
    platforms=("cpu",),
    rules=None,
    timeout: float = 600.0,
) -> dict:
    """Exports `model`/`qvars`, reloads the artifact in a fresh process and checks its outputs.

    Args:
      model, qvars: the model and its `jq.convert` variables.
      x: a batch of inputs (an array, or a tuple of arrays); the artifact is
        exported with a symbolic batch from ``x[:1]`` and checked on all of `x`.
      path: where to write the artifact (``path + ".io.npz"`` gets the inputs and
        the expected outputs).
      weights, platforms, rules: passed to `jq.flax.export.export`.

    Returns:
      The child's report (see the module docstring) plus ``artifact_bytes``,
      ``path`` and ``seconds`` (wall time of the child process).

    Raises:
      RuntimeError: the child process failed before printing its report.
    """
    import functools

    import jax
    import numpy as np

    import jq
    from jq.flax.export import export

    xs = tuple(x) if isinstance(x, (tuple, list)) else (x,)
    blob = export(
        model,
        qvars,
        tuple(a[:1] for a in xs),
        rules=rules,
        platforms=platforms,
        weights=weights,
        path=path,
    )
    if weights == "embedded":  # constants, as in a jit closing over the variables
        ref = jax.jit(lambda *a: jq.apply(model, qvars, *a))
    else:  # arguments
        ref = functools.partial(jax.jit(lambda q, *a: jq.apply(model, q, *a)), qvars)
    y = np.asarray(ref(*xs))
    io_path = os.fspath(path) + ".io.npz"
    np.savez(io_path, y=y, **{f"x{i}": np.asarray(a) for i, a in enumerate(xs)})
    t = time.perf_counter()
    r = subprocess.run(
        [sys.executable, os.path.abspath(__file__), os.fspath(path), io_path],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    secs = time.perf_counter() - t
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        raise RuntimeError(
            f"deploy_check: the fresh process failed (exit {r.returncode}):\n{r.stderr[-3000:]}"
        )
    rep = json.loads(lines[-1])
    rep.update(artifact_bytes=len(blob), path=os.fspath(path), seconds=round(secs, 2))
    return rep


# ---------------------------------------------------------------------------------------
# sizes: embedded vs separate
# ---------------------------------------------------------------------------------------
def measure_sizes(out: str | None = None) -> list[dict]:
    """Artifact sizes for MLPs of a few widths, int8 / int4, embedded vs separate, 1 or 3 platforms."""
    import flax.linen as nn
    import jax

    import jq
    from jq import calibration as cal
    from jq.deploy import read_artifact
    from jq.flax.export import export

    class MLP(nn.Module):
        width: int
        depth: int = 3

        @nn.compact
        def __call__(self, x):
            for _ in range(self.depth - 1):
                x = nn.relu(nn.Dense(self.width)(x))
            return nn.Dense(10)(x)

    rows = []
    for width, fmt in [(256, "int8"), (1024, "int8"), (1024, "int4")]:
        m = MLP(width)
        x = jax.random.normal(jax.random.key(0), (32, width))
        v = m.init(jax.random.key(1), x)
        rules = [
            jq.Rule(
                ".*",
                weight=jq.QuantSpec(fmt, axis=-1),
                activation=jq.QuantSpec("int8", calibration=cal.MinMax()),
            )
        ]
        qv = jq.convert(m, v, rules, jq.calibrate(m, v, rules, [x], progress=False))
        nb = qv.nbytes()
        float_blob = jax.export.export(jax.jit(lambda a, m=m, v=v: m.apply(v, a)))(
            *jax.export.symbolic_args_specs((x,), "b, ...")
        ).serialize()
        for platforms in [("cpu",), ("cpu", "cuda", "tpu")]:
            for mode in ("embedded", "separate"):
                blob = export(m, qv, x[:1], platforms=platforms, weights=mode)
                art = read_artifact(blob)
                w = sum(a.nbytes for a in art.weights)
                rows.append(
                    {
                        "model": f"MLP {width}x{m.depth} ({nb['total_before'] // 4:,} float params)",
                        "weights": fmt,
                        "platforms": "+".join(platforms),
                        "mode": mode,
                        "artifact_bytes": len(blob),
                        "module_bytes": len(art.module),
                        "weight_bytes": w,
                        "qvars_bytes": nb["total_after"],
                        "float_export_bytes": len(float_blob),
                    }
                )
                print(json.dumps(rows[-1]))
    if out:
        with open(out, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


def measure_load(out: str | None = None, repeats: int = 5) -> list[dict]:
    """Median seconds to load and first-call (compile) an artifact, embedded vs separate, interleaved."""
    import flax.linen as nn
    import jax
    import numpy as np

    import jq
    from jq import calibration as cal
    from jq.deploy import load_exported
    from jq.flax.export import export

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Dense(1024)(x))
            x = nn.relu(nn.Dense(1024)(x))
            return nn.Dense(10)(x)

    m = MLP()
    x = jax.random.normal(jax.random.key(0), (32, 1024))
    v = m.init(jax.random.key(1), x)
    rules = [
        jq.Rule(
            ".*",
            weight=jq.QuantSpec("int8", axis=-1),
            activation=jq.QuantSpec("int8", calibration=cal.MinMax()),
        )
    ]
    qv = jq.convert(m, v, rules, jq.calibrate(m, v, rules, [x], progress=False))
    blobs = {mode: export(m, qv, x[:1], weights=mode) for mode in ("embedded", "separate")}
    times = {mode: {"load_and_first_call": [], "call_batch32": []} for mode in blobs}
    for _ in range(repeats):
        for mode, blob in blobs.items():
            jax.clear_caches()
            t = time.perf_counter()
            f = load_exported(blob)
            f(x).block_until_ready()
            times[mode]["load_and_first_call"].append(time.perf_counter() - t)
            f(x).block_until_ready()
            t = time.perf_counter()
            for _ in range(20):
                f(x).block_until_ready()
            times[mode]["call_batch32"].append((time.perf_counter() - t) / 20)
    rows = [
        {"mode": mode, **{k: float(np.median(v)) for k, v in d.items()}, "repeats": repeats}
        for mode, d in times.items()
    ]
    for r in rows:
        print(json.dumps(r))
    if out:
        with open(out, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    here = os.path.dirname(os.path.abspath(__file__))
    if sys.argv[1:] == ["--sizes"]:
        measure_sizes(os.path.join(here, "results", "deploy_sizes.json"))
        measure_load(os.path.join(here, "results", "deploy_load.json"))
    elif len(sys.argv) == 3:
        sys.exit(_child(sys.argv[1], sys.argv[2]))
    else:
        sys.exit("usage: deploy_check.py ARTIFACT IO.npz | --sizes")
