"""Integer kernels: exact integer dots of quantized operands, with zero points and blocks.

With ``x = S_l * (q_l - Z_l)`` and ``w = S_r * (q_r - Z_r)``::

    sum_k x[m, k] w[k, n] = S_l S_r * ( sum_k q_l q_r              (one int32 dot)
                                       - Z_r * sum_k q_l            (lhs row sums)
                                       - Z_l * sum_k q_r            (weight column sums)
                                       + K * Z_l * Z_r )

The scales must lie on non-contracting axes (they are folded on the output);
scales per block along the contracting axis split the contraction into blocks
(one int32 partial dot per block, rescaled and summed in float32).

Lowering. Every integer product is an 8-bit dot emitted by the primitive in
`jq.ops.int8_dot`: on CPU a mixed ``u8 x s8 -> s32`` `stablehlo.dot_general`
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
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jq.ops._dims import free_axes, to_output_layout
from jq.ops._operands import check_scales
from jq.ops.int8_dot import flip_top_bit, int8_dot_general, rhs_sums_of, sums_to_out
from jq.quantize import QArray

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


def _k_of(shape, axes) -> int:
    return int(np.prod([shape[a] for a in axes])) if axes else 1


def _sums_to_out(s, dn, lndim):
    """(rhs batch..., rhs free...) sums -> broadcastable against the dot's output."""
    (lc, _), (lb, _) = dn
    return sums_to_out(s, len(lb), lndim - len(lc) - len(lb))


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
            out, s = int8_dot_general(a, b, dn, rhs_sums=True)
            return out, _sums_to_out(s, dn, a.ndim)
        return int8_dot_general(a, b, dn), None
    # merge the contracting axes into one trailing axis, zero-pad to whole chunks
    lfree, rfree = free_axes(a.ndim, lc, lb), free_axes(b.ndim, rc, rb)
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
    part = int8_dot_general(a2, b2, dn2)
    out = jnp.sum(part.astype(jnp.float32), axis=0)
    sums = None
    if want_sums:  # |sum_k b| <= 128 K: int32 is exact for K < 2**24
        sums = _sums_to_out(rhs_sums_of(b, dn), dn, a.ndim)
    return out, sums


def _lhs_sums(a, dn, rndim):
    """``sum_k a`` in the output layout (batch..., lhs free..., 1 for rhs free)."""
    (lc, rc), (lb, rb) = dn
    k = _k_of(a.shape, lc)
    dt = jnp.int32 if _DTYPE_ABSMAX[np.dtype(a.dtype)] * k <= _INT32_MAX else jnp.float32
    s = jnp.sum(a.astype(dt), axis=tuple(lc), keepdims=True)
    nrf = rndim - len(rc) - len(rb)
    lfree = free_axes(a.ndim, lc, lb)
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
            _sums_to_out(rhs_sums_of(vr.astype(jnp.float32), dn), dn, vl.ndim)
            if want_sums
            else None
        )
        return out, sums
    if vr.dtype == jnp.uint8:
        s = flip_top_bit(vr, jnp.int8)  # vr = s + 128
        out, sums = _int_raw_dot(vl, s, dn, want_sums)
        k = _k_of(vl.shape, lc)
        out = out.astype(jnp.float32) + 128.0 * _lhs_sums(vl, dn, vr.ndim).astype(jnp.float32)
        if sums is not None:
            sums = sums + 128 * k
        return out, sums
    return _dot8_chunked(vl, vr, dn, want_sums)


def int_values(q: QArray):
    """Logical integer values (int4 unpacked) and the int32 zero point (or None)."""
    v = q.int_value()
    if v.dtype not in (jnp.int8, jnp.uint8, jnp.int16):
        raise ValueError(f"no integer dot for QArray format {q.format!r} (values {v.dtype})")
    zp = None if q.zero_point is None else q.zero_point.astype(jnp.int32)
    return v, zp


