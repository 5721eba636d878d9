"""The six practical steps as functions: sites, calibrate, convert, apply, qat, report.

All of them take an unmodified Flax model (linen with its variables, or nnx with
``variables=None``), trace it, and evaluate the traced computation with jq's ops
at the sites the rules select. See `jq.flax._graph` for the mechanism.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jq import ops
from jq.flax._graph import (
    Interpreter,
    ModelAdapter,
    Site,
    bind_eqn,
    fmt_paths,
    leaf_aval,
    sqnr_db,
    state_changes,
    trace,
)
from jq.flax.rules import Rule, check_rules
from jq.flax.select import activation_spec, choose, leaf_specs, scan_lengths, stack_tree
from jq.flax.stream import (
    Stream,
    abstract,
    init_observers,
    observe_site,
    observed_range,
    peek,
    site_body,
    split_batch,
    warn_zero_width,
)
from jq.qparams import QParams, QuantSpec, qparams_from_range, reduce_range
from jq.quantize import QArray, dequantize, fake_quant, lsq_fake_quant, quantize

__all__ = [
    "CalibrationStats",
    "QAT",
    "QuantizedVariables",
    "SitePlan",
    "apply",
    "calibrate",
    "convert",
    "qat",
    "report",
    "sites",
]


# ---------------------------------------------------------------------------------------
# site selection
# ---------------------------------------------------------------------------------------
# ---------------------------------------------------------------------------------------
# sites(): which sites matched which rule
# ---------------------------------------------------------------------------------------
def sites(model, variables, rules: Sequence[Rule], *args, method=None, **kwargs) -> list[dict]:
    """Lists every quantizable site of the model and the rule that selects it.

    Args:
      model: a linen Module (with `variables`) or an nnx Module (``variables=None``).
      variables: linen variables, or None for nnx.
      rules: the `jq.Rule` list.
      *args, **kwargs: an example input (shapes matter, values do not).

    Returns:
      One dict per site: ``site``, ``kind``, ``module``, ``rule`` (index or None),
      ``mode`` (``static`` / ``dynamic`` / ``weight_only`` / ``float``), ``weight``
      (parameter shape) and ``inputs`` (operand shapes). Prints nothing; use
      `format_table` to show it.
    """
    rules = check_rules(rules)
    adapter = ModelAdapter(model, variables, method)
    t = trace(adapter, adapter.values, args, kwargs)
    chosen = choose(t.finder, rules)
    rows = []
    for s in t.finder.sites:
        c = chosen.get(s.name)
        rows.append(
            {
                "site": s.name,
                "kind": s.kind,
                "module": s.module_path,
                "rule": None if c is None else c.rule_index,
                "mode": "float" if c is None else c.mode,
                "weight": None if s.leaf is None else s.leaf.shape,
                "inputs": tuple(tuple(a.shape) for a in s.in_avals[:2]),
            }
        )
    return rows


def format_table(rows: list[dict], columns: Sequence[str] | None = None) -> str:
    """Formats a list of dicts as a fixed-width text table."""
    if not rows:
        return "(no rows)"
    columns = list(columns or rows[0].keys())

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return "-" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = "  ".join(c.ljust(w) for c, w in zip(columns, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------
# calibrate()
# ---------------------------------------------------------------------------------------
class CalibrationStats:
    """Activation statistics gathered by `calibrate`: one observer state per static site.

    Attributes:
      states: dict from site key to observer state (a pytree).
      observers: dict from site key to the observer that produced it.
      num_batches: number of batches seen.
      example: the traced input signature (shapes), reused by `convert`.
      scan_lengths: dict from site key to the lengths of the scans (``nn.scan``,
        ``nnx.scan``) around the site, outermost first; ``()`` outside any scan.
        A scanned site's state is stacked over those leading axes, one
        observer state per layer.
    """

    def __init__(self, states, observers, num_batches, example, site_names, scan_lengths=None):
        self.states = states
        self.observers = observers
        self.num_batches = num_batches
        self.example = example
        self.site_names = site_names
        self.scan_lengths = dict(scan_lengths or {})

    def ranges(self) -> dict[str, tuple[jax.Array, jax.Array]]:
        """``{site key: (lo, hi)}``; raises if a site saw non-finite values or no data.

        A site inside a scan gets ranges stacked over its scan axes: ``lo`` has
        shape ``scan_lengths[key] + range shape`` (one range per layer).
        """
        return {k: observed_range(self.observers[k], st, self._lengths(k), k) for k, st in self.states.items()}

    def _lengths(self, key) -> tuple[int, ...]:
        if key in self.scan_lengths:
            return tuple(self.scan_lengths[key])
        # stats built elsewhere (merged shards, smoothquant): every observer state counts its
        # batches in a scalar `count`, so its shape is the stack of scan lengths
        return tuple(np.shape(getattr(self.states[key], "count", ())))

    def __repr__(self):
        return f"CalibrationStats({len(self.states)} sites, {self.num_batches} batches)"


def calibrate(
    model,
    variables,
    batches: Iterable,
    rules: Sequence[Rule],
    *,
    method=None,
    kwargs: dict | None = None,
    progress: bool = True,
) -> CalibrationStats:
    """Runs the float model over `batches` and observes activations at static sites.

    The model code is untouched: jq traces it, and every site whose rule has a
    static activation spec (one with ``calibration=observer``) feeds its
    activation operand to ``observer.update`` inside one jitted step per batch.

    Args:
      model, variables: a linen Module and its variables, or an nnx Module and None.
      batches: an iterable of inputs; each item is one positional argument, or a
        tuple of positional arguments.
      rules: the `jq.Rule` list.
      method: the model method to run (default ``__call__``).
      kwargs: keyword arguments passed on every call (e.g. ``{"train": False}``).
      progress: show a tqdm progress bar.

    Returns:
      `CalibrationStats` for `convert`.

    Raises:
      ValueError: `batches` is empty.
    """
    rules = check_rules(rules)
    kwargs = dict(kwargs or {})
    adapter = ModelAdapter(model, variables, method)
    first, batches = peek(batches, "jq.calibrate: `batches` is empty; calibration needs at least one batch")
    args = split_batch(first)
    adapter.with_state = adapter.kind == "nnx"
    t = trace(adapter, adapter.values, args, kwargs)
    if adapter.kind == "nnx" and state_changes(t, adapter):
        warnings.warn(
            f"jq.calibrate: the nnx model updates its state when run ({fmt_paths(state_changes(t, adapter))}): "
            "dropout is active or BatchNorm uses batch statistics, so the observed activations are "
            "not the ones inference sees (and one dropout mask repeats for every batch). Call "
            "model.eval() before calibrating",
            RuntimeWarning,
            stacklevel=2,
        )
    chosen = choose(t.finder, rules)
    observers, states, lengths = init_observers(chosen, t.finder)
    selected = {n for n, c in chosen.items() if c.mode == "static"}

    def observe(site, eqn, invals, sts, extra):
        observe_site(site, invals, sts, observers)

    stream = Stream(adapter, kwargs, site_body(selected, observe))
    states, n = stream.run(batches, adapter.values, states, desc="calibrate", progress=progress)
    return CalibrationStats(states, observers, n, (abstract(args), kwargs), tuple(chosen), lengths)


# ---------------------------------------------------------------------------------------
# QuantizedVariables
# ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SitePlan:
    """Static description of one quantized site (kept inside `QuantizedVariables`)."""

    name: str
    kind: str
    leaf: str | None  # parameter path
    mode: str  # static | dynamic | weight_only
    activation: QuantSpec | None  # calibration stripped
    rule_index: int


@dataclasses.dataclass(frozen=True)
class Plan:
    model_kind: str
    signature: tuple  # ((path, shape), ...) of the float model's variables
    sites: tuple[SitePlan, ...]
    float_leaves: tuple  # ((path, shape, dtype name), ...) of the quantized parameters


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["variables", "activations", "smooth"], meta_fields=["plan"]
)
@dataclasses.dataclass(frozen=True)
class QuantizedVariables:
    """A converted model's variables: a pytree, safe to pass through jit and to checkpoint.

    Attributes:
      variables: ``{path: leaf}`` for every variable of the model, with each
        quantized parameter replaced by a `QArray` (int8 values, or int4 packed
        two per byte, plus scales). No float copy of a quantized weight remains.
      activations: ``{site key: QParams}`` for static activation quantization.
      plan: static site table (modes, activation specs) and the float model's
        signature, used by `apply` to run and to check that the variables belong
        to the model.
      smooth: ``{site name: s}``, SmoothQuant factors (`jq.smoothquant`, `jq.smoothing`): `apply`
        multiplies the site's activation operand by ``1 / s`` before quantizing
        it (the weight already holds ``diag(s) W``). `s` has the activation's
        rank, size 1 on every axis but the contracting ones (plus leading
        scan-stacking axes). Empty unless made by ``jq.smoothquant``.
    """

    variables: dict
    activations: dict
    plan: Plan
    smooth: dict = dataclasses.field(default_factory=dict)

    def nbytes(self) -> dict:
        """``{"float": bytes of the float32 originals of the quantized parameters,
        "quantized": bytes of their QArrays (values + scales + zero points),
        "total_before", "total_after", "ratio"}``."""
        fl = sum(int(np.prod(s)) * np.dtype(d).itemsize for _, s, d in self.plan.float_leaves)
        q = sum(v.nbytes for v in self.variables.values() if isinstance(v, QArray))
        other = sum(int(np.size(v)) * np.dtype(v.dtype).itemsize for v in self.variables.values()
                    if not isinstance(v, QArray) and hasattr(v, "dtype") and not jax.dtypes.issubdtype(
                        v.dtype, jax.dtypes.prng_key))
        acts = sum(int(x.size) * x.dtype.itemsize
                   for x in jax.tree_util.tree_leaves((self.activations, self.smooth)))
        return {
            "float": fl,
            "quantized": q,
            "ratio": q / fl if fl else 1.0,
            "total_before": fl + other,
            "total_after": q + other + acts,
        }

    def summary(self) -> str:
        b = self.nbytes()
        modes = {}
        for s in self.plan.sites:
            modes[s.mode] = modes.get(s.mode, 0) + 1
        ms = ", ".join(f"{v} {k}" for k, v in sorted(modes.items()))
        return (
            f"{len(self.plan.sites)} quantized sites ({ms}); quantized weights "
            f"{b['float']:,} -> {b['quantized']:,} bytes ({b['ratio']:.3f}x); "
            f"model {b['total_before']:,} -> {b['total_after']:,} bytes"
        )


def _is_qat_vars(v) -> bool:
    return isinstance(v, dict) and set(v) == {"params", "quant", "state"} and "ranges" in v["state"]


# ---------------------------------------------------------------------------------------
# convert()
# ---------------------------------------------------------------------------------------
def _keep_sharding(q: QArray, value):
    """`q` laid out like its float weight when that one lives on a mesh (see `jq.sharding`)."""
    from jax.sharding import NamedSharding

    s = getattr(value, "sharding", None)
    if not isinstance(value, jax.Array) or isinstance(value, jax.core.Tracer) or not isinstance(s, NamedSharding):
        return q
    from jq.sharding import qarray_shardings

    try:
        return jax.device_put(q, qarray_shardings(q, s))
    except ValueError as e:  # e.g. int4 bytes would straddle two devices: leave XLA's layout
        warnings.warn(f"jq.convert: the quantized weight cannot follow its float sharding: {e}", stacklevel=3)
        return q


def convert(
    model,
    variables,
    rules: Sequence[Rule],
    stats: CalibrationStats | None = None,
    *,
    args: tuple | None = None,
    kwargs: dict | None = None,
    method=None,
    verbose: bool = False,
) -> QuantizedVariables:
    """Turns float (or QAT) variables into quantized variables.

    Every parameter that feeds a selected site is quantized once, here, with its
    rule's weight spec (int8; int4 packed two per byte) and replaced by a
    `QArray`; static activation sites get `QParams` from the calibrated ranges
    (or from the ranges / learned scales of QAT variables).

    Args:
      model: a linen Module, or an nnx Module (the module is never mutated).
      variables: linen variables; None for nnx; or the variables returned by
        `QAT.init` / trained with `QAT.apply` (then the QAT ranges and learned
        scales are used and `stats` is not needed).
      rules: the `jq.Rule` list.
      stats: `CalibrationStats` from `calibrate`; required when a rule is static.
      args, kwargs: an example input, needed when `stats` is None (jq traces the
        model to find its sites).
      method: the model method (default ``__call__``).
      verbose: print the size report.

    Returns:
      `QuantizedVariables`; ``qvars.nbytes()`` gives the sizes before and after.

    Raises:
      ValueError: a static site has no statistics; a rule's spec does not fit
        its layer; no example input to trace.
    """
    rules = check_rules(rules)
    qat_state = None
    if _is_qat_vars(variables):
        qat_state = variables
        variables = _qat_model_variables(model, variables)
        if args is None:
            args, _ = variables_example(qat_state)
        # the caller's keyword arguments win over the ones recorded by QAT.init
        kwargs = {**_recorded_kwargs(qat_state), **(kwargs or {})}
    adapter = ModelAdapter(model, variables, method)
    if qat_state is not None and adapter.kind == "nnx":
        adapter.override({**qat_state["state"]["variables"], **qat_state["params"]})
    if args is None:
        if stats is None:
            raise ValueError(
                "jq.convert: pass `stats` from jq.calibrate, or an example input with args=(x,) "
                "so that jq can trace the model and find its sites"
            )
        args, kw0 = stats.example
        kwargs = {**kw0, **(kwargs or {})}
    args = tuple(args) if isinstance(args, (tuple, list)) else (args,)
    kwargs = dict(kwargs or {})
    t = trace(adapter, adapter.values, args, kwargs)
    chosen = choose(t.finder, rules)

    # weights: one QArray per parameter leaf
    specs = leaf_specs(chosen)
    new_vars = {}
    float_leaves = []
    for li, value in zip(adapter.leaves, adapter.values):
        if li.index in specs:
            spec, c = specs[li.index]
            qp = None
            if qat_state is not None and c.site.name in qat_state["quant"].get("weights", {}):
                w = qat_state["quant"]["weights"][c.site.name]
                _check_learned_scale(c.site.name, w["scale"])
                qp = QParams(w["scale"], None if w.get("zero_point") is None else
                             jnp.round(w["zero_point"]).astype(jnp.int32))
            new_vars[li.path] = _keep_sharding(quantize(jnp.asarray(value), qp, spec), value)
            float_leaves.append((li.path, li.shape, np.dtype(li.dtype).name))
        else:
            new_vars[li.path] = value

    # activations
    acts, plans = {}, []
    ranges = None
    for name, c in chosen.items():
        s = c.site
        act = None if c.rule.activation is None else c.rule.activation.replace(calibration=None)
        if c.mode == "static":
            for op in s.act_operands:
                spec = activation_spec(c, op)
                key = s.act_key(op)
                if qat_state is not None:
                    qp = _qat_act_qparams(qat_state, key, spec)
                else:
                    if stats is None or key not in stats.states:
                        raise ValueError(
                            f"jq.convert: site {key!r} has a static activation spec (rules[{c.rule_index}] "
                            "names a calibration observer) but no statistics; run jq.calibrate with these "
                            "rules and pass stats=, or drop `calibration` for dynamic quantization"
                        )
                    if ranges is None:
                        ranges = {}
                    lo, hi = observed_range(stats.observers[key], stats.states[key],
                                             scan_lengths(s, t.finder), key)
                    warn_zero_width(key, lo, hi)
                    qp = qparams_from_range(lo, hi, spec)
                acts[key] = qp
        elif c.mode == "dynamic":
            for op in s.act_operands:
                activation_spec(c, op)
        plans.append(SitePlan(name, s.kind, None if s.leaf is None else s.leaf.path, c.mode,
                              act if c.mode != "weight_only" else None, c.rule_index))
    plan = Plan(adapter.kind, adapter.signature(), tuple(plans), tuple(float_leaves))
    qvars = QuantizedVariables(new_vars, acts, plan)
    # a dry run surfaces every spec that does not fit its op (e.g. a scale on a contracting axis)
    dry_kw = {**kwargs, "mutable": True} if adapter.kind == "nnx" else kwargs  # train-mode nnx is fine here
    jax.eval_shape(lambda qv, a: apply(model, qv, *a, method=method, **dry_kw), qvars, args)
    if verbose:
        print(qvars.summary())
    return qvars


# ---------------------------------------------------------------------------------------
# apply()
# ---------------------------------------------------------------------------------------
def _adapter_for(model, qvars: QuantizedVariables, method):
    import flax.linen as nn
    from flax import nnx

    if not isinstance(model, (nn.Module, nnx.Module)):
        raise TypeError(
            f"jq.apply: model must be a flax.linen.Module or a flax.nnx.Module, got {type(model).__name__}"
        )
    kind = "linen" if isinstance(model, nn.Module) else "nnx"
    if kind != qvars.plan.model_kind:
        raise ValueError(
            f"jq.apply: the quantized variables belong to another model: they come from a "
            f"{qvars.plan.model_kind} model, but `model` is {type(model).__name__}"
        )
    if kind == "nnx":
        return ModelAdapter(model, None, method)
    nested: dict = {}
    for path, v in qvars.variables.items():
        node = nested
        keys = path.split("/")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = jax.ShapeDtypeStruct(v.shape, jnp.float32) if isinstance(v, QArray) else v
    return ModelAdapter(model, nested, method)


def _linen_signature(model, args, kwargs, method):
    """The variable paths and shapes `model.init` would create, traced abstractly (None if it can't)."""
    try:
        shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *args, method=method, **kwargs))
        import flax.linen as nn

        shapes = nn.meta.unbox(shapes)  # logical-partitioning boxes (nn.with_logical_partitioning)
    except Exception:  # e.g. the model needs rngs or inputs that init cannot get here
        return None
    flat, _ = jax.tree_util.tree_flatten_with_path(shapes)
    return {"/".join(str(getattr(k, "key", k)) for k in p): tuple(x.shape) for p, x in flat}


