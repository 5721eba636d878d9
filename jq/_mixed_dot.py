"""A small primitive for 8-bit integer dots that reach XLA:CPU's VNNI kernels.

`jax.lax.dot_general` on a uint8 and an int8 operand converts both to int32
before XLA sees them, so XLA:CPU runs a plain s32 dot (slower than float32).
XLA:CPU's fast int8 kernels (the YNNPACK / oneDNN library calls, built on the
AVX-512 VNNI instruction ``vpdpbusd``) take only the mixed form
``u8 x s8 -> s32``. `int8_dot_general` is a primitive that emits that mixed
`stablehlo.dot_general` itself.

Semantics, on every platform: ``int8_dot_general(a, b, dn) == sum_k a * b``
exactly, as int32, for ``a`` int8 or uint8 and ``b`` int8, provided
``max|a| * max|b| * K < 2**31`` (the caller splits longer contractions).
Lowerings:

* cpu: ``u8 x s8 -> s32`` dot; an int8 ``a`` is shifted to uint8 first
  (``a + 128``, a bit flip) and ``128 * sum_k b`` is subtracted after.
* other platforms (cuda, rocm, tpu): ``s8 x s8 -> s32`` dot, the form their
  integer GEMMs take; a uint8 ``a`` is shifted to int8 and ``128 * sum_k b``
  added back.

This module is the only place in jq that relies on JAX's lowering API
(``jax.extend.core.Primitive``, ``jax.interpreters.mlir``,
``jax.interpreters.batching``, ``jax.extend.mlir.dialects.stablehlo``), which
is not covered by JAX's stability guarantees. Tested with jax 0.10.2 (jaxlib
0.10.2). If the API is missing, `AVAILABLE` is False, a warning is issued once,
and `int8_dot_general` falls back to ``jax.lax.dot_general(...,
preferred_element_type=int32)`` (correct but slower on CPU).
"""

from __future__ import annotations

import functools
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["AVAILABLE", "TESTED_JAX_VERSIONS", "int8_dot_general"]

TESTED_JAX_VERSIONS = ("0.10.2",)

try:  # the private-ish lowering API; everything that can break is in this block
    from jax.extend.core import Primitive
    from jax.extend.mlir.dialects import stablehlo as _hlo
    from jax.interpreters import batching as _batching
    from jax.interpreters import mlir as _mlir

    _ShapedArray = jax.core.ShapedArray
    AVAILABLE = True
except Exception as _e:  # pragma: no cover - depends on the installed JAX
    AVAILABLE = False
    _IMPORT_ERROR = repr(_e)


def _out_shape(a_shape, b_shape, dn):
    (lc, rc), (lb, rb) = dn
    lfree = [d for i, d in enumerate(a_shape) if i not in lc and i not in lb]
    rfree = [d for i, d in enumerate(b_shape) if i not in rc and i not in rb]
    return tuple(a_shape[i] for i in lb) + tuple(lfree) + tuple(rfree)


def _sums_shape(b_shape, dn):
    (_, rc), (_, rb) = dn
    rfree = [d for i, d in enumerate(b_shape) if i not in rc and i not in rb]
    return tuple(b_shape[i] for i in rb) + tuple(rfree)


def _check_dtypes(a, b):
    if a.dtype not in (np.int8, np.uint8) or b.dtype != np.int8:
        raise TypeError(
            f"int8_dot_general: needs an int8/uint8 lhs and an int8 rhs, got {a.dtype} x {b.dtype}"
        )


def _rhs_sums(b, dn):
    """``sum_k b`` as int32, shape (rhs batch..., rhs free...)."""
    (_, rc), (_, rb) = dn
    s = jnp.sum(b.astype(jnp.int32), axis=tuple(rc))
    kept = [i for i in range(b.ndim) if i not in rc]
    order = [kept.index(i) for i in rb] + [kept.index(i) for i in kept if i not in rb]
    return jnp.transpose(s, order)


def _sums_to_out(s, n_batch, n_lfree):
    return s.reshape(s.shape[:n_batch] + (1,) * n_lfree + s.shape[n_batch:])


def _flip(a, dtype):
    """int8 <-> uint8 by adding 128 (mod 256): a flip of the top bit."""
    return jax.lax.bitcast_convert_type(
        jax.lax.bitcast_convert_type(a, jnp.uint8) ^ jnp.uint8(0x80), dtype
    )


def _reference(a, b, dn, rhs_sums):
    """The plain path: both operands converted to int32 by `jax.lax.dot_general`."""
    out = jax.lax.dot_general(a, b, dn, preferred_element_type=jnp.int32)
    return (out, _rhs_sums(b, dn)) if rhs_sums else (out,)


