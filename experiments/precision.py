"""Precision tooling on the digits and text models: jq.cast, jq.sensitivity, jq.auto_quantize.

Models and data come from `experiments/digits.py` (scikit-learn digits MLP and
CNN) and `experiments/charlm.py` (a character transformer on Python's standard
library), trained here in float32 with those scripts' own training loops.

For every model:

* ``jq.cast`` to float16 and bfloat16 (calibrated on the selection batches):
  what it keeps in float32, and the test metric, against the naive cast
  (``keep=()``: every equation in the format).
* ``jq.sensitivity`` with int4 weight-only rules: per-site output SQNR and
  metric drop.
* ``jq.auto_quantize`` (candidates int4 / int8 / bfloat16 / float32,
  weight-only) under a budget ``max_drop``; the plan, its size and its test
  metric, against uniform weight-only int8 and int4.

The plan is *selected* on batches drawn from the training data (digits: 512
training images; charlm: 32 training windows) and *reported* on the test set,
so the test metric is not the one the search optimised.

Run::

    python experiments/precision.py            # digits MLP + CNN, charlm (quick size)
    python experiments/precision.py --no-text  # digits only

Writes ``experiments/results/precision.{json,md}``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import jq

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import charlm  # noqa: E402
import digits  # noqa: E402
from _common import RESULTS_DIR, machine_info, markdown_table, write_results  # noqa: E402

CANDIDATES = ("int4", "int8", "bfloat16", "float32")


def _uniform(model, variables, fmt, args):
    rules = [jq.Rule(".*", weight=jq.QuantSpec(fmt, axis=-1))]
    return jq.convert(model, variables, rules, args=args)


def _tree_bytes(v):
    return int(sum(np.size(a) * np.dtype(a.dtype).itemsize for a in jax.tree_util.tree_leaves(v)))


def _cast_rows(model, variables, calib_inputs, test_metric, fmt):
    cm = jq.cast(model, variables, fmt, batches=calib_inputs)
    naive = jq.cast(model, variables, fmt, keep=())
    rows = cm.report()
    cats: dict = {}
    for r in rows:
        cats[r["category"]] = cats.get(r["category"], 0) + 1
    return {
        "format": fmt,
        "metric": test_metric(lambda x: cm.apply(x)),
        "naive_metric": test_metric(lambda x: naive.apply(x)),
        "kept": cats,
        "overflow_flags": len(cm.overflow),
        "bytes": cm.nbytes(),
        "summary": cm.summary(),
        "rows": rows,
    }


def study(
    name, model, variables, sel_batches, inputs, metric_fn, test_metric, max_drop, example_args
):
    """cast, sensitivity and auto_quantize on one trained model."""
    t0 = time.perf_counter()
    out = {"model": name, "max_drop": max_drop}
    fwd = jax.jit(model.apply)
    out["float"] = {
        "metric": test_metric(lambda x: fwd(variables, x)),
        "bytes": _tree_bytes(variables),
    }
    calib = [inputs(b) for b in sel_batches]
    out["cast"] = [
        _cast_rows(model, variables, calib, test_metric, f) for f in ("float16", "bfloat16")
    ]
    sens = jq.sensitivity(
        model,
        variables,
        [jq.Rule(".*", weight=jq.QuantSpec("int4", axis=-1))],
        sel_batches,
        metric_fn,
        inputs=inputs,
    )
    out["sensitivity"] = {
        "float_metric": sens.float_metric,
        "rows": list(sens.rows),
        "table": sens.table(),
    }
    res = jq.auto_quantize(
        model,
        variables,
        sel_batches,
        metric_fn,
        max_drop=max_drop,
        candidates=CANDIDATES,
        inputs=inputs,
    )
    run = jax.jit(lambda q, x: jq.apply(model, q, x))
    uni = {}
    for fmt in ("int8", "int4"):
        qv = _uniform(model, variables, fmt, example_args)
        uni[fmt] = {
            "metric": test_metric(lambda x, qv=qv: run(qv, x)),
            "bytes": int(qv.nbytes()["total_after"]),
        }
    auto_test = (
        test_metric(lambda x: run(res.qvars, x))
        if res.qvars is not None
        else out["float"]["metric"]
    )
    out["auto"] = {
        "plan": list(res.plan),
        "rules": [r.path_regex + " " + str(r.ops) + " " + r.weight.format for r in res.rules],
        "selection_metric": res.metric,
        "selection_float_metric": res.float_metric,
        "bytes": res.size_bytes,
        "metric": auto_test,
        "history": list(res.history),
        "text": str(res),
    }
    out["uniform"] = uni
    out["seconds"] = time.perf_counter() - t0
    return out


# ---------------------------------------------------------------------------------------
# digits
# ---------------------------------------------------------------------------------------
def digits_studies(epochs):
    xtr, ytr, xte, yte = digits.load_data()
    rng = np.random.default_rng(1)
    idx = rng.permutation(len(xtr))[:512]
    sel = [(xtr[idx[i : i + 128]], ytr[idx[i : i + 128]]) for i in range(0, 512, 128)]

    def metric_fn(out, b):
        return jnp.mean(jnp.argmax(out, -1) == b[1])

    def test_metric(fn):
        return 100.0 * float(np.mean(np.asarray(jnp.argmax(fn(xte), -1)) == yte))

    res = []
    for name in ("mlp", "cnn"):
        model = digits.make_model(name)
        variables = digits.train_float(model, xtr, ytr, epochs[name], seed=0, desc=name)
        res.append(
            study(
                f"digits {name}",
                model,
                variables,
                sel,
                lambda b: b[0],
                metric_fn,
                test_metric,
                max_drop=0.005,
                example_args=(xte[:2],),
            )
        )
    return res


# ---------------------------------------------------------------------------------------
# charlm
# ---------------------------------------------------------------------------------------
def charlm_study(steps):
    train_ids, test_ids, vocab, _ = charlm.load_corpus()
    cfg = types.SimpleNamespace(ctx=128, seed=0, lr=2e-3, steps=steps, warmup=50, batch=32)
    model = charlm.CharLM(vocab=len(vocab), width=128, layers=2, heads=4, ctx=128)
    variables = charlm.train_float(model, train_ids, cfg, desc="charlm")
    rng = np.random.default_rng(1)
    sel = [charlm._windows(train_ids, rng, 8, 128) for _ in range(4)]
    xt, yt = charlm.eval_windows(test_ids, 128)
    xt, yt = xt[:128], yt[:128]

    def metric_fn(out, b):  # higher is better: minus bits per character
        return -jnp.mean(charlm._nll(out, b[1])) / math.log(2)

    def test_metric(fn):
        return float(
            np.mean(
                [
                    np.asarray(charlm._nll(fn(xt[i : i + 32]), yt[i : i + 32])).mean()
                    for i in range(0, len(xt), 32)
                ]
            )
            / math.log(2)
        )

    return study(
        "charlm",
        model,
        variables,
        sel,
        lambda b: b[0],
        metric_fn,
        test_metric,
        max_drop=0.02,
        example_args=(xt[:2],),
    )


# ---------------------------------------------------------------------------------------
# a small example (the README's)
# ---------------------------------------------------------------------------------------
class Outlier(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(32, name="fragile")(x))
        h = nn.relu(nn.Dense(32, name="mid")(h))
        return nn.Dense(10, name="head")(h)


class RMSNorm(nn.Module):
    eps: float = 1e-12

    @nn.compact
    def __call__(self, x):
        var = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
        return (
            x
            * jax.lax.rsqrt(var + self.eps)
            * self.param("scale", nn.initializers.ones, (x.shape[-1],))
        )


class Small(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = RMSNorm()(nn.Dense(32)(x) * 1e-4)
        return jax.nn.log_softmax(nn.Dense(10)(nn.relu(nn.Dense(32)(h))))


def example() -> str:
    lines = []
    x = jax.random.normal(jax.random.key(1), (8, 16))
    m = Small()
    v = m.init(jax.random.key(0), x)
    cm = jq.cast(m, v, "float16", batches=[x])
    y = m.apply(v, x)
    lines += [
        "cm = jq.cast(model, variables, 'float16', batches=[x])",
        "print(jq.format_table(cm.report()))",
        jq.format_table(cm.report(), ["path", "primitive", "module", "category", "reason"]),
        "print(cm.summary())",
        cm.summary(),
        f"max |cm.apply(x) - float32| = {float(jnp.max(jnp.abs(cm.apply(x) - y))):.3g}; "
        f"naive cast (keep=()): finite = {bool(jnp.all(jnp.isfinite(jq.cast(m, v, 'float16', keep=()).apply(x))))}",
        "",
    ]
    m = Outlier()
    xs = [jax.random.normal(jax.random.key(10 + i), (64, 16)).at[:, 0].set(0.0) for i in range(3)]
    v = m.init(jax.random.key(0), xs[0])
    v = {"params": dict(v["params"])}
    v["params"]["fragile"] = dict(
        v["params"]["fragile"], kernel=v["params"]["fragile"]["kernel"].at[0].set(100.0)
    )
    batches = [(x, jnp.argmax(m.apply(v, x), -1)) for x in xs]

    def agreement(out, b):
        return jnp.mean(jnp.argmax(out, -1) == b[1])

    s = jq.sensitivity(
        m,
        v,
        [jq.Rule(".*", weight=jq.QuantSpec("int8", axis=-1))],
        batches,
        agreement,
        inputs=lambda b: b[0],
    )
    r = jq.auto_quantize(m, v, batches, agreement, max_drop=0.02, inputs=lambda b: b[0])
    lines += [
        "s = jq.sensitivity(model, variables, [jq.Rule('.*', weight=jq.QuantSpec('int8', axis=-1))],",
        "                   batches, agreement, inputs=lambda b: b[0])",
        "print(s)",
        str(s),
        "",
        "r = jq.auto_quantize(model, variables, batches, agreement, max_drop=0.02, inputs=lambda b: b[0])",
        "print(r)",
        str(r),
        "r.rules:",
    ] + [f"  {rule}" for rule in r.rules]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
README_SECTION = """\
## Precision tooling: float16 / bfloat16, sensitivity, automatic mixed precision

