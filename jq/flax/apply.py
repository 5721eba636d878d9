"""`apply`: run a model with its `QuantizedVariables`, integer dots and convs at the quantized sites.

`run_site` is the evaluation of one quantized site, shared with `sensitivity`:
the weight arrives as a `QArray`, float activations go to `jq.ops.dot_general`
/ `jq.ops.conv_general_dilated` with their spec (``lhs_spec=`` /
``lhs_qparams=``), which quantizes them and runs the integer op.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jq import ops
from jq.flax._graph import Interpreter, Site, bind_eqn, keyed_by_site, through_chain
from jq.flax.adapter import ModelAdapter, fmt_paths, leaf_aval, model_kind, state_changes, trace
from jq.flax.qvars import QuantizedVariables
from jq.flax.rules import Rule, check_rules
from jq.flax.select import operand_perm
from jq.flax.stream import check_forwarded
from jq.qparams import QuantSpec
from jq.quantize import QArray, dequantize

__all__ = [
    "apply",
    "conv_params",
    "run_dot_like",
    "run_embed",
    "run_quantized",
    "run_site",
]


def apply(
    model,
    qvars: QuantizedVariables,
    *args,
    rules: Sequence[Rule] | None = None,
    method=None,
    check_finite: bool = False,
    **kwargs,
):
    """Runs the model with quantized variables: integer dots / convs at every quantized site.

    Inputs and keyword arguments (masks, ``train=``, ...) are forwarded to the
    model; ``method=`` selects another method (e.g. ``Embed.attend`` as a tied
    output head, or a method name for nnx). Wrap it in `jax.jit` for speed.

    Args:
      model: the model the variables were converted from (linen, nnx, a function or a
        Hugging Face model; never mutated).
      qvars: `QuantizedVariables` from `convert`.
      *args, **kwargs: the model's inputs. Keyword arguments default to the ones the
        variables were converted with (``qvars.plan.model_kwargs``, for the same `method`).
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
        raise TypeError(
            f"jq.apply: expected QuantizedVariables from jq.convert, got {type(qvars).__name__}"
        )
    check_forwarded("apply", kwargs)
    kwargs = {**qvars.plan.call_kwargs(method), **kwargs}
    return run_quantized(
        model, qvars, args, kwargs, rules=rules, method=method, check_finite=check_finite
    )


def run_quantized(
    model,
    qvars: QuantizedVariables,
    args: tuple,
    kwargs: dict,
    *,
    rules=None,
    method=None,
    check_finite: bool = False,
    init_check: bool = True,
):
    """`apply`'s body, with the model's arguments as a tuple and a dict.

    ``init_check=False`` skips comparing the variables with the ones
    ``model.init`` would make (one more abstract trace of a linen model), for
    callers that built `qvars` from this very model (`convert`'s dry run).
    """
    adapter = _adapter_for(model, qvars, method)
    nnx_mutable = False
    if adapter.kind == "nnx":
        nnx_mutable = kwargs.pop("mutable", False)
        adapter.with_state = True
    model_sig = None
    if adapter.kind == "linen":
        model_sig = _linen_signature(model, args, kwargs, method) if init_check else None
    _check_signature(
        adapter, qvars, model_sig, partial=method is not None, inputs=_describe_inputs(args, kwargs)
    )
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
        mode = None if sp is None else sp.mode
        if sp is not None and (
            sp.weight_key is not None or (sp.weight_perm is not None and site.chain)
        ):
            # a use's own quantized copy (`weight_key`: a tied table's head), and/or a weight
            # stored in the dot's layout: the dot reads the stored weight, not the model's
            # transposes of it (left unused, so jit drops them)
            invals = list(invals)
            if sp.weight_key is not None:
                w = qvars.variables[sp.weight_key]
                invals[site.operand] = w if sp.weight_perm is not None else through_chain(w, site)
            else:
                invals[site.operand] = leaves[site.leaf.index]
        qps = (
            {op: sts[site.key("qparams", op)] for op in site.act_operands}
            if mode == "static"
            else {}
        )
        return run_site(
            site,
            eqn,
            invals,
            mode,
            None if sp is None else sp.activation,
            qps,
            sts.get(site.key("smooth")),
            check_finite,
            weight_perm=None if sp is None else sp.weight_perm,
        )

    states = keyed_by_site(t.finder, qvars.activations, "qparams")
    states.update(
        {s.key("smooth"): qvars.smooth[s.name] for s in t.finder.sites if s.name in qvars.smooth}
    )
    outs = Interpreter(t.finder, selected, handler).run(
        t.jaxpr, t.consts, leaves + t.dyn_args, states
    )
    out = jax.tree_util.tree_unflatten(t.out_tree, outs)
    if adapter.kind == "nnx":
        return _nnx_result(t, adapter, qvars, out, nnx_mutable)
    return out


