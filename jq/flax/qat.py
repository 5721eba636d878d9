"""Quantization-aware training of an unmodified model: `qat` / `QAT`, and reading QAT variables back.

`convert` reads trained QAT variables through `is_qat_vars`,
`qat_model_variables`, `variables_example`, `recorded_kwargs`,
`qat_act_qparams` and `qat_weight_qparams`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jq import ops
from jq.flax._graph import Interpreter, bind_eqn, keyed_by_act_key, keyed_by_site
from jq.flax.adapter import ModelAdapter, fmt_paths, model_kind, state_changes, trace
from jq.flax.apply import conv_params
from jq.flax.qvars import CalibrationStats, observed_range, warn_zero_width
from jq.flax.rules import Rule, check_rules
from jq.flax.select import (
    activation_spec,
    choose,
    direct_weight_sites,
    leaf_specs,
    scan_lengths,
    stack_tree,
)
from jq.flax.stream import check_forwarded
from jq.qparams import QParams, qparams_from_array, qparams_from_range, reduce_range
from jq.quantize import fake_quant, lsq_fake_quant

__all__ = [
    "QAT",
    "QatVariables",
    "is_qat_vars",
    "qat",
    "qat_act_qparams",
    "qat_model_variables",
    "qat_weight_qparams",
    "recorded_kwargs",
    "variables_example",
]


_QAT_FIELDS = ("params", "quant", "state")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class QatVariables(Mapping):
    """QAT variables: ``params`` (trained), ``quant`` (learned quantization parameters), ``state``.

    A registered pytree dataclass that also reads as the dict it replaces:
    ``qv["params"]``, ``{**qv, "state": new_state}``, ``set(qv) == {"params",
    "quant", "state"}``. `QAT.apply` and `jq.convert` take it or such a dict.
    """

    params: Any
    quant: Any
    state: Any

    def __getitem__(self, key: str):
        if key not in _QAT_FIELDS:
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(_QAT_FIELDS)

    def __len__(self) -> int:
        return len(_QAT_FIELDS)


class QAT:
    """Quantization-aware training of an unmodified model.

    ``qat = jq.qat(model, rules)``; ``qv = qat.init(variables, x)`` returns
    `QatVariables` (read like a dict) with three entries:

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
      model: linen or nnx Module, or a function ``fn(params, *args, **kwargs)`` (its
        whole params pytree is trained).
      rules: the `jq.Rule` list. Static activation specs track or learn their
        range; dynamic ones use each batch's own range; weight-only rules
        fake-quantize weights only.
      activations: ``"ema"`` (moving-average min-max, constant
        `averaging_constant`) or ``"lsq"`` (learned scale and zero point).
      weights: ``"minmax"`` (each step's own per-channel min-max) or ``"lsq"``.
      averaging_constant: EMA constant c in ``m <- m + c * (batch - m)``.
      forward: ``"fake"`` (default): the forward pass is the float op on
        fake-quantized operands. ``"int8"`` / ``"fp8"``: at every dot / conv
        site that reads its weight directly (no layout op, no scan, one site
        per weight), the forward pass is the real low-precision op (int8 x int8
        with int32 accumulation, or e4m3 x e4m3 with float32 accumulation;
        `jq.ops.qat_dot_general` with ``int_forward=True``) and the backward
        pass is fake quantization's straight-through VJP in the model's own
        float dtype (bfloat16 for a bfloat16 model). Other sites stay fake
        quantized. The sites' weight and activation formats must be int8 (resp.
        fp8), and ``activations="ema"``, ``weights="minmax"`` (the real op
        passes no gradient to learned scales).
    """

    def __init__(
        self,
        model,
        rules,
        *,
        activations: str = "ema",
        weights: str = "minmax",
        averaging_constant: float = 0.01,
        method=None,
        forward: str = "fake",
    ):
        if activations not in ("ema", "lsq"):
            raise ValueError(f"jq.qat: activations must be 'ema' or 'lsq', got {activations!r}")
        if weights not in ("minmax", "lsq"):
            raise ValueError(f"jq.qat: weights must be 'minmax' or 'lsq', got {weights!r}")
        if not 0.0 < averaging_constant <= 1.0:
            raise ValueError(
                f"jq.qat: averaging_constant must lie in (0, 1], got {averaging_constant}"
            )
        if forward not in _FORWARD:
            raise ValueError(
                f"jq.qat: forward must be one of {', '.join(map(repr, _FORWARD))}, got {forward!r}"
            )
        if forward != "fake" and (activations, weights) != ("ema", "minmax"):
            raise ValueError(
                f"jq.qat: forward={forward!r} runs the real low-precision op, which passes no "
                "gradient to learned scales; use activations='ema' and weights='minmax' with it, "
                "or forward='fake' with LSQ"
            )
        self.forward = forward
        self.model = model
        self.rules = check_rules(rules)
        self.activations = activations
        self.weights = weights
        self.c = float(averaging_constant)
        self.method = method

    def _real_forward_sites(self, finder, chosen) -> dict:
        """``{site name: None}`` (the weight spec is filled in by `apply`) of the sites whose
        forward pass runs the real low-precision op; empty for ``forward="fake"``."""
        if self.forward == "fake":
            return {}
        out = {}
        for name in direct_weight_sites(finder, chosen, ("dot", "conv")).values():
            c = chosen[name]
            if c.mode == "weight_only":
                continue
            fmts = (c.rule.weight.fmt, c.rule.activation.fmt)
            ok = all(
                (f.is_integer and f.bits == 8)
                if self.forward == "int8"
                else f.name.startswith("float8")
                for f in fmts
            )
            if not ok:
                raise ValueError(
                    f"jq.qat: forward={self.forward!r} needs {self.forward} weight and activation "
                    f"formats, but site {name!r} (rules[{c.rule_index}]) has weight "
                    f"{fmts[0].name!r} and activation {fmts[1].name!r}"
                )
            out[name] = None
        return out

    # -- variables <-> adapter ------------------------------------------------------------
    def _adapter(self, params, state):
        kind = model_kind(self.model, "jq.qat")
        if kind == "linen":
            return ModelAdapter(self.model, {"params": params, **state["variables"]}, self.method)
        if kind == "fn":  # a function's whole pytree is its params
            return ModelAdapter(self.model, params, self.method)
        return ModelAdapter(self.model, None, self.method)

    def _leaves(self, adapter, params, state):
        if adapter.kind in ("linen", "fn"):
            return list(adapter.values)
        return list(adapter.override({**state["variables"], **params}).values)

    def init(
        self, variables, *args, stats: CalibrationStats | None = None, **kwargs
    ) -> QatVariables:
        """QAT variables from trained float variables (nnx: None) and an example input.

        Activation ranges start from `stats` when given, otherwise from the
        example batch's min-max; LSQ scales start from those ranges.
        """
        check_forwarded("qat.init", kwargs)
        kind = model_kind(self.model, "jq.qat.init")
        if kind == "fn":
            if variables is None:
                adapter = ModelAdapter(self.model, None, self.method)  # a Hugging Face model
                variables = jax.tree_util.tree_unflatten(adapter.treedef, adapter.values)
            params, rest = variables, {}
        elif kind == "linen":
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
            jnp.zeros((1,) + tuple(np.shape(a))[1:] if np.ndim(a) else (), jnp.result_type(a))
            for a in args
        )
        state = {
            "variables": rest,
            "ranges": {},
            "example": example,
            "example_kwargs": _StaticKwargs.record(kwargs),
        }
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
                    lo, hi = (
                        lo.reshape(lengths + spec.param_shape(tuple(c.site.in_avals[op].shape))),
                        hi.reshape(lengths + spec.param_shape(tuple(c.site.in_avals[op].shape))),
                    )
                    cnt = jnp.ones(lengths, jnp.int32)
                else:
                    shape = spec.param_shape(tuple(c.site.in_avals[op].shape))
                    lo = jnp.zeros(shape, jnp.float32)
                    hi = jnp.zeros(shape, jnp.float32)
                    cnt = jnp.zeros((), jnp.int32)
                    lo, hi, cnt = (stack_tree(a, lengths) for a in (lo, hi, cnt))
                ranges[key] = {
                    "lo": jnp.asarray(lo, jnp.float32),
                    "hi": jnp.asarray(hi, jnp.float32),
                    "count": cnt,
                }
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
                    "zero_point": None
                    if qp.zero_point is None
                    else qp.zero_point.astype(jnp.float32),
                }
        if self.weights == "lsq":
            all_leaves = self._leaves(adapter, params, state)
            for idx, (spec, c) in leaf_specs(chosen, t.finder).items():
                if not jnp.issubdtype(spec.fmt.dtype, jnp.integer):
                    continue
                qp = _minmax_qp(all_leaves[idx], spec)
                quant["weights"][c.site.name] = {
                    "scale": qp.scale,
                    "zero_point": None
                    if qp.zero_point is None
                    else qp.zero_point.astype(jnp.float32),
                }
        return QatVariables(**qv)

    def convert(self, qat_vars: Mapping, **kw):
        """The trained QAT variables as a `jq.QuantizedModel` (integer inference), with the
        rules and method this `QAT` was made with: ``jq.convert(model, qat_vars, rules)``
        bound to the model. Keyword arguments go to `jq.convert` (e.g. ``model_kwargs=``)."""
        from jq.flax.convert import convert
        from jq.flax.model import QuantizedModel

        qv = convert(self.model, qat_vars, self.rules, method=self.method, **kw)
        return QuantizedModel(self.model, qv, method=self.method)

    def apply(self, qat_vars: Mapping, *args, update_stats: bool = False, **kwargs):
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
        check_forwarded("qat.apply", kwargs)
        params, quant, state = qat_vars["params"], qat_vars["quant"], qat_vars["state"]
        adapter = self._adapter(params, state)
        adapter.with_state = adapter.kind == "nnx"
        leaves = self._leaves(adapter, params, state)
        t = trace(adapter, leaves, args, kwargs)
        chosen = choose(t.finder, self.rules, warn=False)
        # weights: fake-quantized once per step at the parameter, in its stored layout (the
        # sites with a real low-precision forward quantize theirs inside the op)
        real = self._real_forward_sites(t.finder, chosen)
        for idx, (spec, c) in leaf_specs(chosen, t.finder).items():
            name = c.site.name
            w = leaves[idx]
            if name in real:
                real[name] = spec
                continue
            if self.weights == "lsq" and name in quant.get("weights", {}):
                lq = quant["weights"][name]
                # LSQ's gradient scale 1 / sqrt(N qmax) counts the N weights of one layer, also
                # for layers stacked by a scan (which the spec quantizes layer by layer)
                n = w.size // math.prod(c.site.stack)
                leaves[idx] = lsq_fake_quant(
                    w,
                    QParams(lq["scale"], lq["zero_point"]),
                    spec,
                    grad_scale=1.0 / math.sqrt(n * spec.qmax),
                )
            else:
                leaves[idx] = fake_quant(w, None, spec)
        c_ema = self.c
        lsq = self.activations == "lsq"

        def handler(site, eqn, invals, sts):
            ch = chosen[site.name]
            vals = list(invals)
            if ch.mode == "weight_only":
                return bind_eqn(eqn, vals)
            spec = ch.rule.activation
            qps = {}
            for op in site.act_operands:
                key = site.key("range", op)
                x = vals[op]
                if ch.mode == "dynamic":
                    qps[op] = None
                elif lsq and site.key("lsq", op) in sts:
                    a = sts[site.key("lsq", op)]
                    vals[op] = lsq_fake_quant(x, QParams(a["scale"], a["zero_point"]), spec)
                    continue
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
                    qps[op] = qparams_from_range(r["lo"], r["hi"], spec)
                if site.name not in real:
                    sp = spec.for_operand(x.ndim, _contract(eqn, op)) if spec.per_row else spec
                    vals[op] = fake_quant(x, qps[op], sp)
            if site.name in real:  # the activation is operand 0, the weight operand 1
                return _real_forward(site, eqn, vals, spec, qps[0], real[site.name])
            return bind_eqn(eqn, vals)

        # interpreter state: the tracked ranges, and the learned activation parameters (LSQ)
        sts = keyed_by_site(t.finder, state["ranges"], "range")
        sts.update(keyed_by_site(t.finder, quant.get("activations", {}), "lsq"))
        selected = {n for n, c in chosen.items() if c.site.kind != "embed"}
        outs = Interpreter(t.finder, selected, handler).run(
            t.jaxpr, t.consts, leaves + t.dyn_args, sts
        )
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
            new_vars = {
                li.path: v for li, v in zip(adapter.leaves, new_leaves) if li.path in new_vars
            }
        elif kwargs.get("mutable", False) is not False:
            new_vars = _merge_linen_updates(new_vars, out)
        if not update_stats:
            return out
        new_state = dict(state)
        new_state["variables"] = new_vars
        new_ranges = keyed_by_act_key(t.finder, sts, "range")
        new_state["ranges"] = {k: new_ranges.get(k, r) for k, r in state["ranges"].items()}
        return out, new_state


_FORWARD = ("fake", "int8", "fp8")


def _contract(eqn, op: int) -> tuple[int, ...]:
    """The axes a site's dot / conv contracts of operand `op` (a per-row spec keeps the rest)."""
    dn = eqn.params["dimension_numbers"]
    if eqn.primitive is jax.lax.dot_general_p:
        return tuple(dn[0][op])
    return tuple(dn.lhs_spec[1:]) if op == 0 else (dn.rhs_spec[1], *dn.rhs_spec[2:])


