"""`auto_quantize`: per site, the cheapest format that keeps a metric within budget."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jq import numerics
from jq.flax._graph import Site
from jq.flax.adapter import ModelAdapter, trace
from jq.flax.apply import apply
from jq.flax.calibrate import calibrate
from jq.flax.convert import convert
from jq.flax.report import format_table
from jq.flax.rules import Rule
from jq.flax.sensitivity import QuantEval, batch_inputs
from jq.flax.stream import check_batches, first_call, model_kwargs_arg
from jq.qparams import QuantSpec

__all__ = [
    "AutoQuantResult",
    "auto_quantize",
]

_BITS = {
    "int4": 4,
    "int8": 8,
    "bfloat16": 16,
    "float16": 16,
    "float8_e4m3fn": 8,
    "float8_e5m2": 8,
    "float32": 32,
}


@dataclasses.dataclass(frozen=True)
class AutoQuantResult:
    """The plan `auto_quantize` chose.

    Attributes:
      rules: one `jq.Rule` per (module, op kind) that is quantized, with an
        anchored regex (``re.escape(module_path)``); feed them to `jq.convert`.
      plan: one dict per unit (the sites sharing a module / parameter):
        ``modules``, ``kinds``, ``format``, ``bytes`` (weights + scales, estimated),
        ``drop_alone`` (metric drop with only this unit at its format).
      size_bytes: bytes of all variables after conversion (``qvars.nbytes()["total_after"]``).
      float_size_bytes: bytes of the float model's variables.
      metric: the metric of the converted model, measured with `jq.apply`.
      float_metric: the metric of the float model.
      history: the greedy moves tried: ``unit``, ``format``, ``metric``, ``accepted``.
      qvars: the `QuantizedVariables` of the plan (None if nothing is quantized).
    """

    rules: tuple
    plan: tuple
    size_bytes: int
    float_size_bytes: int
    metric: float
    float_metric: float
    history: tuple
    qvars: Any = None

    @property
    def drop(self) -> float:
        return self.float_metric - self.metric

    def __str__(self):
        return (
            f"auto_quantize: metric {self.metric:.4g} (float {self.float_metric:.4g}, drop {self.drop:.4g}); "
            f"size {self.size_bytes:,} bytes (float {self.float_size_bytes:,}, "
            f"{self.size_bytes / max(self.float_size_bytes, 1):.3f}x)\n"
            + format_table(list(self.plan), ["modules", "kinds", "format", "bytes", "drop_alone"])
        )


def _candidate_rule(
    fmt: str, module: str, kind: str, activation: QuantSpec | None, weight_axis
) -> Rule | None:
    if fmt == "float32":
        return None
    f = numerics.get_format(fmt)
    if f.is_integer or f.scaled:
        w = QuantSpec(fmt, axis=weight_axis)
        act = activation if (activation is not None and kind != "embed" and f.is_integer) else None
    else:
        w, act = QuantSpec(fmt), None
    return Rule(re.escape(module), ops=(kind,), weight=w, activation=act)


def _unit_bytes(fmt: str, leaves: list, weight_axis) -> int:
    total = 0
    for shape in leaves:
        n = int(np.prod(shape))
        if fmt == "float32":
            total += 4 * n
            continue
        f = numerics.get_format(fmt)
        b = math.ceil(n * f.bits / 8)
        if f.scaled:
            ch = shape[weight_axis] if (weight_axis is not None and len(shape)) else 1
            b += 4 * ch
        total += b
    return total


def auto_quantize(
    model,
    variables,
    batches: Iterable,
    metric_fn: Callable,
    *,
    max_drop: float = 0.01,
    candidates: Sequence[str] = ("int4", "int8", "bfloat16", "float32"),
    activation: QuantSpec | None = None,
    ops: Sequence[str] = ("dot", "conv", "embed"),
    weight_axis: int = -1,
    inputs: Callable | None = None,
    model_kwargs: dict | None = None,
    method=None,
    progress: bool = True,
    kwargs: dict | None = None,
) -> AutoQuantResult:
    """Per site, the cheapest format that keeps the metric within `max_drop` of float32.

    Algorithm (greedy descent, verified jointly):

    1. Sites are grouped into *units*: one per (module path, op kind), merged
       when they share a parameter (a tied embedding), because one `jq.Rule`
       selects by module path and kind, and one parameter has one format.
    2. Every unit starts at the most precise candidate (``float32``). For every
       unit and every cheaper candidate, the metric drop with only that unit
       lowered is measured (`sensitivity` with one format at a time).
    3. Moves "lower unit u by one candidate" are ranked by bytes saved per
       unit of metric drop (drops measured alone in step 2), cheapest damage
       first. Each move is applied and the metric of the whole plan measured;
       it is kept if the drop stays within `max_drop`, otherwise reverted and
       unit u is frozen at its current format. A move whose drop alone already
       exceeds `max_drop` is never tried. This repeats until no move is left.
    4. The final plan is converted with `jq.convert` and measured with
       `jq.apply`; that measured metric is reported.

    The steps are `_units` (1), `_Search.drops_alone` (2), `_descend` (3)
    and `_result` (4).

    Why this order: drops of several quantized layers roughly add up, but not
    exactly, so a plan built from drops measured alone can miss the budget.
    Starting from the float model and lowering the least harmful units first
    spends the budget where it saves the most bytes, and every accepted step is
    a measured plan within budget, so the result is too. The cost is at most
    ``units * (candidates - 1)`` single-unit runs plus as many joint runs.

    Args:
      model, variables: a linen Module and its variables, an nnx Module and None, a
        function ``fn(params, *args, **kwargs)`` and its params, or a Hugging Face Flax
        model and None (its own params) (`jq.flax.adapter`).
      batches: a sequence of batches (iterated many times).
      metric_fn: ``metric_fn(outputs, batch) -> scalar``, higher is better
        (accuracy; pass ``-loss`` for a loss), averaged over batches.
      max_drop: the largest allowed ``float_metric - metric``.
      candidates: formats, ordered or not; ``"float32"`` means not quantized
        and is always added (it is where the search starts).
        Integer formats get per-channel weight scales on `weight_axis`;
        ``"bfloat16"`` / ``"float16"`` are plain casts.
      activation: an activation `QuantSpec` for integer candidates (None:
        weight-only; a spec with ``calibration=`` is static and is calibrated
        once).
      ops: site kinds to consider (``"dot"``, ``"conv"``, ``"embed"``).
      weight_axis: the per-channel weight axis (``-1``: output features).
      inputs: ``inputs(batch)``: the model's positional arguments (a tuple, one
        array, or a pair ``(args, kwargs_dict)``); default: the batch itself.
      model_kwargs: keyword arguments passed to the model on every call.
      method: the model method.
      progress: a tqdm bar over the measured plans.
      kwargs: deprecated name of `model_kwargs`.

    Returns:
      `AutoQuantResult` (``rules`` for `jq.convert`, sizes, metrics, plan).

    Raises:
      ValueError: `batches` is empty; unknown candidate; `max_drop` < 0;
        no site of the kinds `ops`.
    """
    if not callable(metric_fn):
        raise TypeError(
            f"jq.auto_quantize: metric_fn must be callable, got {type(metric_fn).__name__}"
        )
    if not max_drop >= 0:
        raise ValueError(f"jq.auto_quantize: max_drop must be >= 0, got {max_drop}")
    cands = _candidates(candidates)
    if isinstance(ops, str):
        ops = (ops,)
    batches = list(check_batches(batches, "auto_quantize"))
    if not batches:
        raise ValueError("jq.auto_quantize: `batches` is empty")
    kwargs = model_kwargs_arg("auto_quantize", model_kwargs, kwargs)
    args0 = batch_inputs(batches[0], inputs)
    adapter = ModelAdapter(model, variables, method)
    with first_call(batches[0], inputs, "auto_quantize"):
        t = trace(adapter, adapter.values, args0[0], {**kwargs, **args0[1]})
    sites = [s for s in t.finder.sites if s.kind in ops and s.leaf is not None]
    if not sites:
        raise ValueError(f"jq.auto_quantize: the model has no site of kinds {tuple(ops)}")
    units, unit_leaves = _units(sites)
    search = _Search(
        model,
        variables,
        units,
        cands,
        activation,
        weight_axis,
        batches,
        metric_fn,
        inputs,
        method,
        kwargs,
        args0,
    )
    with tqdm(desc="auto_quantize", unit="plan", disable=not progress, leave=False) as bar:
        search.bar = bar
        alone = search.drops_alone()
        plan, history = _descend(search, alone, unit_leaves, max_drop)
        return _result(search, plan, alone, history, unit_leaves, adapter)


def _candidates(candidates: Sequence[str]) -> list[str]:
    """Canonical format names, ``"float32"`` included, cheapest first."""
    cands = []
    for c in candidates:
        name = "float32" if c in ("float32", "f32", "fp32") else numerics.canonical_name(c)
        if name not in _BITS:
            raise ValueError(
                f"jq.auto_quantize: candidate {c!r} is not supported; use {tuple(_BITS)}"
            )
        cands.append(name)
    if "float32" not in cands:
        cands.append("float32")
    return sorted(set(cands), key=lambda f: _BITS[f])


def _units(sites: list[Site]) -> tuple[list[tuple], list[list]]:
    """Step 1: ``(units, unit_leaves)``; a unit is the sorted (module path, kind) pairs that share a
    format, merged through shared parameters; `unit_leaves` holds each unit's parameter shapes."""
    parent: dict = {}

    def find(x):
        while parent.setdefault(x, x) != x:
            x = parent[x]
        return x

    by_leaf: dict = {}
    for s in sites:
        key = (s.module_path, s.kind)
        find(key)
        if s.leaf.index in by_leaf:
            parent[find(key)] = find(by_leaf[s.leaf.index])
        by_leaf[s.leaf.index] = key
    groups: dict = {}
    for s in sites:
        groups.setdefault(find((s.module_path, s.kind)), set()).add((s.module_path, s.kind))
    units = [tuple(sorted(g)) for g in groups.values()]
    unit_leaves = []
    for u in units:
        shapes = {s.leaf.index: s.leaf.shape for s in sites if (s.module_path, s.kind) in u}
        unit_leaves.append(list(shapes.values()))
    return units, unit_leaves