def _describe_inputs(args, kwargs) -> str:
    """``"args[0]: float32(4, 7), mask: bool(4, 1, 5, 5)"``: the array inputs, for error messages."""
    flat, _ = jax.tree_util.tree_flatten_with_path((tuple(args), dict(kwargs)))
    parts = []
    for path, x in flat:
        if not _is_dynamic_input(x):
            continue
        keys = [getattr(k, "key", getattr(k, "idx", k)) for k in path]
        name = f"args[{keys[1]}]" if keys[0] == 0 else str(keys[1])
        name += "".join(f"[{k!r}]" for k in keys[2:])
        parts.append(f"{name}: {jnp.result_type(x)}{tuple(np.shape(x))}")
    return ", ".join(parts) or "no array inputs"


def _is_dynamic_input(x) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct))


def _check_signature(adapter: ModelAdapter, qvars: QuantizedVariables, model_sig: dict | None = None,
                     partial: bool = False, inputs: str | None = None):
    """Checks variable names and shapes (not values) against the model.

    `model_sig` (linen) comes from ``model.init`` on the caller's inputs, so a
    shape that differs there is blamed on the inputs first.
    """
    want = dict(qvars.plan.signature)
    if adapter.kind != qvars.plan.model_kind:
        raise ValueError(
            f"jq.apply: the quantized variables come from a {qvars.plan.model_kind} model, "
            f"but `model` is {adapter.kind}"
        )
    got = model_sig if model_sig is not None else {li.path: li.shape for li in adapter.leaves}
    if adapter.kind == "linen" and model_sig is not None:
        # init creates only some collections (e.g. not "intermediates"); compare the ones it makes
        cols = {p.split("/")[0] for p in got}
        want = {p: s for p, s in want.items() if p.split("/")[0] in cols}
    missing = [] if partial else sorted(set(want) - set(got))  # another method may use a subset
    extra = sorted(set(got) - set(want))
    if missing or extra:
        raise ValueError(
            "jq.apply: the quantized variables belong to another model: "
            f"variables not in the model {missing[:5]}, model variables not in them {extra[:5]}"
        )
    for path, shape in want.items():
        if path in got and tuple(got[path]) != tuple(shape):
            if model_sig is not None:
                raise ValueError(
                    f"jq.apply: the inputs do not fit the quantized variables: run on these inputs "
                    f"({inputs or 'as given'}), the model would make {path!r} with shape "
                    f"{tuple(got[path])}, but the variables hold {tuple(shape)}. Check the input "
                    "shapes (e.g. the feature size of the last axis); if they are right, the variables "
                    "come from another model with the same variable names"
                )
            raise ValueError(
                f"jq.apply: the quantized variables do not fit this model: {path!r} has shape "
                f"{tuple(shape)} in them but {tuple(got[path])} in the model (same variable names, "
                "other sizes: the variables come from another model)"
            )


