"""Float operands quantized inside an op: straight-through gradients, non-finite values.

The public integer ops are wrapped by `float_operands`: a float ``lhs`` /
``rhs`` that comes with a spec is quantized here (statically or dynamically,
see `jq.ops._operands`) and the op body sees a `QArray`. The wrapper gives the
op straight-through gradients (a `jax.custom_jvp` whose tangent is the float
op on the fake-quantized operands, masked where the quantizer clips) and makes
a NaN / inf in an input row reach exactly the outputs that a float op would
make non-finite. Each op describes its axes with a `Geometry`.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero
from jax.experimental import checkify

from jq.ops._operands import as_qarray_params, check_operand, finite_rows, operand_qparams
from jq.qparams import QuantSpec
from jq.quantize import QArray, dequantize, encode, fake_quant_with_mask, nonfinite_mark


class Geometry(NamedTuple):
    """What `float_operands` needs to know about one call of an op."""

    contract: dict  # "lhs" / "rhs" -> contracting axes of that operand
    rows: dict  # "lhs" / "rhs" -> axes of a row: a NaN / inf poisons its whole row
    float_op: Callable  # (lhs, rhs) -> the same op on float32 operands, float32 result
    reach: Callable  # (side, ok) -> bool broadcastable to the output: the outputs of bad rows


def _is_zero(t) -> bool:
    return all(isinstance(z, SymbolicZero) for z in jax.tree.leaves(t))


def _instantiate(t):
    """A tangent pytree with its symbolic zeros made arrays (float0 for integer leaves)."""
    return jax.tree.map(
        lambda z: np.zeros(z.shape, z.dtype) if isinstance(z, SymbolicZero) else z, t
    )


def float_operands(geometry: Callable[[dict, object, object], Geometry]):
    """Decorator of the public integer ops: quantizes float operands that come with a spec.

    A float ``lhs`` / ``rhs`` with ``lhs_spec`` / ``rhs_spec`` (a run-time
    activation, static or dynamic) is quantized here, and the wrapped op gets
    the `QArray`, so that:

    * The op is differentiable with straight-through gradients. A
      `jax.custom_jvp`: the primal is the integer path, unchanged; the tangent
      is the same op in float32 on the input tangent, zeroed where the quantizer
      clips (``jq.fake_quant``'s mask), against the other operand dequantized
      (or fake-quantized). It is linear in the tangents, so reverse mode, jit
      and vmap work. The activation `QParams` get no gradient (as in
      `fake_quant`); a `QArray` operand's scale gets its exact one.
    * Non-finite values propagate as in a float op. A row (a dot's operand
      along its contracting axes; a conv input pixel's feature vector) that
      holds a NaN or inf makes the outputs it reaches NaN (a dot's output row;
      a conv's outputs whose window covers the pixel), and dynamic ranges are
      taken over the finite rows only. The other outputs are bit-identical to
      a run without the bad rows (for a conv, unless the bad example's finite
      pixels set a per-tensor range). The cost is one sum per row
      (`finite_rows`) and one select on the output; a dynamic range reduces
      within rows first, then across them. A static operand whose grid leaves
      a code free (`jq.quantize.nonfinite_mark`: int8 on the narrow grid) maps
      NaN / inf to that code and finds its bad rows from the int8 codes
      instead, and a static fp8 operand maps them to NaN, which the fp8 dot
      carries itself: then no float32 copy of the activation is read twice,
      so XLA fuses the previous layer's rescale, bias, activation function
      and this requantization into one pass from int32 to int8.

    The wrapped op gains a keyword ``check_finite=False``. With True, a NaN or
    inf in a float operand (quantized here, or the activation of a weight-only
    op) is a `checkify` check: run ``checkify.checkify(f,
    errors=checkify.user_checks)`` to catch it. It is off by default because a
    jitted function with a check in it loses JAX's fast dispatch path (about
    0.2 ms per call measured on a batch-1 MLP, more than its whole int8 run).

    `geometry(arguments, lhs, rhs)` describes the op's axes (`Geometry`).
    """

    def wrap(fn):
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def op(*args, check_finite: bool = False, **kwargs):
            bound = sig.bind(*args, **kwargs)
            bound.apply_defaults()
            a = dict(bound.arguments)
            sides = tuple(
                s
                for s in ("lhs", "rhs")
                if isinstance(a.get(f"{s}_spec"), QuantSpec) and not isinstance(a[s], QArray)
            )
            if not sides:  # nothing to quantize here (errors are raised by `fn`)
                if check_finite:
                    _check_weight_only_input(fn.__name__, a)
                return fn(**a)
            return _run_float_operands(fn, geometry, a, sides, check_finite)

        flag = inspect.Parameter("check_finite", inspect.Parameter.KEYWORD_ONLY, default=False)
        op.__signature__ = sig.replace(parameters=[*sig.parameters.values(), flag])
        return op

    return wrap


def _check_finite(x, what: str):
    checkify.debug_check(jnp.all(jnp.isfinite(x)), f"{what}: NaN or inf in the float input")


def _check_weight_only_input(fn_name: str, a: dict):
    """Weight-only (a float array times a QArray): a checkify check on the float operand."""
    lq, rq = isinstance(a["lhs"], QArray), isinstance(a["rhs"], QArray)
    if lq == rq:
        return
    s = "rhs" if lq else "lhs"
    x = a[s]
    if isinstance(x, jax.Array | np.ndarray) and jnp.issubdtype(x.dtype, jnp.floating):
        _check_finite(x, f"jq.ops.{fn_name} (weight-only) `{s}`")


def _run_float_operands(fn, geometry, a: dict, sides: tuple[str, ...], check: bool) -> jax.Array:
    vals = {"lhs": check_operand(a["lhs"], "lhs"), "rhs": check_operand(a["rhs"], "rhs")}
    geo = geometry(a, vals["lhs"], vals["rhs"])
    specs, qps, ok, marks = {}, {"lhs": None, "rhs": None}, {}, {}
    for s in sides:
        specs[s] = a[f"{s}_spec"].for_operand(vals[s].ndim, geo.contract[s])  # axis="rows"
        static = a.get(f"{s}_qparams") is not None
        marks[s] = nonfinite_mark(specs[s]) if static else None
        if marks[s] is None:
            ok[s] = finite_rows(jax.lax.stop_gradient(vals[s]), geo.rows[s])
        qps[s] = operand_qparams(
            vals[s], specs[s], a.get(f"{s}_qparams"), geo.contract[s], s, geo.rows[s], ok.get(s)
        )
        if marks[s] is not None and not np.isnan(marks[s]):  # the codes show the bad rows
            codes = encode(jax.lax.stop_gradient(vals[s]), qps[s], specs[s], marks[s]).value
            ok[s] = jnp.min(codes, axis=tuple(geo.rows[s]), keepdims=True) > marks[s]
        if check:
            _check_finite(vals[s], f"jq.ops.{fn.__name__} `{s}` quantized with `{s}_spec`")
    rest = {k: v for k, v in a.items() if k not in ("lhs", "rhs")}
    for s in sides:
        rest[f"{s}_spec"] = None
        if f"{s}_qparams" in rest:
            rest[f"{s}_qparams"] = None

    def quantized(s, x, qp):
        return as_qarray_params(encode(x, qp, specs[s], marks[s])) if s in specs else x

    def impl(lhs, rhs, lqp, rqp):
        return fn(quantized("lhs", lhs, lqp), quantized("rhs", rhs, rqp), **rest)

    run = jax.custom_jvp(impl)

    @functools.partial(run.defjvp, symbolic_zeros=True)
    def run_jvp(primals, tangents):
        lhs, rhs, lqp, rqp = primals
        y = impl(lhs, rhs, lqp, rqp)
        x = {"lhs": lhs, "rhs": rhs}
        qp = {"lhs": lqp, "rhs": rqp}
        fq = {s: fake_quant_with_mask(x[s], qp[s], specs[s]) for s in specs}

        def value(s):  # the operand as the float op sees it
            if s in specs:
                return fq[s][0]
            if isinstance(x[s], QArray):
                return dequantize(x[s], jnp.float32)
            return x[s].astype(jnp.float32)

        def tangent(s, t):  # linear in t
            if _is_zero(t):
                return None
            if s in specs:  # straight through, zero where the quantizer clips
                return jnp.where(fq[s][1], t, jnp.zeros((), t.dtype)).astype(jnp.float32)
            if isinstance(x[s], QArray):  # the scale's tangent, through dequantize
                _, dt = jax.jvp(lambda q: dequantize(q, jnp.float32), (x[s],), (_instantiate(t),))
                return dt
            return t.astype(jnp.float32)

        dy = None
        for s, t in zip(("lhs", "rhs"), tangents[:2], strict=True):
            dt = tangent(s, t)
            if dt is None:
                continue
            term = geo.float_op(dt, value("rhs")) if s == "lhs" else geo.float_op(value("lhs"), dt)
            dy = term if dy is None else dy + term
        if dy is None:
            dy = jnp.zeros(y.shape, jnp.float32)
        return y, dy.astype(y.dtype)

    out = run(vals["lhs"], vals["rhs"], qps["lhs"], qps["rhs"])
    bad = None
    for s in ok:
        b = geo.reach(s, ok[s])
        bad = b if bad is None else bad | b
    return out if bad is None else jnp.where(bad, jnp.asarray(jnp.nan, out.dtype), out)