**Casting policy.** `jq.cast(model, variables, "float16" | "bfloat16", batches=None)` returns a
`CastModel` whose `apply` (jitted; the model is also a pytree for an outer `jax.jit`) runs the
unmodified model in the low format, with parameters stored in it and dots / convolutions
accumulating in float32, while it keeps in float32 what the format would break:

| category | kept in float32 |
|---|---|
| `norm` | `rsqrt` / `sqrt` of a statistic, the `var + eps` add (the report says whether `eps` underflows: `jq.numerics.format_info(fmt).check(eps)`), the multiply by it |
| `softmax` | `exp` feeding a sum, the sum, the division by it |
| `reduction` | sums, products, max / min, cumulative ops, and squares that feed a sum |
| `loss` | `log`, `log1p` (log-softmax, cross-entropy) |
| `transcendental` | other `exp`, `expm1`, `exp2`, `pow` |
| `literal` | equations with a literal the format cannot hold (`1e-12` underflows float16) |
| `overflow` | with `batches`: equations (and their consumers) whose calibrated `max abs(x)` exceeds the format's max (float16: 65504); parameters that overflow stay float32 |

jq traces the model in float32, so a Flax `LayerNorm` and a custom norm written with `jnp` look the
same to it: the statistics of both stay float32 whatever `force_float32_reductions` says.
Everything else runs in the format; an equation whose float inputs are all float32 statistics
stays float32 too. `cm.report()` lists each kept equation (jaxpr path, primitive, module,
category, reason), `cm.summary()` counts them, `keep=(...)` selects categories (`keep=()` is the
naive cast, for comparison) and `keep_modules=[regex]` keeps whole modules.