def run_dot_like(site: Site, eqn, invals, act_specs, act_qps, mode, smooth=None,
                  check_finite: bool = False):
    """One quantized site: weight (QArray) and activation(s) through jq.ops.

    `smooth`: SmoothQuant factors; the activation operand becomes ``x * (1 / s)``.
    `check_finite`: a checkify check for NaN / inf in the activation (`jq.ops.dot_general`).
    """
    out_aval = eqn.outvars[0].aval
    p = eqn.params
    pet = p.get("preferred_element_type") or out_aval.dtype
    if not jnp.issubdtype(pet, jnp.floating):
        pet = out_aval.dtype
    vals = list(invals[:2])
    if smooth is not None:
        op = site.act_operands[0]
        vals[op] = vals[op] * (1.0 / smooth).astype(vals[op].dtype)
    # float activations go to jq.ops with their spec (and static QParams): ops quantizes them,
    # with straight-through gradients and NaN / inf propagated to the rows they reach
    q = {"check_finite": check_finite}
    if mode != "weight_only":
        for op in site.act_operands:
            side = "lhs" if op == 0 else "rhs"
            q[f"{side}_spec"], q[f"{side}_qparams"] = act_specs[op], act_qps.get(op)
    if site.kind in ("dot", "act_dot"):
        out = ops.dot_general(vals[0], vals[1], p["dimension_numbers"], precision=p.get("precision"),
                              preferred_element_type=pet, **q)
    elif site.kind == "conv":  # the weight is the rhs: only lhs_spec / lhs_qparams
        out = ops.conv_general_dilated(
            vals[0], vals[1], p["window_strides"], p["padding"], p["lhs_dilation"], p["rhs_dilation"],
            p["dimension_numbers"], p["feature_group_count"], p["batch_group_count"],
            precision=p.get("precision"), preferred_element_type=pet, **q,
        )
    else:
        raise AssertionError(site.kind)
    return [out.astype(out_aval.dtype)]