def _real_forward(site, eqn, vals, spec, qp, wspec) -> list:
    """A site's real int8 / fp8 forward with fake quantization's VJP (`jq.ops.qat_*`)."""
    p = eqn.params
    kw = dict(
        precision=p.get("precision"),
        preferred_element_type=p.get("preferred_element_type"),
        lhs_spec=spec,
        lhs_qparams=qp,
        rhs_spec=wspec,
        int_forward=True,
    )
    if site.kind == "dot":
        y = ops.qat_dot_general(vals[0], vals[1], p["dimension_numbers"], **kw)
    else:
        y = ops.qat_conv_general_dilated(vals[0], vals[1], *conv_params(p), **kw)
    return [y.astype(eqn.outvars[0].aval.dtype)]


def qat(model, rules: Sequence[Rule], **kw) -> QAT:
    """A `QAT` wrapper of `model` (see `QAT`)."""
    return QAT(model, rules, **kw)


def is_qat_vars(v) -> bool:
    """`QatVariables`, or a dict with its three entries."""
    return isinstance(v, Mapping) and set(v) == set(_QAT_FIELDS) and "ranges" in v["state"]


def qat_model_variables(model, qat_vars):
    kind = model_kind(model, "jq.convert")
    if kind == "linen":
        return {"params": qat_vars["params"], **qat_vars["state"]["variables"]}
    if kind == "fn":
        return qat_vars["params"]
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
    return tuple(ex), recorded_kwargs(qat_vars)


def recorded_kwargs(qat_vars) -> dict:
    kw = qat_vars["state"].get("example_kwargs")
    return dict(kw.items) if isinstance(kw, _StaticKwargs) else {}


def qat_act_qparams(qat_vars, key, spec):
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


def qat_weight_qparams(qat_vars, name: str) -> QParams | None:
    """The learned (LSQ) weight parameters of site `name`, or None (min-max weights)."""
    w = qat_vars["quant"].get("weights", {}).get(name)
    if w is None:
        return None
    _check_learned_scale(name, w["scale"])
    zp = w.get("zero_point")
    return QParams(w["scale"], None if zp is None else jnp.round(zp).astype(jnp.int32))


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


def _merge_linen_updates(variables: dict, out):
    """``variables`` with the collections of a linen ``(out, updates)`` result that it holds replaced."""
    if not (isinstance(out, tuple) and len(out) == 2 and hasattr(out[1], "items")):
        return variables
    from flax.core import unfreeze

    updates = unfreeze(out[1])
    return {**variables, **{k: v for k, v in updates.items() if k in variables}}


def _minmax_qp(w, spec):
    return qparams_from_array(w, spec)
