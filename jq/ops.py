"""Quantized `dot_general`, `einsum` and `conv_general_dilated`.

The ops take float arrays or `QArray`s and keep `jax.lax`'s signatures and
output layouts (batch dims, then lhs free dims, then rhs free dims).

Integer path. With ``x = S_l * (q_l - Z_l)`` and ``w = S_r * (q_r - Z_r)``::

    sum_k x[m, k] w[k, n] = S_l S_r * ( sum_k q_l q_r              (one int32 dot)
                                       - Z_r * sum_k q_l            (lhs row sums)
                                       - Z_l * sum_k q_r            (weight column sums)
                                       + K * Z_l * Z_r )

The scales must lie on non-contracting axes (they are folded on the output);
scales per block along the contracting axis split the contraction into blocks
(one int32 partial dot per block, rescaled and summed in float32).

Modes, chosen by the operands:

* two integer QArrays: the integer path above;
* a float lhs with ``lhs_spec`` and ``lhs_qparams``: static activation
  quantization, then the integer path;
* a float lhs with ``lhs_spec`` and no ``lhs_qparams``: dynamic quantization
  (min-max per tensor, or per row / token when ``lhs_spec.axis`` names free lhs
  axes);
* a float rhs with ``rhs_spec``: the rhs is quantized from its own min-max;
* a float lhs and an integer QArray rhs without ``lhs_spec``: weight-only
  (int8, uint8 or packed int4 weights, float activations);
* fp16 / bf16 / fp8 QArrays: a dot in that format with float32 accumulation.

Lowering. Every integer product is an 8-bit dot emitted by the primitive in
`jq._mixed_dot`: on CPU a mixed ``u8 x s8 -> s32`` `stablehlo.dot_general`
(the form XLA:CPU hands to its VNNI / YNNPACK kernels; an int8 activation is
shifted to uint8 by flipping its top bit), on GPU / TPU ``s8 x s8 -> s32``.
On CPU the weight sums ``sum_k q_r`` come from one extra lhs row of ones in the
same dot (XLA:CPU's column reduction of an int8 matrix is slow), which also
pads a matrix-vector product (M = 1, XLA's slow loop) to M = 2. The weight may
be stored (K, N) or (N, K): pass the matching dimension numbers.

Accumulation is overflow-safe: the bound ``max|a| * max|b| * K`` is checked for
the operand types actually lowered (uint8 x int8 on CPU: ``255 * 128 * K``, so
K <= 65,793), and a longer contraction is split into chunks whose int32 partial
dots are summed in float32. int16 operands are split into two bytes
(``a = 256 * a_hi + a_lo`` with ``a_hi`` int8 and ``a_lo`` uint8), each an
8-bit dot within the same bound, combined in float32: int16 x int8 never
overflows, whatever K (one int32 accumulator would be safe only for K <= 511).
int64 accumulation is never used: with x64 off it silently becomes int32.

Integer convolutions: on GPU / TPU ``lax.conv_general_dilated(s8, s8,
preferred_element_type=int32)`` (uint8 operands shifted to int8). On CPU, where
XLA's int8 convolution is a slow loop, an ungrouped convolution without lhs
dilation becomes patches (strided slices of the zero-point-padded uint8 input)
times the weight through the mixed dot; grouped / lhs-dilated ones keep the
native s8 conv. The choice is made by `jax.lax.platform_dependent`, so one
exported module carries both. Native windows longer than the 8-bit bound are
rejected (the patch path splits them like any contraction).
"""

from __future__ import annotations

import functools
import inspect
import string
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero
from jax.experimental import checkify

from jq import _mixed_dot
from jq import lowering as _lowering
from jq.lowering import int8_lowering, lowering_info
from jq.qparams import (
    QParams,
    QuantSpec,
    broadcast_qparams,
    qparams_from_array,
    qparams_from_range,
)
from jq.quantize import QArray, _expand_blocks, _fq_forward, dequantize, fake_quant, quantize

__all__ = [
    "conv_general_dilated",
    "dot_general",
    "dynamic_qparams",
    "einsum",
    "int8_lowering",
    "lowering_info",
    "max_safe_contraction",
    "qat_conv_general_dilated",
    "qat_dot_general",
    "qat_einsum",
]

_INT32_MAX = 2**31 - 1

# The largest |value| an operand of each lowered dtype can hold.
_DTYPE_ABSMAX = {
    np.dtype(np.int8): 128,
    np.dtype(np.uint8): 255,
    np.dtype(np.int16): 32768,
    np.dtype(np.uint16): 65535,
    np.dtype(np.int32): 2**31,
}


def max_safe_contraction(lhs_dtype, rhs_dtype) -> int:
    """Largest K for which an int32 accumulation of ``sum_k a_k b_k`` cannot overflow.

    ``K_max = floor((2**31 - 1) / (max|a| * max|b|))`` over the full range of
    each dtype: uint8 x int8 gives 65,793, int8 x int8 131,071, int16 x int8 511.

    Args:
      lhs_dtype, rhs_dtype: integer dtypes of the operands as lowered.

    Returns:
      The bound (at least 0).
    """
    a = _DTYPE_ABSMAX[np.dtype(lhs_dtype)]
    b = _DTYPE_ABSMAX[np.dtype(rhs_dtype)]
    return _INT32_MAX // (a * b)


# On CPU a signed int8 dot is lowered as uint8 x int8 (the VNNI form), so the
# bound for two int8 operands is the uint8 x int8 one.
_K_MAX_8BIT = max_safe_contraction(np.uint8, np.int8)


# ---------------------------------------------------------------------------------------
# dimension numbers
# ---------------------------------------------------------------------------------------
DimensionNumbers = tuple[tuple[Sequence[int], Sequence[int]], tuple[Sequence[int], Sequence[int]]]


def _canonical_dn(dn, lhs_shape, rhs_shape) -> tuple:
    """Validates `dimension_numbers`; returns them as tuples of non-negative ints."""
    try:
        (lc, rc), (lb, rb) = dn
        lc, rc, lb, rb = (tuple(int(a) for a in x) for x in (lc, rc, lb, rb))
    except (TypeError, ValueError) as e:
        raise ValueError(
            "dimension_numbers must be ((lhs_contracting, rhs_contracting), "
            f"(lhs_batch, rhs_batch)), got {dn!r}"
        ) from e
    ln, rn = len(lhs_shape), len(rhs_shape)

    def norm(axes, n, what):
        out = []
        for a in axes:
            if not -n <= a < n:
                raise ValueError(f"dimension_numbers: {what} axis {a} is out of range for rank {n}")
            out.append(a % n)
        return tuple(out)

    lc, lb = norm(lc, ln, "lhs contracting"), norm(lb, ln, "lhs batch")
    rc, rb = norm(rc, rn, "rhs contracting"), norm(rb, rn, "rhs batch")
    if len(lc) != len(rc):
        raise ValueError(
            f"dimension_numbers: {len(lc)} lhs contracting axes but {len(rc)} rhs contracting axes"
        )
    if len(lb) != len(rb):
        raise ValueError(
            f"dimension_numbers: {len(lb)} lhs batch axes but {len(rb)} rhs batch axes"
        )
    if len(set(lc + lb)) != len(lc + lb) or len(set(rc + rb)) != len(rc + rb):
        raise ValueError(f"dimension_numbers {dn!r} repeat an axis")
    for a, b in zip(lc, rc, strict=True):
        if lhs_shape[a] != rhs_shape[b]:
            raise ValueError(
                f"contracting dimensions do not match: lhs axis {a} has size {lhs_shape[a]} but "
                f"rhs axis {b} has size {rhs_shape[b]} (lhs shape {tuple(lhs_shape)}, "
                f"rhs shape {tuple(rhs_shape)})"
            )
    for a, b in zip(lb, rb, strict=True):
        if lhs_shape[a] != rhs_shape[b]:
            raise ValueError(
                f"batch dimensions do not match: lhs axis {a} has size {lhs_shape[a]} but "
                f"rhs axis {b} has size {rhs_shape[b]} (lhs shape {tuple(lhs_shape)}, "
                f"rhs shape {tuple(rhs_shape)})"
            )
    return (lc, rc), (lb, rb)