def run_embed(eqn, invals):
    table, idx = invals[0], invals[1]
    p = eqn.params
    dn = p["dimension_numbers"]
    if (
        isinstance(table, QArray)
        and table.ndim == 2
        and tuple(dn.collapsed_slice_dims) == (0,)
        and tuple(dn.start_index_map) == (0,)
        and tuple(p["slice_sizes"]) == (1, table.shape[1])
    ):
        # gather int rows and their scales, dequantize only the gathered rows
        g = functools.partial(jax.lax.gather, dimension_numbers=dn, indices_are_sorted=p["indices_are_sorted"],
                              unique_indices=p["unique_indices"], mode=p["mode"])
        rows = g(table.int_value(), idx, slice_sizes=(1, table.shape[1]), fill_value=0)
        scale = jnp.broadcast_to(table.scale, (table.shape[0], 1))
        srows = g(scale, idx, slice_sizes=(1, 1), fill_value=0)
        out = rows.astype(jnp.float32)
        if table.zero_point is not None:
            zp = jnp.broadcast_to(table.zero_point, (table.shape[0], 1)).astype(jnp.float32)
            out = out - g(zp, idx, slice_sizes=(1, 1), fill_value=0)
        return [(out * srows).astype(eqn.outvars[0].aval.dtype)]
    return bind_eqn(eqn, invals)