@dataclasses.dataclass(eq=False)
class _Search:
    """Measures plans: a plan is one candidate index per unit (``top`` = float32, not quantized).

    Static activations are calibrated once, for every unit at int8; one `QuantEval`
    function is compiled per distinct rule set and reused.
    """

    model: Any
    variables: Any
    units: list
    cands: tuple
    activation: QuantSpec | None
    weight_axis: int | None
    batches: list
    metric_fn: Callable
    inputs: Any
    method: Any
    kwargs: dict
    args0: tuple

    def __post_init__(self):
        self.top = len(self.cands) - 1
        self.stats = None
        act = self.activation
        if act is not None and act.is_static:
            # one calibration for every unit and candidate: sites are selected by name
            all_rules = [
                _candidate_rule("int8", mod, kind, act, self.weight_axis)
                for u in self.units
                for mod, kind in u
            ]
            self.stats = calibrate(
                self.model,
                self.variables,
                all_rules,
                self.batches,
                inputs=self.inputs,
                model_kwargs=self.kwargs,
                method=self.method,
                progress=False,
            )
        self._fns: dict = {}
        base = QuantEval(
            self.model, self.variables, (), self.method, self.kwargs, self.args0, None
        ).fn(frozenset())
        self.float_metric = self.mean_metric(base)

    def mean_metric(self, fn) -> float:
        """The metric of ``fn(inputs)`` averaged over the batches."""
        return float(
            np.mean(
                [float(self.metric_fn(fn(batch_inputs(b, self.inputs)), b)) for b in self.batches]
            )
        )

    def rules_for(self, plan) -> tuple:
        out = []
        for u, f in zip(self.units, plan):
            for mod, kind in u:
                r = _candidate_rule(self.cands[f], mod, kind, self.activation, self.weight_axis)
                if r is not None:
                    out.append(r)
        return tuple(out)

    bar = None  # a tqdm bar counting measured plans (set by `auto_quantize`)

    def metric_of(self, plan) -> float:
        if self.bar is not None:
            self.bar.update(1)
        rules = self.rules_for(plan)
        if not rules:
            return self.float_metric
        if rules not in self._fns:
            ev = QuantEval(
                self.model, self.variables, rules, self.method, self.kwargs, self.args0, self.stats
            )
            self._fns[rules] = ev.fn(frozenset(ev.chosen))
        return self.mean_metric(self._fns[rules])

    def drops_alone(self) -> dict:
        """Step 2: ``{(unit, candidate): metric drop with only that unit at that candidate}``."""
        n, top = len(self.units), self.top
        alone = {}
        for ui in range(n):
            for f in range(top):
                plan = [top] * n
                plan[ui] = f
                alone[(ui, f)] = self.float_metric - self.metric_of(plan)
        alone.update({(ui, top): 0.0 for ui in range(n)})
        return alone