def _free(n, contract, batch):
    return tuple(a for a in range(n) if a not in contract and a not in batch)


def _to_out(p, side: str, dn, lshape, rshape) -> jax.Array:
    """Maps a keepdims parameter of one operand onto the output layout of the dot.

    `p` has size 1 on every contracting axis. The result broadcasts against the
    output ``(batch..., lhs free..., rhs free...)``.
    """
    (lc, rc), (lb, rb) = dn
    lfree, rfree = _free(len(lshape), lc, lb), _free(len(rshape), rc, rb)
    if side == "lhs":
        batch, free, contract = lb, lfree, lc
        shape = [p.shape[a] for a in lb + lfree] + [1] * len(rfree)
    else:
        batch, free, contract = rb, rfree, rc
        shape = [p.shape[a] for a in rb] + [1] * len(lfree) + [p.shape[a] for a in rfree]
    p = jnp.transpose(p, batch + free + contract)
    return p.reshape(shape)


# ---------------------------------------------------------------------------------------
# operand analysis
# ---------------------------------------------------------------------------------------
def _param_layout(q: QArray, name: str) -> tuple[tuple[int, ...], int | None, int | None]:
    """(channel axes, block axis, block size) of a QArray's scale (and zero point)."""
    channel, block_axis, block_size = [], None, None
    params = [q.scale] + ([q.zero_point] if q.zero_point is not None else [])
    for p in params:
        if p.ndim != q.ndim:
            raise ValueError(
                f"`{name}`: QArray scale/zero point of shape {tuple(p.shape)} must have the rank "
                f"of the array {q.shape} (keepdims form)"
            )
    for a in range(q.ndim):
        sizes = {p.shape[a] for p in params} - {1}
        if not sizes:
            continue
        if len(sizes) > 1:
            raise ValueError(f"`{name}`: scale and zero point disagree on axis {a}")
        s = sizes.pop()
        if s == q.shape[a]:
            channel.append(a)
        elif q.shape[a] % s == 0:
            if block_axis is not None:
                raise ValueError(f"`{name}`: QArray has blocks on two axes ({block_axis} and {a})")
            block_axis, block_size = a, q.shape[a] // s
        else:
            raise ValueError(
                f"`{name}`: scale size {s} on axis {a} neither matches nor divides the size "
                f"{q.shape[a]} of that axis"
            )
    return tuple(channel), block_axis, block_size


def _check_scales(q: QArray, contract: tuple[int, ...], name: str):
    channel, baxis, bsize = _param_layout(q, name)
    for a in channel:
        if a in contract and q.shape[a] > 1:
            raise ValueError(
                f"`{name}`: a per-channel scale lies on axis {a}, which is a contracting axis of "
                "this dot; per-channel scales must be on non-contracting axes (use per-block "
                "scales, block_axis/block_size, to vary the scale along the contraction)"
            )
    return baxis, bsize


def _expand_free_blocks(q: QArray, contract: tuple[int, ...], name: str) -> QArray:
    """Repeats per-block parameters that lie on a non-contracting axis to full size.

    Only blocks along the contraction need the block-split dot; elsewhere a
    block scale is just a coarser per-channel scale.
    """
    _, baxis, bsize = _param_layout(q, name)
    if baxis is None or baxis in contract:
        return q

    def rep(p):
        return None if p is None or p.shape[baxis] == 1 else jnp.repeat(p, bsize, axis=baxis)

    return QArray(q.value, rep(q.scale), rep(q.zero_point), q.format, q.shape, q.pack_axis)


def _keepdims(p, ndim):
    if p is None:
        return None
    p = jnp.asarray(p)
    if p.ndim != ndim:
        p = p.reshape((1,) * ndim) if p.size == 1 else p
    return p


def _as_qarray_params(q: QArray) -> QArray:
    """QArray with scale / zero point in keepdims form (scalar parameters reshaped)."""
    scale = _keepdims(q.scale, q.ndim)
    zp = _keepdims(q.zero_point, q.ndim)
    if scale is q.scale and zp is q.zero_point:
        return q
    return QArray(q.value, scale, zp, q.format, q.shape, q.pack_axis)


def _quantize_lhs(lhs, spec: QuantSpec | None, qp: QParams | None, contract, name="lhs"):
    if spec is None:
        if qp is not None:
            raise ValueError("lhs_qparams was given without lhs_spec; pass the QuantSpec too")
        return lhs
    if isinstance(lhs, QArray):
        raise ValueError(
            "lhs is already a QArray; lhs_spec / lhs_qparams apply only to a float lhs"
        )
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"lhs_spec must be a jq.QuantSpec, got {type(spec).__name__}")
    lhs = jnp.asarray(lhs)
    qp = _operand_qparams(lhs, spec, qp, contract, name)
    return _as_qarray_params(quantize(lhs, qp, spec))


def _operand_qparams(
    x, spec: QuantSpec, qp: QParams | None, contract, name: str, rows=None, ok=None
) -> QParams:
    """Keepdims `QParams` for a float operand: `qp` broadcast (static), or dynamic.

    With `rows` (axes) and `ok` (`_finite_rows` over them), the dynamic range
    comes from the finite rows only (`_dynamic_qparams_rows`); without, from
    the finite values (`dynamic_qparams`).
    """
    for a in spec.channel_axes(x.ndim, name):
        if a in contract and x.shape[a] > 1:
            raise ValueError(
                f"{name}_spec.axis puts a per-channel scale on {name} axis {a}, a contracting "
                "axis of this op; per-row / per-token activation scales must name "
                "non-contracting axes"
            )
    if qp is not None:
        return broadcast_qparams(qp, x.shape, spec, name)
    x = jax.lax.stop_gradient(x)
    if ok is None:
        return dynamic_qparams(x, spec, name)
    return _dynamic_qparams_rows(x, spec, rows, ok, name)


def _finite_rows(x, axes) -> jax.Array:
    """True where the row of `x` along `axes` is finite (keepdims), from one sum per row.

    A row's sum is NaN or inf exactly when the row holds a NaN or inf, except
    for finite values so large that the float32 sum overflows (``|x|`` near
    ``3e38 / row length``): such a row counts as non-finite. One plain
    reduction, which XLA:CPU runs at memory speed (an ``isfinite`` mask or
    ``any`` needs a pass that writes a mask first).
    """
    return jnp.isfinite(jnp.sum(x, axis=tuple(axes), keepdims=True, dtype=jnp.float32))


def _symmetric_scale(amax, spec: QuantSpec):
    tiny = jnp.finfo(jnp.float32).tiny
    return jnp.where(amax > 0, jnp.maximum(amax / spec.qmax, tiny), 1.0)


