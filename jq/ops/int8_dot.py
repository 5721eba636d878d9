"""The primitive behind every 8-bit integer dot in jq, and its per-backend forms.

``int8_dot_general(a, b, dn) == sum_k a * b`` exactly, as int32, for ``a``
int8 or uint8 and ``b`` int8, provided ``max|a| * max|b| * K < 2**31`` (the
caller, `jq.ops`, splits longer contractions). The *form* that XLA sees is
chosen by `jq.lowering` when the dot is traced and carried as parameters of
the primitive:

* ``u8s8`` (x86 with VNNI / AMX): a mixed ``u8 x s8 -> s32`` dot, which
  `jax.lax.dot_general` cannot express (it widens mixed operands to s32, and
  XLA:CPU's VNNI kernels take only the mixed form). An int8 ``a`` is shifted to
  uint8 (a top-bit flip, ``a + 128``) and ``128 * sum_k b`` subtracted.
* ``s8s8`` (other CPUs): ``s8 x s8 -> s32``; a uint8 ``a`` is shifted to int8
  and ``128 * sum_k b`` added.
* ``s8s8_padk`` (every non-CPU platform): ``s8 x s8 -> s32`` with the
  contraction zero-padded to a multiple of ``k_multiple`` and free dimensions
  below 16 zero-padded (the result is sliced back). Zeros add nothing, so the
  form is exact; it avoids XLA:GPU's wrong results at K = 3 and its tile
  failure on tiny dots.

In the two CPU forms the lhs free axes are merged into one axis M, and a row of
ones is appended to the lhs when the weight sums ``sum_k b`` are needed and the
lhs is the smaller operand, and always when M = 1: an M = 1 integer dot takes
XLA:CPU's slow generic loop, and the extra row costs less than XLA:CPU's column
reduction of an int8 matrix.

Registration: the CPU lowering runs the traced CPU form; every other platform
runs ``s8s8_padk``. So one `jax.export` to several platforms keeps each
platform's own form in its branch.

This module is the only place in jq that relies on JAX's lowering API
(``jax.extend.core.Primitive``, ``jax.interpreters.mlir``,
``jax.interpreters.batching``, ``jax.extend.mlir.dialects.stablehlo``), which
is not covered by JAX's stability guarantees; see `TESTED_JAX_VERSIONS`. If the
API is missing, `AVAILABLE` is False, a warning is issued once, and the dot
falls back to `jax.lax.dot_general` in the ``s8s8`` form on CPU and the
``s8s8_padk`` form elsewhere (`jax.lax.platform_dependent`): still exact,
slower on VNNI CPUs.
"""

from __future__ import annotations

import functools
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from jq import lowering

__all__ = ["AVAILABLE", "SUPPORTED_JAX", "TESTED_JAX_VERSIONS", "int8_dot_general"]

# The range pyproject.toml admits, and the versions the whole suite passed with
# (where: README "JAX versions"). 0.10.2: x86 CPUs with AVX-512 VNNI, in CI.
# 0.11.2 ran the previous release on an NVIDIA H200 (its failures are fixed and
# tested on CPU, not yet re-run there); 0.12 has not been run.
SUPPORTED_JAX = (">=", (0, 10, 2), "<", (0, 13))
TESTED_JAX_VERSIONS = ("0.10.2",)

try:  # the private-ish lowering API; everything that can break is in this block
    from jax.extend.core import Primitive
    from jax.extend.mlir.dialects import stablehlo as _hlo
    from jax.interpreters import batching as _batching
    from jax.interpreters import mlir as _mlir

    _ShapedArray = getattr(jax.core, "ShapedArray", None)
    if _ShapedArray is None:  # pragma: no cover - newer JAX
        from jax._src.core import ShapedArray as _ShapedArray
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


def rhs_sums_of(b, dn):
    """``sum_k b`` as int32, shape (rhs batch..., rhs free...)."""
    (_, rc), (_, rb) = dn
    s = jnp.sum(b.astype(jnp.int32), axis=tuple(rc))
    kept = [i for i in range(b.ndim) if i not in rc]
    order = [kept.index(i) for i in rb] + [kept.index(i) for i in kept if i not in rb]
    return jnp.transpose(s, order)