def apply(model, qvars: QuantizedVariables, *args, rules: Sequence[Rule] | None = None, method=None,
          check_finite: bool = False, **kwargs):
    """Runs the model with quantized variables: integer dots / convs at every quantized site.

    Inputs and keyword arguments (masks, ``train=``, ...) are forwarded to the
    model; ``method=`` selects another method (e.g. ``Embed.attend`` as a tied
    output head, or a method name for nnx). Wrap it in `jax.jit` for speed.

    Args:
      model: the model the variables were converted from (linen or nnx; never mutated).
      qvars: `QuantizedVariables` from `convert`.
      *args, **kwargs: the model's inputs.
      rules: optional; checked against the specs carried by `qvars`.
      method: the model method.
      check_finite: register a `checkify` check for NaN / inf in the activation of every
        quantized site; run ``checkify.checkify(f, errors=checkify.user_checks)`` to see it.
        Off by default: a check costs the jitted function JAX's fast dispatch path. Without it,
        a NaN or inf still makes the output rows it reaches NaN (see `jq.ops.dot_general`).
      mutable: (keyword) linen: forwarded to ``model.apply``, which then returns
        ``(out, updates)``. nnx: ``mutable=True`` returns ``(out, new_qvars)``
        with the variables the module updates in place (dropout RNG counts,
        BatchNorm statistics) advanced as ``model(x)`` would advance them; pass
        `new_qvars` to the next call.

    Raises:
      ValueError: `qvars` belongs to another model, or `rules` disagrees with it;
        an nnx module updates its state (dropout active, BatchNorm in training
        mode) without ``mutable=True`` (call ``model.eval()`` for inference).
    """
    if not isinstance(qvars, QuantizedVariables):
        raise TypeError(f"jq.apply: expected QuantizedVariables from jq.convert, got {type(qvars).__name__}")
    adapter = _adapter_for(model, qvars, method)
    nnx_mutable = False
    if adapter.kind == "nnx":
        nnx_mutable = kwargs.pop("mutable", False)
        adapter.with_state = True
    model_sig = None
    if adapter.kind == "linen":
        import flax.linen as nn

        if not isinstance(model, nn.Module):
            raise TypeError(f"jq.apply: model must be a Flax Module, got {type(model).__name__}")
        model_sig = _linen_signature(model, args, kwargs, method)
    _check_signature(adapter, qvars, model_sig, partial=method is not None, inputs=_describe_inputs(args, kwargs))
    if rules is not None:
        _check_rules_consistent(check_rules(rules), qvars)
    leaves = [qvars.variables[li.path] for li in adapter.leaves]
    avals = [leaf_aval(li, v) for li, v in zip(adapter.leaves, leaves)]
    try:
        t = trace(adapter, avals, args, kwargs)
    except TypeError as e:  # shape errors of jax ops (a wrong input width on an nnx Linear)
        if type(e) is not TypeError:
            raise
        raise TypeError(
            f"jq.apply: the model does not run on these inputs ({_describe_inputs(args, kwargs)}) with "
            f"the quantized variables: {e}"
        ) from e
    plan = {s.name: s for s in qvars.plan.sites}
    selected = set()
    for s in t.finder.sites:
        if s.name in plan or (s.leaf is not None and isinstance(leaves[s.leaf.index], QArray)):
            selected.add(s.name)

    def handler(site, eqn, invals, sts):
        sp = plan.get(site.name)
        if site.kind == "embed":
            return run_embed(eqn, invals)
        if sp is None or sp.mode == "weight_only":
            if site.kind == "act_dot":
                return bind_eqn(eqn, invals)
            return run_dot_like(site, eqn, invals, {}, {}, "weight_only",
                                 sts.get(site.name + ":smooth"), check_finite)
        specs = {op: sp.activation for op in site.act_operands}
        qps = {op: sts[site.act_key(op)] for op in site.act_operands} if sp.mode == "static" else {}
        return run_dot_like(site, eqn, invals, specs, qps, sp.mode, sts.get(site.name + ":smooth"),
                             check_finite)

    states = {}
    for s in t.finder.sites:
        for op in s.act_operands:
            k = s.act_key(op)
            if k in qvars.activations:
                states[k] = qvars.activations[k]
        if s.name in qvars.smooth:
            states[s.name + ":smooth"] = qvars.smooth[s.name]
    outs = Interpreter(t.finder, selected, handler).run(t.jaxpr, t.consts, leaves + t.dyn_args, states)
    out = jax.tree_util.tree_unflatten(t.out_tree, outs)
    if adapter.kind == "nnx":
        return _nnx_result(t, adapter, qvars, out, nnx_mutable)
    return out


def _nnx_result(t, adapter: ModelAdapter, qvars: QuantizedVariables, out, mutable):
    """`apply`'s result for an nnx model traced with its state: the output, or (output, new qvars)."""
    out, new_leaves = out
    if mutable is not True and mutable is not False:
        raise TypeError(f"jq.apply: for an nnx model, mutable must be True or False, got {mutable!r}")
    if not mutable:
        changed = state_changes(t, adapter)
        if changed:
            raise ValueError(
                f"jq.apply: the nnx model updates its state in this call ({fmt_paths(changed)}): "
                "dropout is active or BatchNorm is in training mode. Dropping the update would repeat "
                "one dropout mask on every call. Call model.eval() for inference, or pass mutable=True "
                "to get (out, new_qvars) and use new_qvars in the next call"
            )
        return out
    old = qvars.variables
    new = {li.path: (old[li.path] if li.is_param or isinstance(old[li.path], QArray) else v)
           for li, v in zip(adapter.leaves, new_leaves)}
    return out, dataclasses.replace(qvars, variables=new)


def _check_rules_consistent(rules, qvars):
    for sp in qvars.plan.sites:
        r = rules[sp.rule_index] if sp.rule_index < len(rules) else None
        act = None if r is None or r.activation is None else r.activation.replace(calibration=None)
        # static vs dynamic as well: the specs match once `calibration` is stripped
        mode_differs = r is not None and sp.kind != "embed" and r.mode != sp.mode
        if r is None or mode_differs or (sp.mode != "weight_only" and act != sp.activation):
            raise ValueError(
                f"jq.apply: `rules` disagree with the quantized variables at site {sp.name!r} "
                f"(converted {sp.mode} with rules[{sp.rule_index}], activation {sp.activation}"
                + (f"; the rule given now is {r.mode})" if mode_differs else ")")
            )


# ---------------------------------------------------------------------------------------
# QAT
# ---------------------------------------------------------------------------------------
def _qat_model_variables(model, qat_vars):
    import flax.linen as nn

    if isinstance(model, nn.Module):
        return {"params": qat_vars["params"], **qat_vars["state"]["variables"]}
    return None