def _dynamic_qparams_rows(x, spec: QuantSpec, rows, ok, name: str) -> QParams:
    """`dynamic_qparams` over the finite rows of `x` only (`ok`: `_finite_rows` over `rows`).

    Two stages: min / max (or max |x|) within each row, then over the finite
    rows, for every axis but the spec's channel axes. For finite `x` the result
    equals `dynamic_qparams` bit for bit (min and max do not round).
    """
    fmt = spec.fmt
    if spec.block_size is not None or not fmt.scaled:
        return dynamic_qparams(jnp.where(ok, x, jnp.zeros((), x.dtype)), spec, name)
    keep = spec.channel_axes(x.ndim, name)
    rows = tuple(rows)
    red = tuple(a for a in range(x.ndim) if a not in keep and a not in rows)

    def stage(f, v):  # within rows, then across the finite ones (0 is in every range anyway,
        # so 0 is also the initial value: an empty input gets the zero-width range at 0)
        v = f(v, axis=rows, keepdims=True, initial=0.0).astype(jnp.float32)
        return f(jnp.where(ok, v, 0.0), axis=red, keepdims=True, initial=0.0)

    if fmt.is_integer and spec.scheme == "symmetric" and fmt.signed:
        return QParams(_symmetric_scale(stage(jnp.max, jnp.abs(x)), spec), None)
    return qparams_from_range(stage(jnp.min, x), stage(jnp.max, x), spec)


def dynamic_qparams(x: jax.Array, spec: QuantSpec, name: str = "x") -> QParams:
    """Min-max parameters of the finite values of `x` at run time (dynamic quantization).

    Equal to `qparams_from_array` when `x` is finite. NaN and inf are left out
    of the range (read as 0, which every range includes anyway), so that one
    non-finite value does not spoil the scale of the finite ones; the ops then
    make the outputs it reaches NaN (see `dot_general`).

    Symmetric signed specs need only ``max|x|``: ``S = max|x| / qmax`` (one
    reduction instead of a min and a max, which matters at batch 1 where each
    kernel launch counts); affine specs get min and max from one variadic
    reduction and then `qparams_from_range`.

    Args:
      x: float array (wrap it in `jax.lax.stop_gradient` when differentiating).
      spec: the activation `QuantSpec` (per tensor, or per row / channel axes).
      name: the argument name used in error messages.

    Returns:
      `QParams` in keepdims form.
    """
    fmt = spec.fmt
    x = jnp.asarray(x)
    x = jnp.where(jnp.isfinite(x), x, jnp.zeros((), x.dtype))  # fused into the reduction
    if spec.block_size is not None or not fmt.is_integer:
        return qparams_from_array(x, spec, name)
    keep = spec.channel_axes(x.ndim, name)
    red = tuple(a for a in range(x.ndim) if a not in keep)
    xf = x.astype(jnp.float32)
    if spec.scheme == "symmetric" and fmt.signed:
        amax = jnp.max(jnp.abs(xf), axis=red, keepdims=True, initial=0.0)
        return QParams(_symmetric_scale(amax, spec), None)
    lo, hi = jax.lax.reduce(
        (xf, xf),
        (np.float32(np.inf), np.float32(-np.inf)),
        lambda a, b: (jnp.minimum(a[0], b[0]), jnp.maximum(a[1], b[1])),
        red,
    )
    shape = tuple(1 if a in red else d for a, d in enumerate(x.shape))
    return qparams_from_range(lo.reshape(shape), hi.reshape(shape), spec)


_dynamic_qparams = dynamic_qparams  # the name jq.flax used first


def _quantize_rhs(rhs, spec: QuantSpec | None, name="rhs", qp: QParams | None = None):
    if spec is None:
        if qp is not None:
            raise ValueError("rhs_qparams was given without rhs_spec; pass the QuantSpec too")
        return rhs
    if isinstance(rhs, QArray):
        raise ValueError("rhs is already a QArray; rhs_spec applies only to a float rhs")
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"rhs_spec must be a jq.QuantSpec, got {type(spec).__name__}")
    rhs = jnp.asarray(rhs)
    qp = _operand_qparams(rhs, spec, qp, (), name)
    return _as_qarray_params(quantize(rhs, qp, spec))


def _out_dtype(preferred_element_type):
    if preferred_element_type is not None and jnp.issubdtype(
        jnp.dtype(preferred_element_type), jnp.floating
    ):
        return jnp.dtype(preferred_element_type)
    return jnp.dtype(jnp.float32)


def _check_operand(x, name):
    if isinstance(x, QArray):
        return _as_qarray_params(x)
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
            f"`{name}` must be a float array or a jq.QArray, got an array of dtype {x.dtype}"
        )
    return x


# ---------------------------------------------------------------------------------------
# integer kernels
# ---------------------------------------------------------------------------------------
def _to_signed8(v: jax.Array, zp):
    """uint8 values -> int8 values shifted by -128 (zero point shifted the same way)."""
    s = jax.lax.bitcast_convert_type(v ^ jnp.uint8(0x80), jnp.int8)
    z = jnp.full((1,) * v.ndim, -128, jnp.int32) if zp is None else zp.astype(jnp.int32) - 128
    return s, z


def _k_of(shape, axes) -> int:
    return int(np.prod([shape[a] for a in axes])) if axes else 1


def _sums_to_out(s, dn, lndim):
    """(rhs batch..., rhs free...) sums -> broadcastable against the dot's output."""
    (lc, _), (lb, _) = dn
    nb, nlf = len(lb), lndim - len(lc) - len(lb)
    return s.reshape(s.shape[:nb] + (1,) * nlf + s.shape[nb:])