def sums_to_out(s, n_batch, n_lfree):
    """``(batch..., rhs free...)`` sums -> broadcastable against the dot's output."""
    return s.reshape(s.shape[:n_batch] + (1,) * n_lfree + s.shape[n_batch:])


def flip_top_bit(a, dtype):
    """int8 <-> uint8 by adding 128 (mod 256): a flip of the top bit."""
    return jax.lax.bitcast_convert_type(
        jax.lax.bitcast_convert_type(a, jnp.uint8) ^ jnp.uint8(0x80), dtype
    )


def _lax_dot(a, b, dimension_numbers):
    return jax.lax.dot_general(a, b, dimension_numbers, preferred_element_type=jnp.int32)


def _is_static(*dims) -> bool:
    return all(isinstance(d, int) for d in dims)


# ---------------------------------------------------------------------------------------
# the forms: pure functions of (a, b), given the raw dot to emit
# ---------------------------------------------------------------------------------------
def _cpu_form(a, b, dn, rhs_sums, *, signed: bool, dot):
    """The two CPU forms: ``s8 x s8`` (signed) or ``u8 x s8``; M >= 2; sums from a row of ones."""
    (lc, rc), (lb, rb) = dn
    target = jnp.int8 if signed else jnp.uint8
    lfree = tuple(i for i in range(a.ndim) if i not in lc and i not in lb)
    shifted = a.dtype != target  # uint8 -> int8 (a = s + 128) or int8 -> uint8 (a = u - 128)
    u = flip_top_bit(a, target) if shifted else a
    nb, nc = len(lb), len(lc)
    u = jnp.transpose(u, lb + lfree + lc)  # (batch..., free..., contracting...)
    free_shape = tuple(a.shape[i] for i in lfree)
    m = math.prod(free_shape)  # a symbolic dimension under jax.export shape polymorphism
    u = u.reshape(u.shape[:nb] + (m,) + u.shape[nb + len(lfree) :])
    dn2 = ((tuple(range(nb + 1, nb + 1 + nc)), rc), (tuple(range(nb)), rb))
    n = math.prod(d for i, d in enumerate(b.shape) if i not in rc and i not in rb)
    # a symbolic M may be 1 at run time: keep the extra row then too
    need_sums = rhs_sums or shifted
    pad_m = not _is_static(m) or m == 1
    append = (need_sums or pad_m) and (not _is_static(m, n) or m <= max(n, 1) or pad_m)
    if append:
        extra = jnp.ones(u.shape[:nb] + (1,) + u.shape[nb + 1 :], u.dtype)
        u = jnp.concatenate([u, extra], axis=nb)
    out = dot(u, b, dn2)  # (batch..., M[+1], rhs free...)
    sums = None
    if append:
        sums = jax.lax.index_in_dim(out, m, axis=nb, keepdims=False)
        out = jax.lax.slice_in_dim(out, 0, m, axis=nb)
    elif need_sums:  # M > N: the reduction over the weight is small next to the dot
        sums = rhs_sums_of(b, dn)
    if shifted:
        corr = 128 * jnp.expand_dims(sums, nb)
        out = out + corr if signed else out - corr
    out = out.reshape(out.shape[:nb] + free_shape + out.shape[nb + 1 :])
    return [out, sums] if rhs_sums else [out]


