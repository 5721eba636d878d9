"""`convert`: float (or QAT) variables to `QuantizedVariables`, weights quantized once."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jq.flax.adapter import ModelAdapter, trace
from jq.flax.apply import apply
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
    Plan,
    QuantizedVariables,
    SitePlan,
    observed_range,
    permute_qarray,
    warn_zero_width,
)
from jq.flax.rules import Rule, check_rules
from jq.flax.select import (
    activation_spec,
    choose,
    direct_weight_sites,
    leaf_specs,
    scan_lengths,
)
from jq.qparams import qparams_from_range
from jq.quantize import QArray, quantize

__all__ = [
    "convert",
]


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
    target: str | None = None,
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
      target: the hardware the variables are for: None or ``"cpu"`` keeps every
        weight in the model's layout (measured on an AVX-512 VNNI CPU, (N, K)
        is no faster there); ``"gpu"`` or ``"tpu"`` stores each kernel of a dot
        site with its contracting axes last, contiguous ((K, N) -> (N, K); a
        DenseGeneral (K, H, D) -> (H, D, K)), the operand layout of integer
        (IMMA) and fp8 GEMMs, so that no call transposes a weight. Recorded per
        site (``SitePlan.weight_perm``); `apply`, exports, `report`, checkpoints
        and `jq.sharding` read it. Kernels shared by several sites, used
        outside them, packed (int4), stacked by a scan or sharded keep their
        layout.

    Returns:
      `QuantizedVariables`; ``qvars.nbytes()`` gives the sizes before and after.

    Raises:
      ValueError: a static site has no statistics; a rule's spec does not fit
        its layer; no example input to trace.
    """
    rules = check_rules(rules)
    if target not in _TARGETS:
        raise ValueError(
            f"jq.convert: target must be one of {', '.join(map(repr, _TARGETS))}, got {target!r}"
        )
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

    # weights: one QArray per parameter leaf
    specs = leaf_specs(chosen)
    nk = _nk_candidates(t.finder, chosen) if _TARGETS[target] == "nk" else {}
    new_vars = {}
    float_leaves = []
    perms = {}  # site name -> the permutation its weight is stored in
    for li, value in zip(adapter.leaves, adapter.values):
        if li.index in specs:
            spec, c = specs[li.index]
            qp = None if qat_state is None else qat_weight_qparams(qat_state, c.site.name)
            q = quantize(jnp.asarray(value), qp, spec)
            placed = _keep_sharding(q, value)
            if li.index in nk and placed is q and q.pack_axis is None:
                site_name, perm = nk[li.index]
                placed = permute_qarray(q, perm)
                perms[site_name] = perm
            new_vars[li.path] = placed
            float_leaves.append((li.path, li.shape, np.dtype(li.dtype).name))
        else:
            new_vars[li.path] = value

    # activations
    acts, plans = {}, []
    for name, c in chosen.items():
        s = c.site
        act = None if c.rule.activation is None else c.rule.activation.replace(calibration=None)
        if c.mode == "static":
            for op in s.act_operands:
                spec = activation_spec(c, op)
                key = s.act_key(op)
                if qat_state is not None:
                    qp = qat_act_qparams(qat_state, key, spec)
                else:
                    if stats is None or key not in stats.states:
                        raise ValueError(
                            f"jq.convert: site {key!r} has a static activation spec (rules[{c.rule_index}] "
                            "names a calibration observer) but no statistics; run jq.calibrate with these "
                            "rules and pass stats=, or drop `calibration` for dynamic quantization"
                        )
                    lo, hi = observed_range(
                        stats.observers[key], stats.states[key], scan_lengths(s, t.finder), key
                    )
                    warn_zero_width(key, lo, hi)
                    qp = qparams_from_range(lo, hi, spec)
                acts[key] = qp
        elif c.mode == "dynamic":
            for op in s.act_operands:
                activation_spec(c, op)
        plans.append(
            SitePlan(
                name,
                s.kind,
                None if s.leaf is None else s.leaf.path,
                c.mode,
                act if c.mode != "weight_only" else None,
                c.rule_index,
                perms.get(name),
            )
        )
    plan = Plan(adapter.kind, adapter.signature(), tuple(plans), tuple(float_leaves))
    qvars = QuantizedVariables(new_vars, acts, plan)
    # a dry run surfaces every spec that does not fit its op (e.g. a scale on a contracting axis)
    dry_kw = (
        {**kwargs, "mutable": True} if adapter.kind == "nnx" else kwargs
    )  # train-mode nnx is fine here
    jax.eval_shape(lambda qv, a: apply(model, qv, *a, method=method, **dry_kw), qvars, args)
    if verbose:
        print(qvars.summary())
    return qvars


_TARGETS = {None: None, "cpu": None, "gpu": "nk", "tpu": "nk"}


def _nk_candidates(finder, chosen) -> dict[int, tuple[str, tuple[int, ...]]]:
    """``{leaf index: (site name, perm)}``: kernels to store with the contraction last.

    A kernel its dot site reads directly (`direct_weight_sites`), with no batch
    axes and some contracting axis before a free one; ``perm`` = its free axes,
    then its contracting axes, each in order.
    """
    out = {}
    for idx, name in direct_weight_sites(finder, chosen, ("dot",)).items():
        s = chosen[name].site
        (_, rc), (_, rb) = s.eqn.params["dimension_numbers"]
        free = tuple(a for a in range(len(s.leaf.shape)) if a not in rc)
        perm = free + tuple(rc)
        if not tuple(rb) and free and perm != tuple(range(len(perm))):
            out[idx] = (name, perm)
    return out


def _keep_sharding(q: QArray, value):
    """`q` laid out like its float weight when that one lives on a mesh (see `jq.sharding`)."""
    from jax.sharding import NamedSharding

    s = getattr(value, "sharding", None)
    if (
        not isinstance(value, jax.Array)
        or isinstance(value, jax.core.Tracer)
        or not isinstance(s, NamedSharding)
    ):
        return q
    from jq.sharding import qarray_shardings

    try:
        return jax.device_put(q, qarray_shardings(q, s))
    except ValueError as e:  # e.g. int4 bytes would straddle two devices: leave XLA's layout
        warnings.warn(
            f"jq.convert: the quantized weight cannot follow its float sharding: {e}", stacklevel=3
        )
        return q