**Sensitivity.** `jq.sensitivity(model, variables, rules, batches, metric_fn=None, inputs=None)`
quantizes one site at a time (the others float), through the same integer path as `jq.apply`,
and reports per site the output MSE, the SQNR in dB and, with `metric_fn(outputs, batch)`
(higher is better), the metric drop; sorted most sensitive first, printable, and returned as
data (`result.rows`). Static rules are calibrated once. `inputs(batch)` picks the model input
out of a batch that also carries labels.

**Automatic mixed precision.** `jq.auto_quantize(model, variables, batches, metric_fn,
max_drop=0.01, candidates=("int4", "int8", "bfloat16", "float32"))` picks per site the cheapest
format that keeps the metric within `max_drop` of float32. Greedy descent, verified jointly:
every unit (one module and op kind, merged when sites share a parameter) starts at float32; the
drop of each unit alone at each cheaper format is measured; then moves "lower one unit by one
format" are applied in order of bytes saved per unit of drop alone, each kept only if the metric
of the whole plan stays within budget (a rejected move freezes that unit). Drops do not add up
exactly, so each accepted step is a measured plan. The result carries `rules` (one
`jq.Rule(re.escape(module), ops=(kind,), ...)` each) that `jq.convert` takes as they are, the
converted `qvars`, the size in bytes and the metric measured with `jq.apply`.
"""


def render(result) -> str:
    out = [
        README_SECTION,
        "# Results: jq.cast, jq.sensitivity, jq.auto_quantize",
        "",
        f"{result['machine'].get('cpu', '')}; jax {jax.__version__}; run {result['date']}. "
        "Selection (calibration, sensitivity, plan search) on training data; metrics on the test set.",
        "",
    ]
    for st in result["studies"]:
        lower_better = st["model"] == "charlm"
        unit = "test bits/char (lower is better)" if lower_better else "test accuracy (%)"
        out += [
            f"## {st['model']}",
            "",
            f"Budget: max_drop = {st['max_drop']} "
            f"({'bits/char' if lower_better else 'accuracy fraction'}) on the selection batches.",
            "",
        ]
        rows = [["float32", f"{st['float']['metric']:.4f}", f"{st['float']['bytes']:,}", "-"]]
        for fmt in ("int8", "int4"):
            u = st["uniform"][fmt]
            rows.append(
                [f"uniform {fmt} (weight-only)", f"{u['metric']:.4f}", f"{u['bytes']:,}", "-"]
            )
        a = st["auto"]
        plan = ", ".join(f"{p['modules']}:{p['format']}" for p in a["plan"])
        rows.append(["auto_quantize", f"{a['metric']:.4f}", f"{a['bytes']:,}", plan])
        for c in st["cast"]:
            rows.append(
                [
                    f"jq.cast {c['format']} (naive cast: {c['naive_metric']:.4f})",
                    f"{c['metric']:.4f}",
                    f"{c['bytes']:,}",
                    (", ".join(f"{v} {k}" for k, v in sorted(c["kept"].items())) or "nothing")
                    + f"; {c['overflow_flags']} overflow flags",
                ]
            )
        cols = [
            ("method", "method", None),
            ("metric", unit, None),
            ("bytes", "bytes", None),
            ("plan", "plan / kept in float32", None),
        ]
        table = markdown_table(
            [dict(zip(("method", "metric", "bytes", "plan"), r)) for r in rows], cols
        )
        out += [
            table,
            "",
            "Sensitivity (int4 weight-only, one site at a time, selection batches):",
            "",
            "```",
            st["sensitivity"]["table"],
            "```",
            "",
            "auto_quantize:",
            "",
            "```",
            a["text"],
            "```",
            "",
        ]
    out += ["## Example (README)", "", "```", result["example"], "```", ""]
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--no-text", action="store_true")
    p.add_argument("--steps", type=int, default=300, help="charlm training steps")
    p.add_argument(
        "--render", action="store_true", help="re-render precision.md from precision.json"
    )
    a = p.parse_args(argv)
    if a.render:
        import json

        with open(os.path.join(RESULTS_DIR, "precision.json")) as f:
            result = json.load(f)
        md = render(result)
        with open(os.path.join(RESULTS_DIR, "precision.md"), "w") as f:
            f.write(md.rstrip() + "\n")
        print(md)
        return
    t0 = time.perf_counter()
    studies = digits_studies({"mlp": 30, "cnn": 15})
    if not a.no_text:
        studies.append(charlm_study(a.steps))
    result = {
        "machine": machine_info(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "studies": studies,
        "example": example(),
        "wall_s": time.perf_counter() - t0,
    }
    for st in studies:
        for c in st["cast"]:
            c.pop("rows")
    md = render(result)
    write_results(RESULTS_DIR, "precision", result, md)
    print(md)


if __name__ == "__main__":
    main()