def run_site(
    site: Site,
    eqn,
    invals,
    mode: str | None,
    activation: QuantSpec | None,
    act_qps: dict,
    smooth=None,
    check_finite: bool = False,
    *,
    weight_perm: tuple[int, ...] | None = None,
) -> list:
    """One selected site of a quantized model, as `jq.apply` evaluates it.

    `mode` is the site's ``static`` / ``dynamic`` / ``weight_only`` mode, or
    None for a site outside the plan that reads a quantized parameter (then
    weight-only). `activation` is the activation spec (calibration stripped),
    `act_qps` ``{operand: QParams}`` for a static site, `smooth` SmoothQuant
    factors for the activation. `weight_perm`: the weight arrives stored
    transposed by it (`SitePlan.weight_perm`).
    """
    if site.kind == "embed":
        return run_embed(eqn, invals)
    if mode is None or mode == "weight_only":
        if site.kind == "act_dot":
            return bind_eqn(eqn, invals)
        return run_dot_like(
            site, eqn, invals, {}, {}, "weight_only", smooth, check_finite, weight_perm
        )
    specs = {op: activation for op in site.act_operands}
    return run_dot_like(site, eqn, invals, specs, act_qps, mode, smooth, check_finite, weight_perm)


def run_dot_like(
    site: Site,
    eqn,
    invals,
    act_specs,
    act_qps,
    mode,
    smooth=None,
    check_finite: bool = False,
    weight_perm: tuple[int, ...] | None = None,
):
    """One quantized site: weight (QArray) and activation(s) through jq.ops.

    `smooth`: SmoothQuant factors; the activation operand becomes ``x * (1 / s)``.
    `check_finite`: a checkify check for NaN / inf in the activation (`jq.ops.dot_general`).
    `weight_perm`: the rhs kernel is stored as ``transpose(model's kernel, weight_perm)``
    (`jq.lowering.weight_layout`), and arrives so, also where the model transposes it on
    the way (`select.operand_perm`); the dot names the stored axes instead (no transpose is
    emitted, and the output layout is the same, since the free axes keep their order).
    """
    out_aval = eqn.outvars[0].aval
    p = dict(eqn.params)
    if weight_perm is not None:
        (lc, rc), (lb, rb) = p["dimension_numbers"]
        # operand axis a is stored axis src[a], which the stored-as array holds at
        # weight_perm.index(src[a])
        src = operand_perm(site) or tuple(range(len(weight_perm)))
        moved = lambda axes: tuple(weight_perm.index(src[a]) for a in axes)  # noqa: E731
        p["dimension_numbers"] = ((lc, moved(rc)), (lb, moved(rb)))
    pet = p.get("preferred_element_type") or out_aval.dtype
    if not jnp.issubdtype(pet, jnp.floating):
        pet = out_aval.dtype
    vals = list(invals[:2])
    if (
        site.kind == "act_dot"
    ):  # a quantized KV cache (jq.kv_cache): quantized again by the dot's spec
        vals = [
            dequantize(v, jnp.float32).astype(iv.aval.dtype) if isinstance(v, QArray) else v
            for v, iv in zip(vals, eqn.invars)
        ]
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
        out = ops.dot_general(
            vals[0],
            vals[1],
            p["dimension_numbers"],
            precision=p.get("precision"),
            preferred_element_type=pet,
            **q,
        )
    elif site.kind == "conv":  # the weight is the rhs: only lhs_spec / lhs_qparams
        out = ops.conv_general_dilated(
            vals[0], vals[1], *conv_params(p), precision=p.get("precision"),
            preferred_element_type=pet, **q,
        )  # fmt: skip
    else:
        raise AssertionError(site.kind)
    return [out.astype(out_aval.dtype)]


