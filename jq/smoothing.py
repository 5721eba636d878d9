"""SmoothQuant: migrate per-channel activation outliers into the weights.

Transformer activations have a few input channels with values 10-100x larger
than the rest; a per-tensor int8 scale set by them leaves the other channels
with a handful of levels. SmoothQuant (Xiao et al., 2022) divides each input
channel ``j`` of the activation by a factor ``s_j`` and multiplies the matching
weight row by it, which leaves the product unchanged::

    X W = (X diag(s)^-1) (diag(s) W),   s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)

``alpha`` (0.5 by default) sets how much of the difficulty moves to the
weights: ``alpha = 1`` equalises the activation channels completely, ``alpha =
0`` the weight rows. Here ``X`` is ``(..., K)`` and ``W`` is ``(K, N)``, so
``max|X_j|`` is over all rows of the calibration data for input channel ``j``
and ``max|W_j|`` over the ``j``-th weight row.

With ``power_of_two=True`` every ``s_j`` is rounded to the nearest power of two
(in log scale), so scaling by it is exact in floating point and the identity
holds bit for bit (at a small cost in how well the channels are balanced).

References:
  Xiao, Lin, Seznec, Wu, Demouth, Han. "SmoothQuant: Accurate and Efficient
  Post-Training Quantization for Large Language Models", ICML 2023,
  arXiv:2211.10438.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["channel_absmax", "smooth_activation", "smooth_weight", "smoothing_factors"]


def channel_absmax(x: jax.Array, axis: int = -1) -> jax.Array:
    """``max |x|`` over every axis but `axis` (the input-channel axis), float32 ``(K,)``."""
    x = jnp.asarray(x)
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(
            f"channel_absmax: axis={axis} is out of range for `x` with shape {x.shape}"
        )
    axis %= x.ndim
    red = tuple(a for a in range(x.ndim) if a != axis)
    return jnp.max(jnp.abs(x.astype(jnp.float32)), axis=red)


def smoothing_factors(
    act_absmax: jax.Array,
    weight_absmax: jax.Array,
    alpha: float = 0.5,
    *,
    power_of_two: bool = False,
) -> jax.Array:
    """SmoothQuant's per-channel factors ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)``.

    A channel whose activation or weight row is all zero gets ``s_j = 1`` (there
    is nothing to balance, and a 0 or inf factor would break the identity).

    Args:
      act_absmax: ``(K,)`` calibration ``max |X_j|`` per input channel, >= 0.
      weight_absmax: ``(K,)`` ``max |W_j|`` per weight row, >= 0.
      alpha: migration strength in ``[0, 1]``.
      power_of_two: round each factor to the nearest power of two.

    Returns:
      float32 ``(K,)`` positive factors.

    Raises:
      ValueError: shapes differ or are not 1-D, `alpha` outside [0, 1], or
        negative / non-finite statistics (concrete inputs).
    """
    a = jnp.asarray(act_absmax, jnp.float32)
    w = jnp.asarray(weight_absmax, jnp.float32)
    if a.ndim != 1 or a.shape != w.shape:
        raise ValueError(
            f"smoothing_factors: act_absmax and weight_absmax must be 1-D of equal length, got {a.shape} "
            f"and {w.shape}"
        )
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"smoothing_factors: alpha must lie in [0, 1], got {alpha!r}")
    if not any(isinstance(v, jax.core.Tracer) for v in (a, w)):
        for name, v in (("act_absmax", a), ("weight_absmax", w)):
            if not bool(jnp.all(jnp.isfinite(v) & (v >= 0))):
                raise ValueError(f"smoothing_factors: `{name}` must be finite and >= 0")
    ok = (a > 0) & (w > 0)
    a1 = jnp.where(ok, a, 1.0)
    w1 = jnp.where(ok, w, 1.0)
    s = jnp.where(ok, jnp.exp(alpha * jnp.log(a1) - (1.0 - alpha) * jnp.log(w1)), 1.0)
    if power_of_two:
        s = jnp.exp2(jnp.round(jnp.log2(s)))
    return s


def smooth_activation(x: jax.Array, s: jax.Array, axis: int = -1) -> jax.Array:
    """``x / s`` along the input-channel `axis` (computed as ``x * (1 / s)``)."""
    x = jnp.asarray(x)
    axis %= x.ndim
    shape = [1] * x.ndim
    shape[axis] = -1
    return x * (1.0 / jnp.asarray(s, jnp.float32)).astype(x.dtype).reshape(shape)


def smooth_weight(w: jax.Array, s: jax.Array, axis: int = 0) -> jax.Array:
    """``diag(s) W``: row ``j`` along `axis` (the input rows of a Dense kernel) times ``s_j``."""
    w = jnp.asarray(w)
    axis %= w.ndim
    shape = [1] * w.ndim
    shape[axis] = -1
    return w * jnp.asarray(s, jnp.float32).astype(w.dtype).reshape(shape)
