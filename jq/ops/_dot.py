"""`dot_general`: the quantized dot, dispatched on the operands' formats.

Two integer `QArray`s take the integer kernel (`jq.ops._kernels`); two fp16 /
bf16 / fp8 `QArray`s a dot in that format with float32 accumulation; a float
operand and a `QArray` are weight-only: ``x . (q - Z)`` in the float operand's
dtype, then the scale folded on the output. A float operand with a spec is
quantized first by `jq.ops._float_operands`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jq.ops._dims import DimensionNumbers, canonical_dn, to_output_layout
from jq.ops._float_operands import Geometry, float_operands
from jq.ops._kernels import int_dot
from jq.ops._operands import (
    check_operand,
    check_scales,
    check_spec_args,
    expand_free_blocks,
    result_dtype,
)
from jq.qparams import QParams, QuantSpec
from jq.quantize import QArray, dequantize


def _dot_geometry(a: dict, lhs, rhs) -> Geometry:
    dn = canonical_dn(a["dimension_numbers"], lhs.shape, rhs.shape)
    (lc, rc), _ = dn

    def float_op(x, w):
        return jax.lax.dot_general(x, w, dn, a["precision"], preferred_element_type=jnp.float32)

    def reach(side, ok):  # a bad lhs row reaches its output row, a bad rhs column its column
        return to_output_layout(~ok, side, dn, lhs.shape, rhs.shape)

    contract = {"lhs": lc, "rhs": rc}
    return Geometry(contract, contract, float_op, reach)


def _float_fmt_dot(ql: QArray, qr: QArray, dn, precision, out_dtype) -> jax.Array:
    (lc, rc), _ = dn
    lbax, _ = check_scales(ql, lc, "lhs")
    rbax, _ = check_scales(qr, rc, "rhs")
    if (lbax is not None and lbax in lc) or (rbax is not None and rbax in rc):
        lhs, rhs = dequantize(ql, jnp.float32), dequantize(qr, jnp.float32)
        return jax.lax.dot_general(lhs, rhs, dn, precision, jnp.float32).astype(out_dtype)
    acc = jax.lax.dot_general(ql.value, qr.value, dn, precision, preferred_element_type=jnp.float32)
    scale = to_output_layout(ql.scale, "lhs", dn, ql.shape, qr.shape) * to_output_layout(
        qr.scale, "rhs", dn, ql.shape, qr.shape
    )
    return (acc * scale.astype(jnp.float32)).astype(out_dtype)


def _weight_only(x: jax.Array, q: QArray, dn, precision, out_dtype, q_is_rhs: bool):
    """Float operand times a QArray: ``x . (q - Z)`` then the scale folded on the output."""
    (lc, rc), _ = dn
    name = "rhs" if q_is_rhs else "lhs"
    bax, _ = check_scales(q, rc if q_is_rhs else lc, name)
    cdt = x.dtype
    blocked = bax is not None and bax in (rc if q_is_rhs else lc)
    if blocked:
        w = dequantize(q, jnp.float32).astype(cdt)
        scale = None
    else:
        v = q.int_value() if q.fmt.is_integer else q.value
        if q.zero_point is not None:
            # |q - Z| <= 255 for 8-bit formats: exact in bfloat16 and float16
            v = v.astype(jnp.int32) - q.zero_point.astype(jnp.int32)
        w = v.astype(cdt)
        scale = q.scale.astype(jnp.float32)
    lhs, rhs = (x, w) if q_is_rhs else (w, x)
    acc = jax.lax.dot_general(lhs, rhs, dn, precision, preferred_element_type=jnp.float32)
    if scale is not None:
        acc = acc * to_output_layout(scale, name, dn, lhs.shape, rhs.shape)
    return acc.astype(out_dtype)


@float_operands(_dot_geometry)
def dot_general(
    lhs,
    rhs,
    dimension_numbers: DimensionNumbers,
    precision=None,
    preferred_element_type=None,
    *,
    lhs_spec: QuantSpec | None = None,
    lhs_qparams: QParams | None = None,
    rhs_spec: QuantSpec | None = None,
    rhs_qparams: QParams | None = None,
) -> jax.Array:
    """Quantized `jax.lax.dot_general`: same signature, same output layout.

    Two integer QArrays give one integer dot ``q_l . q_r`` with int32
    accumulation, then ``S_l * S_r`` folded on the output and the zero-point
    terms (see `jq.ops._kernels`). A float operand with a spec is quantized
    first: statically (``lhs_qparams`` / ``rhs_qparams`` given) or dynamically
    (min-max at run time over its rows that hold no NaN or inf, per tensor or
    per row when the spec's axis names free axes). A float lhs with an integer
    QArray rhs (and no ``lhs_spec``) is weight-only. fp16 / bf16 / fp8 QArrays
    are dotted in their format with float32 accumulation.

    Gradients: with respect to a float operand quantized here, straight-through
    (as `jq.fake_quant`): ``d(lhs) . dequantize(rhs)`` in float32, zero where
    the quantizer clips; with respect to a float operand that is not quantized
    (weight-only) and a QArray's scale, exact.

    Non-finite values: a NaN or inf in an lhs row quantized here makes that
    output row NaN (an rhs column, that output column) and leaves the others
    as they would be without it; a weight-only dot propagates them as the float
    dot does. With ``check_finite=True``, `checkify` (``errors=
    checkify.user_checks``) reports them.

    Args:
      lhs, rhs: float arrays or `QArray`s.
      dimension_numbers: ``((lhs_contracting, rhs_contracting), (lhs_batch,
        rhs_batch))`` as in `jax.lax.dot_general`.
      precision: passed to float dots.
      preferred_element_type: result dtype when floating; otherwise the result
        is float32 (integer accumulation is always int32). Two plain float
        operands with no specs give exactly `jax.lax.dot_general`.
      lhs_spec: quantize a float lhs with this spec.
      lhs_qparams: static parameters for the lhs (needs ``lhs_spec``).
      rhs_spec: quantize a float rhs (a weight, or an activation) with this spec.
      rhs_qparams: static parameters for the rhs (needs ``rhs_spec``).
      check_finite: (keyword) register a `checkify` check for NaN / inf in the
        float operands; off by default, since a check costs the jitted
        function JAX's fast dispatch path.

    Returns:
      Batch dims, then lhs free dims, then rhs free dims.

    Raises:
      ValueError: contracting / batch sizes differ, a per-channel scale lies on
        a contracting axis, blocks do not line up, or the formats cannot be
        combined (an integer with a float format).
      TypeError: an operand is neither a float array nor a QArray.
    """
    lhs = check_operand(lhs, "lhs")
    rhs = check_operand(rhs, "rhs")
    dn = canonical_dn(dimension_numbers, lhs.shape, rhs.shape)
    (lc, rc), _ = dn
    check_spec_args("lhs", lhs, lhs_spec, lhs_qparams)
    check_spec_args("rhs", rhs, rhs_spec, rhs_qparams)
    lq, rq = isinstance(lhs, QArray), isinstance(rhs, QArray)
    if not lq and not rq:
        return jax.lax.dot_general(lhs, rhs, dn, precision, preferred_element_type)
    if lq:
        lhs = expand_free_blocks(lhs, lc, "lhs")
    if rq:
        rhs = expand_free_blocks(rhs, rc, "rhs")
    out_dtype = result_dtype(preferred_element_type)
    if lq and rq:
        li, ri = lhs.fmt.is_integer, rhs.fmt.is_integer
        if li and ri:
            return int_dot(lhs, rhs, dn, out_dtype)
        if not li and not ri:
            return _float_fmt_dot(lhs, rhs, dn, precision, out_dtype)
        raise ValueError(
            f"cannot combine an lhs in format {lhs.format!r} with an rhs in format "
            f"{rhs.format!r}: both must be integer formats or both float formats"
        )
    if rq:
        return _weight_only(lhs, rhs, dn, precision, out_dtype, q_is_rhs=True)
    return _weight_only(rhs, lhs, dn, precision, out_dtype, q_is_rhs=False)
