"""GPTQ: one-shot weight quantization with second-order error compensation.

GPTQ (Frantar et al., 2022) quantizes a linear layer's weight ``W`` of shape
``(K, N)`` (``K`` input features, the rows; ``N`` outputs) so that the layer
output on calibration inputs ``X`` of shape ``(K, n)`` changes as little as
possible::

    min_Q  || W^T X - Q^T X ||^2   =   tr((W - Q)^T H (W - Q)) / 2,   H = 2 X X^T

It quantizes the rows of ``W`` one at a time (the paper's "columns" of its
``(N, K)`` layout) and spreads each row's rounding error over the rows not yet
quantized, the optimal update of Optimal Brain Surgeon::

    U = chol(H^-1) (upper),  e_r = (w_r - q(w_r)) / U[r, r],
    w_j <- w_j - U[r, j] * e_r   for every j > r.

The updates are applied lazily: inside a block of ``B`` rows (128 by default)
row by row, and to the rows after the block in one ``(K, B) @ (B, N)`` matmul
when the block is done. The whole loop is one jitted `lax.fori_loop` over
blocks around a `lax.fori_loop` over the rows of a block.

Options, as in the reference implementation:

* ``percdamp``: ``H += percdamp * mean(diag(H)) * I`` before the Cholesky
  factorisation (0.01 by default). Inputs that are always 0 (``H[j, j] == 0``)
  get ``H[j, j] = 1`` and their weight row set to 0, as in the paper's code.
* ``act_order``: quantize rows in order of decreasing ``H[j, j]`` (the inputs
  with the largest activations first). The stored `QArray` is in the original
  row order.
* group scales: ``QuantSpec(fmt, axis=-1, block_axis=0, block_size=g)`` gives one
  scale (and zero point) per output column and per group of ``g`` consecutive
  input rows. Without ``act_order`` a group's parameters are computed from the
  group's already error-updated weights when its first row is reached (the
  paper's setting). With ``act_order`` the rows of a group are not visited
  together, so the group parameters are computed before the pass from the
  original weights ("static groups"); groups stay contiguous in the original
  order, which is the layout jq's block scales need (no ``g_idx``).

With ``H`` diagonal (for example ``H = I``), ``chol(H^-1)`` is diagonal, no
error is propagated and GPTQ equals round-to-nearest exactly.

References:
  Frantar, Ashkboos, Hoefler, Alistarh. "GPTQ: Accurate Post-Training
  Quantization for Generative Pre-trained Transformers", ICLR 2023,
  arXiv:2210.17323.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

from jq.qparams import QParams, QuantSpec, qparams_from_range
from jq.quantize import QArray, quantize

__all__ = ["GPTQResult", "gptq_quantize", "gptq_with_params", "hessian_update", "rtn_quantize"]

_HI = jax.lax.Precision.HIGHEST


class GPTQResult(NamedTuple):
    """What `gptq_quantize` returns.

    Attributes:
      qarray: the quantized weight as a jq `QArray` of the input's shape (int4
        packed two per byte), rows in the original order.
      weight: ``dequantize(qarray)`` as float32 ``(K, N)``, the weight the
        layer now computes with.
      qparams: the `QParams` used, keepdims shape (``(K // group, N)`` for group
        scales, ``(1, N)`` per column, ``(1, 1)`` per tensor).
      codes: the integer codes, int32 ``(K, N)``, original row order.
      perm: the row order used (``act_order``), or None.
    """

    qarray: QArray
    weight: jax.Array
    qparams: QParams
    codes: jax.Array
    perm: jax.Array | None


@dataclasses.dataclass(frozen=True)
class _Config:
    spec: QuantSpec
    qmin: int
    qmax: int
    block: int
    group: int | None  # rows per group (None: one parameter row for all K rows)
    dynamic: bool  # group parameters computed during the pass


# ---------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------
def _grid(spec: QuantSpec, bits: int | None) -> tuple[int, int]:
    fmt = spec.fmt
    if bits is None:
        return int(spec.qmin), int(spec.qmax)
    if (
        isinstance(bits, bool)
        or not isinstance(bits, (int, np.integer))
        or not 2 <= bits <= fmt.bits
    ):
        raise ValueError(
            f"gptq: `bits` must be an int in [2, {fmt.bits}] for format {fmt.name!r}, got {bits!r}"
        )
    if fmt.signed:
        qmax = 2 ** (bits - 1) - 1
        qmin = -qmax if spec.narrow_range else -(2 ** (bits - 1))
        return qmin, qmax
    return 0, 2**bits - 1


def _check_spec(spec: QuantSpec, k: int) -> tuple[int | None, bool]:
    """Returns (group size or None, per-column scales) for a ``(K, N)`` weight."""
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"gptq: `spec` must be a jq.QuantSpec, got {type(spec).__name__}")
    if not spec.fmt.is_integer:
        raise ValueError(f"gptq: GPTQ needs an integer format, got spec.format={spec.format!r}")
    axes = spec.channel_axes(2, "w")
    if axes not in ((), (1,)):
        raise ValueError(
            f"gptq: scales of a (K, N) weight may lie on the output axis only (axis=-1 or None), "
            f"got spec.axis={spec.axis}"
        )
    group = None
    if spec.block_size is not None:
        if spec.canonical_block_axis(2, "w") != 0:
            raise ValueError(
                f"gptq: group scales are blocks along the input rows (block_axis=0), got "
                f"spec.block_axis={spec.block_axis}"
            )
        group = int(spec.block_size)
        if k % group:
            raise ValueError(
                f"gptq: group size spec.block_size={group} does not divide the K={k} input rows of `w`"
            )
    return group, axes == (1,)


def _lazy_block(k: int, block: int, group: int | None) -> int:
    """The largest lazy-block size <= `block` that divides K and nests with the groups."""
    if group is not None and group > block:
        cands = [d for d in range(1, block + 1) if group % d == 0]  # divides the group, hence K
    elif group is not None:
        cands = [d for d in range(group, block + 1, group) if k % d == 0]
    else:
        cands = [d for d in range(1, min(block, k) + 1) if k % d == 0]
    return max(cands)


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


# ---------------------------------------------------------------------------------------
# quantization parameters and rounding (jq.quantize's exact arithmetic)
# ---------------------------------------------------------------------------------------
def _params(lo, hi, cfg: _Config) -> tuple[jax.Array, jax.Array]:
    """Scale and zero point (float32, 0 when absent) covering [lo, hi] on the grid."""
    spec = cfg.spec
    if (cfg.qmin, cfg.qmax) == (spec.qmin, spec.qmax):
        qp = qparams_from_range(lo, hi, spec)
        zp = (
            jnp.zeros_like(qp.scale) if qp.zero_point is None else qp.zero_point.astype(jnp.float32)
        )
        return qp.scale, zp
    # a narrower grid (`bits`) inside the storage format: the same formulas
    lo = jnp.minimum(lo, 0.0)
    hi = jnp.maximum(hi, 0.0)
    tiny = jnp.finfo(jnp.float32).tiny
    qmin, qmax = cfg.qmin, cfg.qmax
    if spec.scheme == "symmetric":
        amax = jnp.maximum(-lo, hi)
        if spec.fmt.signed:
            scale = amax * np.float32(1.0 / qmax)
            zp = jnp.zeros_like(amax)
        else:
            scale = amax * np.float32(1.0 / ((qmax - qmin) / 2.0))
            zp = jnp.full(lo.shape, (qmax - qmin + 1) // 2 + qmin, jnp.float32)
        return jnp.where(amax > 0, jnp.maximum(scale, tiny), 1.0), zp
    width = hi - lo
    scale = jnp.where(width > 0, jnp.maximum(width * np.float32(1.0 / (qmax - qmin)), tiny), 1.0)
    zp = jnp.clip(jnp.round(qmin - lo / scale), qmin, qmax)
    return scale, zp


def _range(rows: jax.Array, per_column: bool) -> tuple[jax.Array, jax.Array]:
    """Min and max over rows (and over columns unless per column): shape (N,) or (1,)."""
    if per_column:
        return jnp.min(rows, axis=0), jnp.max(rows, axis=0)
    return jnp.min(rows).reshape(1), jnp.max(rows).reshape(1)


def _round(w, scale, zp, cfg: _Config):
    """``q = clip(round(w * (1 / S)) + Z)`` and ``S * (q - Z)``, as `jq.quantize` computes them."""
    q = jnp.clip(jnp.round(w * (1.0 / scale)) + zp, cfg.qmin, cfg.qmax)
    return q, (q - zp) * scale


# ---------------------------------------------------------------------------------------
# the jitted pass
# ---------------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("cfg", "per_column"))
def _gptq_pass(w, u, row_scale, row_zp, cfg: _Config, per_column: bool):
    """Quantizes the rows of `w` in order with the error feedback of `u` = chol(H^-1)^T.

    `row_scale`, `row_zp`: (K, N or 1) per-row parameters (static mode; ignored
    when dynamic). Returns the float codes (K, N) and the per-group parameters
    (G, N or 1) actually used in dynamic mode.
    """
    k, n = w.shape
    bsz = cfg.block
    nblocks = k // bsz
    ncol = n if per_column else 1
    g = cfg.group or k
    groups = k // g

    def block_step(b, carry):
        w, codes, gscale, gzp = carry
        r0 = b * bsz
        w1 = jax.lax.dynamic_slice_in_dim(w, r0, bsz, 0)
        u1 = jax.lax.dynamic_slice(u, (r0, r0), (bsz, bsz))
        if cfg.dynamic and g >= bsz:
            # a group starts on this block's first row iff r0 % g == 0; every row
            # from r0 on is up to date here, so take the parameters from `w`
            src = jax.lax.dynamic_slice_in_dim(w, jnp.minimum(r0, k - g), g, 0)
            s_new, z_new = _params(*_range(src, per_column), cfg)
            start = (r0 % g) == 0
            gi = r0 // g
            gscale = jnp.where(start, gscale.at[gi].set(s_new), gscale)
            gzp = jnp.where(start, gzp.at[gi].set(z_new), gzp)

        def row_step(i, c):
            w1, q1, e1, gscale, gzp = c
            r = r0 + i
            if cfg.dynamic:
                if g < bsz:
                    src = jax.lax.dynamic_slice_in_dim(w1, jnp.minimum(i, bsz - g), g, 0)
                    s_new, z_new = _params(*_range(src, per_column), cfg)
                    start = (r % g) == 0
                    gi = r // g
                    gscale = jnp.where(start, gscale.at[gi].set(s_new), gscale)
                    gzp = jnp.where(start, gzp.at[gi].set(z_new), gzp)
                s, z = gscale[r // g], gzp[r // g]
            else:
                s, z = row_scale[r], row_zp[r]
            wr = w1[i]
            q, wq = _round(wr, s, z, cfg)
            err = (wr - wq) / u1[i, i]
            # u1 is upper triangular: rows < i are untouched, row i becomes wq
            w1 = w1 - u1[i][:, None] * err[None, :]
            return w1, q1.at[i].set(q), e1.at[i].set(err), gscale, gzp

        z0 = jnp.zeros((bsz, n), jnp.float32)
        w1, q1, e1, gscale, gzp = jax.lax.fori_loop(0, bsz, row_step, (w1, z0, z0, gscale, gzp))
        # lazy update of every later row (rows of this block are done and not read again)
        ublk = jax.lax.dynamic_slice_in_dim(u, r0, bsz, 0)  # (B, K)
        w = w - jnp.matmul(ublk.T, e1, precision=_HI)
        codes = jax.lax.dynamic_update_slice_in_dim(codes, q1, r0, 0)
        return w, codes, gscale, gzp

    init = (
        w,
        jnp.zeros((k, n), jnp.float32),
        jnp.ones((groups, ncol), jnp.float32),
        jnp.zeros((groups, ncol), jnp.float32),
    )
    _, codes, gscale, gzp = jax.lax.fori_loop(0, nblocks, block_step, init)
    return codes, gscale, gzp


def _factor(h, percdamp: float, act_order: bool):
    """U = chol(H^-1)^T (upper) in the quantization order, the dead inputs and that order.

    Computed on the host in float64 with LAPACK: exact enough to tell a singular
    H from a merely ill-conditioned one, and nothing to compile. No explicit
    inverse: with J the order reversal and ``J H J = M M^T`` (lower Cholesky),
    ``H = R R^T`` with ``R = J M J`` upper, so ``H^-1 = U^T U`` with
    ``U = R^-1 = J M^-1 J`` (one Cholesky and one triangular inverse). BLAS runs
    single-threaded here: next to XLA's thread pool, more threads made it 20x
    slower on 2 cores.
    """
    hf = np.asarray(h, np.float64)
    k = hf.shape[0]
    dead = np.diagonal(hf) == 0
    hf = hf + np.diag(dead.astype(np.float64))
    perm = None
    if act_order:
        perm = np.argsort(-np.diagonal(np.asarray(h, np.float64)), kind="stable")
        hf = hf[perm][:, perm]
    hf = hf + percdamp * np.mean(np.diagonal(hf)) * np.eye(k)
    bad = ValueError(
        f"gptq: the Hessian `h` is not positive definite after dampening with percdamp={percdamp} "
        "(singular: too few or linearly dependent calibration inputs); raise percdamp "
        "(0.01 is the paper's default) or add calibration data"
    )
    flipped = np.ascontiguousarray(hf[::-1, ::-1])
    with _one_blas_thread():
        try:
            m = np.linalg.cholesky(flipped)
        except np.linalg.LinAlgError:
            raise bad from None
        # pivots at rounding level mean a numerically singular H (cond > ~1e12)
        if np.min(np.diagonal(m) ** 2 / np.diagonal(flipped)) < 1e-12:
            raise bad
        minv, info = scipy.linalg.lapack.dtrtri(m, lower=1)
    u = np.ascontiguousarray(minv[::-1, ::-1])
    if info != 0 or not np.all(np.isfinite(u)):
        raise bad
    return u.astype(np.float32), dead, perm


def _one_blas_thread():
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - optional
        return contextlib.nullcontext()
    return threadpool_limits(1)


def _check_common(w, h, percdamp, block_size):
    if isinstance(w, jax.core.Tracer) or isinstance(h, jax.core.Tracer):
        raise TypeError(
            "gptq: `w` and `h` must be concrete arrays (call it outside jit; the pass inside is jitted)"
        )
    w = np.asarray(w)
    h = np.asarray(h)
    if w.ndim != 2 or not np.issubdtype(w.dtype, np.floating):
        raise ValueError(
            f"gptq: `w` must be a 2-D float (K, N) weight, got shape {w.shape}, dtype {w.dtype}"
        )
    k = w.shape[0]
    if h.shape != (k, k):
        raise ValueError(
            f"gptq: `h` must have shape (K, K) = {(k, k)} for `w` of shape {w.shape}, got {h.shape}"
        )
    if (
        not isinstance(percdamp, (int, float, np.floating))
        or isinstance(percdamp, bool)
        or not percdamp >= 0
    ):
        raise ValueError(f"gptq: `percdamp` must be a float >= 0, got {percdamp!r}")
    if (
        isinstance(block_size, bool)
        or not isinstance(block_size, (int, np.integer))
        or block_size < 1
    ):
        raise ValueError(f"gptq: `block_size` must be a positive int, got {block_size!r}")
    if not (np.all(np.isfinite(w)) and np.all(np.isfinite(h))):
        raise ValueError("gptq: `w` and `h` must be finite (NaN or inf found)")
    return w.astype(np.float32), h


@functools.partial(jax.jit, static_argnames=("cfg", "per_column"))
def _run_given(w, u, perm, inv, row_scale, row_zp, cfg: _Config, per_column: bool):
    codes, _, _ = _gptq_pass(w[perm], u, row_scale[perm], row_zp[perm], cfg, per_column)
    return codes[inv]


def gptq_with_params(
    w: jax.Array,
    h: jax.Array,
    row_scale: jax.Array,
    row_zero_point: jax.Array,
    spec: QuantSpec,
    *,
    percdamp: float = 0.01,
    act_order: bool = False,
    block_size: int = 128,
    bits: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """GPTQ with fixed quantization parameters given per element (any scale layout).

    Used for weights whose scales are tied in ways a ``(K, N)`` matrix view
    cannot express as groups or columns (e.g. a ``(D, H, Dh)`` DenseGeneral
    kernel with one scale per ``Dh``): the caller expands its `QParams` to
    ``(K, N)`` (or ``(K, 1)``) and gets the GPTQ codes back.

    Args:
      w, h: as in `gptq_quantize`.
      row_scale, row_zero_point: float32 ``(K, N)`` or ``(K, 1)`` arrays, the
        scale and zero point (0 when absent) of each element.
      spec: the integer `QuantSpec` (format and grid); its axes are not used.
      percdamp, act_order, block_size, bits: as in `gptq_quantize`.

    Returns:
      ``(weight, codes)``: the dequantized float32 weight and the float codes,
      both ``(K, N)`` in the original row order.
    """
    w, h = _check_common(w, h, percdamp, block_size)
    k, n = w.shape
    qmin, qmax = _grid(spec, bits)
    row_scale = jnp.asarray(row_scale, jnp.float32)
    row_scale = jnp.broadcast_to(row_scale, (k, row_scale.shape[-1]))
    row_zp = jnp.broadcast_to(jnp.asarray(row_zero_point, jnp.float32), row_scale.shape)
    u, dead, perm = _factor(h, float(percdamp), act_order)
    w = np.where(dead[:, None], np.float32(0), w)
    perm = np.arange(k) if perm is None else perm
    cfg = _Config(spec, qmin, qmax, _lazy_block(k, block_size, None), None, False)
    per_column = row_scale.shape[-1] == n and n != 1
    codes = _run_given(w, u, perm, np.argsort(perm), row_scale, row_zp, cfg, per_column)
    return (codes - row_zp) * row_scale, codes


@functools.partial(jax.jit, static_argnames=("cfg", "per_column"))
def _run(w, u, perm, inv, cfg: _Config, per_column: bool):
    k, n = w.shape
    g = cfg.group or k
    # static parameters (per tensor, per column, or groups of the original weights)
    wg = w.reshape(k // g, g, n)
    if per_column:
        lo, hi = jnp.min(wg, axis=1), jnp.max(wg, axis=1)
    else:
        lo, hi = jnp.min(wg, axis=(1, 2))[:, None], jnp.max(wg, axis=(1, 2))[:, None]
    gscale, gzp = _params(lo, hi, cfg)  # (G, N or 1)
    rows = perm // g
    codes, dscale, dzp = _gptq_pass(w[perm], u, gscale[rows], gzp[rows], cfg, per_column)
    if cfg.dynamic:
        gscale, gzp = dscale, dzp
    codes = codes[inv]
    grow = jnp.arange(k) // g
    weight = (codes - gzp[grow]) * gscale[grow]
    return codes, gscale, gzp, weight


_quantize = jax.jit(quantize, static_argnums=(2,))


def gptq_quantize(
    w: jax.Array,
    h: jax.Array,
    spec: QuantSpec,
    *,
    percdamp: float = 0.01,
    act_order: bool = False,
    block_size: int = 128,
    static_groups: bool | None = None,
    bits: int | None = None,
) -> GPTQResult:
    """Quantizes a ``(K, N)`` weight with GPTQ, given the input Hessian ``H = 2 X X^T / n``.

    The Cholesky factorisation runs on the host in float64 (numpy); the
    row-by-row pass is one jitted function (compiled once per shape and
    configuration). Call it outside `jax.jit`.

    Args:
      w: float weight, shape ``(K, N)`` (a Dense kernel: input rows, output columns).
      h: float ``(K, K)`` Hessian of the layer inputs (any positive multiple of
        ``X X^T``; the result does not depend on the factor).
      spec: integer `QuantSpec` of the stored weight: ``axis=-1`` (one scale per
        output column) or None (per tensor), optionally with group scales
        ``block_axis=0, block_size=group``. Symmetric or affine.
      percdamp: dampening ``H += percdamp * mean(diag(H)) * I`` (>= 0).
      act_order: quantize rows in order of decreasing ``diag(H)``.
      block_size: rows per lazy update block (128 in the paper). It is lowered to
        a divisor of K that nests with the groups.
      static_groups: compute group parameters from the original weights before
        the pass. Default: True with ``act_order`` (required there), else False.
      bits: optional narrower integer grid inside the storage format, e.g.
        ``bits=3`` with ``"int4"`` (codes in ``[-4, 3]``, or ``[-3, 3]`` with the
        narrow symmetric grid), stored as int4.

    Returns:
      `GPTQResult` (QArray, dequantized weight, parameters, codes, row order).

    Raises:
      ValueError: bad shapes, a group size that does not divide K, a
        non-integer format, NaN / inf in `w` or `h`, or an `h` that is not
        positive definite after dampening (singular, e.g. ``percdamp=0`` with
        fewer calibration rows than K).
      TypeError: `spec` is not a QuantSpec; `w` or `h` is a tracer.
    """
    w, h = _check_common(w, h, percdamp, block_size)
    k, n = w.shape
    group, per_column = _check_spec(spec, k)
    qmin, qmax = _grid(spec, bits)
    if static_groups is None:
        static_groups = bool(act_order)
    if act_order and group is not None and not static_groups:
        raise ValueError(
            "gptq: act_order with group scales needs static_groups=True (jq stores groups in the "
            "original row order; their parameters must be fixed before the permuted pass)"
        )
    u, dead, perm = _factor(h, float(percdamp), act_order)
    w = np.where(dead[:, None], np.float32(0), w)
    cfg = _Config(
        spec,
        qmin,
        qmax,
        _lazy_block(k, block_size, group),
        group,
        not static_groups and group is not None,
    )
    p = np.arange(k) if perm is None else perm
    codes, gscale, gzp, weight = _run(w, u, p, np.argsort(p), cfg, per_column)
    has_zp = spec.scheme == "affine" or not spec.fmt.signed
    qp = QParams(gscale, gzp.astype(jnp.int32) if has_zp else None)
    q = _quantize(weight, qp, spec)
    return GPTQResult(
        q, weight, qp, codes.astype(jnp.int32), None if perm is None else jnp.asarray(perm)
    )


def rtn_quantize(w: jax.Array, spec: QuantSpec, *, bits: int | None = None) -> GPTQResult:
    """Round-to-nearest with min-max parameters: GPTQ's baseline, on the same grid.

    Equals ``jq.quantize(w, None, spec)`` when `bits` is None.
    """
    w = np.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"rtn: `w` must be a 2-D (K, N) weight, got shape {w.shape}")
    return gptq_quantize(
        w, np.eye(w.shape[0], dtype=np.float32), spec, percdamp=0.0, bits=bits, static_groups=True
    )


def hessian_update(h: jax.Array, x: jax.Array) -> jax.Array:
    """Adds ``2 x^T x`` to the running sum `h`: `x` is ``(rows, K)``, accumulated in float32."""
    x = jnp.asarray(x, jnp.float32)
    return h + 2.0 * jnp.matmul(x.T, x, precision=_HI)