@jax.tree_util.register_pytree_node_class
class _StaticKwargs:
    """The plain-Python keyword arguments of `QAT.init` (``train=False``, ...), kept as static
    pytree data in the QAT state (no leaves: jit, grad and optax pass them through), so that
    `convert` re-traces the model with them."""

    def __init__(self, items=()):
        self.items = tuple(items)

    @classmethod
    def record(cls, kwargs: dict) -> _StaticKwargs:
        keep = []
        for k, v in sorted(kwargs.items()):
            # `mutable` and `rngs` steer one call, they are not model inputs; arrays are not static
            if k in ("mutable", "rngs") or not isinstance(v, (bool, int, float, str, type(None))):
                continue
            keep.append((k, v))
        return cls(keep)

    def tree_flatten(self):
        return (), self.items

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(aux)

    def __eq__(self, other):
        return isinstance(other, _StaticKwargs) and self.items == other.items

    def __hash__(self):
        return hash(self.items)

    def __repr__(self):
        return f"StaticKwargs({dict(self.items)})"


def variables_example(qat_vars):
    """The example input recorded by `QAT.init`: ``(args, kwargs)``."""
    ex = qat_vars["state"].get("example")
    if ex is None:
        raise ValueError("jq.convert: QAT variables carry no example input; pass args=(x,)")
    return tuple(ex), _recorded_kwargs(qat_vars)


def _recorded_kwargs(qat_vars) -> dict:
    kw = qat_vars["state"].get("example_kwargs")
    return dict(kw.items) if isinstance(kw, _StaticKwargs) else {}


def _qat_act_qparams(qat_vars, key, spec):
    if key in qat_vars["quant"].get("activations", {}):
        a = qat_vars["quant"]["activations"][key]
        _check_learned_scale(key, a["scale"])
        zp = a.get("zero_point")
        return QParams(a["scale"], None if zp is None else jnp.round(zp).astype(jnp.int32))
    r = qat_vars["state"]["ranges"].get(key)
    if r is None:
        raise ValueError(f"jq.convert: QAT variables have no range for static site {key!r}")
    warn_zero_width(key, r["lo"], r["hi"])
    return qparams_from_range(r["lo"], r["hi"], spec)


def _check_learned_scale(name: str, scale) -> None:
    """LSQ scales are trained freely: a zero or non-finite one cannot quantize.

    (A negative one can: the grid is mirrored, and `quantize` / `dequantize`
    give exactly what `lsq_fake_quant` computed in training.)
    """
    if isinstance(scale, jax.core.Tracer):
        return
    s = np.asarray(scale, np.float64)
    ok = np.isfinite(s) & (s != 0)
    if not np.all(ok):
        bad = s[~ok].reshape(-1)[:3].tolist()
        raise ValueError(
            f"jq.convert: the learned QAT scale of site {name!r} is zero or not finite (e.g. {bad}); "
            "lower the learning rate of the `quant` parameters or clip them in training"
        )