if AVAILABLE:
    # `_raw_p` emits one stablehlo.dot_general on its operands as they are (any
    # mix of 8-bit types, int32 result); it appears only inside the lowerings below.
    _raw_p = Primitive("jq_raw_int8_dot")

    def _raw_abstract(a, b, *, dimension_numbers):
        return _ShapedArray(_out_shape(a.shape, b.shape, dimension_numbers), np.dtype(np.int32))

    _raw_p.def_abstract_eval(_raw_abstract)

    def _raw_lowering(ctx, a, b, *, dimension_numbers):
        (lc, rc), (lb, rb) = dimension_numbers
        dnums = _hlo.DotDimensionNumbers.get(
            lhs_batching_dimensions=list(lb),
            rhs_batching_dimensions=list(rb),
            lhs_contracting_dimensions=list(lc),
            rhs_contracting_dimensions=list(rc),
        )
        (aval_out,) = ctx.avals_out
        return [_hlo.dot_general(_mlir.aval_to_ir_type(ctx.module_context, aval_out), a, b, dnums)]

    _mlir.register_lowering(_raw_p, _raw_lowering)

    int8_dot_p = Primitive("jq_int8_dot_general")
    int8_dot_p.multiple_results = True

    def _abstract(a, b, *, dimension_numbers, rhs_sums):
        _check_dtypes(a, b)
        out = _ShapedArray(_out_shape(a.shape, b.shape, dimension_numbers), np.dtype(np.int32))
        if not rhs_sums:
            return [out]
        return [out, _ShapedArray(_sums_shape(b.shape, dimension_numbers), np.dtype(np.int32))]

    int8_dot_p.def_abstract_eval(_abstract)

    def _cpu_form(a, b, *, dimension_numbers, rhs_sums):
        """u8 x s8 -> s32, the VNNI form. A row of ones yields ``sum_k b``.

        The lhs free axes are merged into one axis M (a copy only when they are
        not already contiguous). A row of ones is appended when the lhs is the
        smaller operand (and always when M = 1, so M >= 2: an M=1 integer dot
        would take XLA:CPU's slow generic loop); for a large lhs (M > N, e.g.
        convolution patches) the sums come from a reduction over the weight.
        """
        (lc, rc), (lb, rb) = dimension_numbers
        lfree = tuple(i for i in range(a.ndim) if i not in lc and i not in lb)
        u = a if a.dtype == jnp.uint8 else _flip(a, jnp.uint8)
        nb, nc = len(lb), len(lc)
        # lhs as (batch..., M, contracting...)
        u = jnp.transpose(u, lb + lfree + lc)
        free_shape = tuple(a.shape[i] for i in lfree)
        m = math.prod(free_shape)  # a symbolic dimension under jax.export shape polymorphism
        # a symbolic M may be 1 at run time: keep the extra row then too
        need_sums = rhs_sums or a.dtype == jnp.int8 or not isinstance(m, int) or m == 1
        u = u.reshape(u.shape[:nb] + (m,) + u.shape[nb + len(lfree) :])
        dn = ((tuple(range(nb + 1, nb + 1 + nc)), rc), (tuple(range(nb)), rb))
        n = math.prod(d for i, d in enumerate(b.shape) if i not in rc and i not in rb)
        # Weight sums from a row of ones appended to a small lhs (M <= N; the copy is
        # cheap, and XLA:CPU's column reduction of an int8 matrix costs more than a
        # small-M dot), or from a plain reduction when the lhs is the larger operand.
        # (a symbolic M, under jax.export shape polymorphism, always gets the row)
        append = need_sums and (not (isinstance(m, int) and isinstance(n, int)) or m <= max(n, 1))
        if append:
            ones = jnp.ones(u.shape[:nb] + (1,) + u.shape[nb + 1 :], jnp.uint8)
            u = jnp.concatenate([u, ones], axis=nb)
        out = _raw_p.bind(u, b, dimension_numbers=dn)  # (batch..., M[+1], rhs free...)
        if append:
            sums = jax.lax.index_in_dim(out, m, axis=nb, keepdims=False)
            out = jax.lax.slice_in_dim(out, 0, m, axis=nb)
        elif need_sums:  # M > N: the reduction over the weight is small next to the dot
            sums = _rhs_sums(b, dimension_numbers)
        if a.dtype == jnp.int8:  # a = u - 128
            out = out - 128 * jnp.expand_dims(sums, nb)
        out = out.reshape(out.shape[:nb] + free_shape + out.shape[nb + 1 :])
        return [out, sums] if rhs_sums else [out]

    def _signed_form(a, b, *, dimension_numbers, rhs_sums):
        """s8 x s8 -> s32, the form GPU and TPU integer GEMMs take."""
        dn = dimension_numbers
        (lc, _), (lb, _) = dn
        s = a if a.dtype == jnp.int8 else _flip(a, jnp.int8)
        out = _raw_p.bind(s, b, dimension_numbers=dn)
        need_sums = rhs_sums or a.dtype == jnp.uint8
        if need_sums:
            sums = _rhs_sums(b, dn)
            if a.dtype == jnp.uint8:  # a = s + 128
                out = out + 128 * _sums_to_out(sums, len(lb), a.ndim - len(lb) - len(lc))
        return [out, sums] if rhs_sums else [out]

    @functools.cache
    def _jitted(dimension_numbers, rhs_sums):
        return jax.jit(
            lambda a, b: int8_dot_p.bind(
                a, b, dimension_numbers=dimension_numbers, rhs_sums=rhs_sums
            )
        )

    def _impl(a, b, *, dimension_numbers, rhs_sums):
        return _jitted(dimension_numbers, rhs_sums)(a, b)

    int8_dot_p.def_impl(_impl)
    _mlir.register_lowering(int8_dot_p, _mlir.lower_fun(_signed_form, multiple_results=True))
    _mlir.register_lowering(
        int8_dot_p, _mlir.lower_fun(_cpu_form, multiple_results=True), platform="cpu"
    )

    def _batch_rule(args, dims, *, dimension_numbers, rhs_sums):
        (a, b), (ad, bd) = args, dims
        (lc, rc), (lb, rb) = dimension_numbers
        nb = len(lb)
        n_lfree = a.ndim - len(lc) - nb - (ad is not None)
        if ad is not None and bd is not None:
            # both mapped: the mapped axis is a new leading batch axis
            a = jnp.moveaxis(a, ad, 0)
            b = jnp.moveaxis(b, bd, 0)

            def sh(t):
                return tuple(i + 1 for i in t)

            dn = ((sh(lc), sh(rc)), ((0,) + sh(lb), (0,) + sh(rb)))
            outs = int8_dot_p.bind(a, b, dimension_numbers=dn, rhs_sums=rhs_sums)
            return outs, [0] * len(outs)
        if ad is not None:
            # a mapped only: its mapped axis becomes the last lhs free axis
            a = jnp.moveaxis(a, ad, a.ndim - 1)
            outs = int8_dot_p.bind(a, b, dimension_numbers=dimension_numbers, rhs_sums=rhs_sums)
            return outs, [nb + n_lfree] + [None] * (len(outs) - 1)
        # b mapped only: its mapped axis becomes the last rhs free axis
        b = jnp.moveaxis(b, bd, b.ndim - 1)
        n_rfree = b.ndim - 1 - len(rc) - nb
        outs = int8_dot_p.bind(a, b, dimension_numbers=dimension_numbers, rhs_sums=rhs_sums)
        return outs, [nb + n_lfree + n_rfree] + [nb + n_rfree] * (len(outs) - 1)

    _batching.primitive_batchers[int8_dot_p] = _batch_rule


