"""`sensitivity`: quantize one site at a time and measure what it costs the model's output.

`QuantEval` evaluates the model with a chosen subset of sites quantized,
through `jq.flax.apply.run_site` (the path `jq.apply` takes); `auto_quantize`
uses it for its plans too.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jq.flax._graph import Interpreter
from jq.flax.adapter import ModelAdapter, trace
from jq.flax.apply import run_site
from jq.flax.calibrate import calibrate
from jq.flax.qvars import CalibrationStats, observed_range
from jq.flax.report import format_table
from jq.flax.rules import Rule, check_rules
from jq.flax.select import choose, leaf_specs, scan_lengths
from jq.flax.stream import first_call, model_call, model_kwargs_arg, rules_then_batches
from jq.qparams import qparams_from_range
from jq.quantize import quantize

__all__ = [
    "QuantEval",
    "SensitivityResult",
    "batch_inputs",
    "sensitivity",
]


@dataclasses.dataclass(frozen=True)
class SensitivityResult:
    """Per-site sensitivity, most sensitive first.

    Attributes:
      rows: one dict per site: ``site``, ``kind``, ``module``, ``format``
        (weight format of its rule), ``mse``, ``sqnr_db``, and with a metric
        ``metric`` and ``drop`` (``float_metric - metric``).
      float_metric: the metric of the float model (None without `metric_fn`).
    """

    rows: tuple
    float_metric: float | None

    def table(self) -> str:
        cols = ["site", "kind", "format", "mse", "sqnr_db"] + (
            ["metric", "drop"] if self.float_metric is not None else []
        )
        return format_table(list(self.rows), cols)

    def __str__(self):
        head = "" if self.float_metric is None else f"float metric: {self.float_metric:.4g}\n"
        return head + self.table()


def batch_inputs(batch, inputs):
    """``(args, kwargs)`` of the model call for `batch` (`jq.flax.stream.model_call`): the
    batch's own arguments; the fixed keyword arguments are added where the call is traced."""
    return model_call(batch, inputs)


class QuantEval:
    """Evaluates a model with a chosen subset of sites quantized (the path `jq.apply` takes)."""

    def __init__(self, model, variables, rules, method, kwargs, args, stats):
        self.adapter = ModelAdapter(model, variables, method)
        self.kwargs = kwargs
        self.rules = rules
        a0, kw0 = args  # the first batch's call (`batch_inputs`)
        t = trace(self.adapter, self.adapter.values, a0, {**kwargs, **kw0})
        self.finder = t.finder
        self.chosen = choose(t.finder, rules, warn=False)
        self.stats = stats
        self._act_qps = {}
        for c in self.chosen.values():
            if c.mode != "static":
                continue
            for op in c.site.act_operands:
                key = c.site.act_key(op)
                if stats is None or key not in stats.states:
                    raise ValueError(
                        f"jq.sensitivity: static site {key!r} has no calibration statistics"
                    )
                lo, hi = observed_range(
                    stats.observers[key], stats.states[key], scan_lengths(c.site, t.finder)
                )
                spec = c.rule.activation.replace(calibration=None)
                self._act_qps[c.site.key("qparams", op)] = qparams_from_range(lo, hi, spec)
        self._fns: dict = {}

    def fn(self, names: frozenset):
        if names in self._fns:
            return self._fns[names]
        chosen = {n: c for n, c in self.chosen.items() if n in names}
        specs = leaf_specs(chosen, self.finder)
        adapter, kwargs = self.adapter, self.kwargs
        act_qps = {k: v for k, v in self._act_qps.items() if k.site in chosen}

        def handler(site, eqn, invals, sts):
            c = chosen[site.name]
            act = None if c.rule.activation is None else c.rule.activation.replace(calibration=None)
            qps = (
                {op: sts[site.key("qparams", op)] for op in site.act_operands}
                if c.mode == "static"
                else {}
            )
            return run_site(site, eqn, invals, c.mode, act, qps)

        @jax.jit
        def f(leaves, qps, dyn):
            leaves = list(leaves)
            for idx, (spec, _) in specs.items():
                leaves[idx] = quantize(leaves[idx], None, spec)
            avals = [
                jax.ShapeDtypeStruct(jnp.shape(v), li.dtype)
                for v, li in zip(self.adapter.values, adapter.leaves)
            ]
            a, kw = dyn
            t = trace(adapter, avals, a, {**kwargs, **kw})
            outs = Interpreter(t.finder, set(chosen), handler).run(
                t.jaxpr, t.consts, leaves + t.dyn_args, dict(qps)
            )
            return jax.tree_util.tree_unflatten(t.out_tree, outs)

        g = lambda call: f(self.adapter.values, act_qps, call)  # noqa: E731
        self._fns[names] = g
        return g


def _flat_out(y):
    return jnp.concatenate(
        [jnp.ravel(jnp.asarray(v, jnp.float32)) for v in jax.tree_util.tree_leaves(y)]
    )