def _descend(search: _Search, alone: dict, unit_leaves: list, max_drop: float) -> tuple[list, list]:
    """Step 3: the greedy descent; returns the plan and the moves tried."""
    cands, weight_axis = search.cands, search.weight_axis
    plan = [search.top] * len(search.units)
    frozen = set()
    history = []
    while True:
        moves = []
        for ui in range(len(search.units)):
            if ui in frozen or plan[ui] == 0:
                continue
            f = plan[ui] - 1
            if alone[(ui, f)] > max_drop:
                continue
            saved = _unit_bytes(cands[plan[ui]], unit_leaves[ui], weight_axis) - _unit_bytes(
                cands[f], unit_leaves[ui], weight_axis
            )
            cost = max(alone[(ui, f)] - alone[(ui, plan[ui])], 0.0)
            moves.append((-saved / (cost + 1e-6), ui, f))
        if not moves:
            break
        moves.sort()
        _, ui, f = moves[0]
        trial = list(plan)
        trial[ui] = f
        m = search.metric_of(trial)
        ok = search.float_metric - m <= max_drop
        history.append(
            {
                "unit": "+".join(f"{mod or '<root>'}:{k}" for mod, k in search.units[ui]),
                "format": cands[f],
                "metric": m,
                "accepted": ok,
            }
        )
        if ok:
            plan = trial
        else:
            frozen.add(ui)
    return plan, history