_warned = False


def int8_dot_general(a: jax.Array, b: jax.Array, dimension_numbers, rhs_sums: bool = False):
    """Exact ``sum_k a * b`` as int32 for an int8 / uint8 `a` and an int8 `b`.

    Args:
      a: int8 or uint8 array.
      b: int8 array.
      dimension_numbers: ``((lc, rc), (lb, rb))`` with non-negative axes, as in
        `jax.lax.dot_general`.
      rhs_sums: also return ``sum_k b`` (int32, shape ``(rhs batch..., rhs
        free...)``), the term that zero-point corrections need. On CPU it comes
        from one extra lhs row of ones in the same dot, which is far cheaper
        than XLA:CPU's column reduction of an int8 matrix.

    Returns:
      The int32 dot in `jax.lax.dot_general`'s layout, or ``(dot, sums)``. Exact
      when ``max|a| * max|b| * K < 2**31`` (K = product of contracting sizes);
      callers split longer contractions.

    Raises:
      TypeError: other dtypes.
    """
    global _warned
    (lc, rc), (lb, rb) = dimension_numbers
    dn = ((tuple(lc), tuple(rc)), (tuple(lb), tuple(rb)))
    _check_dtypes(a, b)
    if AVAILABLE:
        outs = int8_dot_p.bind(a, b, dimension_numbers=dn, rhs_sums=bool(rhs_sums))
    else:
        if not _warned:
            warnings.warn(
                f"jq: JAX's lowering API is unavailable ({_IMPORT_ERROR}); int8 dots use "
                "jax.lax.dot_general, which is correct but slower on CPU. Tested JAX versions: "
                f"{', '.join(TESTED_JAX_VERSIONS)}.",
                RuntimeWarning,
                stacklevel=2,
            )
            _warned = True
        outs = _reference(a, b, dn, rhs_sums)
    return tuple(outs) if rhs_sums else outs[0]
