"""Quantization-aware training ops: fake quantization with straight-through gradients.

``y = op(fq(lhs), fq(rhs))`` with ``fq = jq.fake_quant``; the gradients pass
straight through inside the quantizer's range and are zero where it clips.
With ``int_forward=True`` the forward pass is the real integer (or fp8) op
instead, and the backward pass is still the fake-quant VJP.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from jq.ops._conv import conv_general_dilated
from jq.ops._dims import DimensionNumbers
from jq.ops._dot import dot_general
from jq.ops._einsum import parse_einsum
from jq.ops._operands import as_qarray_params, check_operand
from jq.qparams import QParams, QuantSpec
from jq.quantize import QArray, fake_quant, quantize


def _qat(
    float_op, int_op, lhs, rhs, lhs_spec, lhs_qparams, rhs_spec, rhs_qparams, int_forward, contract
):
    """Fake-quant forward with STE gradients, or a real integer forward with the same VJP.

    `contract`: the contracting axes of lhs and rhs (a per-row spec keeps the others).
    """
    for spec, name in ((lhs_spec, "lhs_spec"), (rhs_spec, "rhs_spec")):
        if spec is not None and not isinstance(spec, QuantSpec):
            raise TypeError(f"{name} must be a jq.QuantSpec, got {type(spec).__name__}")
    if lhs_qparams is not None and lhs_spec is None:
        raise ValueError("lhs_qparams was given without lhs_spec; pass the QuantSpec too")
    if rhs_qparams is not None and rhs_spec is None:
        raise ValueError("rhs_qparams was given without rhs_spec; pass the QuantSpec too")
    lhs = check_operand(lhs, "lhs")
    rhs = check_operand(rhs, "rhs")
    if isinstance(lhs, QArray) or isinstance(rhs, QArray):
        raise TypeError("QAT ops take float operands (they are quantized inside the op)")
    if lhs_spec is not None:
        lhs_spec = lhs_spec.for_operand(lhs.ndim, contract[0])
    if rhs_spec is not None:
        rhs_spec = rhs_spec.for_operand(rhs.ndim, contract[1])

    def fq(x, qp, spec):
        return x if spec is None else fake_quant(x, qp, spec)

    def fq_op(lhs, rhs, lqp, rqp):
        return float_op(fq(lhs, lqp, lhs_spec), fq(rhs, rqp, rhs_spec))

    if not int_forward:
        return fq_op(lhs, rhs, lhs_qparams, rhs_qparams)
    if rhs_spec is None or not (rhs_spec.fmt.is_integer or rhs_spec.fmt.name.startswith("float8")):
        raise ValueError(
            "int_forward=True needs an integer or fp8 rhs_spec (the weight format), got "
            f"{None if rhs_spec is None else rhs_spec.format!r}"
        )
    out_dtype = jax.eval_shape(fq_op, lhs, rhs, lhs_qparams, rhs_qparams).dtype

    @jax.custom_vjp
    def op(lhs, rhs, lqp, rqp):
        rq = as_qarray_params(quantize(rhs, rqp, rhs_spec))
        return int_op(lhs, rq, lqp).astype(out_dtype)

    def fwd(lhs, rhs, lqp, rqp):
        return op(lhs, rhs, lqp, rqp), (lhs, rhs, lqp, rqp)

    def bwd(res, g):
        lhs, rhs, lqp, rqp = res
        _, vjp = jax.vjp(lambda a, b: fq_op(a, b, lqp, rqp), lhs, rhs)
        ga, gb = vjp(g)
        zeros = functools.partial(jax.tree.map, jnp.zeros_like)
        return ga, gb, zeros(lqp), zeros(rqp)

    op.defvjp(fwd, bwd)
    return op(lhs, rhs, lhs_qparams, rhs_qparams)


def qat_dot_general(
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
    int_forward: bool = False,
) -> jax.Array:
    """Quantization-aware `dot_general`: fake quantization with straight-through gradients.

    Forward (``int_forward=False``)::

        y = dot_general(fq(lhs), fq(rhs)),   fq = jq.fake_quant

    with ``fq(lhs)`` from ``lhs_qparams`` (static) or the lhs's own min-max
    (dynamic), and ``fq(rhs)`` from ``rhs_qparams`` or its min-max. Gradients
    (STE, the clipping mask ``1[qmin <= round(x/S) + Z <= qmax]``)::

        dL/dlhs = mask_l * (g . fq(rhs)^T),   dL/drhs = mask_r * (fq(lhs)^T . g)

    With ``int_forward=True`` the forward pass is the real low-precision op
    (`dot_general` on the quantized operands: int8 with int32 accumulation, or
    fp8 with float32 accumulation when ``rhs_spec`` is an fp8 format) and the
    backward pass is the VJP above, computed from the float inputs kept as
    residuals. Both forwards agree up to float32 rounding. The QParams receive
    zero gradients (use `jq.lsq_fake_quant` to learn scales).

    Args:
      lhs, rhs: float arrays.
      dimension_numbers, precision, preferred_element_type: as in
        `jax.lax.dot_general` (the result dtype is that of the float dot).
      lhs_spec, lhs_qparams: activation spec and optional static parameters;
        no spec leaves the lhs in float.
      rhs_spec, rhs_qparams: weight spec and optional parameters.
      int_forward: run the integer (or fp8) op in the forward pass.

    Returns:
      ``jax.lax.dot_general``'s layout.
    """

    def float_op(a, b):
        return jax.lax.dot_general(a, b, dimension_numbers, precision, preferred_element_type)

    def int_op(a, rq, lqp):
        return dot_general(
            a,
            rq,
            dimension_numbers,
            precision,
            preferred_element_type,
            lhs_spec=lhs_spec,
            lhs_qparams=lqp,
        )

    return _qat(
        float_op, int_op, lhs, rhs, lhs_spec, lhs_qparams, rhs_spec, rhs_qparams, int_forward,
        dimension_numbers[0],
    )  # fmt: skip


def qat_einsum(
    subscripts: str,
    lhs,
    rhs,
    *,
    precision=None,
    preferred_element_type=None,
    lhs_spec: QuantSpec | None = None,
    lhs_qparams: QParams | None = None,
    rhs_spec: QuantSpec | None = None,
    rhs_qparams: QParams | None = None,
    int_forward: bool = False,
) -> jax.Array:
    """Quantization-aware two-operand einsum; see `qat_dot_general` for the semantics."""
    lnd, rnd = jnp.ndim(lhs), jnp.ndim(rhs)
    dn, perm = parse_einsum(subscripts, lnd, rnd)

    def post(y):
        return jnp.transpose(y, perm) if perm != tuple(range(len(perm))) else y

    def float_op(a, b):
        return post(jax.lax.dot_general(a, b, dn, precision, preferred_element_type))

    def int_op(a, rq, lqp):
        return post(
            dot_general(
                a, rq, dn, precision, preferred_element_type, lhs_spec=lhs_spec, lhs_qparams=lqp
            )
        )

    return _qat(
        float_op, int_op, lhs, rhs, lhs_spec, lhs_qparams, rhs_spec, rhs_qparams, int_forward,
        dn[0],
    )  # fmt: skip


def qat_conv_general_dilated(
    lhs,
    rhs,
    window_strides: Sequence[int],
    padding,
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers=None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision=None,
    preferred_element_type=None,
    *,
    lhs_spec: QuantSpec | None = None,
    lhs_qparams: QParams | None = None,
    rhs_spec: QuantSpec | None = None,
    rhs_qparams: QParams | None = None,
    int_forward: bool = False,
) -> jax.Array:
    """Quantization-aware `conv_general_dilated`; see `qat_dot_general` for the semantics."""
    kw = dict(
        window_strides=window_strides,
        padding=padding,
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count,
        batch_group_count=batch_group_count,
        precision=precision,
        preferred_element_type=preferred_element_type,
    )

    def float_op(a, b):
        return jax.lax.conv_general_dilated(a, b, **kw)

    def int_op(a, rq, lqp):
        return conv_general_dilated(a, rq, **kw, lhs_spec=lhs_spec, lhs_qparams=lqp)

    cdn = jax.lax.conv_dimension_numbers(jnp.shape(lhs), jnp.shape(rhs), dimension_numbers)
    contract = (cdn.lhs_spec[1:], (cdn.rhs_spec[1], *cdn.rhs_spec[2:]))
    return _qat(
        float_op, int_op, lhs, rhs, lhs_spec, lhs_qparams, rhs_spec, rhs_qparams, int_forward,
        contract,
    )  # fmt: skip