def _pad_to_multiple(x, axis, size, multiple):
    new = -(-size // multiple) * multiple
    if _is_static(size) and new == size:
        return x
    cfg = [(0, 0, 0)] * x.ndim
    cfg[axis] = (0, new - size, 0)
    return jax.lax.pad(x, jnp.zeros((), x.dtype), cfg)


def _padk_form(a, b, dn, rhs_sums, *, k_multiple: int, min_free: int, dot):
    """``s8 x s8 -> s32`` on (batch, M, K) x (batch, K, N) or (batch, N, K), padded with zeros.

    K is padded to a multiple of `k_multiple`, M and N (when static) to at least
    `min_free`; the result is sliced back. The rhs keeps whichever of its two
    canonical orders is a no-op for its layout (a (K, N) weight stays (K, N), an
    (N, K) weight stays (N, K)).
    """
    (lc, rc), (lb, rb) = dn
    s = a if a.dtype == jnp.int8 else flip_top_bit(a, jnp.int8)
    nb = len(lb)
    lfree = tuple(i for i in range(a.ndim) if i not in lc and i not in lb)
    rfree = tuple(i for i in range(b.ndim) if i not in rc and i not in rb)
    lfree_shape = tuple(a.shape[i] for i in lfree)
    rfree_shape = tuple(b.shape[i] for i in rfree)
    bshape = tuple(a.shape[i] for i in lb)
    m, n = math.prod(lfree_shape), math.prod(rfree_shape)
    k = math.prod(a.shape[i] for i in lc)
    x = jnp.transpose(s, lb + lfree + lc).reshape(bshape + (m, k))
    nk = bool(rfree) and bool(rc) and min(rc) > max(rfree)  # rhs stored free-major: (N, K)
    if nk:
        w = jnp.transpose(b, rb + rfree + rc).reshape(bshape + (n, k))
        kax, nax = nb + 1, nb
    else:
        w = jnp.transpose(b, rb + rc + rfree).reshape(bshape + (k, n))
        kax, nax = nb, nb + 1
    x = _pad_to_multiple(x, nb + 1, k, k_multiple)
    w = _pad_to_multiple(w, kax, k, k_multiple)
    mp, np_ = m, n
    if _is_static(m) and m < min_free:
        x, mp = _pad_to_multiple(x, nb, m, min_free), min_free
    if _is_static(n) and n < min_free:
        w, np_ = _pad_to_multiple(w, nax, n, min_free), min_free
    batch = tuple(range(nb))
    dn2 = (((nb + 1,), (kax,)), (batch, batch))
    out = dot(x, w, dn2)  # (batch..., M', N')
    if mp != m or np_ != n:
        out = jax.lax.slice(out, (0,) * (nb + 2), bshape + (m, n))
    out = out.reshape(bshape + lfree_shape + rfree_shape)
    need_sums = rhs_sums or a.dtype == jnp.uint8
    sums = rhs_sums_of(b, dn) if need_sums else None
    if a.dtype == jnp.uint8:  # a = s + 128
        out = out + 128 * sums_to_out(sums, nb, len(lfree))
    return [out, sums] if rhs_sums else [out]


def _form(a, b, dn, rhs_sums, form, k_multiple, dot):
    if form == "u8s8":
        return _cpu_form(a, b, dn, rhs_sums, signed=False, dot=dot)
    if form == "s8s8":
        return _cpu_form(a, b, dn, rhs_sums, signed=True, dot=dot)
    return _padk_form(
        a, b, dn, rhs_sums, k_multiple=k_multiple, min_free=lowering.ACCEL_MIN_FREE, dot=dot
    )


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

    def _raw_dot(a, b, dn):
        return _raw_p.bind(a, b, dimension_numbers=dn)

    int8_dot_p = Primitive("jq_int8_dot_general")
    int8_dot_p.multiple_results = True

    def _abstract(a, b, *, dimension_numbers, rhs_sums, cpu_form, k_multiple):
        _check_dtypes(a, b)
        out = _ShapedArray(_out_shape(a.shape, b.shape, dimension_numbers), np.dtype(np.int32))
        if not rhs_sums:
            return [out]
        return [out, _ShapedArray(_sums_shape(b.shape, dimension_numbers), np.dtype(np.int32))]

    int8_dot_p.def_abstract_eval(_abstract)

    def _cpu_lowered(a, b, *, dimension_numbers, rhs_sums, cpu_form, k_multiple):
        return _form(a, b, dimension_numbers, rhs_sums, cpu_form, k_multiple, _raw_dot)

    def _accel_lowered(a, b, *, dimension_numbers, rhs_sums, cpu_form, k_multiple):
        return _form(a, b, dimension_numbers, rhs_sums, "s8s8_padk", k_multiple, _raw_dot)

    @functools.cache
    def _jitted(**params):
        return jax.jit(lambda a, b: int8_dot_p.bind(a, b, **params))

    def _impl(a, b, **params):
        return _jitted(**params)(a, b)

    int8_dot_p.def_impl(_impl)
    _mlir.register_lowering(int8_dot_p, _mlir.lower_fun(_accel_lowered, multiple_results=True))
    _mlir.register_lowering(
        int8_dot_p, _mlir.lower_fun(_cpu_lowered, multiple_results=True), platform="cpu"
    )

    def _batch_rule(args, dims, *, dimension_numbers, rhs_sums, **params):
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
            outs = int8_dot_p.bind(a, b, dimension_numbers=dn, rhs_sums=rhs_sums, **params)
            return outs, [0] * len(outs)
        if ad is not None:
            # a mapped only: its mapped axis becomes the last lhs free axis
            a = jnp.moveaxis(a, ad, a.ndim - 1)
            outs = int8_dot_p.bind(
                a, b, dimension_numbers=dimension_numbers, rhs_sums=rhs_sums, **params
            )
            return outs, [nb + n_lfree] + [None] * (len(outs) - 1)
        # b mapped only: its mapped axis becomes the last rhs free axis
        b = jnp.moveaxis(b, bd, b.ndim - 1)
        n_rfree = b.ndim - 1 - len(rc) - nb
        outs = int8_dot_p.bind(
            a, b, dimension_numbers=dimension_numbers, rhs_sums=rhs_sums, **params
        )
        return outs, [nb + n_lfree + n_rfree] + [nb + n_rfree] * (len(outs) - 1)

    _batching.primitive_batchers[int8_dot_p] = _batch_rule


_warned = False


def _fallback(a, b, dn, rhs_sums, k_multiple):
    """Without the lowering API: the signed forms through `jax.lax.dot_general`."""

    def cpu(a, b):
        return tuple(_form(a, b, dn, rhs_sums, "s8s8", k_multiple, _lax_dot))

    def accel(a, b):
        return tuple(_form(a, b, dn, rhs_sums, "s8s8_padk", k_multiple, _lax_dot))

    return jax.lax.platform_dependent(a, b, cpu=cpu, default=accel)


def int8_dot_general(a: jax.Array, b: jax.Array, dimension_numbers, rhs_sums: bool = False):
    """Exact ``sum_k a * b`` as int32 for an int8 / uint8 `a` and an int8 `b`.

    Args:
      a: int8 or uint8 array.
      b: int8 array.
      dimension_numbers: ``((lc, rc), (lb, rb))`` with non-negative axes, as in
        `jax.lax.dot_general`.
      rhs_sums: also return ``sum_k b`` (int32, shape ``(rhs batch..., rhs
        free...)``), the term that zero-point corrections need. In the CPU forms
        it comes from one extra lhs row of ones in the same dot, which is far
        cheaper than XLA:CPU's column reduction of an int8 matrix.

    Returns:
      The int32 dot in `jax.lax.dot_general`'s layout, or ``(dot, sums)``. Exact
      when ``max|a| * max|b| * K < 2**31`` (K = product of contracting sizes);
      callers split longer contractions. The form is the one `jq.lowering`
      chooses now (see `jq.ops.lowering_info`).

    Raises:
      TypeError: other dtypes.
    """
    global _warned
    (lc, rc), (lb, rb) = dimension_numbers
    dn = ((tuple(lc), tuple(rc)), (tuple(lb), tuple(rb)))
    _check_dtypes(a, b)
    low = lowering.current()
    if AVAILABLE:
        outs = int8_dot_p.bind(
            a,
            b,
            dimension_numbers=dn,
            rhs_sums=bool(rhs_sums),
            cpu_form=low.cpu_form,
            k_multiple=low.k_multiple,
        )
    else:
        if not _warned:
            warnings.warn(
                f"jq: JAX's lowering API is unavailable ({_IMPORT_ERROR}); int8 dots use "
                "jax.lax.dot_general in the signed form, which is exact but slower on VNNI "
                f"CPUs. Tested JAX versions: {', '.join(TESTED_JAX_VERSIONS)}.",
                RuntimeWarning,
                stacklevel=2,
            )
            _warned = True
        outs = _fallback(a, b, dn, bool(rhs_sums), low.k_multiple)
    return tuple(outs) if rhs_sums else outs[0]