def int_core(vl, zl, vr, zr, dn) -> jax.Array:
    """``sum_k (vl - zl)(vr - zr)`` in the output layout (int32 or float32).

    ``= sum_k vl vr - Z_r sum_k vl - Z_l sum_k (vr - Z_r)``. The weight sums come
    out of the same dot (`jq.ops.int8_dot`); with no split and a result bounded
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
        zro = to_output_layout(zr, "rhs", dn, vl.shape, vr.shape).astype(dt)
        acc = acc - zro * _lhs_sums(vl, dn, vr.ndim).astype(dt)
    if zl is not None:
        zlo = to_output_layout(zl, "lhs", dn, vl.shape, vr.shape).astype(dt)
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


# The largest lhs (rows x blocks) that `_rhs_blocks_as_rows` handles: the block-masked lhs
# multiplies the dot's work by the number of blocks, which pays while the dot is a
# matrix-vector product bound by reading the weight (LLM decoding).
_BLOCK_ROWS_MAX = 512


def _rhs_blocks_as_rows(vl, vr, sl, sr, dn, ra: int, bs: int):
    """A weight blocked along its one contracting axis, as one plain dot of block-masked rows.

    ``sum_k x[m, k] w[k, n]`` with one weight scale per block of `bs` rows of K:
    lhs row m becomes nb rows ``x[m] * [k in block b]`` (zeros elsewhere), and one
    int32 dot against the whole weight gives every block's partial sum at once
    (``(M * nb, N)``), which are scaled per block and summed. Exact as the
    block-split dot, without a batched integer dot (XLA:CPU runs those with a slow
    loop, 0.04-0.13x float32 at GPT-2 widths). Symmetric operands, no batch axes,
    one contracting axis and ``M * nb <= _BLOCK_ROWS_MAX``; otherwise None.
    """
    (lc, rc), (lb, rb) = dn
    if lb or rb or len(lc) != 1 or len(rc) != 1:
        return None
    (la,) = lc
    k = vl.shape[la]
    nb = k // bs
    lfree_shape = tuple(d for i, d in enumerate(vl.shape) if i != la)
    m = int(np.prod(lfree_shape))
    if m * nb > _BLOCK_ROWS_MAX:
        return None
    x = jnp.moveaxis(vl, la, -1).reshape(m, k)
    mask = (np.arange(k) // bs)[None, :] == np.arange(nb)[:, None]  # (nb, K), a constant
    xb = jnp.where(mask[None], x[:, None, :], jnp.zeros((), x.dtype)).reshape(m * nb, k)
    acc = int_core(xb, None, vr, None, (((1,), (ra,)), ((), ())))  # (M * nb, rhs free...)
    rfree_shape = acc.shape[1:]
    acc = acc.reshape((m, nb) + rfree_shape).astype(jnp.float32)
    sr_b = jnp.moveaxis(sr, ra, 0)  # (nb, rhs free...)
    out = jnp.sum(acc * sr_b[None], axis=1)  # (M, rhs free...)
    sl_m = jnp.broadcast_to(sl, vl.shape[:la] + (1,) + vl.shape[la + 1 :])
    sl_m = jnp.moveaxis(sl_m, la, -1).reshape((m,) + (1,) * len(rfree_shape))
    return (out * sl_m).reshape(lfree_shape + rfree_shape)


def int_dot(ql: QArray, qr: QArray, dn, out_dtype) -> jax.Array:
    (lc, rc), _ = dn
    lbax, lbs = check_scales(ql, lc, "lhs")
    rbax, rbs = check_scales(qr, rc, "rhs")
    vl, zl = int_values(ql)
    vr, zr = int_values(qr)
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
        if r_blk and not l_blk and zl is None and zr is None:
            fast = _rhs_blocks_as_rows(vl, vr, sl, sr, dn, ra, bs)
            if fast is not None:
                return fast.astype(out_dtype)
        vl, (sl, zl) = _split_blocks(vl, [sl, zl], la, bs)
        vr, (sr, zr) = _split_blocks(vr, [sr, zr], ra, bs)
        dn = _block_dn(dn, la, ra)
        acc = int_core(vl, zl, vr, zr, dn).astype(jnp.float32)
        acc = acc * to_output_layout(sl, "lhs", dn, vl.shape, vr.shape)
        acc = acc * to_output_layout(sr, "rhs", dn, vl.shape, vr.shape)
        return jnp.sum(acc, axis=0).astype(out_dtype)
    acc = int_core(vl, zl, vr, zr, dn).astype(jnp.float32)
    scale = to_output_layout(sl, "lhs", dn, vl.shape, vr.shape) * to_output_layout(
        sr, "rhs", dn, vl.shape, vr.shape
    )
    return (acc * scale).astype(out_dtype)
