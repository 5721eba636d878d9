"""Precision tooling: a float16 / bfloat16 casting policy, per-site sensitivity, automatic mixed precision.

Three functions, all on unmodified linen / nnx models traced to a jaxpr (see
`jq.flax._graph`):

* `cast` runs the model in float16 or bfloat16, with the weights stored in that
  format, while keeping the precision-sensitive equations in float32: norm
  statistics, softmax, reductions, losses, literals the format cannot hold, and
  (given calibration batches) every equation whose activations overflow the
  format. It says what it kept, and why.
* `sensitivity` quantizes one site at a time and measures the output error
  (MSE, SQNR in dB) and, optionally, the drop of a task metric.
* `auto_quantize` picks a format per site (int4 / int8 / bfloat16 / float32) so
  that the metric stays within ``max_drop`` of the float model, and returns
  `jq.Rule` objects that `jq.convert` takes as they are.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.extend.core as jcore
import jax.numpy as jnp
import numpy as np

from jq import numerics
from jq.flax._graph import Interpreter, bind_eqn, inner_jaxpr, scan_counts, scope_path
from jq.flax.adapter import ModelAdapter, is_dynamic, trace
from jq.flax.apply import apply, run_site
from jq.flax.calibrate import calibrate
from jq.flax.convert import convert
from jq.flax.qvars import CalibrationStats, observed_range
from jq.flax.report import format_table
from jq.flax.rules import Rule, check_rules
from jq.flax.select import choose, leaf_specs, scan_lengths
from jq.flax.stream import Stream, peek, split_batch
from jq.qparams import QuantSpec, qparams_from_range
from jq.quantize import quantize

__all__ = [
    "KEEP_CATEGORIES",
    "AutoQuantResult",
    "CastModel",
    "SensitivityResult",
    "auto_quantize",
    "cast",
    "sensitivity",
]

#: Reasons `cast` may keep an equation in float32; pass a subset as ``keep=``.
#:  * ``"norm"``: ``1/sqrt(var + eps)`` of a norm (and its epsilon, and the
#:    multiply / divide by it).
#:  * ``"softmax"``: ``exp`` feeding a sum, the sum, and the division by it.
#:  * ``"reduction"``: sums, products, max / min, cumulative ops, and squares
#:    that feed a sum (``x**2`` overflows float16 for ``|x| > 256``).
#:  * ``"loss"``: ``log`` / ``log1p`` (log-softmax, cross-entropy).
#:  * ``"transcendental"``: other ``exp``, ``expm1``, ``exp2``, ``pow``.
#:  * ``"literal"``: an equation with a literal the format cannot hold as a
#:    normal number (``1e-12`` underflows float16; ``-1e9`` overflows it).
#:  * ``"overflow"``: calibration saw ``max |x|`` above the format's max at the
#:    equation's output or input.
KEEP_CATEGORIES = ("norm", "softmax", "reduction", "loss", "transcendental", "literal", "overflow")

_LOW = {"float16": jnp.float16, "bfloat16": jnp.bfloat16}
_SUM_REDUCTIONS = {"reduce_sum", "cumsum", "reduce_prod", "cumprod", "cumlogsumexp"}
_REDUCTIONS = _SUM_REDUCTIONS | {"reduce_max", "reduce_min", "cummax", "cummin"}
_TRANSPARENT = {"convert_element_type", "broadcast_in_dim", "reshape", "squeeze", "expand_dims",
                "copy", "copy_p", "transpose", "stop_gradient", "reduce_precision"}
_CONTROL = {"while", "cond"}
# primitives that need their original float dtype (bit-level or dtype-typed)
_DTYPE_BOUND = {"bitcast_convert_type", "reduce_precision", "nextafter"}


def _is_float(dtype) -> bool:
    return jnp.issubdtype(dtype, jnp.floating)


def _castable(dtype) -> bool:
    """Float types at least as wide as float32: the ones the policy lowers."""
    return _is_float(dtype) and jnp.dtype(dtype).itemsize >= 4


# ---------------------------------------------------------------------------------------
# a flat view of the jaxpr (calls inlined) for pattern matching
# ---------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Node:
    path: tuple
    eqn: Any
    ins: list  # ("v", id) or ("lit", value)
    outs: list  # ("v", id)
    module: str

    @property
    def prim(self) -> str:
        return self.eqn.primitive.name


class _Graph:
    """Every primitive equation of a traced model, calls inlined, with producers and consumers."""

    def __init__(self, jaxpr):
        self.nodes: list[_Node] = []
        self._n = 0
        ins = [self._fresh() for _ in jaxpr.invars]
        self.input_refs = ins
        self._walk(jaxpr, ins, [self._fresh() for _ in jaxpr.constvars], (), "")
        self.producer = {}
        self.consumers: dict = {}
        for n in self.nodes:
            for r in n.outs:
                self.producer[r] = n
            for r in n.ins:
                if r[0] == "v":
                    self.consumers.setdefault(r, []).append(n)
        self.by_path = {n.path: n for n in self.nodes}

    def _fresh(self):
        self._n += 1
        return ("v", self._n)

    def _walk(self, jaxpr, in_refs, const_refs, prefix, scope):
        env = dict(zip(jaxpr.invars, in_refs))
        env.update(zip(jaxpr.constvars, const_refs))

        def ref(v):
            return ("lit", v.val) if isinstance(v, jcore.Literal) else env[v]

        for i, eqn in enumerate(jaxpr.eqns):
            path = prefix + (i,)
            here = scope_path(eqn, scope)
            ins = [ref(v) for v in eqn.invars]
            inner = inner_jaxpr(eqn)
            if inner is not None:
                j, consts = inner
                outs = self._walk(j, ins, [self._fresh() for _ in j.constvars], path, here)
            elif eqn.primitive.name == "scan":
                closed = eqn.params["jaxpr"]
                nc, _ = scan_counts(eqn.params)
                body_in = ins[:nc] + [self._fresh() for _ in ins[nc:]]
                self._walk(closed.jaxpr, body_in, [self._fresh() for _ in closed.jaxpr.constvars], path, here)
                outs = [self._fresh() for _ in eqn.outvars]
                self.nodes.append(_Node(path, eqn, ins, outs, here))
            else:
                outs = [self._fresh() for _ in eqn.outvars]
                self.nodes.append(_Node(path, eqn, ins, outs, here))
            for v, o in zip(eqn.outvars, outs):
                env[v] = o
        return [ref(v) for v in jaxpr.outvars]

    def src(self, r, depth: int = 8):
        """The producer of `r`, looking through layout ops and casts."""
        for _ in range(depth):
            n = self.producer.get(r) if r[0] == "v" else None
            if n is None or n.prim not in _TRANSPARENT:
                return n
            r = n.ins[0]
        return None

    def users(self, r, depth: int = 8) -> list[_Node]:
        """Consumers of `r`, looking through layout ops and casts."""
        out, todo = [], [(r, 0)]
        while todo:
            x, d = todo.pop()
            for n in self.consumers.get(x, ()):
                if n.prim in _TRANSPARENT and d < depth:
                    todo.append((n.outs[0], d + 1))
                else:
                    out.append(n)
        return out

    def literal(self, r, depth: int = 8):
        """A scalar literal behind `r` (possibly broadcast or cast), or None."""
        for _ in range(depth):
            if r[0] == "lit":
                return r[1]
            n = self.producer.get(r)
            if n is None or n.prim not in _TRANSPARENT:
                return None
            r = n.ins[0]
        return None


def _is_square(g: _Graph, n: _Node) -> bool:
    if n.prim == "square":
        return True
    if n.prim == "integer_pow":
        return n.eqn.params.get("y", 0) % 2 == 0
    return n.prim == "mul" and n.ins[0] == n.ins[1]


def _reduction_behind(g: _Graph, r, depth: int = 6) -> bool:
    """Whether a sum-like reduction feeds `r` through a few elementwise ops (a statistic)."""
    todo = [(r, 0)]
    seen = set()
    while todo:
        x, d = todo.pop()
        if x[0] != "v" or x in seen or d > depth:
            continue
        seen.add(x)
        n = g.producer.get(x)
        if n is None:
            continue
        if n.prim in _SUM_REDUCTIONS:
            return True
        if len(n.outs) == 1:
            todo.extend((i, d + 1) for i in n.ins)
    return False


def _epsilon_behind(g: _Graph, r, depth: int = 4):
    """The literal added on the way to `r` (``var + eps``), or None."""
    for _ in range(depth):
        n = g.src(r)
        if n is None:
            return None
        if n.prim == "add":
            for i in n.ins:
                v = g.literal(i)
                if v is not None:
                    return float(np.asarray(v)), n
        if n.prim in ("max", "add", "sub", "div", "mul"):
            r = n.ins[0]
            continue
        return None
    return None


def _analyse(g: _Graph, fmt: str, keep: frozenset, keep_modules: tuple, overflow: dict) -> dict:
    """{path: (category, reason)} of the equations to keep in float32."""
    info = numerics.format_info(fmt)
    reasons: dict = {}
    order = ("user", "overflow", "control_flow", "norm", "softmax", "loss", "reduction", "transcendental",
             "literal")

    def add(n, cat, why):
        if cat not in ("user", "control_flow") and cat not in keep:
            return
        old = reasons.get(n.path)
        if old is None or order.index(cat) < order.index(old[0]):
            reasons[n.path] = (cat, why)

    for n in g.nodes:
        p = n.prim
        if keep_modules and any(re.fullmatch(rx, n.module) for rx in keep_modules):
            add(n, "user", "module matches keep_modules")
        if p in _CONTROL:
            add(n, "control_flow", f"{p}: control flow is evaluated in float32")
        if p in _DTYPE_BOUND:
            add(n, "control_flow", f"{p} depends on the exact float32 bits")
        for r in n.ins:
            if r[0] == "v" and r in overflow and "overflow" in keep:
                add(n, "overflow", f"model input max |x| = {overflow[r]:.4g} overflows {fmt} "
                                   f"(max {info.max:.6g})")
        if n.path in overflow:
            m = overflow[n.path]
            add(n, "overflow", f"max |x| = {m:.4g} overflows {fmt} (max {info.max:.6g})")
            for r in n.outs:
                for u in g.users(r):
                    add(u, "overflow", f"input max |x| = {m:.4g} overflows {fmt} (max {info.max:.6g})")
        if p in _REDUCTIONS:
            s = g.src(n.ins[0])
            if s is not None and s.prim == "exp" and p in _SUM_REDUCTIONS:
                add(n, "softmax", "softmax: sum of exp")
            elif s is not None and _is_square(g, s):
                add(n, "reduction", f"{p} of squares (variance / mean square statistics)")
            else:
                add(n, "reduction", f"{p}: reduction in float32")
        elif _is_square(g, n) and any(u.prim in _SUM_REDUCTIONS for u in g.users(n.outs[0])):
            add(n, "reduction", f"square feeding a sum (x**2 overflows {fmt} above |x| = "
                                f"{math.sqrt(info.max):.4g})")
        elif p == "exp":
            if any(u.prim in _SUM_REDUCTIONS for u in g.users(n.outs[0])):
                add(n, "softmax", "softmax: exp")
            else:
                add(n, "transcendental", f"exp overflows {fmt} above x = {math.log(info.max):.4g}")
        elif p in ("expm1", "exp2", "pow"):
            add(n, "transcendental", f"{p}: range exceeds {fmt}")
        elif p in ("log", "log1p"):
            s = g.src(n.ins[0])
            if s is not None and s.prim in _SUM_REDUCTIONS:
                add(n, "loss", "log-sum-exp (log_softmax / cross-entropy)")
            else:
                add(n, "loss", f"{p} (losses, log-probabilities)")
        elif p == "div":
            s = g.src(n.ins[1])
            if s is not None and s.prim in _SUM_REDUCTIONS and (e := g.src(s.ins[0])) is not None \
                    and e.prim == "exp":
                add(n, "softmax", "softmax: division by the sum of exp")
        if p in ("rsqrt", "sqrt") and _reduction_behind(g, n.ins[0]):
            found = _epsilon_behind(g, n.ins[0])
            if found is not None:
                eps, add_node = found
                verdict = info.check(eps)
                add(n, "norm", f"norm: {p}(var + eps), eps={eps:.3g} {verdict}")
                add(add_node, "norm", f"norm epsilon {eps:.3g}: {verdict}")
            else:
                add(n, "norm", f"norm: {p} of a statistic")
            for u in g.users(n.outs[0]):
                if u.prim in ("mul", "div"):
                    add(u, "norm", f"norm: scaling by the {p} statistic")
        for r in n.ins:
            if r[0] != "lit":
                continue
            v = np.asarray(r[1])
            if v.ndim == 0 and _is_float(v.dtype) and np.isfinite(v) and not info.representable(float(v)):
                add(n, "literal", f"literal {float(v):.3g} {info.check(float(v))}")
    return reasons


# ---------------------------------------------------------------------------------------
# the casting interpreter
# ---------------------------------------------------------------------------------------
def _pkey(path: tuple) -> str:
    return ".".join(map(str, path))


def _weak(v) -> bool:
    """Literals and numpy constants: they take the dtype of the equation they meet."""
    return not isinstance(v, jax.Array) and not hasattr(v, "aval")


class _CastRun:
    """Evaluates a jaxpr with every equation in `low` unless it is kept in float32.

    Mode of an equation: float32 if it is kept; otherwise `low` if one of its
    float inputs is already in `low`; otherwise float32 (its inputs are float32
    statistics, constants or model inputs that stayed float32). Dots and convs
    in `low` accumulate in float32 (``preferred_element_type``) and round once.
    With ``observe=True`` everything runs in float32 and ``max |x|`` of every
    equation's output is recorded in `obs` (calibration).
    """

    def __init__(self, low, keep: dict, observe: bool = False, obs: dict | None = None):
        self.low = low
        self.keep = keep
        self.observe = observe
        self.obs = obs if obs is not None else {}
        self.modes: dict = {}

    def run(self, jaxpr, consts, args, prefix=()):
        env: dict = {}

        def read(v):
            return v.val if isinstance(v, jcore.Literal) else env[v]

        env.update(zip(jaxpr.constvars, consts))
        env.update(zip(jaxpr.invars, args))
        for i, eqn in enumerate(jaxpr.eqns):
            path = prefix + (i,)
            outs = self._eval(eqn, [read(v) for v in eqn.invars], path)
            for v, o in zip(eqn.outvars, outs):
                if not isinstance(v, jcore.DropVar):
                    env[v] = o
        return [read(v) for v in jaxpr.outvars]

    def _record(self, path, outs, eqn):
        if not self.observe:
            return
        path = _pkey(path)
        m = [jnp.max(jnp.abs(o)).astype(jnp.float32) for o, v in zip(outs, eqn.outvars)
             if _is_float(v.aval.dtype) and np.size(o) > 0]
        if m and path in self.obs:
            self.obs[path] = jnp.maximum(self.obs[path], functools.reduce(jnp.maximum, m))

    def _eval(self, eqn, invals, path):
        prim = eqn.primitive.name
        inner = inner_jaxpr(eqn)
        if inner is not None:
            j, consts = inner
            return self.run(j, consts, invals, path)
        if prim == "scan":
            return self._scan(eqn, invals, path)
        mode = self._mode(eqn, invals, path)
        self.modes[path] = mode
        if mode == "low":
            outs = self._bind_low(eqn, invals)
        else:
            vals = [v if _weak(v) or not _is_float(iv.aval.dtype) else v.astype(iv.aval.dtype)
                    for v, iv in zip(invals, eqn.invars)]
            outs = bind_eqn(eqn, vals)
        self._record(path, outs, eqn)
        return outs

    def _mode(self, eqn, invals, path) -> str:
        if self.observe or path in self.keep:
            return "float32"
        strong = [v for v, iv in zip(invals, eqn.invars) if _is_float(iv.aval.dtype) and not _weak(v)]
        if not strong:
            return "orig"
        if not any(_castable(iv.aval.dtype) for iv in eqn.invars):
            return "orig"
        if any(v.dtype == self.low for v in strong):
            return "low"
        return "follow"

    def _bind_low(self, eqn, invals):
        low = self.low
        vals = [jnp.asarray(v, low) if _castable(iv.aval.dtype) else v for v, iv in zip(invals, eqn.invars)]
        prim = eqn.primitive.name
        over = {}
        acc = False
        if prim == "convert_element_type" and _castable(eqn.params["new_dtype"]):
            over["new_dtype"] = jnp.dtype(low)
        if prim in ("dot_general", "conv_general_dilated"):
            over["preferred_element_type"] = jnp.dtype(jnp.float32)
            acc = True
        outs = bind_eqn(eqn, vals, **over)
        if acc:
            outs = [o.astype(low) for o in outs]
        return outs

    def _scan(self, eqn, invals, path):
        p = eqn.params
        closed = p["jaxpr"]
        nc, nk = scan_counts(p)
        consts, carry, xs = invals[:nc], invals[nc: nc + nk], invals[nc + nk:]
        carry = [jnp.asarray(c) for c in carry]
        dts = [c.dtype for c in carry]
        keys = sorted(k for k in self.obs if k.startswith(_pkey(path) + "."))

        def body(c, x):
            cv, co = c
            saved = self.obs
            self.obs = dict(zip(keys, co))
            outs = self.run(closed.jaxpr, closed.consts, list(consts) + list(cv) + list(x), path)
            new_obs = [self.obs[k] for k in keys]
            self.obs = saved
            return ([o.astype(d) for o, d in zip(outs[:nk], dts)], new_obs), list(outs[nk:])

        (new_carry, new_obs), ys = jax.lax.scan(
            body, (carry, [self.obs[k] for k in keys]), list(xs), length=p["length"], reverse=p["reverse"],
            unroll=p["unroll"])
        self.obs.update(zip(keys, new_obs))
        outs = list(new_carry) + list(ys)
        self.modes[path] = "scan"
        self._record(path, outs, eqn)
        return outs


@dataclasses.dataclass(frozen=True)
class _CastStatic:
    """Static part of a `CastModel` (identity-hashed, so jit caches per instance)."""

    adapter: Any
    fmt: str
    keep: frozenset
    keep_modules: tuple
    overflow: dict = dataclasses.field(compare=False, hash=False)
    kept_params: tuple = ()  # ((leaf path, module, max |w|), ...) stored float32 because they overflow
    jitted: dict = dataclasses.field(default_factory=dict, compare=False, hash=False)  # signature -> jitted apply

    def __hash__(self):
        return id(self)

    def __eq__(self, other):
        return self is other


@jax.tree_util.register_pytree_node_class
class CastModel:
    """A model that runs in float16 / bfloat16, with precision-sensitive equations in float32.

    Made by `jq.cast`. ``cm.apply(x)`` (or ``cm(x)``) is jitted; the model is
    also a pytree (the cast weights are its leaves), so
    ``jax.jit(lambda m, x: m.apply(x))(cm, x)`` works too. ``print(cm.table())``
    shows what stays float32 and why; ``cm.summary()`` counts it.

    Attributes:
      dtype: the format name, ``"float16"`` or ``"bfloat16"``.
      leaves: the model's variables, parameters stored in `dtype` (other
        collections, e.g. batch statistics, stay float32).
      overflow: ``{equation path: max |x|}`` of the equations (``"3.1.4"``: the
        path of indices in the jaxpr, calls inlined) and model inputs (``"in:0"``)
        whose calibrated values overflow the format (empty without calibration).
    """

    def __init__(self, leaves, static: _CastStatic):
        self.leaves = list(leaves)
        self._static = static
        self._last = None  # (graph, reasons, modes) of the last traced call, for report()

    def tree_flatten(self):
        return (self.leaves,), self._static

    @classmethod
    def tree_unflatten(cls, static, children):
        return cls(children[0], static)

    @property
    def dtype(self) -> str:
        return self._static.fmt

    @property
    def overflow(self) -> dict:
        return dict(self._static.overflow)

    def _keep_for(self, graph: _Graph) -> dict:
        s = self._static
        paths = {_pkey(p): p for p in graph.by_path}
        over = {paths[k]: m for k, m in s.overflow.items() if k in paths}
        n_leaves = len(self.leaves)
        for k, m in s.overflow.items():
            if k.startswith("in:") and n_leaves + int(k[3:]) < len(graph.input_refs):
                # a model input: its consumers stay float32
                over[graph.input_refs[n_leaves + int(k[3:])]] = m
        return _analyse(graph, s.fmt, s.keep, s.keep_modules, over)

    def apply(self, *args, **kwargs):
        """Runs the model on `args` / `kwargs` (the model's own inputs); returns its output.

        Float inputs are cast to the format on entry unless calibration saw them
        overflow; float outputs come back in their float32 dtype. The call is
        jitted (one compilation per input signature); non-array arguments are
        static.
        """
        if self._example is None:  # what report() traces when called without an input
            self._example = (tuple(jax.tree_util.tree_map(
                lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)) if is_dynamic(a) else a, args)),
                kwargs)
        flat, tree = jax.tree_util.tree_flatten((args, kwargs))
        dyn_idx = tuple(i for i, x in enumerate(flat) if is_dynamic(x))
        static = tuple((i, x) for i, x in enumerate(flat) if i not in dyn_idx)
        try:
            key = (tree, dyn_idx, static)
            hash(key)
        except TypeError:
            return self._apply(*args, **kwargs)
        cache = self._static.jitted
        if key not in cache:
            def run(cm, dyn):
                full = list(flat)
                for i, d in zip(dyn_idx, dyn):
                    full[i] = d
                a, kw = jax.tree_util.tree_unflatten(tree, full)
                return cm._apply(*a, **kw)

            cache[key] = jax.jit(run)
        return cache[key](self, [flat[i] for i in dyn_idx])

    def _apply(self, *args, **kwargs):
        s = self._static
        low = _LOW[s.fmt]
        avals = [jax.ShapeDtypeStruct(jnp.shape(v), li.dtype) for v, li in zip(self.leaves, s.adapter.leaves)]
        t = trace(s.adapter, avals, args, kwargs)
        graph = _Graph(t.jaxpr)
        keep = self._keep_for(graph)
        run = _CastRun(low, keep)
        dyn = []
        for k, d in enumerate(t.dyn_args):
            d = jnp.asarray(d)
            if _castable(d.dtype) and f"in:{k}" not in s.overflow:
                d = d.astype(low)
            dyn.append(d)
        outs = run.run(t.jaxpr, t.consts, list(self.leaves) + dyn)
        outs = [o.astype(v.aval.dtype) if _is_float(v.aval.dtype) else o for o, v in zip(outs, t.jaxpr.outvars)]
        self._last = (graph, keep, dict(run.modes))
        return jax.tree_util.tree_unflatten(t.out_tree, outs)

    __call__ = apply

    def report(self, *args, include_follow: bool = False, **kwargs) -> list[dict]:
        """What runs in float32, and why: one row per kept equation.

        Traces the model on `args` (or reuses the last call's trace when none
        are given). Rows: ``path`` (equation index path in the jaxpr, calls
        inlined), ``primitive``, ``module``, ``category`` (see
        `KEEP_CATEGORIES`), ``reason``. With ``include_follow=True`` the
        equations that stay float32 only because all their inputs are float32
        statistics are listed too (category ``"follow"``).
        """
        if args or kwargs or self._last is None:
            if not args:
                if self._example is None:
                    raise ValueError("jq.CastModel.report: pass an example input, or call the model first")
                args, kwargs = self._example
            jax.eval_shape(lambda a: self._apply(*a, **kwargs), tuple(args))
        graph, keep, modes = self._last
        info = numerics.format_info(self.dtype)
        rows = [{"path": path, "primitive": "parameter", "module": mod or "-", "category": "overflow",
                 "reason": f"stored float32: max |w| = {m:.4g} overflows {self.dtype} (max {info.max:.6g})"}
                for path, mod, m in self._static.kept_params]
        for n in graph.nodes:
            if n.path in keep:
                cat, why = keep[n.path]
            elif include_follow and modes.get(n.path) == "follow":
                cat, why = "follow", "all float inputs are float32 (statistics or constants)"
            else:
                continue
            rows.append({"path": _pkey(n.path), "primitive": n.prim, "module": n.module or "-",
                         "category": cat, "reason": why})
        return rows

    _example = None

    def table(self, *args, **kwargs) -> str:
        """`report` as a printable fixed-width table."""
        return format_table(self.report(*args, **kwargs), ["path", "primitive", "module", "category", "reason"])

    def summary(self) -> str:
        """Counts of the equations by precision, and the kept ones by reason."""
        rows = self.report()
        graph, keep, modes = self._last
        counts: dict = {}
        for m in modes.values():
            counts[m] = counts.get(m, 0) + 1
        cats: dict = {}
        for r in rows:
            cats[r["category"]] = cats.get(r["category"], 0) + 1
        low = counts.get("low", 0)
        f32 = counts.get("float32", 0) + counts.get("follow", 0)
        return (f"jq.cast({self.dtype}): {low} equations in {self.dtype}, {f32} in float32 "
                f"({', '.join(f'{v} {k}' for k, v in sorted(cats.items())) or 'none kept'}; "
                f"{counts.get('follow', 0)} follow float32 inputs); "
                f"{len(self._static.overflow)} overflow flags")

    def nbytes(self) -> int:
        """Bytes of the stored variables."""
        return int(sum(np.size(v) * jnp.dtype(v.dtype).itemsize for v in self.leaves if hasattr(v, "dtype")))

    def __repr__(self):
        return f"CastModel({self.dtype}, {len(self.leaves)} variables, {len(self._static.overflow)} overflow flags)"


def cast(
    model,
    variables,
    dtype: str,
    batches: Iterable | None = None,
    *,
    args: tuple | None = None,
    kwargs: dict | None = None,
    method=None,
    keep: Sequence[str] = KEEP_CATEGORIES,
    keep_modules: Sequence[str] = (),
    headroom: float = 1.0,
) -> CastModel:
    """Casts a model to float16 or bfloat16, keeping precision-sensitive equations in float32.

    jq traces the unmodified model (in float32) to a jaxpr and evaluates it with
    every equation in `dtype` except those the policy keeps (see
    `KEEP_CATEGORIES`): norm statistics and epsilons, softmax, reductions,
    losses, literals that `dtype` cannot hold, and equations whose calibrated
    activations overflow. Casts are inserted where the precision changes; dots
    and convolutions in `dtype` accumulate in float32. Parameters are stored in
    `dtype`.

    Because the model is traced in float32, Flax's ``LayerNorm`` and a custom
    norm written with ``jnp`` look alike to jq: the statistics of both stay in
    float32, whatever ``force_float32_reductions`` says. An epsilon below the
    format's smallest normal (``jq.numerics.format_info(dtype).check(eps)``) is
    named in the report.

    Args:
      model: a linen Module (with `variables`) or an nnx Module (``variables=None``).
      variables: linen variables, or None for nnx.
      dtype: ``"float16"`` or ``"bfloat16"`` (aliases ``"fp16"``, ``"bf16"``, ...).
      batches: optional calibration inputs (each item one positional argument,
        or a tuple of them). Equations whose ``max |x|`` exceeds the format's
        max / `headroom` are kept in float32, with their consumers.
      args, kwargs: an example input to trace now (for `report` before the
        first call); defaults to the first batch.
      method: the model method (default ``__call__``).
      keep: the categories to keep in float32; ``keep=()`` casts everything
        (the naive policy, for comparison).
      keep_modules: regexes of module paths kept in float32 entirely.
      headroom: safety factor for the overflow check (``max |x| * headroom > max``).

    Returns:
      A `CastModel`: ``cm.apply(x)`` (jittable), ``cm.report()``, ``cm.summary()``.

    Raises:
      ValueError: `dtype` is not float16 / bfloat16; `keep` names an unknown
        category; `headroom` < 1.
    """
    try:
        fmt = numerics.canonical_name(dtype)
    except (TypeError, ValueError) as e:
        raise ValueError(f"jq.cast: dtype must be 'float16' or 'bfloat16', got {dtype!r}") from e
    if fmt not in _LOW:
        raise ValueError(f"jq.cast: dtype must be 'float16' or 'bfloat16', got {dtype!r}")
    keep = (keep,) if isinstance(keep, str) else tuple(keep)
    bad = [k for k in keep if k not in KEEP_CATEGORIES]
    if bad:
        raise ValueError(f"jq.cast: keep has unknown categories {bad}; known: {KEEP_CATEGORIES}")
    if isinstance(keep_modules, str):
        keep_modules = (keep_modules,)
    for rx in keep_modules:
        try:
            re.compile(rx)
        except re.error as e:
            raise ValueError(f"jq.cast: keep_modules entry {rx!r} is not a valid regex: {e}") from e
    if not headroom >= 1.0:
        raise ValueError(f"jq.cast: headroom must be >= 1, got {headroom}")
    kwargs = dict(kwargs or {})
    adapter = ModelAdapter(model, variables, method)
    low = _LOW[fmt]
    info = numerics.format_info(fmt)
    overflow: dict = {}
    example = None if args is None else (tuple(args) if isinstance(args, (tuple, list)) else (args,), kwargs)
    if batches is not None:
        obs_max = _observe_max(adapter, batches, kwargs)
        if example is None:
            example = obs_max.pop("__example__")
        else:
            obs_max.pop("__example__")
        overflow = {p: m for p, m in obs_max.items() if not (m * headroom <= info.max)}
    leaves, kept_params = [], []
    for li, v in zip(adapter.leaves, adapter.values):
        if li.is_param and hasattr(v, "dtype") and _castable(jnp.result_type(v)):
            m = float(np.max(np.abs(np.asarray(v, np.float32)))) if np.size(v) else 0.0
            if "overflow" in keep and not m * headroom <= info.max:
                kept_params.append((li.path, li.module_path, m))  # would be stored as inf
            else:
                v = jnp.asarray(np.asarray(v).astype(low))
        leaves.append(v)
    static = _CastStatic(adapter, fmt, frozenset(keep), tuple(keep_modules), overflow, tuple(kept_params))
    cm = CastModel(leaves, static)
    if example is not None:
        cm._example = example
    return cm


def _observe_max(adapter: ModelAdapter, batches: Iterable, kwargs: dict) -> dict:
    """max |x| of every equation's float output (and of every float input) over `batches`."""
    first, batches = peek(batches, "jq.cast: `batches` is empty; pass None to skip calibration")
    args = split_batch(first)
    t = trace(adapter, adapter.values, args, kwargs)
    graph = _Graph(t.jaxpr)
    init = {_pkey(n.path): jnp.zeros((), jnp.float32) for n in graph.nodes}
    in_keys = [f"in:{k}" for k in range(len(t.dyn_args))]
    for k in in_keys:
        init[k] = jnp.zeros((), jnp.float32)

    def body(tt, leaves, dyn, obs, extra):
        run = _CastRun(jnp.float32, {}, observe=True, obs=dict(obs))
        for k, d in zip(in_keys, dyn):
            if _is_float(d.dtype):
                run.obs[k] = jnp.maximum(run.obs[k], jnp.max(jnp.abs(d)).astype(jnp.float32))
        run.run(tt.jaxpr, tt.consts, leaves + dyn)
        return run.obs

    obs, _ = Stream(adapter, kwargs, body).run(batches, adapter.values, init, desc="cast")
    out = {k: float(v) for k, v in obs.items()}
    out["__example__"] = (args, kwargs)
    return out


# ---------------------------------------------------------------------------------------
# sensitivity
# ---------------------------------------------------------------------------------------
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
        cols = ["site", "kind", "format", "mse", "sqnr_db"] + (["metric", "drop"] if self.float_metric is not None
                                                                  else [])
        return format_table(list(self.rows), cols)

    def __str__(self):
        head = "" if self.float_metric is None else f"float metric: {self.float_metric:.4g}\n"
        return head + self.table()


def _batch_inputs(batch, inputs):
    if inputs is None:
        return split_batch(batch)
    a = inputs(batch)
    return a if isinstance(a, tuple) else (a,)


class _QuantEval:
    """Evaluates a model with a chosen subset of sites quantized (the path `jq.apply` takes)."""

    def __init__(self, model, variables, rules, method, kwargs, args, stats):
        self.adapter = ModelAdapter(model, variables, method)
        self.kwargs = kwargs
        self.rules = rules
        t = trace(self.adapter, self.adapter.values, args, kwargs)
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
                    raise ValueError(f"jq.sensitivity: static site {key!r} has no calibration statistics")
                lo, hi = observed_range(stats.observers[key], stats.states[key],
                                         scan_lengths(c.site, t.finder))
                spec = c.rule.activation.replace(calibration=None)
                self._act_qps[c.site.key("qparams", op)] = qparams_from_range(lo, hi, spec)
        self._fns: dict = {}

    def fn(self, names: frozenset):
        if names in self._fns:
            return self._fns[names]
        chosen = {n: c for n, c in self.chosen.items() if n in names}
        specs = leaf_specs(chosen)
        adapter, kwargs = self.adapter, self.kwargs
        act_qps = {k: v for k, v in self._act_qps.items() if k.site in chosen}

        def handler(site, eqn, invals, sts):
            c = chosen[site.name]
            act = None if c.rule.activation is None else c.rule.activation.replace(calibration=None)
            qps = {op: sts[site.key("qparams", op)] for op in site.act_operands} if c.mode == "static" else {}
            return run_site(site, eqn, invals, c.mode, act, qps)

        @jax.jit
        def f(leaves, qps, dyn):
            leaves = list(leaves)
            for idx, (spec, _) in specs.items():
                leaves[idx] = quantize(leaves[idx], None, spec)
            avals = [jax.ShapeDtypeStruct(jnp.shape(v), li.dtype) for v, li in zip(self.adapter.values,
                                                                                   adapter.leaves)]
            a, kw = dyn
            t = trace(adapter, avals, a, {**kwargs, **kw})
            outs = Interpreter(t.finder, set(chosen), handler).run(t.jaxpr, t.consts, leaves + t.dyn_args,
                                                                   dict(qps))
            return jax.tree_util.tree_unflatten(t.out_tree, outs)

        g = lambda args: f(self.adapter.values, act_qps, (args, {}))  # noqa: E731
        self._fns[names] = g
        return g


def _flat_out(y):
    return jnp.concatenate([jnp.ravel(jnp.asarray(v, jnp.float32)) for v in jax.tree_util.tree_leaves(y)])


def _measure(fn, batches, inputs, refs, metric_fn):
    se, sig, n, ms = 0.0, 0.0, 0, []
    for b, ref in zip(batches, refs):
        y = fn(_batch_inputs(b, inputs))
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
      model, variables: a linen Module and its variables, or an nnx Module and None.
      rules: the `jq.Rule` list; static rules are calibrated once on `batches`
        unless `stats` is given.
      batches: a sequence of batches (iterated several times).
      metric_fn: optional ``metric_fn(outputs, batch) -> scalar``.
      inputs: optional ``inputs(batch) -> model input or tuple of inputs`` (for
        batches that also carry labels); default: the batch itself.
      stats: `CalibrationStats` to reuse.
      method, kwargs: the model method and fixed keyword arguments.

    Returns:
      `SensitivityResult`, sorted by ``drop`` (with a metric) or ``sqnr_db``
      (without), most sensitive first; ``print(result)`` shows the table.

    Raises:
      ValueError: `batches` is empty; the rules select no site.
    """
    rules = check_rules(rules)
    batches = list(batches)
    if not batches:
        raise ValueError("jq.sensitivity: `batches` is empty")
    kwargs = dict(kwargs or {})
    args0 = _batch_inputs(batches[0], inputs)
    ev = _make_eval(model, variables, rules, batches, inputs, stats, method, kwargs, args0)
    if not ev.chosen:
        raise ValueError("jq.sensitivity: the rules select no site of the model")
    base = ev.fn(frozenset())
    refs, fm = [], []
    for b in batches:
        y = base(_batch_inputs(b, inputs))
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
        group = [n for n, o in ev.chosen.items()
                 if n == name or (c.site.leaf is not None and o.site.leaf is not None
                                  and o.site.leaf.index == c.site.leaf.index)]
        done.update(group)
        mse, sq, m = _measure(ev.fn(frozenset(group)), batches, inputs, refs, metric_fn)
        spec = c.rule.weight if c.site.kind != "act_dot" else c.rule.activation
        row = {"site": " + ".join(group), "kind": ",".join(ev.chosen[n].site.kind for n in group),
               "module": c.site.module_path, "format": spec.format, "mse": mse, "sqnr_db": sq}
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
    t = trace(adapter, adapter.values, args0, kwargs)
    chosen = choose(t.finder, rules, warn=False)
    if stats is None and any(c.mode == "static" for c in chosen.values()):
        stats = calibrate(model, variables, [_batch_inputs(b, inputs) for b in batches], rules, method=method,
                          kwargs=kwargs, progress=False)
    return _QuantEval(model, variables, rules, method, kwargs, args0, stats)


# ---------------------------------------------------------------------------------------
# auto_quantize
# ---------------------------------------------------------------------------------------
_BITS = {"int4": 4, "int8": 8, "bfloat16": 16, "float16": 16, "float8_e4m3fn": 8, "float8_e5m2": 8,
         "float32": 32}


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
        return (f"auto_quantize: metric {self.metric:.4g} (float {self.float_metric:.4g}, drop {self.drop:.4g}); "
                f"size {self.size_bytes:,} bytes (float {self.float_size_bytes:,}, "
                f"{self.size_bytes / max(self.float_size_bytes, 1):.3f}x)\n"
                + format_table(list(self.plan), ["modules", "kinds", "format", "bytes", "drop_alone"]))


def _candidate_rule(fmt: str, module: str, kind: str, activation: QuantSpec | None, weight_axis) -> Rule | None:
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
    method=None,
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

    Why this order: drops of several quantized layers roughly add up, but not
    exactly, so a plan built from drops measured alone can miss the budget.
    Starting from the float model and lowering the least harmful units first
    spends the budget where it saves the most bytes, and every accepted step is
    a measured plan within budget, so the result is too. The cost is at most
    ``units * (candidates - 1)`` single-unit runs plus as many joint runs.

    Args:
      model, variables: a linen Module and its variables, or an nnx Module and None.
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
      inputs: ``inputs(batch) -> model input(s)``; default: the batch itself.
      method, kwargs: the model method and fixed keyword arguments.

    Returns:
      `AutoQuantResult` (``rules`` for `jq.convert`, sizes, metrics, plan).

    Raises:
      ValueError: `batches` is empty; unknown candidate; `max_drop` < 0;
        no site of the kinds `ops`.
    """
    if not callable(metric_fn):
        raise TypeError(f"jq.auto_quantize: metric_fn must be callable, got {type(metric_fn).__name__}")
    if not max_drop >= 0:
        raise ValueError(f"jq.auto_quantize: max_drop must be >= 0, got {max_drop}")
    cands = []
    for c in candidates:
        name = "float32" if c in ("float32", "f32", "fp32") else numerics.canonical_name(c)
        if name not in _BITS:
            raise ValueError(f"jq.auto_quantize: candidate {c!r} is not supported; use {tuple(_BITS)}")
        cands.append(name)
    if "float32" not in cands:
        cands.append("float32")
    cands = sorted(set(cands), key=lambda f: _BITS[f])  # cheapest first
    if isinstance(ops, str):
        ops = (ops,)
    batches = list(batches)
    if not batches:
        raise ValueError("jq.auto_quantize: `batches` is empty")
    kwargs = dict(kwargs or {})
    args0 = _batch_inputs(batches[0], inputs)
    adapter = ModelAdapter(model, variables, method)
    t = trace(adapter, adapter.values, args0, kwargs)
    sites_ = [s for s in t.finder.sites if s.kind in ops and s.leaf is not None]
    if not sites_:
        raise ValueError(f"jq.auto_quantize: the model has no site of kinds {tuple(ops)}")

    # units: (module, kind) pairs, merged through shared parameters
    parent: dict = {}

    def find(x):
        while parent.setdefault(x, x) != x:
            x = parent[x]
        return x

    by_leaf: dict = {}
    for s in sites_:
        key = (s.module_path, s.kind)
        find(key)
        if s.leaf.index in by_leaf:
            parent[find(key)] = find(by_leaf[s.leaf.index])
        by_leaf[s.leaf.index] = key
    groups: dict = {}
    for s in sites_:
        groups.setdefault(find((s.module_path, s.kind)), set()).add((s.module_path, s.kind))
    units = [tuple(sorted(g)) for g in groups.values()]
    unit_leaves = []
    for u in units:
        shapes = {s.leaf.index: s.leaf.shape for s in sites_ if (s.module_path, s.kind) in u}
        unit_leaves.append(list(shapes.values()))

    def rules_for(plan):
        out = []
        for u, f in zip(units, plan):
            for mod, kind in u:
                r = _candidate_rule(cands[f], mod, kind, activation, weight_axis)
                if r is not None:
                    out.append(r)
        return tuple(out)

    # one evaluator over every (unit, integer-or-cast candidate) rule: sites are selected by name
    all_rules = []
    for u in units:
        for mod, kind in u:
            r = _candidate_rule("int8", mod, kind, activation, weight_axis)
            all_rules.append(r)
    stats = None
    if activation is not None and activation.is_static:
        stats = calibrate(model, variables, [_batch_inputs(b, inputs) for b in batches], all_rules,
                          method=method, kwargs=kwargs, progress=False)

    evals: dict = {}

    def metric_of(plan) -> float:
        rules = rules_for(plan)
        if not rules:
            return float_metric
        key = rules
        if key not in evals:
            ev = _QuantEval(model, variables, rules, method, kwargs, args0, stats)
            evals[key] = ev.fn(frozenset(ev.chosen))
        fn = evals[key]
        return float(np.mean([float(metric_fn(fn(_batch_inputs(b, inputs)), b)) for b in batches]))

    base_ev = _QuantEval(model, variables, (), method, kwargs, args0, None).fn(frozenset())
    float_metric = float(np.mean([float(metric_fn(base_ev(_batch_inputs(b, inputs)), b)) for b in batches]))
    top = len(cands) - 1
    # step 2: drops alone
    alone = {}
    for ui in range(len(units)):
        for f in range(top):
            plan = [top] * len(units)
            plan[ui] = f
            alone[(ui, f)] = float_metric - metric_of(plan)
    alone.update({(ui, top): 0.0 for ui in range(len(units))})
    # step 3: greedy descent
    plan = [top] * len(units)
    frozen = set()
    history = []
    while True:
        moves = []
        for ui in range(len(units)):
            if ui in frozen or plan[ui] == 0:
                continue
            f = plan[ui] - 1
            if alone[(ui, f)] > max_drop:
                continue
            saved = _unit_bytes(cands[plan[ui]], unit_leaves[ui], weight_axis) - \
                _unit_bytes(cands[f], unit_leaves[ui], weight_axis)
            cost = max(alone[(ui, f)] - alone[(ui, plan[ui])], 0.0)
            moves.append((-saved / (cost + 1e-6), ui, f))
        if not moves:
            break
        moves.sort()
        _, ui, f = moves[0]
        trial = list(plan)
        trial[ui] = f
        m = metric_of(trial)
        ok = float_metric - m <= max_drop
        history.append({"unit": "+".join(f"{mod or '<root>'}:{k}" for mod, k in units[ui]), "format": cands[f],
                        "metric": m, "accepted": ok})
        if ok:
            plan = trial
        else:
            frozen.add(ui)
    # step 4: convert and measure the real thing
    rules = rules_for(plan)
    float_size = int(sum(np.size(v) * jnp.dtype(jnp.result_type(v)).itemsize for v in adapter.values
                         if hasattr(v, "dtype") and not jax.dtypes.issubdtype(v.dtype, jax.dtypes.prng_key)))
    qvars = None
    if rules:
        qvars = convert(model, variables, rules, stats=stats, args=args0, kwargs=kwargs, method=method)
        size = int(qvars.nbytes()["total_after"])
        fn = jax.jit(lambda qv, a: apply(model, qv, *a, method=method, **kwargs))
        metric = float(np.mean([float(metric_fn(fn(qvars, _batch_inputs(b, inputs)), b)) for b in batches]))
    else:
        size, metric = float_size, float_metric
    rows = []
    for ui, u in enumerate(units):
        rows.append({"modules": ",".join(sorted({mod or "<root>" for mod, _ in u})),
                     "kinds": ",".join(sorted({k for _, k in u})), "format": cands[plan[ui]],
                     "bytes": _unit_bytes(cands[plan[ui]], unit_leaves[ui], weight_axis),
                     "drop_alone": alone[(ui, plan[ui])]})
    return AutoQuantResult(rules, tuple(rows), size, float_size, metric, float_metric, tuple(history), qvars)