class QAT:
    """Quantization-aware training of an unmodified model.

    ``qat = jq.qat(model, rules)``; ``qv = qat.init(variables, x)`` returns a
    dict with three entries:

    * ``"params"``: the model's float parameters (linen: ``variables["params"]``;
      nnx: ``{path: array}`` of its `nnx.Param` leaves), trained as usual;
    * ``"quant"``: learned quantization parameters (LSQ scales / zero points of
      activations, and of weights when ``weights="lsq"``), trainable; keep them
      out of weight decay with an optax mask;
    * ``"state"``: everything not trained by gradients: tracked activation
      ranges (moving average of min / max), other variable collections, and the
      example input signature that `convert` re-traces with.

    ``qat.apply(qv, x)`` runs the fake-quantized forward pass (straight-through
    gradients); ``qat.apply(qv, x, update_stats=True)`` also returns the new
    ``"state"`` with the moving-average ranges updated (PyTorch's
    FakeQuantize order: update the range, then quantize with it).
    ``jq.convert(model, qv, rules)`` gives inference variables whose
    `jq.apply` output matches this forward pass.

    Args:
      model: linen or nnx Module.
      rules: the `jq.Rule` list. Static activation specs track or learn their
        range; dynamic ones use each batch's own range; weight-only rules
        fake-quantize weights only.
      activations: ``"ema"`` (moving-average min-max, constant
        `averaging_constant`) or ``"lsq"`` (learned scale and zero point).
      weights: ``"minmax"`` (each step's own per-channel min-max) or ``"lsq"``.
      averaging_constant: EMA constant c in ``m <- m + c * (batch - m)``.
    """

    def __init__(self, model, rules, *, activations: str = "ema", weights: str = "minmax",
                 averaging_constant: float = 0.01, method=None):
        if activations not in ("ema", "lsq"):
            raise ValueError(f"jq.qat: activations must be 'ema' or 'lsq', got {activations!r}")
        if weights not in ("minmax", "lsq"):
            raise ValueError(f"jq.qat: weights must be 'minmax' or 'lsq', got {weights!r}")
        if not 0.0 < averaging_constant <= 1.0:
            raise ValueError(f"jq.qat: averaging_constant must lie in (0, 1], got {averaging_constant}")
        self.model = model
        self.rules = check_rules(rules)
        self.activations = activations
        self.weights = weights
        self.c = float(averaging_constant)
        self.method = method

    # -- variables <-> adapter ------------------------------------------------------------
    def _adapter(self, params, state):
        import flax.linen as nn

        if isinstance(self.model, nn.Module):
            return ModelAdapter(self.model, {"params": params, **state["variables"]}, self.method)
        return ModelAdapter(self.model, None, self.method)

    def _leaves(self, adapter, params, state):
        if adapter.kind == "linen":
            return list(adapter.values)
        return list(adapter.override({**state["variables"], **params}).values)

    def init(self, variables, *args, stats: CalibrationStats | None = None, **kwargs) -> dict:
        """QAT variables from trained float variables (nnx: None) and an example input.

        Activation ranges start from `stats` when given, otherwise from the
        example batch's min-max; LSQ scales start from those ranges.
        """
        import flax.linen as nn

        if isinstance(self.model, nn.Module):
            if variables is None:
                raise ValueError("jq.qat.init: a linen model needs its trained variables")
            from flax.core import unfreeze

            variables = unfreeze(variables)
            params = variables["params"]
            rest = {k: v for k, v in variables.items() if k != "params"}
        else:
            if variables is not None:
                raise ValueError("jq.qat.init: an nnx model carries its state; pass variables=None")
            adapter = ModelAdapter(self.model, None, self.method)
            params = {li.path: v for li, v in zip(adapter.leaves, adapter.values) if li.is_param}
            rest = {li.path: v for li, v in zip(adapter.leaves, adapter.values) if not li.is_param}
        # a one-row example input, kept so that `convert` can re-trace the model
        example = tuple(
            jnp.zeros((1,) + tuple(np.shape(a))[1:] if np.ndim(a) else (), jnp.result_type(a)) for a in args
        )
        state = {"variables": rest, "ranges": {}, "example": example,
                 "example_kwargs": _StaticKwargs.record(kwargs)}
        adapter = self._adapter(params, state)
        t = trace(adapter, self._leaves(adapter, params, state), args, kwargs)
        chosen = choose(t.finder, self.rules)
        ranges, quant = {}, {"activations": {}, "weights": {}}
        key_choice = {}
        for c in chosen.values():
            if c.mode != "static":
                continue
            spec = c.rule.activation
            for op in c.site.act_operands:
                activation_spec(c, op)
                key = c.site.act_key(op)
                key_choice[key] = c
                lengths = scan_lengths(c.site, t.finder)
                if stats is not None and key in stats.states:
                    lo, hi = observed_range(stats.observers[key], stats.states[key], lengths, key)
                    lo, hi = lo.reshape(lengths + spec.param_shape(tuple(c.site.in_avals[op].shape))), \
                        hi.reshape(lengths + spec.param_shape(tuple(c.site.in_avals[op].shape)))
                    cnt = jnp.ones(lengths, jnp.int32)
                else:
                    shape = spec.param_shape(tuple(c.site.in_avals[op].shape))
                    lo = jnp.zeros(shape, jnp.float32)
                    hi = jnp.zeros(shape, jnp.float32)
                    cnt = jnp.zeros((), jnp.int32)
                    lo, hi, cnt = (stack_tree(a, lengths) for a in (lo, hi, cnt))
                ranges[key] = {"lo": jnp.asarray(lo, jnp.float32), "hi": jnp.asarray(hi, jnp.float32),
                               "count": cnt}
        state["ranges"] = ranges
        qv = {"params": params, "quant": quant, "state": state}
        if any(int(np.min(r["count"])) == 0 for r in ranges.values()):
            _, new_state = self.apply(qv, *args, update_stats=True, **kwargs)
            # only the ranges: init leaves RNG counts and BatchNorm statistics as the model has them
            qv["state"] = {**state, "ranges": new_state["ranges"]}
        if self.activations == "lsq":
            for key, r in qv["state"]["ranges"].items():
                qp = qparams_from_range(r["lo"], r["hi"], key_choice[key].rule.activation)
                quant["activations"][key] = {
                    "scale": qp.scale,
                    "zero_point": None if qp.zero_point is None else qp.zero_point.astype(jnp.float32),
                }
        if self.weights == "lsq":
            all_leaves = self._leaves(adapter, params, state)
            for idx, (spec, c) in leaf_specs(chosen).items():
                if not jnp.issubdtype(spec.fmt.dtype, jnp.integer):
                    continue
                qp = _minmax_qp(all_leaves[idx], spec)
                quant["weights"][c.site.name] = {
                    "scale": qp.scale,
                    "zero_point": None if qp.zero_point is None else qp.zero_point.astype(jnp.float32),
                }
        return qv

    def apply(self, qat_vars: dict, *args, update_stats: bool = False, **kwargs):
        """Fake-quantized forward pass. Returns the output, or ``(output, new_state)``.

        With ``update_stats=True`` the new state holds everything the step
        changed, exactly as running the float model would change it:

        * the moving-average activation ranges;
        * nnx: every non-parameter variable the module updates in place (the
          RNG counts of `nnx.Dropout` and other RNG streams, `nnx.BatchNorm`
          statistics), so that each step draws a new dropout mask;
        * linen: pass ``mutable=["batch_stats"]`` (and ``rngs=``) as to
          ``model.apply``. The output is then ``(out, updates)``, as
          ``model.apply`` returns it, and the updated collections that the
          state holds are already merged into ``new_state["variables"]``;
          collections the state does not hold (``"intermediates"``) are only
          in ``updates``.

        Raises:
          ValueError: an nnx module changes its state (dropout active, BatchNorm
            in training mode) while ``update_stats=False``, which would drop the
            change and repeat one dropout mask on every call; pass
            ``update_stats=True``, or call ``model.eval()`` for evaluation.
        """
        params, quant, state = qat_vars["params"], qat_vars["quant"], qat_vars["state"]
        adapter = self._adapter(params, state)
        adapter.with_state = adapter.kind == "nnx"
        leaves = self._leaves(adapter, params, state)
        t = trace(adapter, leaves, args, kwargs)
        chosen = choose(t.finder, self.rules, warn=False)
        # weights: fake-quantized once per step at the parameter, in its stored layout
        for idx, (spec, c) in leaf_specs(chosen).items():
            name = c.site.name
            w = leaves[idx]
            if self.weights == "lsq" and name in quant.get("weights", {}):
                lq = quant["weights"][name]
                leaves[idx] = lsq_fake_quant(w, QParams(lq["scale"], lq["zero_point"]), spec)
            else:
                leaves[idx] = fake_quant(w, None, spec)
        c_ema = self.c
        lsq = self.activations == "lsq"

        def handler(site, eqn, invals, sts):
            ch = chosen[site.name]
            vals = list(invals)
            if ch.mode != "weight_only":
                spec = ch.rule.activation
                for op in site.act_operands:
                    key = site.act_key(op)
                    x = vals[op]
                    if ch.mode == "dynamic":
                        vals[op] = fake_quant(x, None, spec)
                    elif lsq and key in quant.get("activations", {}):
                        a = sts["quant:" + key]
                        vals[op] = lsq_fake_quant(x, QParams(a["scale"], a["zero_point"]), spec)
                    else:
                        r = sts[key]
                        if update_stats and x.size:  # an empty batch leaves the range alone
                            lo, hi = reduce_range(jax.lax.stop_gradient(x), spec)
                            lo, hi = lo.reshape(r["lo"].shape), hi.reshape(r["hi"].shape)
                            first = r["count"] == 0
                            nlo = jnp.where(first, lo, r["lo"] + c_ema * (lo - r["lo"]))
                            nhi = jnp.where(first, hi, r["hi"] + c_ema * (hi - r["hi"]))
                            r = {"lo": nlo, "hi": nhi, "count": r["count"] + 1}
                            sts[key] = r
                        qp = qparams_from_range(r["lo"], r["hi"], spec)
                        vals[op] = fake_quant(x, qp, spec)
            return bind_eqn(eqn, vals)

        sts = dict(state["ranges"])
        for k, a in quant.get("activations", {}).items():
            sts["quant:" + k] = a
        selected = {n for n, c in chosen.items() if c.site.kind != "embed"}
        outs = Interpreter(t.finder, selected, handler).run(t.jaxpr, t.consts, leaves + t.dyn_args, sts)
        out = jax.tree_util.tree_unflatten(t.out_tree, outs)
        new_vars = state["variables"]
        if adapter.kind == "nnx":
            out, new_leaves = out
            changed = state_changes(t, adapter)
            if changed and not update_stats:
                raise ValueError(
                    f"jq.qat.apply: the nnx model updates its state in this call ({fmt_paths(changed)}: "
                    "dropout RNG counts, BatchNorm statistics), which update_stats=False would drop, "
                    "repeating one dropout mask on every call; pass update_stats=True and keep the "
                    "returned state, or call model.eval() to evaluate"
                )
            new_vars = {li.path: v for li, v in zip(adapter.leaves, new_leaves) if li.path in new_vars}
        elif kwargs.get("mutable", False) is not False:
            new_vars = _merge_linen_updates(new_vars, out)
        if not update_stats:
            return out
        new_state = dict(state)
        new_state["variables"] = new_vars
        new_state["ranges"] = {k: sts[k] for k in state["ranges"]}
        return out, new_state


