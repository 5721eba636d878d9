"""`cast`: run a model in float16 or bfloat16, keeping precision-sensitive equations in float32.

jq traces the unmodified model (in float32) and evaluates the jaxpr with the
one `jq.flax._graph.Interpreter` (scans included), whose per-equation hooks
(`_CastRun`) run every equation in the low format except those the policy of
`jq.flax.cast_policy` keeps. With calibration batches, `_observe_max` streams
them (`jq.flax.stream.Stream`) and records ``max |x|`` of every equation (state
keyed by `EqnKey`), so that equations whose values overflow the format stay
float32 too.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jq import numerics
from jq.flax._graph import EqnKey, Interpreter, SiteFinder, bind_eqn
from jq.flax.adapter import ModelAdapter, is_dynamic, trace
from jq.flax.cast_policy import (
    KEEP_CATEGORIES,
    LOW_DTYPES,
    castable,
    is_float,
    keep_reasons,
)
from jq.flax.dataflow import JaxprView
from jq.flax.report import format_table
from jq.flax.stream import (
    Stream,
    check_batches,
    first_call,
    model_call,
    model_kwargs_arg,
    peek,
)

__all__ = [
    "CastModel",
    "cast",
]


def _pkey(path: tuple) -> str:
    return ".".join(map(str, path))


def _weak(v) -> bool:
    """Literals and numpy constants: they take the dtype of the equation they meet."""
    return not isinstance(v, jax.Array) and not hasattr(v, "aval")


class _CastRun:
    """The `Interpreter` hooks of `cast`: every equation in `low` unless it is kept in float32.

    Mode of an equation: float32 if it is kept; otherwise `low` if one of its
    float inputs is already in `low`; otherwise float32 (its inputs are float32
    statistics, constants or model inputs that stayed float32). Dots and convs
    in `low` accumulate in float32 (``preferred_element_type``) and round once.
    With ``observe=True`` everything runs in float32 and ``max |x|`` of every
    equation's output is recorded in the state entry ``EqnKey(path, "absmax")``
    (calibration; the interpreter carries the entries of a scan's body through
    it).
    """

    def __init__(self, finder: SiteFinder, low, keep: dict, observe: bool = False):
        self.low = low
        self.keep = keep
        self.observe = observe
        self.modes: dict = {}
        self.interpreter = Interpreter(
            finder, set(), None, on_eqn=self._eqn, on_scan=self._scan_done, enter_all=True
        )

    def run(self, jaxpr, consts, args, states: dict | None = None) -> list:
        return self.interpreter.run(jaxpr, consts, args, {} if states is None else states)

    def _record(self, path, outs, eqn, states):
        key = EqnKey(path, "absmax")
        if not self.observe or key not in states:
            return
        m = [
            jnp.max(jnp.abs(o)).astype(jnp.float32)
            for o, v in zip(outs, eqn.outvars)
            if is_float(v.aval.dtype) and np.size(o) > 0
        ]
        if m:
            states[key] = jnp.maximum(states[key], functools.reduce(jnp.maximum, m))

    def _eqn(self, eqn, invals, states, path):
        mode = self._mode(eqn, invals, path)
        self.modes[path] = mode
        if mode == "low":
            outs = self._bind_low(eqn, invals)
        else:
            vals = [
                v if _weak(v) or not is_float(iv.aval.dtype) else v.astype(iv.aval.dtype)
                for v, iv in zip(invals, eqn.invars)
            ]
            outs = bind_eqn(eqn, vals)
        self._record(path, outs, eqn, states)
        return outs

    def _scan_done(self, eqn, outs, states, path):
        self.modes[path] = "scan"
        self._record(path, outs, eqn, states)

    def _mode(self, eqn, invals, path) -> str:
        if self.observe or path in self.keep:
            return "float32"
        strong = [
            v for v, iv in zip(invals, eqn.invars) if is_float(iv.aval.dtype) and not _weak(v)
        ]
        if not strong:
            return "orig"
        if not any(castable(iv.aval.dtype) for iv in eqn.invars):
            return "orig"
        if any(v.dtype == self.low for v in strong):
            return "low"
        return "follow"

    def _bind_low(self, eqn, invals):
        low = self.low
        vals = [
            jnp.asarray(v, low) if castable(iv.aval.dtype) else v
            for v, iv in zip(invals, eqn.invars)
        ]
        prim = eqn.primitive.name
        over = {}
        acc = False
        if prim == "convert_element_type" and castable(eqn.params["new_dtype"]):
            over["new_dtype"] = jnp.dtype(low)
        if prim in ("dot_general", "conv_general_dilated"):
            over["preferred_element_type"] = jnp.dtype(jnp.float32)
            acc = True
        outs = bind_eqn(eqn, vals, **over)
        if acc:
            outs = [o.astype(low) for o in outs]
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
    jitted: dict = dataclasses.field(
        default_factory=dict, compare=False, hash=False
    )  # signature -> jitted apply

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

    def _keep_for(self, graph: JaxprView) -> dict:
        s = self._static
        paths = {_pkey(p): p for p in graph.by_path}
        over = {paths[k]: m for k, m in s.overflow.items() if k in paths}
        n_leaves = len(self.leaves)
        for k, m in s.overflow.items():
            if k.startswith("in:") and n_leaves + int(k[3:]) < len(graph.input_refs):
                # a model input: its consumers stay float32
                over[graph.input_refs[n_leaves + int(k[3:])]] = m
        return keep_reasons(graph, s.fmt, s.keep, s.keep_modules, over)

    def apply(self, *args, **kwargs):
        """Runs the model on `args` / `kwargs` (the model's own inputs); returns its output.

        Float inputs are cast to the format on entry unless calibration saw them
        overflow; float outputs come back in their float32 dtype. The call is
        jitted (one compilation per input signature); non-array arguments are
        static.
        """
        if self._example is None:  # what report() traces when called without an input
            self._example = (
                tuple(
                    jax.tree_util.tree_map(
                        lambda a: (
                            jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a))
                            if is_dynamic(a)
                            else a
                        ),
                        args,
                    )
                ),
                kwargs,
            )
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
        low = LOW_DTYPES[s.fmt]
        avals = [
            jax.ShapeDtypeStruct(jnp.shape(v), li.dtype)
            for v, li in zip(self.leaves, s.adapter.leaves)
        ]
        t = trace(s.adapter, avals, args, kwargs)
        graph = t.finder.view
        keep = self._keep_for(graph)
        run = _CastRun(t.finder, low, keep)
        dyn = []
        for k, d in enumerate(t.dyn_args):
            d = jnp.asarray(d)
            if castable(d.dtype) and f"in:{k}" not in s.overflow:
                d = d.astype(low)
            dyn.append(d)
        outs = run.run(t.jaxpr, t.consts, list(self.leaves) + dyn)
        outs = [
            o.astype(v.aval.dtype) if is_float(v.aval.dtype) else o
            for o, v in zip(outs, t.jaxpr.outvars)
        ]
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
                    raise ValueError(
                        "jq.CastModel.report: pass an example input, or call the model first"
                    )
                args, kwargs = self._example
            jax.eval_shape(lambda a: self._apply(*a, **kwargs), tuple(args))
        graph, keep, modes = self._last
        info = numerics.format_info(self.dtype)
        rows = [
            {
                "path": path,
                "primitive": "parameter",
                "module": mod or "-",
                "category": "overflow",
                "reason": f"stored float32: max |w| = {m:.4g} overflows {self.dtype} (max {info.max:.6g})",
            }
            for path, mod, m in self._static.kept_params
        ]
        for n in graph.nodes:
            if n.path in keep:
                cat, why = keep[n.path]
            elif include_follow and modes.get(n.path) == "follow":
                cat, why = "follow", "all float inputs are float32 (statistics or constants)"
            else:
                continue
            rows.append(
                {
                    "path": _pkey(n.path),
                    "primitive": n.prim,
                    "module": n.module or "-",
                    "category": cat,
                    "reason": why,
                }
            )
        return rows

    _example = None

    def table(self, *args, **kwargs) -> str:
        """`report` as a printable fixed-width table."""
        return format_table(
            self.report(*args, **kwargs), ["path", "primitive", "module", "category", "reason"]
        )

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
        return (
            f"jq.cast({self.dtype}): {low} equations in {self.dtype}, {f32} in float32 "
            f"({', '.join(f'{v} {k}' for k, v in sorted(cats.items())) or 'none kept'}; "
            f"{counts.get('follow', 0)} follow float32 inputs); "
            f"{len(self._static.overflow)} overflow flags"
        )

    def nbytes(self) -> int:
        """Bytes of the stored variables."""
        return int(
            sum(
                np.size(v) * jnp.dtype(v.dtype).itemsize for v in self.leaves if hasattr(v, "dtype")
            )
        )

    def __repr__(self):
        return f"CastModel({self.dtype}, {len(self.leaves)} variables, {len(self._static.overflow)} overflow flags)"


def cast(
    model,
    variables,
    dtype: str,
    batches: Iterable | None = None,
    *,
    args: tuple | None = None,
    inputs: Callable | None = None,
    model_kwargs: dict | None = None,
    method=None,
    keep: Sequence[str] = KEEP_CATEGORIES,
    keep_modules: Sequence[str] = (),
    headroom: float = 1.0,
    kwargs: dict | None = None,
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
      model: a linen Module (with `variables`), an nnx Module (``variables=None``), a
        function ``fn(params, *args, **kwargs)`` (with its params) or a Hugging Face model.
      variables: linen variables, or None for nnx.
      dtype: ``"float16"`` or ``"bfloat16"`` (aliases ``"fp16"``, ``"bf16"``, ...).
      batches: optional calibration batches (an iterable; see `jq.calibrate`).
        Equations whose ``max |x|`` exceeds the format's max / `headroom` are
        kept in float32, with their consumers.
      args: an example input (a tuple of positional arguments) to trace now
        (for `report` before the first call); defaults to the first batch.
      inputs: ``inputs(batch)``: the model's positional arguments (a tuple, one
        array, or ``(args, kwargs_dict)``); default: the batch itself.
      model_kwargs: keyword arguments passed to the model on every call.
      method: the model method (default ``__call__``).
      keep: the categories to keep in float32; ``keep=()`` casts everything
        (the naive policy, for comparison).
      keep_modules: regexes of module paths kept in float32 entirely.
      headroom: safety factor for the overflow check (``max |x| * headroom > max``).
      kwargs: deprecated name of `model_kwargs`.

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
    if fmt not in LOW_DTYPES:
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
    kwargs = model_kwargs_arg("cast", model_kwargs, kwargs)
    adapter = ModelAdapter(model, variables, method)
    low = LOW_DTYPES[fmt]
    info = numerics.format_info(fmt)
    overflow: dict = {}
    example = (
        None
        if args is None
        else (tuple(args) if isinstance(args, (tuple, list)) else (args,), kwargs)
    )
    if batches is not None:
        obs_max = _observe_max(adapter, check_batches(batches, "cast"), kwargs, inputs)
        if example is None:
            example = obs_max.pop("__example__")
        else:
            obs_max.pop("__example__")
        overflow = {p: m for p, m in obs_max.items() if not (m * headroom <= info.max)}
    leaves, kept_params = [], []
    for li, v in zip(adapter.leaves, adapter.values):
        if li.is_param and hasattr(v, "dtype") and castable(jnp.result_type(v)):
            m = float(np.max(np.abs(np.asarray(v, np.float32)))) if np.size(v) else 0.0
            if "overflow" in keep and not m * headroom <= info.max:
                kept_params.append((li.path, li.module_path, m))  # would be stored as inf
            else:
                v = jnp.asarray(np.asarray(v).astype(low))
        leaves.append(v)
    static = _CastStatic(
        adapter, fmt, frozenset(keep), tuple(keep_modules), overflow, tuple(kept_params)
    )
    cm = CastModel(leaves, static)
    if example is not None:
        cm._example = example
    return cm


def _observe_max(adapter: ModelAdapter, batches: Iterable, kwargs: dict, inputs=None) -> dict:
    """max |x| of every equation's float output (and of every float input) over `batches`.

    Keys are the public forms of `CastModel.overflow`: ``"3.1.4"`` (the
    equation's index path) and ``"in:k"`` (the k-th array input).
    """
    first, batches = peek(batches, "jq.cast: `batches` is empty; pass None to skip calibration")
    args, kw = model_call(first, inputs, kwargs)
    with first_call(first, inputs, "cast"):
        t = trace(adapter, adapter.values, args, kw)
    zero = jnp.zeros((), jnp.float32)
    init = {
        "eqns": {EqnKey(n.path, "absmax"): zero for n in t.finder.view.nodes},
        "inputs": [zero] * len(t.dyn_args),
    }

    def body(tt, leaves, dyn, obs, extra):
        states = dict(obs["eqns"])
        _CastRun(tt.finder, jnp.float32, {}, observe=True).run(
            tt.jaxpr, tt.consts, leaves + dyn, states
        )
        inputs = [
            jnp.maximum(m, jnp.max(jnp.abs(d)).astype(jnp.float32)) if is_float(d.dtype) else m
            for m, d in zip(obs["inputs"], dyn)
        ]
        return {"eqns": states, "inputs": inputs}

    obs, _ = Stream(adapter, kwargs, body, inputs).run(batches, adapter.values, init, desc="cast")
    out = {_pkey(k.path): float(v) for k, v in obs["eqns"].items()}
    out.update({f"in:{k}": float(v) for k, v in enumerate(obs["inputs"])})
    out["__example__"] = (args, kw)
    return out
