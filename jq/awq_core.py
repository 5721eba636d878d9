"""AWQ (activation-aware weight quantization) on arrays: the scale search and the clip search.

A weight ``W`` ``(K, N)`` multiplies activations ``X`` ``(n, K)``. Input channels
whose activations are large matter more to the output, and scaling them up
before round-to-nearest shrinks their relative rounding error. AWQ (Lin et al.,
2024) multiplies row ``j`` of ``W`` by ``s_j`` and divides channel ``j`` of
``X`` by it, which leaves the float product unchanged::

    X W = (X diag(s)^-1) (diag(s) W)

and picks ``s`` from the per-channel mean magnitude ``m_j = mean |X_j|`` with
one exponent ``alpha`` searched on a grid::

    s_j(alpha) = m_j^alpha / sqrt(max_j m_j^alpha * min_j m_j^alpha)

minimising the output error of the quantized layer,

    E(alpha) = sum_i || X (diag(s)^-1 Q(diag(s) W_i)) - X W_i ||_F^2 / n
             = sum_i tr(D_i^T G D_i),   D_i = Q(diag(s) W_i) / s - W_i,  G = X^T X / n

over every weight ``W_i`` that reads the same ``X`` (the query, key and value
projections of attention are searched together, since they share one ``s``).
``Q`` is the weight's own quantizer (round-to-nearest with min-max scales on
the spec's grid). With the Gram matrix ``G`` the error is exact over every
calibration token, without keeping the tokens.

With a weight statistic ``w_j`` (`awq_weight_mean`: the mean over output
columns of ``|W_jc|`` divided by its quantization group's max), the search also
tries the two-sided family ``s_j = m_j^alpha / w_j^(1 - alpha)`` (normalised the
same way), as AutoAWQ's ``duo_scaling`` does, and keeps whichever family and
``alpha`` give the least ``E``. ``alpha = 0`` of the one-sided family is plain
round-to-nearest, so the result is never worse than RTN on the calibration data.

The clip search then shrinks the range of each quantization group: for every
``(group of rows, column)`` block of the scaled weight ``W' = diag(s) W`` it
tries ``W' clipped to +-r max|W'_block|`` for ``r`` on a grid from 1 down to
``1 - max_shrink`` and keeps, per block, the ``r`` with the least
``D_b^T G'_bb D_b``, where ``G' = diag(s)^-1 G diag(s)^-1`` is the Gram matrix
of the scaled activations and ``G'_bb`` its diagonal block over the group's rows
(blocks are treated as independent, as in the paper).

References:
  Lin, Tang, Tang, Yang, Chen, Wang, Xiao, Dang, Gan, Han. "AWQ: Activation-aware
  Weight Quantization for On-Device LLM Compression and Acceleration", MLSys
  2024, arXiv:2306.00978.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "AWQSearch",
    "awq_clip",
    "awq_scales",
    "awq_search",
    "awq_weight_mean",
    "output_error",
]

#: ``quantizer(w) -> dequantized w``, both ``(K, N)`` float32: the weight's round-to-nearest.
Quantizer = Callable[[jax.Array], jax.Array]


class AWQSearch(NamedTuple):
    """The result of `awq_search`."""

    alpha: float  # the best exponent
    scales: jax.Array  # shape=(K,), dtype=float32: s(alpha)
    alphas: np.ndarray  # shape=(n_grid,), the grid
    errors: np.ndarray  # shape=(n_grid,), E(alpha) of s = m^alpha for every grid point
    duo: bool = False  # the best scales are the two-sided m^alpha / w^(1 - alpha)
    errors_duo: np.ndarray | None = None  # shape=(n_grid,), E(alpha) of the two-sided family


def _check_gram(gram, k: int, fn: str) -> jax.Array:
    g = jnp.asarray(gram, jnp.float32)
    if g.shape != (k, k):
        raise ValueError(f"{fn}: gram must be (K, K) = ({k}, {k}), got shape {g.shape}")
    return g


def awq_scales(
    act_mean: jax.Array, alpha: float, weight_mean: jax.Array | None = None
) -> jax.Array:
    """``s_j = m_j^alpha / sqrt(max m^alpha * min m^alpha)``; channels with ``m_j = 0`` get ``s_j = 1``.

    With `weight_mean` (``w_j``), the two-sided ``s_j = m_j^alpha / w_j^(1 - alpha)``,
    normalised the same way; channels with ``m_j = 0`` or ``w_j = 0`` get ``s_j = 1``.

    Args:
      act_mean: ``(K,)`` mean ``|X_j|`` per input channel, >= 0.
      alpha: the exponent (0 gives ``s = 1`` without `weight_mean`).
      weight_mean: optional ``(K,)`` weight statistic, >= 0 (`awq_weight_mean`).

    Returns:
      float32 ``(K,)`` positive factors whose largest and smallest (over channels
      with ``m_j > 0``) multiply to 1.
    """
    m = jnp.asarray(act_mean, jnp.float32)
    ok = m > 0
    logs = alpha * jnp.log(jnp.where(ok, m, 1.0))
    if weight_mean is not None:
        wm = jnp.asarray(weight_mean, jnp.float32)
        ok = ok & (wm > 0)
        logs = logs - (1.0 - alpha) * jnp.log(jnp.where(wm > 0, wm, 1.0))
    logs = jnp.where(ok, logs, 0.0)
    hi = jnp.max(jnp.where(ok, logs, -jnp.inf))
    lo = jnp.min(jnp.where(ok, logs, jnp.inf))
    centre = jnp.where(jnp.any(ok), 0.5 * (hi + lo), 0.0)
    return jnp.where(ok, jnp.exp(logs - centre), 1.0)


def awq_weight_mean(weights: Sequence[jax.Array], group: int | Sequence[int]) -> jax.Array:
    """``(K,)`` the weight statistic of the two-sided scales: ``mean_c |W_jc| / max_{j' in g(j)} |W_j'c|``.

    Each ``(K, N_i)`` weight is divided, per column, by the largest magnitude
    in its quantization group of `group` rows (K: the whole column), and the
    result is averaged over the columns of all `weights` together.

    Raises:
      ValueError: a group does not divide K, or the weights disagree on K.
    """
    ws = [jnp.abs(jnp.asarray(w, jnp.float32)) for w in weights]
    groups = [group] * len(ws) if isinstance(group, (int, np.integer)) else list(group)
    k = ws[0].shape[0]
    parts = []
    for w, gsz in zip(ws, groups):
        if w.ndim != 2 or w.shape[0] != k or k % gsz:
            raise ValueError(
                f"jq.awq_weight_mean: every weight must be (K={k}, N) with K divisible by its "
                f"group, got shape {w.shape} and group {gsz}"
            )
        blocks = w.reshape(k // gsz, gsz, -1)
        amax = jnp.max(blocks, axis=1, keepdims=True)
        parts.append((blocks / jnp.where(amax > 0, amax, 1.0)).reshape(k, -1))
    return jnp.mean(jnp.concatenate(parts, axis=1), axis=1)


def output_error(gram: jax.Array, w: jax.Array, wq: jax.Array) -> jax.Array:
    """``tr((Wq - W)^T G (Wq - W))``: the mean squared output error ``||X Wq - X W||^2 / n`` summed over columns."""
    d = jnp.asarray(wq, jnp.float32) - jnp.asarray(w, jnp.float32)
    return jnp.sum(d * (jnp.asarray(gram, jnp.float32) @ d))


def awq_search(
    gram: jax.Array,
    act_mean: jax.Array,
    weights: Sequence[jax.Array],
    quantizers: Sequence[Quantizer],
    *,
    n_grid: int = 20,
    weight_mean: jax.Array | None = None,
    gram_aware: bool = False,
) -> AWQSearch:
    """Grid search of AWQ's exponent for the weights that read one activation.

    Evaluates ``E(alpha)`` (module docstring) at ``alpha = i / n_grid`` for
    ``i = 0 .. n_grid - 1`` (the paper's grid) and returns the minimiser; ties
    go to the smaller ``alpha`` (``alpha = 0`` is plain round-to-nearest, so the
    result is never worse than RTN on the calibration data). With
    `weight_mean`, the two-sided family is searched on the same grid too and
    the better of the two minimisers is kept (ties: the one-sided).

    Args:
      gram: ``(K, K)`` ``X^T X / n`` of the shared activation.
      act_mean: ``(K,)`` mean ``|X_j|``.
      weights: the ``(K, N_i)`` float weights.
      quantizers: one `Quantizer` per weight.
      n_grid: grid points.
      weight_mean: ``(K,)`` `awq_weight_mean` of `weights`, or None (one-sided only).
      gram_aware: each quantizer is called as ``q(diag(s) W, G')`` with the Gram
        matrix ``G' = diag(s)^-1 G diag(s)^-1`` of the scaled activations, for
        rounding that depends on the inputs (GPTQ: ``E`` is then the error of
        GPTQ's result, and ``alpha = 0`` is plain GPTQ). Evaluated eagerly
        (the quantizer may run host code); default: ``q(diag(s) W)``, jitted.

    Returns:
      `AWQSearch`.

    Raises:
      ValueError: no weights, mismatched shapes or counts, ``n_grid < 1``.
    """
    fn = "jq.awq_search"
    if not weights or len(weights) != len(quantizers):
        raise ValueError(
            f"{fn}: need one quantizer per weight and at least one weight, got "
            f"{len(weights)} weights and {len(quantizers)} quantizers"
        )
    if isinstance(n_grid, bool) or not isinstance(n_grid, (int, np.integer)) or n_grid < 1:
        raise ValueError(f"{fn}: n_grid must be a positive int, got {n_grid!r}")
    m = jnp.asarray(act_mean, jnp.float32)
    k = m.shape[0] if m.ndim == 1 else -1
    if m.ndim != 1:
        raise ValueError(f"{fn}: act_mean must be 1-D (K,), got shape {m.shape}")
    g = _check_gram(gram, k, fn)
    ws = [jnp.asarray(w, jnp.float32) for w in weights]
    for i, w in enumerate(ws):
        if w.ndim != 2 or w.shape[0] != k:
            raise ValueError(f"{fn}: weights[{i}] must be (K={k}, N), got shape {w.shape}")

    wm = None
    if weight_mean is not None:
        wm = jnp.asarray(weight_mean, jnp.float32)
        if wm.shape != (k,):
            raise ValueError(f"{fn}: weight_mean must be (K,) = ({k},), got shape {wm.shape}")

    def error(alpha, w_mean):
        s = awq_scales(m, alpha, w_mean)
        g_s = g / (s[:, None] * s[None, :]) if gram_aware else None
        total = jnp.zeros((), jnp.float32)
        for w, q in zip(ws, quantizers):
            w_s = w * s[:, None]
            wq = (q(w_s, g_s) if gram_aware else q(w_s)) / s[:, None]
            total = total + output_error(g, w, wq)
        return total

    if not gram_aware:
        error = jax.jit(error)

    alphas = np.arange(n_grid, dtype=np.float64) / n_grid
    errors = np.array([float(error(jnp.float32(a), None)) for a in alphas])
    best = int(np.argmin(errors))
    if wm is None:
        return AWQSearch(float(alphas[best]), awq_scales(m, float(alphas[best])), alphas, errors)
    errors_duo = np.array([float(error(jnp.float32(a), wm)) for a in alphas])
    best_duo = int(np.argmin(errors_duo))
    duo = bool(errors_duo[best_duo] < errors[best])
    alpha = float(alphas[best_duo if duo else best])
    scales = awq_scales(m, alpha, wm if duo else None)
    return AWQSearch(alpha, scales, alphas, errors, duo, errors_duo)


def awq_clip(
    gram: jax.Array,
    w: jax.Array,
    quantizer: Quantizer,
    group: int,
    *,
    n_grid: int = 20,
    max_shrink: float = 0.5,
) -> jax.Array:
    """AWQ's clip search: per ``(row group, column)`` block, the clip ratio with the least output error.

    For ``r`` in ``1, 1 - max_shrink / n_grid, ..., 1 - max_shrink (n_grid - 1) / n_grid``
    every block ``b`` of `w` (rows ``[g * group, (g + 1) * group)``, one column)
    is clipped to ``+-r max|w_b|``, the whole weight goes through `quantizer`,
    and each block keeps the ``r`` minimising ``D_b^T G_bb D_b`` (``D`` the
    dequantized minus the float weight). ``r = 1`` is in the grid, so no block
    gets a larger error than without clipping (for the same quantizer).

    Args:
      gram: ``(K, K)`` Gram matrix of the activations `w` multiplies.
      w: ``(K, N)`` float weight.
      quantizer: its round-to-nearest (`Quantizer`), with scales from the clipped weight.
      group: rows per block; must divide K (K for one block per column).
      n_grid, max_shrink: the grid of ratios.

    Returns:
      float32 ``(K, N)``: `w` with each block clipped at its best ratio (not quantized).

    Raises:
      ValueError: `group` does not divide K, `max_shrink` outside [0, 1), bad shapes.
    """
    fn = "jq.awq_clip"
    w = jnp.asarray(w, jnp.float32)
    if w.ndim != 2:
        raise ValueError(f"{fn}: w must be (K, N), got shape {w.shape}")
    k, n = w.shape
    g = _check_gram(gram, k, fn)
    if isinstance(group, bool) or not isinstance(group, (int, np.integer)) or group < 1:
        raise ValueError(f"{fn}: group must be a positive int, got {group!r}")
    if k % group:
        raise ValueError(f"{fn}: group={group} does not divide the K={k} rows of w")
    if not 0.0 <= max_shrink < 1.0:
        raise ValueError(f"{fn}: max_shrink must lie in [0, 1), got {max_shrink!r}")
    if isinstance(n_grid, bool) or not isinstance(n_grid, (int, np.integer)) or n_grid < 1:
        raise ValueError(f"{fn}: n_grid must be a positive int, got {n_grid!r}")
    ng = k // group
    # diagonal blocks of G: (ng, group, group)
    gb = jnp.stack([g[i * group : (i + 1) * group, i * group : (i + 1) * group] for i in range(ng)])
    amax = jnp.max(jnp.abs(w.reshape(ng, group, n)), axis=1)  # (ng, n)

    @jax.jit
    def trial(r):
        lim = jnp.repeat(r * amax, group, axis=0)  # (K, n)
        wc = jnp.clip(w, -lim, lim)
        d = (quantizer(wc) - w).reshape(ng, group, n)
        err = jnp.einsum("gkn,gkl,gln->gn", d, gb, d)
        return wc, err

    best_w, best_err = trial(jnp.float32(1.0))
    for i in range(1, n_grid):
        wc, err = trial(jnp.float32(1.0 - max_shrink * i / n_grid))
        better = err < best_err
        best_err = jnp.where(better, err, best_err)
        best_w = jnp.where(jnp.repeat(better, group, axis=0), wc, best_w)
    return best_w