def conv_params(p: dict) -> tuple:
    """A ``conv_general_dilated`` equation's parameters, in the positional order of
    `jq.ops.conv_general_dilated` after the two operands (strides ... batch_group_count)."""
    return (
        p["window_strides"],
        p["padding"],
        p["lhs_dilation"],
        p["rhs_dilation"],
        p["dimension_numbers"],
        p["feature_group_count"],
        p["batch_group_count"],
    )


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
        g = functools.partial(
            jax.lax.gather,
            dimension_numbers=dn,
            indices_are_sorted=p["indices_are_sorted"],
            unique_indices=p["unique_indices"],
            mode=p["mode"],
        )
        rows = g(table.int_value(), idx, slice_sizes=(1, table.shape[1]), fill_value=0)
        scale = jnp.broadcast_to(table.scale, (table.shape[0], 1))
        srows = g(scale, idx, slice_sizes=(1, 1), fill_value=0)
        out = rows.astype(jnp.float32)
        if table.zero_point is not None:
            zp = jnp.broadcast_to(table.zero_point, (table.shape[0], 1)).astype(jnp.float32)
            out = out - g(zp, idx, slice_sizes=(1, 1), fill_value=0)
        return [(out * srows).astype(eqn.outvars[0].aval.dtype)]
    return bind_eqn(eqn, invals)


def _adapter_for(model, qvars: QuantizedVariables, method):
    kind = model_kind(model, "jq.apply")
    if kind != qvars.plan.model_kind:
        raise ValueError(
            f"jq.apply: the quantized variables belong to another model: they come from a "
            f"{qvars.plan.model_kind} model, but `model` is {type(model).__name__}"
        )
    if kind == "nnx":
        return ModelAdapter(model, None, method)
    # a QArray stands for its float kernel: the kernel's shape ((K, N) also when stored (N, K))
    # and dtype (a bfloat16 model keeps computing in bfloat16 between its quantized sites)
    shapes = dict(qvars.plan.signature)
    dtypes = {path: dt for path, _, dt in qvars.plan.float_leaves}

    def stand_in(path):
        v = qvars.variables[path]
        if isinstance(v, QArray):
            v = jax.ShapeDtypeStruct(
                tuple(shapes.get(path, v.shape)), jnp.dtype(dtypes.get(path, "float32"))
            )
        return v

    paths = [path for path, _ in qvars.plan.signature]  # not the per-use copies ("<leaf>@<site>")
    if kind == "fn" and qvars.plan.params_tree is not None:
        td = qvars.plan.params_tree.treedef
        tree = jax.tree_util.tree_unflatten(td, [stand_in(p) for p in paths])
        return ModelAdapter(model, tree, method)
    nested: dict = {}
    for path in paths:
        node = nested
        keys = path.split("/")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = stand_in(path)
    return ModelAdapter(model, nested, method)


def _linen_signature(model, args, kwargs, method):
    """The variable paths and shapes `model.init` would create, traced abstractly (None if it can't)."""
    try:
        shapes = jax.eval_shape(
            lambda: model.init(jax.random.key(0), *args, method=method, **kwargs)
        )
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


def _check_signature(
    adapter: ModelAdapter,
    qvars: QuantizedVariables,
    model_sig: dict | None = None,
    partial: bool = False,
    inputs: str | None = None,
):
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


#: nnx.MultiHeadAttention's decode cache (`nnx.Cache` variables after ``init_cache``).
_CACHE_NAMES = ("cached_key", "cached_value", "cache_index")


def _nnx_result(t, adapter: ModelAdapter, qvars: QuantizedVariables, out, mutable):
    """`apply`'s result for an nnx model traced with its state: the output, or (output, new qvars)."""
    out, new_leaves = out
    if mutable is not True and mutable is not False:
        raise TypeError(
            f"jq.apply: for an nnx model, mutable must be True or False, got {mutable!r}"
        )
    if not mutable:
        changed = state_changes(t, adapter)
        cache = [p for p in changed if p.rsplit("/", 1)[-1] in _CACHE_NAMES]
        other = [p for p in changed if p not in cache]
        if other:
            raise ValueError(
                f"jq.apply: the nnx model updates its state in this call ({fmt_paths(other)}): "
                "dropout is active or BatchNorm is in training mode. Dropping the update would repeat "
                "one dropout mask on every call. Call model.eval() for inference, or pass mutable=True "
                "to get (out, new_qvars) and use new_qvars in the next call"
            )
        if cache:
            raise ValueError(
                f"jq.apply: the nnx model writes its decode cache in this call ({fmt_paths(cache)}): "
                "attention in decode mode stores each step's keys and values and advances "
                "cache_index, and dropping that write would decode every step against the old "
                "cache. Pass mutable=True to get (out, new_qvars) and call the next step with "
                "new_qvars"
            )
        return out
    old = qvars.variables
    # a quantized KV cache (jq.kv_cache) comes back as the QArray the step wrote
    new = {
        li.path: (
            old[li.path]
            if li.is_param or (isinstance(old[li.path], QArray) and not isinstance(v, QArray))
            else v
        )
        for li, v in zip(adapter.leaves, new_leaves)
    }
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