def _measure(fn, batches, inputs, refs, metric_fn):
    se, sig, n, ms = 0.0, 0.0, 0, []
    for b, ref in zip(batches, refs):
        y = fn(batch_inputs(b, inputs))
        d = _flat_out(y) - ref
        se += float(jnp.sum(jnp.square(d)))
        sig += float(jnp.sum(jnp.square(ref)))
        n += int(ref.size)
        if metric_fn is not None:
            ms.append(float(metric_fn(y, b)))
    mse = se / max(n, 1)
    sq = 10.0 * math.log10(max(sig, 1e-30) / max(se, 1e-30))
    return mse, sq, (float(np.mean(ms)) if ms else None)


def sensitivity(
    model,
    variables,
    rules: Sequence[Rule],
    batches: Iterable,
    metric_fn: Callable | None = None,
    *,
    inputs: Callable | None = None,
    model_kwargs: dict | None = None,
    stats: CalibrationStats | None = None,
    method=None,
    kwargs: dict | None = None,
) -> SensitivityResult:
    """Quantizes one site at a time (all others float) and measures the damage.

    For every site the rules select, the model runs with only that site
    quantized, through the same integer path as `jq.apply`, over all
    `batches`, and is compared with the float model:
    ``mse = mean((y_q - y)^2)`` over every output element and batch,
    ``sqnr_db = 10 log10(sum y^2 / sum (y_q - y)^2)``, and with `metric_fn`
    ``drop = metric(float) - metric(quantized)`` (metrics averaged over batches;
    higher is better, so pass ``-loss`` for a loss). A parameter shared by
    several sites (a tied embedding) is quantized wherever it is used.

    Args:
      model, variables: a linen Module and its variables, an nnx Module and None, a
        function ``fn(params, *args, **kwargs)`` and its params, or a Hugging Face Flax
        model and None (its own params) (`jq.flax.adapter`).
      rules: the `jq.Rule` list; static rules are calibrated once on `batches`
        unless `stats` is given.
      batches: a sequence of batches (iterated several times).
      metric_fn: optional ``metric_fn(outputs, batch) -> scalar``.
      inputs: optional ``inputs(batch)``: the model's positional arguments (a
        tuple, one array, or a pair ``(args, kwargs_dict)``), e.g. ``lambda b:
        b[0]`` for batches that also carry labels; default: the batch itself.
      model_kwargs: keyword arguments passed to the model on every call.
      stats: `CalibrationStats` to reuse.
      method: the model method.
      kwargs: deprecated name of `model_kwargs`.

    Returns:
      `SensitivityResult`, sorted by ``drop`` (with a metric) or ``sqnr_db``
      (without), most sensitive first; ``print(result)`` shows the table.

    Raises:
      ValueError: `batches` is empty; the rules select no site.
    """
    rules, batches = rules_then_batches("sensitivity", rules, batches)
    rules = check_rules(rules)
    batches = list(batches)
    if not batches:
        raise ValueError("jq.sensitivity: `batches` is empty")
    kwargs = model_kwargs_arg("sensitivity", model_kwargs, kwargs)
    args0 = batch_inputs(batches[0], inputs)
    with first_call(batches[0], inputs, "sensitivity"):
        ev = _make_eval(model, variables, rules, batches, inputs, stats, method, kwargs, args0)
    if not ev.chosen:
        raise ValueError("jq.sensitivity: the rules select no site of the model")
    base = ev.fn(frozenset())
    refs, fm = [], []
    for b in batches:
        y = base(batch_inputs(b, inputs))
        refs.append(_flat_out(y))
        if metric_fn is not None:
            fm.append(float(metric_fn(y, b)))
    float_metric = float(np.mean(fm)) if metric_fn is not None else None
    rows = []
    done = set()
    for name, c in ev.chosen.items():
        if name in done:
            continue
        # a parameter shared by several sites (tied embedding) is quantized at all of them together
        group = [
            n
            for n, o in ev.chosen.items()
            if n == name
            or (
                c.site.leaf is not None
                and o.site.leaf is not None
                and o.site.leaf.index == c.site.leaf.index
            )
        ]
        done.update(group)
        mse, sq, m = _measure(ev.fn(frozenset(group)), batches, inputs, refs, metric_fn)
        spec = c.rule.weight if c.site.kind != "act_dot" else c.rule.activation
        row = {
            "site": " + ".join(group),
            "kind": ",".join(ev.chosen[n].site.kind for n in group),
            "module": c.site.module_path,
            "format": spec.format,
            "mse": mse,
            "sqnr_db": sq,
        }
        if metric_fn is not None:
            row["metric"] = m
            row["drop"] = float_metric - m
        rows.append(row)
    if metric_fn is not None:
        rows.sort(key=lambda r: (-r["drop"], r["sqnr_db"]))
    else:
        rows.sort(key=lambda r: r["sqnr_db"])
    return SensitivityResult(tuple(rows), float_metric)


def _make_eval(model, variables, rules, batches, inputs, stats, method, kwargs, args0):
    adapter = ModelAdapter(model, variables, method)
    t = trace(adapter, adapter.values, args0[0], {**kwargs, **args0[1]})
    chosen = choose(t.finder, rules, warn=False)
    if stats is None and any(c.mode == "static" for c in chosen.values()):
        stats = calibrate(
            model,
            variables,
            rules,
            batches,
            inputs=inputs,
            model_kwargs=kwargs,
            method=method,
            progress=False,
        )
    return QuantEval(model, variables, rules, method, kwargs, args0, stats)