def _merge_linen_updates(variables: dict, out):
    """``variables`` with the collections of a linen ``(out, updates)`` result that it holds replaced."""
    if not (isinstance(out, tuple) and len(out) == 2 and hasattr(out[1], "items")):
        return variables
    from flax.core import unfreeze

    updates = unfreeze(out[1])
    return {**variables, **{k: v for k, v in updates.items() if k in variables}}


def _minmax_qp(w, spec):
    from jq.qparams import qparams_from_array

    return qparams_from_array(w, spec)


def qat(model, rules: Sequence[Rule], **kw) -> QAT:
    """A `QAT` wrapper of `model` (see `QAT`)."""
    return QAT(model, rules, **kw)


# ---------------------------------------------------------------------------------------
# report()
# ---------------------------------------------------------------------------------------
def report(model, variables, qvars: QuantizedVariables, *args, method=None, **kwargs) -> list[dict]:
    """Per-site quality: weight and activation SQNR (dB) and clipping fraction on one batch.

    Runs the float model on `args` and, at every quantized site, compares the
    weight with its dequantized `QArray` and the activation with its
    quantize-dequantize round trip under the site's parameters.

    Returns:
      One dict per site: ``site``, ``kind``, ``mode``, ``weight_sqnr_db``,
      ``act_sqnr_db``, ``act_clip_frac`` (fraction of activation values outside
      the representable range; 0 for dynamic sites).
    """
    adapter = ModelAdapter(model, variables, method)
    t = trace(adapter, adapter.values, args, kwargs)
    plan = {s.name: s for s in qvars.plan.sites}
    selected = {s.name for s in t.finder.sites if s.name in plan}
    metrics: dict = {}

    def handler(site, eqn, invals, sts):
        sp = plan[site.name]
        if sp.mode != "weight_only":
            for op in site.act_operands:
                x = invals[op].astype(jnp.float32)
                key = site.act_key(op)
                qp = qvars.activations.get(key) if sp.mode == "static" else None
                q = quantize(x, qp, sp.activation)
                xh = dequantize(q)
                if qp is not None:
                    from jq.qparams import broadcast_qparams

                    b = broadcast_qparams(qp, x.shape, sp.activation)
                    zp = 0.0 if b.zero_point is None else b.zero_point.astype(jnp.float32)
                    v = jnp.round(x * (1.0 / b.scale)) + zp  # as jq.quantize rounds
                    clip = jnp.mean(((v < sp.activation.qmin) | (v > sp.activation.qmax)).astype(jnp.float32))
                else:
                    clip = jnp.zeros((), jnp.float32)
                sts[key] = {"sqnr": sqnr_db(x, xh), "clip": clip}
        return bind_eqn(eqn, invals)

    for s in t.finder.sites:
        sp = plan.get(s.name)
        if sp is None or sp.mode == "weight_only":
            continue
        for op in s.act_operands:
            metrics[s.act_key(op)] = stack_tree(
                {"sqnr": jnp.zeros((), jnp.float32), "clip": jnp.zeros((), jnp.float32)},
                scan_lengths(s, t.finder))
    Interpreter(t.finder, selected, handler).run(t.jaxpr, t.consts, list(adapter.values) + t.dyn_args, metrics)
    rows = []
    by_path = {li.path: v for li, v in zip(adapter.leaves, adapter.values)}
    for sp in qvars.plan.sites:
        wq = qvars.variables.get(sp.leaf) if sp.leaf else None
        wsq = None
        if isinstance(wq, QArray):
            wsq = float(sqnr_db(jnp.asarray(by_path[sp.leaf]), dequantize(wq)))
        keys = [k for k in metrics if k == sp.name or k.startswith(sp.name + ":")]
        asq = [float(jnp.mean(metrics[k]["sqnr"])) for k in keys]
        acl = [float(jnp.mean(metrics[k]["clip"])) for k in keys]
        rows.append({
            "site": sp.name, "kind": sp.kind, "mode": sp.mode,
            "weight_sqnr_db": wsq,
            "act_sqnr_db": min(asq) if asq else None,
            "act_clip_frac": max(acl) if acl else None,
        })
    return rows