def _dot8_chunked(a, b, dn, want_sums: bool):
    """``sum_k a b`` for an int8/uint8 `a` and an int8 `b`, never overflowing int32.

    Up to ``K = 65,793`` (the uint8 x int8 bound; int8 lhs operands are lowered
    as uint8 on CPU) this is one exact int32 dot. Longer contractions are split
    into balanced chunks, one exact int32 dot each, summed in float32.

    Returns:
      ``(dot, sums)``: dot int32 (one chunk) or float32 (split); sums is
      ``sum_k b`` as int32 in the output layout, or None.
    """
    (lc, rc), (lb, rb) = dn
    k = _k_of(a.shape, lc)
    if k <= _K_MAX_8BIT:
        if want_sums:
            out, s = _mixed_dot.int8_dot_general(a, b, dn, rhs_sums=True)
            return out, _sums_to_out(s, dn, a.ndim)
        return _mixed_dot.int8_dot_general(a, b, dn), None
    # merge the contracting axes into one trailing axis, zero-pad to whole chunks
    lfree, rfree = _free(a.ndim, lc, lb), _free(b.ndim, rc, rb)
    a2 = jnp.transpose(a, lb + lfree + lc)
    b2 = jnp.transpose(b, rb + rfree + rc)
    a2 = a2.reshape(a2.shape[: len(lb) + len(lfree)] + (k,))
    b2 = b2.reshape(b2.shape[: len(rb) + len(rfree)] + (k,))
    n_chunks = -(-k // _K_MAX_8BIT)
    kc = -(-k // n_chunks)
    pad = n_chunks * kc - k
    if pad:  # zeros add nothing to the products or to the sums
        a2 = jnp.pad(a2, [(0, 0)] * (a2.ndim - 1) + [(0, pad)])
        b2 = jnp.pad(b2, [(0, 0)] * (b2.ndim - 1) + [(0, pad)])
    a2 = a2.reshape(a2.shape[:-1] + (n_chunks, kc))
    b2 = b2.reshape(b2.shape[:-1] + (n_chunks, kc))
    nb, nlf, nrf = len(lb), len(lfree), len(rfree)
    # the chunk axis is a batch axis, first in the output
    dn2 = (
        ((a2.ndim - 1,), (b2.ndim - 1,)),
        ((nb + nlf,) + tuple(range(nb)), (nb + nrf,) + tuple(range(nb))),
    )
    part = _mixed_dot.int8_dot_general(a2, b2, dn2)
    out = jnp.sum(part.astype(jnp.float32), axis=0)
    sums = None
    if want_sums:  # |sum_k b| <= 128 K: int32 is exact for K < 2**24
        sums = _sums_to_out(_rhs_sums(b, dn), dn, a.ndim)
    return out, sums


def _rhs_sums(b, dn):
    (_, rc), (_, rb) = dn
    s = jnp.sum(b.astype(jnp.int32), axis=tuple(rc))
    kept = [i for i in range(b.ndim) if i not in rc]
    order = [kept.index(i) for i in rb] + [kept.index(i) for i in kept if i not in rb]
    return jnp.transpose(s, order)


def _lhs_sums(a, dn, rndim):
    """``sum_k a`` in the output layout (batch..., lhs free..., 1 for rhs free)."""
    (lc, rc), (lb, rb) = dn
    k = _k_of(a.shape, lc)
    dt = jnp.int32 if _DTYPE_ABSMAX[np.dtype(a.dtype)] * k <= _INT32_MAX else jnp.float32
    s = jnp.sum(a.astype(dt), axis=tuple(lc), keepdims=True)
    nrf = rndim - len(rc) - len(rb)
    lfree = _free(a.ndim, lc, lb)
    s = jnp.transpose(s, lb + lfree + lc)
    return s.reshape(s.shape[: len(lb) + len(lfree)] + (1,) * nrf)


def _split_int16(v):
    """int16 ``v = 256 * hi + lo``: hi int8 in [-128, 127], lo uint8 in [0, 255]."""
    hi = (v >> 8).astype(jnp.int8)
    lo = (v & 0xFF).astype(jnp.uint8)
    return hi, lo


def _int_raw_dot(vl, vr, dn, want_sums: bool):
    """Exact ``sum_k vl vr`` (int32, or float32 once split) and optionally ``sum_k vr``.

    Operands are int8, uint8 or int16. Every product is formed by 8-bit dots:

    * a uint8 rhs is shifted to int8: ``vr = s + 128``, adding ``128 sum_k vl``;
    * an int16 lhs is split into bytes, ``vl = 256 hi + lo`` (two 8-bit dots,
      combined in float32), so int16 x int8 never overflows int32 whatever K;
    * an int16 rhs: the operands are swapped.
    """
    (lc, rc), (lb, rb) = dn
    if vl.dtype == jnp.int16:
        hi, lo = _split_int16(vl)
        d_hi, sums = _int_raw_dot(hi, vr, dn, want_sums)
        d_lo, _ = _int_raw_dot(lo, vr, dn, False)
        return 256.0 * d_hi.astype(jnp.float32) + d_lo.astype(jnp.float32), sums
    if vr.dtype == jnp.int16:
        nb = len(lb)
        nl, nr = vl.ndim - len(lc) - nb, vr.ndim - len(rc) - nb
        swapped, _ = _int_raw_dot(vr, vl, ((rc, lc), (rb, lb)), False)
        perm = tuple(range(nb)) + tuple(range(nb + nr, nb + nr + nl)) + tuple(range(nb, nb + nr))
        out = jnp.transpose(swapped, perm)
        sums = (
            _sums_to_out(_rhs_sums(vr.astype(jnp.float32), dn), dn, vl.ndim) if want_sums else None
        )
        return out, sums
    if vr.dtype == jnp.uint8:
        s, _ = _to_signed8(vr, None)
        out, sums = _int_raw_dot(vl, s, dn, want_sums)
        k = _k_of(vl.shape, lc)
        out = out.astype(jnp.float32) + 128.0 * _lhs_sums(vl, dn, vr.ndim).astype(jnp.float32)
        if sums is not None:
            sums = sums + 128 * k
        return out, sums
    return _dot8_chunked(vl, vr, dn, want_sums)


def _int_values(q: QArray):
    """Logical integer values (int4 unpacked) and the int32 zero point (or None)."""
    v = q.int_value()
    if v.dtype not in (jnp.int8, jnp.uint8, jnp.int16):
        raise ValueError(f"no integer dot for QArray format {q.format!r} (values {v.dtype})")
    zp = None if q.zero_point is None else q.zero_point.astype(jnp.int32)
    return v, zp


def _int_core(vl, zl, vr, zr, dn) -> jax.Array:
    """``sum_k (vl - zl)(vr - zr)`` in the output layout (int32 or float32).

    ``= sum_k vl vr - Z_r sum_k vl - Z_l sum_k (vr - Z_r)``. The weight sums come
    out of the same dot (`jq._mixed_dot`); with no split and a result bounded
    by ``max|vl - zl| max|vr - zr| K < 2**31`` the whole sum stays int32 (exact:
    two's complement intermediates wrap back), otherwise it is float32.
    """
    (lc, rc), _ = dn
    raw, rsum = _int_raw_dot(vl, vr, dn, zl is not None)
    if zl is None and zr is None:
        return raw
    k = _k_of(vl.shape, lc)

    def span(v, z):
        lo, hi = (0, 255) if v.dtype == jnp.uint8 else (-128, 127)
        if v.dtype == jnp.int16:
            lo, hi = -32768, 32767
        return hi - lo if z is not None else max(-lo, hi)

    exact = raw.dtype == jnp.int32 and span(vl, zl) * span(vr, zr) * k <= _INT32_MAX
    dt = jnp.int32 if exact else jnp.float32
    acc = raw.astype(dt)
    if zr is not None:
        zro = _to_out(zr, "rhs", dn, vl.shape, vr.shape).astype(dt)
        acc = acc - zro * _lhs_sums(vl, dn, vr.ndim).astype(dt)
    if zl is not None:
        zlo = _to_out(zl, "lhs", dn, vl.shape, vr.shape).astype(dt)
        w = rsum.astype(dt)
        if zr is not None:
            w = w - k * zro
        acc = acc - zlo * w
    return acc


def _split_blocks(x, p_list, axis, bsize):
    """Reshapes axis `axis` of `x` into (n_blocks, bsize), params into (n_blocks, 1)."""
    nb = x.shape[axis] // bsize
    xs = x.reshape(x.shape[:axis] + (nb, bsize) + x.shape[axis + 1 :])
    ps = []
    for p in p_list:
        if p is None:
            ps.append(None)
            continue
        ps.append(p.reshape(p.shape[:axis] + (p.shape[axis], 1) + p.shape[axis + 1 :]))
    return xs, ps


def _block_dn(dn, l_axis, r_axis):
    """Dimension numbers after splitting lhs axis `l_axis` / rhs `r_axis` into (nb, g).

    The block index becomes the first batch axis; the in-block axis is contracted.
    """
    (lc, rc), (lb, rb) = dn

    def shift(axes, cut):
        return tuple(a + 1 if a > cut else a for a in axes)

    lc2 = tuple(l_axis + 1 if a == l_axis else a for a in shift(lc, l_axis))
    rc2 = tuple(r_axis + 1 if a == r_axis else a for a in shift(rc, r_axis))
    lb2 = (l_axis,) + shift(lb, l_axis)
    rb2 = (r_axis,) + shift(rb, r_axis)
    return (lc2, rc2), (lb2, rb2)


def _int_dot(ql: QArray, qr: QArray, dn, out_dtype) -> jax.Array:
    (lc, rc), _ = dn
    lbax, lbs = _check_scales(ql, lc, "lhs")
    rbax, rbs = _check_scales(qr, rc, "rhs")
    vl, zl = _int_values(ql)
    vr, zr = _int_values(qr)
    sl, sr = ql.scale.astype(jnp.float32), qr.scale.astype(jnp.float32)
    l_blk = lbax is not None and lbax in lc
    r_blk = rbax is not None and rbax in rc
    if l_blk or r_blk:
        # pair the blocked contracting axes; both sides must cut the same axis alike
        if l_blk and r_blk:
            if lc.index(lbax) != rc.index(rbax) or lbs != rbs:
                raise ValueError(
                    f"lhs blocks (axis {lbax}, size {lbs}) and rhs blocks (axis {rbax}, size "
                    f"{rbs}) do not line up along the contraction"
                )
            la, ra, bs = lbax, rbax, lbs
        elif l_blk:
            la, ra, bs = lbax, rc[lc.index(lbax)], lbs
        else:
            la, ra, bs = lc[rc.index(rbax)], rbax, rbs
        vl, (sl, zl) = _split_blocks(vl, [sl, zl], la, bs)
        vr, (sr, zr) = _split_blocks(vr, [sr, zr], ra, bs)
        dn = _block_dn(dn, la, ra)
        acc = _int_core(vl, zl, vr, zr, dn).astype(jnp.float32)
        acc = acc * _to_out(sl, "lhs", dn, vl.shape, vr.shape)
        acc = acc * _to_out(sr, "rhs", dn, vl.shape, vr.shape)
        return jnp.sum(acc, axis=0).astype(out_dtype)
    acc = _int_core(vl, zl, vr, zr, dn).astype(jnp.float32)
    scale = _to_out(sl, "lhs", dn, vl.shape, vr.shape) * _to_out(sr, "rhs", dn, vl.shape, vr.shape)
    return (acc * scale).astype(out_dtype)


# ---------------------------------------------------------------------------------------
# float formats, weight-only
# ---------------------------------------------------------------------------------------
def _float_fmt_dot(ql: QArray, qr: QArray, dn, precision, out_dtype) -> jax.Array:
    (lc, rc), _ = dn
    lbax, _ = _check_scales(ql, lc, "lhs")
    rbax, _ = _check_scales(qr, rc, "rhs")
    if (lbax is not None and lbax in lc) or (rbax is not None and rbax in rc):
        lhs, rhs = dequantize(ql, jnp.float32), dequantize(qr, jnp.float32)
        return jax.lax.dot_general(lhs, rhs, dn, precision, jnp.float32).astype(out_dtype)
    acc = jax.lax.dot_general(ql.value, qr.value, dn, precision, preferred_element_type=jnp.float32)
    scale = _to_out(ql.scale, "lhs", dn, ql.shape, qr.shape) * _to_out(
        qr.scale, "rhs", dn, ql.shape, qr.shape
    )
    return (acc * scale.astype(jnp.float32)).astype(out_dtype)


def _weight_only(x: jax.Array, q: QArray, dn, precision, out_dtype, q_is_rhs: bool):
    """Float operand times a QArray: ``x . (q - Z)`` then the scale folded on the output."""
    (lc, rc), _ = dn
    name = "rhs" if q_is_rhs else "lhs"
    bax, _ = _check_scales(q, rc if q_is_rhs else lc, name)
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
        acc = acc * _to_out(scale, name, dn, lhs.shape, rhs.shape)
    return acc.astype(out_dtype)


# ---------------------------------------------------------------------------------------
# float operands quantized inside an op: straight-through gradients, non-finite values
# ---------------------------------------------------------------------------------------
class _Geometry(NamedTuple):
    """What `_float_operands` needs to know about one call of an op."""

    contract: dict  # "lhs" / "rhs" -> contracting axes of that operand
    rows: dict  # "lhs" / "rhs" -> axes of a row: a NaN / inf poisons its whole row
    float_op: Callable  # (lhs, rhs) -> the same op on float32 operands, float32 result
    reach: Callable  # (side, ok) -> bool broadcastable to the output: the outputs of bad rows


def _dot_geometry(a: dict, lhs, rhs) -> _Geometry:
    dn = _canonical_dn(a["dimension_numbers"], lhs.shape, rhs.shape)
    (lc, rc), _ = dn

    def float_op(x, w):
        return jax.lax.dot_general(x, w, dn, a["precision"], preferred_element_type=jnp.float32)

    def reach(side, ok):  # a bad lhs row reaches its output row, a bad rhs column its column
        return _to_out(~ok, side, dn, lhs.shape, rhs.shape)

    contract = {"lhs": lc, "rhs": rc}
    return _Geometry(contract, contract, float_op, reach)


def _conv_geometry(a: dict, lhs, rhs) -> _Geometry:
    cdn = _conv_dn(len(lhs.shape), a["dimension_numbers"])
    kw = dict(
        window_strides=a["window_strides"],
        padding=a["padding"],
        lhs_dilation=a["lhs_dilation"],
        rhs_dilation=a["rhs_dilation"],
        dimension_numbers=cdn,
    )

    def float_op(x, w):
        return jax.lax.conv_general_dilated(
            x,
            w,
            **kw,
            feature_group_count=a["feature_group_count"],
            batch_group_count=a["batch_group_count"],
            precision=a["precision"],
            preferred_element_type=jnp.float32,
        )

    def reach(side, ok):
        out_nd = len(cdn.out_spec)
        if side == "rhs":  # a bad weight reaches every output of its output feature
            shape = [1] * out_nd
            shape[cdn.out_spec[1]] = ok.shape[cdn.rhs_spec[0]]
            return jnp.reshape(~ok, shape)
        # a bad input pixel reaches the outputs whose window covers it: a max over the
        # conv's windows of the bad-pixel map (no float convolution in the module)
        lsp, rsp, osp = cdn
        nsp = len(lsp) - 2
        ksize = tuple(rhs.shape[ax] for ax in rsp[2:])
        strides = tuple(a["window_strides"])
        rdil = tuple(a["rhs_dilation"] or (1,) * nsp)
        ldil = tuple(a["lhs_dilation"] or (1,) * nsp)
        pads = a["padding"]
        if isinstance(pads, str):  # as jax.lax.conv_general_dilated resolves it
            eff = tuple((k - 1) * d + 1 for k, d in zip(ksize, rdil, strict=True))
            pads = jax.lax.padtype_to_pads(
                tuple(lhs.shape[ax] for ax in lsp[2:]), eff, strides, pads
            )
        win, st, pad, bdil, wdil = ([1] * out_nd, [1] * out_nd, [(0, 0)] * out_nd,
                                    [1] * out_nd, [1] * out_nd)
        for i, ax in enumerate(lsp[2:]):
            win[ax], st[ax], pad[ax] = ksize[i], strides[i], tuple(pads[i])
            bdil[ax], wdil[ax] = ldil[i], rdil[i]
        bad = (~ok).astype(jnp.float32)
        groups = a["feature_group_count"]
        if groups > 1:  # `ok` per element: a bad input reaches its own group's outputs only
            f = lsp[1]
            bad = bad.reshape(bad.shape[:f] + (groups, -1) + bad.shape[f + 1 :]).max(axis=f + 1)
        bad = jax.lax.reduce_window(bad, 0.0, jax.lax.max, win, st, pad, bdil, wdil)
        perm = [0] * out_nd
        for j in range(out_nd):  # lhs layout -> output layout (same roles, other order)
            perm[osp[j]] = lsp[j]
        bad = jnp.transpose(bad, perm)
        if groups > 1:  # each group's map to its O / G output features
            bad = jnp.repeat(bad, rhs.shape[rsp[0]] // groups, axis=osp[1])
        return bad > 0.5

    lhs_contract = tuple(cdn.lhs_spec[1:])
    rhs_contract = (cdn.rhs_spec[1],) + tuple(cdn.rhs_spec[2:])
    # an input row is a pixel (its feature vector; each element when features are grouped,
    # so that a bad value spoils only its own group); a weight row, an output feature's kernel
    lhs_rows = (cdn.lhs_spec[1],) if a["feature_group_count"] == 1 else ()
    rows = {"lhs": lhs_rows, "rhs": rhs_contract}
    return _Geometry({"lhs": lhs_contract, "rhs": rhs_contract}, rows, float_op, reach)


def _is_zero(t) -> bool:
    return all(isinstance(z, SymbolicZero) for z in jax.tree.leaves(t))


def _instantiate(t):
    """A tangent pytree with its symbolic zeros made arrays (float0 for integer leaves)."""
    return jax.tree.map(
        lambda z: np.zeros(z.shape, z.dtype) if isinstance(z, SymbolicZero) else z, t
    )


def _float_operands(geometry: Callable[[dict, object, object], _Geometry]):
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
      (`_finite_rows`) and one select on the output; a dynamic range reduces
      within rows first, then across them.

    The wrapped op gains a keyword ``check_finite=False``. With True, a NaN or
    inf in a float operand (quantized here, or the activation of a weight-only
    op) is a `checkify` check: run ``checkify.checkify(f,
    errors=checkify.user_checks)`` to catch it. It is off by default because a
    jitted function with a check in it loses JAX's fast dispatch path (about
    0.2 ms per call measured on a batch-1 MLP, more than its whole int8 run).

    `geometry(arguments, lhs, rhs)` describes the op's axes (`_Geometry`).
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
    vals = {"lhs": _check_operand(a["lhs"], "lhs"), "rhs": _check_operand(a["rhs"], "rhs")}
    geo = geometry(a, vals["lhs"], vals["rhs"])
    specs, qps, ok = {}, {"lhs": None, "rhs": None}, {}
    for s in sides:
        specs[s] = a[f"{s}_spec"]
        ok[s] = _finite_rows(jax.lax.stop_gradient(vals[s]), geo.rows[s])
        qps[s] = _operand_qparams(
            vals[s], specs[s], a.get(f"{s}_qparams"), geo.contract[s], s, geo.rows[s], ok[s]
        )
        if check:
            _check_finite(vals[s], f"jq.ops.{fn.__name__} `{s}` quantized with `{s}_spec`")
    rest = {k: v for k, v in a.items() if k not in ("lhs", "rhs")}
    for s in sides:
        rest[f"{s}_spec"] = None
        if f"{s}_qparams" in rest:
            rest[f"{s}_qparams"] = None

    def quantized(s, x, qp):
        return _as_qarray_params(quantize(x, qp, specs[s])) if s in specs else x

    def impl(lhs, rhs, lqp, rqp):
        return fn(quantized("lhs", lhs, lqp), quantized("rhs", rhs, rqp), **rest)

    run = jax.custom_jvp(impl)

    @functools.partial(run.defjvp, symbolic_zeros=True)
    def run_jvp(primals, tangents):
        lhs, rhs, lqp, rqp = primals
        y = impl(lhs, rhs, lqp, rqp)
        x = {"lhs": lhs, "rhs": rhs}
        qp = {"lhs": lqp, "rhs": rqp}
        fq = {s: _fake_quant_with_mask(x[s], qp[s], specs[s]) for s in specs}

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
    for s in sides:
        b = geo.reach(s, ok[s])
        bad = b if bad is None else bad | b
    return jnp.where(bad, jnp.asarray(jnp.nan, out.dtype), out)


def _fake_quant_with_mask(x, qp: QParams, spec: QuantSpec):
    """``dequantize(quantize(x, qp, spec))`` in float32, and the mask where it does not clip."""
    xf = x.astype(jnp.float32)
    scale = _expand_blocks(qp.scale.astype(jnp.float32), x.shape)
    zp = (
        jnp.zeros((), jnp.float32)
        if qp.zero_point is None
        else _expand_blocks(qp.zero_point, x.shape).astype(jnp.float32)
    )
    return _fq_forward(xf, scale, zp, spec)


# ---------------------------------------------------------------------------------------
# public ops
# ---------------------------------------------------------------------------------------
@_float_operands(_dot_geometry)
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
    terms (see the module docstring). A float operand with a spec is quantized
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
    lhs = _check_operand(lhs, "lhs")
    rhs = _check_operand(rhs, "rhs")
    dn = _canonical_dn(dimension_numbers, lhs.shape, rhs.shape)
    (lc, rc), _ = dn
    lhs = _quantize_lhs(lhs, lhs_spec, lhs_qparams, lc)
    rhs = _quantize_rhs(rhs, rhs_spec, qp=rhs_qparams)
    lq, rq = isinstance(lhs, QArray), isinstance(rhs, QArray)
    if not lq and not rq:
        return jax.lax.dot_general(lhs, rhs, dn, precision, preferred_element_type)
    if lq:
        lhs = _expand_free_blocks(lhs, lc, "lhs")
    if rq:
        rhs = _expand_free_blocks(rhs, rc, "rhs")
    out_dtype = _out_dtype(preferred_element_type)
    if lq and rq:
        li, ri = lhs.fmt.is_integer, rhs.fmt.is_integer
        if li and ri:
            return _int_dot(lhs, rhs, dn, out_dtype)
        if not li and not ri:
            return _float_fmt_dot(lhs, rhs, dn, precision, out_dtype)
        raise ValueError(
            f"cannot combine an lhs in format {lhs.format!r} with an rhs in format "
            f"{rhs.format!r}: both must be integer formats or both float formats"
        )
    if rq:
        return _weight_only(lhs, rhs, dn, precision, out_dtype, q_is_rhs=True)
    return _weight_only(rhs, lhs, dn, precision, out_dtype, q_is_rhs=False)


# ---------------------------------------------------------------------------------------
# einsum
# ---------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=256)
def _parse_einsum(subscripts: str, lndim: int, rndim: int):
    """Parses a two-operand einsum into (dimension_numbers, output permutation)."""
    s = subscripts.replace(" ", "")
    if "->" in s:
        ins, out = s.split("->")
        explicit = True
    else:
        ins, out, explicit = s, None, False
    parts = ins.split(",")
    if len(parts) != 2:
        raise ValueError(f"einsum: expected two operands in {subscripts!r}, got {len(parts)}")
    letters = [c for c in string.ascii_letters if c not in s]
    n_ells = []
    for p, nd in zip(parts, (lndim, rndim), strict=True):
        n_ells.append(nd - (len(p) - 3) if "..." in p else 0)
        if n_ells[-1] < 0:
            raise ValueError(f"einsum: {p!r} has more axes than the operand's rank {nd}")
    ell = "".join(letters[: max(n_ells)])  # ellipsis axes align on the right
    terms = []
    for p, nd, n_ell in zip(parts, (lndim, rndim), n_ells, strict=True):
        if "..." in p:
            p = p.replace("...", ell[len(ell) - n_ell :])
        if len(p) != nd:
            raise ValueError(f"einsum: subscripts {p!r} do not match an operand of rank {nd}")
        if len(set(p)) != len(p):
            raise ValueError(f"einsum: repeated index in {p!r} (traces are not supported)")
        terms.append(p)
    lt, rt = terms
    if explicit:
        out = out.replace("...", ell)
    else:
        counts = {c: (lt + rt).count(c) for c in set(lt + rt)}
        out = ell + "".join(sorted(c for c, n in counts.items() if n == 1 and c not in ell))
    for c in out:
        if c not in lt and c not in rt:
            raise ValueError(f"einsum: output index {c!r} appears in no operand of {subscripts!r}")
    for c in lt + rt:
        if c not in out and not (c in lt and c in rt):
            raise ValueError(
                f"einsum: index {c!r} in {subscripts!r} is summed over in one operand only; "
                "reduce that operand first"
            )
    batch = [c for c in lt if c in rt and c in out]
    contract = [c for c in lt if c in rt and c not in out]
    dn = (
        (tuple(lt.index(c) for c in contract), tuple(rt.index(c) for c in contract)),
        (tuple(lt.index(c) for c in batch), tuple(rt.index(c) for c in batch)),
    )
    got = batch + [c for c in lt if c not in rt] + [c for c in rt if c not in lt]
    perm = tuple(got.index(c) for c in out)
    return dn, perm


def einsum(
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
    check_finite: bool = False,
) -> jax.Array:
    """Quantized two-operand einsum, lowered to `dot_general` (see there for modes).

    Indices in both operands and in the output are batch axes (scales on them
    are allowed, e.g. per-head scales in attention); indices in both operands
    but not in the output are contracted; the others are free.

    Args:
      subscripts: e.g. ``"bqhd,bkhd->bhqk"``; ``...`` is supported.
      lhs, rhs: float arrays or `QArray`s.
      precision, preferred_element_type, lhs_spec, lhs_qparams, rhs_spec,
        rhs_qparams, check_finite: as in `dot_general` (the signature matches
        what ``flax.nnx.Einsum`` passes).

    Returns:
      The result in the order the subscripts give.

    Raises:
      ValueError: malformed subscripts, an index summed in one operand only, or
        any error of `dot_general`.
    """
    if not isinstance(subscripts, str):
        raise TypeError(f"einsum: subscripts must be a string, got {type(subscripts).__name__}")
    lnd = lhs.ndim if isinstance(lhs, QArray) else jnp.ndim(lhs)
    rnd = rhs.ndim if isinstance(rhs, QArray) else jnp.ndim(rhs)
    dn, perm = _parse_einsum(subscripts, lnd, rnd)
    out = dot_general(
        lhs,
        rhs,
        dn,
        precision,
        preferred_element_type,
        lhs_spec=lhs_spec,
        lhs_qparams=lhs_qparams,
        rhs_spec=rhs_spec,
        rhs_qparams=rhs_qparams,
        check_finite=check_finite,
    )
    if perm != tuple(range(len(perm))):
        out = jnp.transpose(out, perm)
    return out


# ---------------------------------------------------------------------------------------
# convolution
# ---------------------------------------------------------------------------------------
def _conv_dn(lhs_ndim, dimension_numbers):
    return jax.lax.conv_dimension_numbers((1,) * lhs_ndim, (1,) * lhs_ndim, dimension_numbers)


@_float_operands(_conv_geometry)  # quantizes a float lhs / rhs with a spec (see there)
def conv_general_dilated(
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
) -> jax.Array:
    """Quantized `jax.lax.conv_general_dilated`: same signature and layout.

    Integer path: ``conv(q_l, q_r)`` with int32 accumulation, then the scales
    folded on the output. The lhs scale may vary only along the batch axis
    (per tensor or per example); the rhs scale only along the output-feature
    axis. Zero points::

        sum_win (q_l - Z_l)(q_r - Z_r) = conv(q_l, q_r) - Z_r conv(q_l, 1)
                                         - Z_l conv(valid, q_r) + Z_l Z_r conv(valid, 1)

    where `valid` is 1 on the real input and 0 on padding / dilation holes (so
    padding stands for a real 0, as in the float conv). The extra convs have a
    single input or output channel.

    Args:
      lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
        dimension_numbers, feature_group_count, batch_group_count, precision:
        as in `jax.lax.conv_general_dilated`.
      preferred_element_type: result dtype when floating; else float32.
      lhs_spec, lhs_qparams, rhs_spec: as in `dot_general`.

    Returns:
      The convolution in the layout `dimension_numbers` gives.

    Raises:
      ValueError: a scale on a contracted axis (input features, spatial axes),
        mismatched formats, or `batch_group_count > 1` with quantized operands.
    """
    lhs = _check_operand(lhs, "lhs")
    rhs = _check_operand(rhs, "rhs")
    cdn = _conv_dn(len(lhs.shape), dimension_numbers)
    lhs_contract = tuple(cdn.lhs_spec[1:])  # feature + spatial axes
    lhs = _quantize_lhs(lhs, lhs_spec, lhs_qparams, lhs_contract)
    rhs = _quantize_rhs(rhs, rhs_spec)
    kw = dict(
        window_strides=window_strides,
        padding=padding,
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=cdn,
        feature_group_count=feature_group_count,
        batch_group_count=batch_group_count,
    )
    lq, rq = isinstance(lhs, QArray), isinstance(rhs, QArray)
    if not lq and not rq:
        return jax.lax.conv_general_dilated(
            lhs, rhs, precision=precision, preferred_element_type=preferred_element_type, **kw
        )
    out_dtype = _out_dtype(preferred_element_type)
    if batch_group_count != 1:
        raise ValueError(
            "conv_general_dilated: batch_group_count > 1 is not supported with QArrays"
        )
    out_spec = cdn.out_spec

    def check(q, allowed, name):
        channel, baxis, _ = _param_layout(q, name)
        for a in channel + ((baxis,) if baxis is not None else ()):
            if a != allowed and q.shape[a] > 1:
                raise ValueError(
                    f"conv_general_dilated: `{name}` has a per-channel or per-block scale on axis "
                    f"{a}, which is contracted (or not supported) by the convolution; only axis "
                    f"{allowed} may carry a scale"
                )

    def fold(p, axis, target):
        nd = len(out_spec)
        shape = [1] * nd
        shape[target] = p.shape[axis]
        return jnp.reshape(jnp.moveaxis(p, axis, 0).reshape(p.shape[axis], -1)[:, 0], shape)

    if lq and rq:
        li, ri = lhs.fmt.is_integer, rhs.fmt.is_integer
        if li != ri:
            raise ValueError(
                f"cannot combine an lhs in format {lhs.format!r} with an rhs in format "
                f"{rhs.format!r}: both must be integer formats or both float formats"
            )
        check(lhs, cdn.lhs_spec[0], "lhs")
        check(rhs, cdn.rhs_spec[0], "rhs")
        scale = fold(lhs.scale.astype(jnp.float32), cdn.lhs_spec[0], out_spec[0]) * fold(
            rhs.scale.astype(jnp.float32), cdn.rhs_spec[0], out_spec[1]
        )
        if not li:
            acc = jax.lax.conv_general_dilated(
                lhs.value, rhs.value, precision=precision, preferred_element_type=jnp.float32, **kw
            )
            return (acc * scale).astype(out_dtype)
        vl, zl = _int_values(lhs)
        vr, zr = _int_values(rhs)
        # every platform: patches x weight through the exact integer dot (XLA:CPU's int8
        # convolution is a slow loop, and XLA:GPU rejects integer convolutions)
        # the input is shifted once, before the patches, to the lhs type of the form that
        # runs there: uint8 for the CPU's u8s8 form, int8 on GPU / TPU and other CPUs
        cpu_lhs = jnp.uint8 if _lowering.current().cpu_form == "u8s8" else jnp.int8
        acc = jax.lax.platform_dependent(
            vl,
            vr,
            cpu=lambda vl, vr: _conv_patches(vl, zl, vr, zr, cdn, kw, feature_group_count, cpu_lhs),
            default=lambda vl, vr: _conv_patches(
                vl, zl, vr, zr, cdn, kw, feature_group_count, jnp.int8
            ),
        )
        return (acc * scale).astype(out_dtype)
    # weight-only (or activation-only): dequantize the QArray in the float operand's dtype
    if rq:
        check(rhs, cdn.rhs_spec[0], "rhs")
        w = dequantize(rhs, jnp.float32).astype(lhs.dtype)
        x = lhs
    else:
        check(lhs, cdn.lhs_spec[0], "lhs")
        x = dequantize(lhs, jnp.float32).astype(rhs.dtype)
        w = rhs
    acc = jax.lax.conv_general_dilated(
        x, w, precision=precision, preferred_element_type=jnp.float32, **kw
    )
    return acc.astype(out_dtype)


def _conv_patches(vl, zl, vr, zr, cdn, kw, groups: int, want) -> jax.Array:
    """Integer conv as patches x weight through the exact integer dot (float32, output layout).

    The input is dilated (``lhs_dilation``) and padded with its zero point
    (holes and padding stand for a real 0, as in the float conv), the window
    offsets are gathered by strided slices into ``(N, out..., taps * C)`` and
    contracted with the weight reshaped to ``(taps * C, O)``: one `_int_core`
    dot, zero-point terms and long-window splits included. With feature groups
    the group is a batch axis of that dot: ``(G, N, out..., taps * C/G) x (G,
    taps * C/G, O/G)``. An 8-bit input is shifted once, before the patches, to
    `want` (the lhs type of the dot's form on this platform), not per tap.
    """
    lspec, rspec, ospec = cdn
    nsp = len(lspec) - 2
    perm = (lspec[0], *lspec[2:], lspec[1])
    x = jnp.transpose(vl, perm)  # N, spatial..., C
    w = jnp.transpose(vr, (*rspec[2:], rspec[1], rspec[0]))  # spatial..., C/G, O
    zl = None if zl is None else jnp.transpose(zl.astype(jnp.int32), perm)  # (N | 1, 1, ..., 1)
    if x.dtype in (jnp.int8, jnp.uint8) and x.dtype != want:
        x = _mixed_dot._flip(x, want)  # x' = x + 128 (int8 -> uint8) or x - 128
        shift = 128 if want == jnp.uint8 else -128
        zl = jnp.full((1,) * x.ndim, shift, jnp.int32) if zl is None else zl + shift
    ksize = w.shape[:nsp]
    strides = tuple(kw["window_strides"])
    rdil = tuple(kw["rhs_dilation"] or (1,) * nsp)
    ldil = tuple(kw["lhs_dilation"] or (1,) * nsp)
    eff = tuple((k - 1) * d + 1 for k, d in zip(ksize, rdil, strict=True))
    pads = kw["padding"]
    if isinstance(pads, str):  # as jax.lax.conv_general_dilated resolves it
        pads = jax.lax.padtype_to_pads(x.shape[1:-1], eff, strides, pads)
    cfg = [(0, 0, 0)] + [
        (lo, hi, d - 1) for (lo, hi), d in zip(pads, ldil, strict=True)
    ] + [(0, 0, 0)]
    if zl is None or zl.size == 1:
        padval = jnp.zeros((), x.dtype) if zl is None else zl.reshape(()).astype(x.dtype)
        x = jax.lax.pad(x, padval, cfg)
    else:  # a zero point per example: pad with 0, then put each example's zero point in
        real = jax.lax.pad(jnp.ones((1,) + x.shape[1:-1] + (1,), jnp.bool_), False, cfg)
        x = jnp.where(real, jax.lax.pad(x, jnp.zeros((), x.dtype), cfg), zl.astype(x.dtype))
    # quantize once: without the barrier XLA re-quantizes the float input per tap
    x = jax.lax.optimization_barrier(x)
    out_sp = tuple((x.shape[1 + i] - eff[i]) // strides[i] + 1 for i in range(nsp))
    taps = []
    for offs in np.ndindex(*ksize):
        start = (0,) + tuple(o * d for o, d in zip(offs, rdil, strict=True)) + (0,)
        limit = (
            (x.shape[0],)
            + tuple(
                st + (n - 1) * s + 1 for st, n, s in zip(start[1:-1], out_sp, strides, strict=True)
            )
            + (x.shape[-1],)
        )
        taps.append(jax.lax.slice(x, start, limit, (1,) + strides + (1,)))
    patches = jnp.concatenate(taps, axis=-1) if len(taps) > 1 else taps[0]  # (..., taps * C)
    n_out = w.shape[-1]
    zl2 = None if zl is None else zl.reshape(zl.shape[:1] + (1,) * (patches.ndim - 1))
    if groups == 1:
        w2 = w.reshape(-1, n_out)
        dn = (((patches.ndim - 1,), (0,)), ((), ()))
        zr2 = None if zr is None else zr.reshape(1, -1)
        acc = _int_core(patches, zl2, w2, zr2, dn).astype(jnp.float32)  # N, out..., O
    else:
        cg, og, ntaps = x.shape[-1] // groups, n_out // groups, len(taps)
        p = patches.reshape(patches.shape[:-1] + (ntaps, groups, cg))
        p = jnp.moveaxis(p, -2, 0).reshape((groups,) + patches.shape[:-1] + (ntaps * cg,))
        w2 = w.reshape(ntaps, cg, groups, og).transpose(2, 0, 1, 3).reshape(groups, ntaps * cg, og)
        dn = (((p.ndim - 1,), (1,)), ((0,), (0,)))
        zl2 = None if zl2 is None else zl2[None]
        zr2 = None
        if zr is not None:
            zr2 = zr.reshape(groups, 1, og) if zr.size > 1 else zr.reshape(1, 1, 1)
        acc = _int_core(p, zl2, w2, zr2, dn).astype(jnp.float32)  # G, N, out..., O/G
        acc = jnp.moveaxis(acc, 0, -2).reshape(acc.shape[1:-1] + (n_out,))
    # to the requested output layout
    cur = (ospec[0], *ospec[2:], ospec[1])
    return jnp.transpose(acc, np.argsort(cur))


def _qat(float_op, int_op, lhs, rhs, lhs_spec, lhs_qparams, rhs_spec, rhs_qparams, int_forward):
    """Fake-quant forward with STE gradients, or a real integer forward with the same VJP."""
    for spec, name in ((lhs_spec, "lhs_spec"), (rhs_spec, "rhs_spec")):
        if spec is not None and not isinstance(spec, QuantSpec):
            raise TypeError(f"{name} must be a jq.QuantSpec, got {type(spec).__name__}")
    if lhs_qparams is not None and lhs_spec is None:
        raise ValueError("lhs_qparams was given without lhs_spec; pass the QuantSpec too")
    if rhs_qparams is not None and rhs_spec is None:
        raise ValueError("rhs_qparams was given without rhs_spec; pass the QuantSpec too")
    lhs = _check_operand(lhs, "lhs")
    rhs = _check_operand(rhs, "rhs")
    if isinstance(lhs, QArray) or isinstance(rhs, QArray):
        raise TypeError("QAT ops take float operands (they are quantized inside the op)")

    def fq(x, qp, spec):
        return x if spec is None else fake_quant(x, qp, spec)

    def fq_op(lhs, rhs, lqp, rqp):
        return float_op(fq(lhs, lqp, lhs_spec), fq(rhs, rqp, rhs_spec))

    if not int_forward:
        return fq_op(lhs, rhs, lhs_qparams, rhs_qparams)
    if rhs_spec is None or not rhs_spec.fmt.is_integer:
        raise ValueError("int_forward=True needs an integer rhs_spec (the weight format)")
    out_dtype = jax.eval_shape(fq_op, lhs, rhs, lhs_qparams, rhs_qparams).dtype

    @jax.custom_vjp
    def op(lhs, rhs, lqp, rqp):
        rq = _as_qarray_params(quantize(rhs, rqp, rhs_spec))
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

    With ``int_forward=True`` the forward pass is the real integer op
    (`dot_general` on the quantized operands, int32 accumulation) and the
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
      int_forward: run the integer op in the forward pass.

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
        float_op, int_op, lhs, rhs, lhs_spec, lhs_qparams, rhs_spec, rhs_qparams, int_forward
    )


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
    dn, perm = _parse_einsum(subscripts, lnd, rnd)

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
        float_op, int_op, lhs, rhs, lhs_spec, lhs_qparams, rhs_spec, rhs_qparams, int_forward
    )


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

    return _qat(
        float_op, int_op, lhs, rhs, lhs_spec, lhs_qparams, rhs_spec, rhs_qparams, int_forward
    )
