"""`convert`: float (or QAT) variables to `QuantizedVariables`, weights quantized once."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jq.flax.adapter import ModelAdapter, trace
from jq.flax.apply import run_quantized
from jq.flax.qat import (
    is_qat_vars,
    qat_act_qparams,
    qat_model_variables,
    qat_weight_qparams,
    recorded_kwargs,
    variables_example,
)
from jq.flax.qvars import (
    CalibrationStats,
    ParamsTree,
    Plan,
    QuantizedVariables,
    SitePlan,
    method_name,
    observed_range,
    permute_qarray,
    record_kwargs,
    warn_zero_width,
)
from jq.flax.rules import Rule, check_rules
from jq.flax.select import (
    activation_spec,
    choose,
    movable_weight_sites,
    scan_lengths,
    weight_storage,
)
from jq.flax.stream import model_kwargs_arg
from jq.hosteval import host_eval
from jq.lowering import TARGETS, weight_layout
from jq.qparams import QuantSpec, qparams_from_range
from jq.quantize import QArray, quantize

__all__ = [
    "convert",
    "HOST_MAX_ELEMENTS",
    "quantize_leaves",
    "quantize_leaves_jit",
]


def convert(
    model,
    variables,
    rules: Sequence[Rule],
    stats: CalibrationStats | None = None,
    *,
    args: tuple | None = None,
    model_kwargs: dict | None = None,
    method=None,
    verbose: bool = False,
    kwargs: dict | None = None,
    target: str | None = None,
) -> QuantizedVariables:
    """Turns float (or QAT) variables into quantized variables.

    Every parameter that feeds a selected site is quantized once, here, with its
    rule's weight spec (int8; int4 packed two per byte) and replaced by a
    `QArray`; static activation sites get `QParams` from the calibrated ranges
    (or from the ranges / learned scales of QAT variables). All weights and
    calibrated activation parameters are computed by one jitted function
    (`quantize_leaves`), compiled once per structure of specs and shapes; the
    model is traced twice (once to find its sites, once for the dry run of
    `jq.apply` that checks every spec against its op).

    Args:
      model: a linen Module, an nnx Module (never mutated), a function
        ``fn(params, *args, **kwargs)`` or a Hugging Face Flax model.
      variables: linen variables; None for nnx; or the variables returned by
        `QAT.init` / trained with `QAT.apply` (then the QAT ranges and learned
        scales are used and `stats` is not needed).
      rules: the `jq.Rule` list.
      stats: `CalibrationStats` from `calibrate`; required when a rule is static.
      args: an example input (a tuple of positional arguments), needed when
        `stats` is None (jq traces the model to find its sites).
      model_kwargs: the model's keyword arguments for that example (default:
        the ones `calibrate` saw, or that `QAT.init` recorded). Their plain values
        (``train=False``) are recorded in the result (``qvars.plan.model_kwargs``,
        saved in checkpoints): `jq.apply`, `jq.export` and `QuantizedModel` pass
        them by default; a caller's keyword arguments override them.
      method: the model method (default ``__call__``).
      verbose: print the size report.
      kwargs: deprecated name of `model_kwargs`.
      target: the hardware the variables are for (None: this CPU, ``"cpu"``,
        ``"gpu"``, ``"tpu"``). Each kernel of a dot site is stored in the layout
        `jq.lowering.weight_layout(target)` names, whatever the model's own:
        ``"nk"`` (contracting axes last, contiguous: (K, N) -> (N, K), a
        DenseGeneral (K, H, D) -> (H, D, K)) on GPU / TPU (the operand layout of
        integer and fp8 GEMMs) and on x86 CPUs (XLA:CPU's fast int8
        matrix-vector products, LLM decoding), ``"kn"`` (contracting axes first)
        on other CPUs; so no call transposes an int8 weight (an HF GPT-2 Conv1D
        kernel read through ``kernel.T`` is read as stored). Recorded per site
        (``SitePlan.weight_perm``: stored = ``transpose(model's kernel,
        perm)``); `apply`, exports, `report`, checkpoints and `jq.sharding`
        read it. Kernels shared by several sites, used outside them, reaching
        the dot through a reshape, packed (int4), stacked by a scan or sharded
        keep their layout.

    Returns:
      `QuantizedVariables`; ``qvars.nbytes()`` gives the sizes before and after.

    Raises:
      ValueError: a static site has no statistics; a rule's spec does not fit
        its layer; no example input to trace.
    """
    rules = check_rules(rules)
    kwargs = model_kwargs_arg("convert", model_kwargs, kwargs) if kwargs or model_kwargs else None
    if target not in TARGETS:
        raise ValueError(
            f"jq.convert: target must be one of {', '.join(map(repr, TARGETS))}, got {target!r}"
        )
    layout = weight_layout(target)
    qat_state = None
    if is_qat_vars(variables):
        qat_state = variables
        variables = qat_model_variables(model, variables)
        if args is None:
            args, _ = variables_example(qat_state)
        # the caller's keyword arguments win over the ones recorded by QAT.init
        kwargs = {**recorded_kwargs(qat_state), **(kwargs or {})}
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

    # weights: one QArray per parameter leaf (or per use of a parameter whose uses differ:
    # `weight_storage`); static activations: QParams from their ranges
    specs, per_use = weight_storage(chosen, t.finder)
    quantized = [li for li in adapter.leaves if li.index in specs]
    values = dict(zip((li.index for li in adapter.leaves), adapter.values))
    wqps = [
        None if qat_state is None else qat_weight_qparams(qat_state, specs[li.index][1].site.name)
        for li in quantized
    ]
    wqps += [None if qat_state is None else qat_weight_qparams(qat_state, name) for name in per_use]
    copy_keys = {name: f"{c.site.leaf.path}@{name}" for name, (_, c) in per_use.items()}
    acts, ranges, act_specs = {}, {}, {}
    for c in chosen.values():
        if c.mode == "dynamic":
            for op in c.site.act_operands:
                activation_spec(c, op)
        if c.mode != "static":
            continue
        for op in c.site.act_operands:
            spec = activation_spec(c, op)
            key = c.site.act_key(op)
            if qat_state is not None:
                acts[key] = qat_act_qparams(qat_state, key, spec)
                continue
            if stats is None or key not in stats.states:
                raise ValueError(
                    f"jq.convert: site {key!r} has a static activation spec (rules[{c.rule_index}] "
                    "names a calibration observer) but no statistics; run jq.calibrate with these "
                    "rules and pass stats=, or drop `calibration` for dynamic quantization"
                )
            lo, hi = observed_range(
                stats.observers[key], stats.states[key], scan_lengths(c.site, t.finder), key
            )
            warn_zero_width(key, lo, hi)
            ranges[key], act_specs[key] = (lo, hi), spec
    qs, finite, act_qps = quantize_leaves(
        tuple(specs[li.index][0] for li in quantized) + tuple(sp for sp, _ in per_use.values()),
        tuple(act_specs.values()),
        [values[li.index] for li in quantized]
        + [values[c.site.leaf.index] for _, c in per_use.values()],
        wqps,
        list(ranges.values()),
    )
    qs, copies = qs[: len(quantized)], qs[len(quantized) :]
    read = [li.path for li in quantized] + [c.site.leaf.path for _, c in per_use.values()]
    bad = sorted({p for p, ok in zip(read, np.asarray(finite)) if not ok})
    if bad:
        raise ValueError(f"jq.convert: parameters {bad} hold NaN or inf; they cannot be quantized")
    acts.update(zip(ranges, act_qps))
    new_vars = {li.path: v for li, v in zip(adapter.leaves, adapter.values)}
    moves = _storage_perms(t.finder, chosen, layout)
    perms = {}  # site name -> the permutation its weight is stored in
    for li, q in zip(quantized, qs):
        if li.index in moves and q.pack_axis is None:
            # stored in the dot's layout; a float weight on a mesh lends its sharding, permuted
            site_name, perm = moves[li.index]
            placed = _keep_sharding(permute_qarray(q, perm), values[li.index], perm)
            perms[site_name] = perm
        else:
            placed = _keep_sharding(q, values[li.index])
        new_vars[li.path] = placed
    for name, q in zip(per_use, copies):
        if copy_keys[name] in new_vars:
            raise ValueError(f"jq.convert: variable name {copy_keys[name]!r} is taken")
        new_vars[copy_keys[name]] = _keep_sharding(q, values[per_use[name][1].site.leaf.index])
    float_leaves = [(li.path, li.shape, np.dtype(li.dtype).name) for li in quantized]

    plans = []
    for name, c in chosen.items():
        s = c.site
        act = None if c.rule.activation is None else c.rule.activation.replace(calibration=None)
        plans.append(
            SitePlan(
                name,
                s.kind,
                None if s.leaf is None else s.leaf.path,
                c.mode,
                act if c.mode != "weight_only" else None,
                c.rule_index,
                perms.get(name),
                copy_keys.get(name),
                c.note,
            )
        )
    plan = Plan(
        adapter.kind,
        adapter.signature(),
        tuple(plans),
        tuple(float_leaves),
        record_kwargs(kwargs),
        method_name(method),
        ParamsTree(adapter.treedef) if adapter.kind == "fn" else None,
    )
    qvars = QuantizedVariables(new_vars, acts, plan)
    # a dry run surfaces every spec that does not fit its op (e.g. a scale on a contracting axis)
    dry_kw = (
        {**kwargs, "mutable": True} if adapter.kind == "nnx" else kwargs
    )  # train-mode nnx is fine here
    jax.eval_shape(
        lambda qv, a: run_quantized(model, qv, a, dict(dry_kw), method=method, init_check=False),
        qvars,
        args,
    )
    if verbose:
        print(qvars.summary())
    return qvars


#: Up to this many weight elements, `quantize_leaves` computes on the host (single-threaded
#: numpy beats compiling); above it, compiling once costs little next to the arithmetic,
#: which XLA spreads over every core.
HOST_MAX_ELEMENTS = 1 << 26


def quantize_leaves(
    weight_specs: tuple[QuantSpec, ...],
    act_specs: tuple[QuantSpec, ...],
    weights: list,
    weight_qparams: list,
    ranges: list,
):
    """All of `convert`'s arithmetic at once: `quantize_leaves_jit`'s result, computed on the
    host with numpy when that is bit-identical (`jq.hosteval`: no compilation), else jitted.
    """
    if sum(int(np.size(w)) for w in weights) <= HOST_MAX_ELEMENTS:
        fn = functools.partial(quantize_leaves_jit.__wrapped__, weight_specs, act_specs)
        out = host_eval(fn, weights, weight_qparams, ranges)
        if out is not None:
            return jax.device_put(out)  # (jnp.asarray would compile a copy per array)
    weights = [jnp.asarray(w) for w in weights]
    return quantize_leaves_jit(weight_specs, act_specs, weights, weight_qparams, ranges)


@functools.partial(jax.jit, static_argnums=(0, 1))
def quantize_leaves_jit(
    weight_specs: tuple[QuantSpec, ...],
    act_specs: tuple[QuantSpec, ...],
    weights: list,
    weight_qparams: list,
    ranges: list,
):
    """All of `convert`'s arithmetic in one compiled function.

    Returns ``(qarrays, finite, act_qparams)``: ``jq.quantize(w, qp, spec)``
    for every weight (``qp`` None: min-max parameters from the weight itself),
    ``all(isfinite(w))`` per weight (checked on the host: under jit `quantize`
    cannot raise), and ``jq.qparams_from_range(lo, hi, spec)`` for every
    calibrated activation range. The specs are static, so the function
    compiles once per structure, not once per eager op (about 70 compilations
    on a four-layer CNN). `quantize` computes the same float32 operations
    (``round_half_even(x * (1 / S))``) whether jitted or eager, so the result
    is bit-identical to quantizing each weight on its own.
    """
    qs = [quantize(w, qp, s) for w, qp, s in zip(weights, weight_qparams, weight_specs)]
    finite = jnp.stack([jnp.all(jnp.isfinite(w)) for w in weights]) if weights else jnp.ones(0)
    act_qps = [qparams_from_range(lo, hi, s) for (lo, hi), s in zip(ranges, act_specs)]
    return qs, finite, act_qps


def _storage_perms(finder, chosen, layout: str) -> dict[int, tuple[str, tuple[int, ...]]]:
    """``{leaf index: (site name, perm)}``: weights to store transposed by ``perm``.

    A weight that one dot site reads as its rhs (`select.movable_weight_sites`:
    directly or through transposes) is stored as ``transpose(w, perm)`` with
    the dot's contracting axes first (``layout="kn"``) or last (``"nk"``), each
    group in the dot's order; no perm when that is already the stored layout.
    """
    out = {}
    for idx, name in movable_weight_sites(finder, chosen, ("dot",)).items():
        s = chosen[name].site
        (_, rc), (_, rb) = s.eqn.params["dimension_numbers"]
        if tuple(rb):
            continue
        src = tuple(a[0] for a in s.axes)  # operand axis i is stored axis src[i]
        free = tuple(src[a] for a in range(len(src)) if a not in rc)
        con = tuple(src[a] for a in rc)
        if not free:
            continue
        perm = con + free if layout == "kn" else free + con
        if perm != tuple(range(len(perm))) or s.chain:
            # (an identity perm behind a transpose: the dot reads the stored weight as it is)
            out[idx] = (name, perm)
    return out


def _keep_sharding(q: QArray, value, perm: tuple[int, ...] | None = None):
    """`q` laid out like its float weight when that one lives on a mesh (see `jq.sharding`);
    `perm`: `q` is the weight transposed by it, and so is the sharding's spec."""
    from jax.sharding import NamedSharding, PartitionSpec

    s = getattr(value, "sharding", None)
    if (
        not isinstance(value, jax.Array)
        or isinstance(value, jax.core.Tracer)
        or not isinstance(s, NamedSharding)
    ):
        return q
    if perm is not None:
        spec = tuple(s.spec) + (None,) * (len(perm) - len(s.spec))
        s = NamedSharding(s.mesh, PartitionSpec(*(spec[p] for p in perm)))
    from jq.sharding import qarray_shardings

    try:
        return jax.device_put(q, qarray_shardings(q, s))
    except ValueError as e:  # e.g. int4 bytes would straddle two devices: leave XLA's layout
        warnings.warn(
            f"jq.convert: the quantized weight cannot follow its float sharding: {e}", stacklevel=3
        )
        return q