def _result(
    search: _Search,
    plan: list,
    alone: dict,
    history: list,
    unit_leaves: list,
    adapter: ModelAdapter,
) -> AutoQuantResult:
    """Step 4: convert the plan, measure it with `jq.apply`, and report."""
    model, method, kwargs, inputs = search.model, search.method, search.kwargs, search.inputs
    cands, weight_axis = search.cands, search.weight_axis
    rules = search.rules_for(plan)
    float_size = int(
        sum(
            np.size(v) * jnp.dtype(jnp.result_type(v)).itemsize
            for v in adapter.values
            if hasattr(v, "dtype") and not jax.dtypes.issubdtype(v.dtype, jax.dtypes.prng_key)
        )
    )
    qvars = None
    if rules:
        qvars = convert(
            model,
            search.variables,
            rules,
            stats=search.stats,
            args=search.args0[0],
            model_kwargs={**kwargs, **search.args0[1]},
            method=method,
        )
        size = int(qvars.nbytes()["total_after"])
        fn = jax.jit(lambda qv, c: apply(model, qv, *c[0], method=method, **{**kwargs, **c[1]}))
        metric = float(
            np.mean(
                [
                    float(search.metric_fn(fn(qvars, batch_inputs(b, inputs)), b))
                    for b in search.batches
                ]
            )
        )
    else:
        size, metric = float_size, search.float_metric
    rows = []
    for ui, u in enumerate(search.units):
        rows.append(
            {
                "modules": ",".join(sorted({mod or "<root>" for mod, _ in u})),
                "kinds": ",".join(sorted({k for _, k in u})),
                "format": cands[plan[ui]],
                "bytes": _unit_bytes(cands[plan[ui]], unit_leaves[ui], weight_axis),
                "drop_alone": alone[(ui, plan[ui])],
            }
        )
    return AutoQuantResult(
        rules, tuple(rows), size, float_size, metric, search.float_metric, tuple(history), qvars
    )
