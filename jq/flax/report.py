"""Which sites the rules select (`sites`), and how well a converted model keeps them (`report`)."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from jq.flax._graph import Interpreter, bind_eqn, keyed_by_site
from jq.flax.adapter import ModelAdapter, trace
from jq.flax.qvars import QuantizedVariables, inverse_perm, permute_qarray
from jq.flax.rules import Rule, check_rules
from jq.flax.select import choose, scan_lengths, stack_tree
from jq.flax.stream import check_forwarded
from jq.flax.weight_axes import axis_roles
from jq.qparams import broadcast_qparams
from jq.quantize import QArray, dequantize, quantize

__all__ = [
    "format_table",
    "report",
    "sites",
]


def sites(model, variables, rules: Sequence[Rule], *args, method=None, **kwargs) -> list[dict]:
    """Lists every quantizable site of the model and the rule that selects it.

    Args:
      model: a linen Module (with `variables`), an nnx Module (``variables=None``), a
        function ``fn(params, *args, **kwargs)`` (with its params) or a Hugging Face model.
      variables: linen variables, or None for nnx.
      rules: the `jq.Rule` list.
      *args, **kwargs: an example input (shapes matter, values do not).

    Returns:
      One dict per site: ``site``, ``kind``, ``module``, ``rule`` (index or None),
      ``mode`` (``static`` / ``dynamic`` / ``weight_only`` / ``float``), ``weight``
      (parameter shape), ``axes`` (what each stored axis of the parameter is to
      its op: ``"output"``, ``"contracting"``, ... see `jq.flax.weight_axes`)
      and ``inputs`` (operand shapes). Prints nothing; use
      `format_table` to show it.
    """
    rules = check_rules(rules)
    check_forwarded("sites", kwargs)
    adapter = ModelAdapter(model, variables, method)
    t = trace(adapter, adapter.values, args, kwargs)
    chosen = choose(t.finder, rules)
    rows = []
    for s in t.finder.sites:
        c = chosen.get(s.name)
        roles = axis_roles(s)
        rows.append(
            {
                "site": s.name,
                "kind": s.kind,
                "module": s.module_path,
                "rule": None if c is None else c.rule_index,
                "mode": "float" if c is None else c.mode,
                "weight": None if s.leaf is None else s.leaf.shape,
                "axes": None if roles is None else roles,
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


def report(model, variables, qvars: QuantizedVariables, *args, method=None, **kwargs) -> list[dict]:
    """Per-site quality: weight and activation SQNR (dB) and clipping fraction on one batch.

    Runs the float model on `args` and, at every quantized site, compares the
    weight with its dequantized `QArray` and the activation with its
    quantize-dequantize round trip under the site's parameters. Keyword
    arguments default to the ones `qvars` was converted with, as in `jq.apply`.

    Returns:
      One dict per site: ``site``, ``kind``, ``mode``, ``weight_sqnr_db``,
      ``act_sqnr_db``, ``act_clip_frac`` (fraction of activation values outside
      the representable range; 0 for dynamic sites), ``note`` (how a semantic
      weight spec was adapted at the site, e.g. a group size; None otherwise).
    """
    check_forwarded("report", kwargs)
    kwargs = {**qvars.plan.call_kwargs(method), **kwargs}  # as `jq.apply` calls the model
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
                # static QParams come through the state: inside a scan, one slice per layer
                qp = sts.get(site.key("qparams", op)) if sp.mode == "static" else None
                q = quantize(x, qp, sp.activation)
                xh = dequantize(q)
                if qp is not None:
                    b = broadcast_qparams(qp, x.shape, sp.activation)
                    zp = 0.0 if b.zero_point is None else b.zero_point.astype(jnp.float32)
                    v = jnp.round(x * (1.0 / b.scale)) + zp  # as jq.quantize rounds
                    clip = jnp.mean(
                        ((v < sp.activation.qmin) | (v > sp.activation.qmax)).astype(jnp.float32)
                    )
                else:
                    clip = jnp.zeros((), jnp.float32)
                sts[site.key("metrics", op)] = {"sqnr": _sqnr_db(x, xh), "clip": clip}
        return bind_eqn(eqn, invals)

    for s in t.finder.sites:
        sp = plan.get(s.name)
        if sp is None or sp.mode == "weight_only":
            continue
        for op in s.act_operands:
            metrics[s.key("metrics", op)] = stack_tree(
                {"sqnr": jnp.zeros((), jnp.float32), "clip": jnp.zeros((), jnp.float32)},
                scan_lengths(s, t.finder),
            )
    states = {**keyed_by_site(t.finder, qvars.activations, "qparams"), **metrics}
    Interpreter(t.finder, selected, handler).run(
        t.jaxpr, t.consts, list(adapter.values) + t.dyn_args, states
    )
    rows = []
    by_path = {li.path: v for li, v in zip(adapter.leaves, adapter.values)}
    for sp in qvars.plan.sites:
        wq = qvars.variables.get(sp.weight_key or sp.leaf) if sp.leaf else None
        wsq = None
        if isinstance(wq, QArray):
            if sp.weight_perm is not None:
                wq = permute_qarray(wq, inverse_perm(sp.weight_perm))
            wsq = float(_sqnr_db(jnp.asarray(by_path[sp.leaf]), dequantize(wq)))
        keys = [k for k in metrics if k.site == sp.name]
        asq = [float(jnp.mean(states[k]["sqnr"])) for k in keys]
        acl = [float(jnp.mean(states[k]["clip"])) for k in keys]
        rows.append(
            {
                "site": sp.name,
                "kind": sp.kind,
                "mode": sp.mode,
                "weight_sqnr_db": wsq,
                "act_sqnr_db": min(asq) if asq else None,
                "act_clip_frac": max(acl) if acl else None,
                "note": sp.note,
            }
        )
    return rows


def _sqnr_db(x, y) -> jax.Array:
    """Signal-to-quantization-noise ratio of approximation `y` of `x`, in dB."""
    x = x.astype(jnp.float32)
    noise = jnp.sum(jnp.square(x - y.astype(jnp.float32)))
    sig = jnp.sum(jnp.square(x))
    return 10.0 * jnp.log10(jnp.maximum(sig, 1e-30) / jnp.maximum(noise, 1e-30))
