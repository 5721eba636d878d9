"""A quantized key / value cache on arrays: per token and head scales, written one slice at a time.

An attention cache holds keys and values ``(..., length, heads, head_dim)``. Here
each ``(token, head)`` vector ``c`` of length ``head_dim`` is stored as codes
``c_q`` and one bfloat16 scale ``S = max|c| / qmax`` rounded up (``qmax`` = 127
for int8, 7 for int4, 448 for fp8 e4m3)::

    c_q = round(c / S)  (integers, clipped to [-qmax, qmax]),  or  cast_e4m3(c / S)
    c  ~= S * c_q

so an int8 cache holds ``head_dim`` bytes plus 2 bytes of scale per vector
against ``4 head_dim`` bytes in float32 (0.266x at head_dim 32, 0.254x at 128).
bfloat16 keeps float32's exponent range, so no vector's scale over- or
underflows; rounding the scale up costs at most 2^-8 of one quantization step.
A zero vector gets ``S = 1`` and zero codes. The scales are a `QArray`'s, with
size 1 on the last axis, so `jq.dequantize` reads the cache back.

`update_slice` is ``lax.dynamic_update_slice`` for such a cache: the new slice
is quantized with its own per-vector scales and written into the codes and the
scales; the other vectors are not touched (no re-quantization drift).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jq.qparams import QParams, QuantSpec
from jq.quantize import QArray, dequantize, encode

__all__ = ["cache_nbytes", "check_kv_spec", "empty_kv_cache", "quantize_kv", "update_slice"]

_FORMATS = ("int8", "int4", "float8_e4m3fn", "float8_e5m2")


def check_kv_spec(spec: QuantSpec, fn: str = "jq.kv_cache") -> QuantSpec:
    """Checks that `spec` can quantize a cache: a symmetric int8 / int4 / fp8 format, no axis or blocks."""
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"{fn}: the cache spec must be a jq.QuantSpec, got {type(spec).__name__}")
    if spec.format not in _FORMATS:
        raise ValueError(f"{fn}: a cache format must be one of {_FORMATS}, got {spec.format!r}")
    if spec.scheme != "symmetric" or spec.axis is not None or spec.block_size is not None:
        raise ValueError(
            f"{fn}: a cache spec is symmetric with no axis or blocks (scales are always per "
            f"token and head), got scheme={spec.scheme!r}, axis={spec.axis!r}, "
            f"block_size={spec.block_size!r}"
        )
    if spec.calibration is not None:
        raise ValueError(
            f"{fn}: cache scales are computed when each token is written; drop `calibration`"
        )
    return spec


def _vector_spec(spec: QuantSpec, ndim: int) -> QuantSpec:
    return spec.replace(axis=tuple(range(ndim - 1)) if ndim > 1 else None)


def _bf16_up(s: jax.Array) -> jax.Array:
    """The smallest bfloat16 >= `s` (positive, normal float32 `s`)."""
    b = s.astype(jnp.bfloat16)
    up = jax.lax.bitcast_convert_type(
        jax.lax.bitcast_convert_type(b, jnp.uint16) + jnp.uint16(1), jnp.bfloat16
    )
    return jnp.where(b.astype(jnp.float32) < s, up, b)


def quantize_kv(x: jax.Array, spec: QuantSpec) -> QArray:
    """`x` ``(..., head_dim)`` quantized with one bfloat16 scale per vector along the last axis.

    The scale is ``max|c| / qmax`` rounded *up* to bfloat16 (so no code is clipped),
    and the codes are computed with that stored scale. Vectors with ``max|c| <= 1e-30``
    (or non-finite) get scale 1 and zero codes.
    """
    x = jnp.asarray(x)
    fmt = spec.fmt
    qmax = float(spec.qmax) if fmt.is_integer else float(fmt.qmax)
    amax = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=-1, keepdims=True)
    ok = jnp.isfinite(amax) & (amax > 1e-30)
    scale = _bf16_up(jnp.where(ok, amax / qmax, 1.0))
    q = encode(
        jnp.where(ok, x, 0).astype(x.dtype),
        QParams(scale.astype(jnp.float32), None),
        _vector_spec(spec, x.ndim),
    )
    return QArray(q.value, scale, None, q.format, q.shape, q.pack_axis)


def empty_kv_cache(shape: tuple[int, ...], spec: QuantSpec) -> QArray:
    """A zero cache of logical `shape` (zero codes, unit scales)."""
    return quantize_kv(jnp.zeros(shape, jnp.float32), spec)


def _spec_of(q: QArray) -> QuantSpec:
    return _vector_spec(QuantSpec(q.format), len(q.shape))


def update_slice(q: QArray, update: jax.Array, indices) -> QArray:
    """``lax.dynamic_update_slice(dequantize(q), update, indices)`` kept quantized.

    When `update` spans the whole last axis (one or more complete vectors, the
    attention write), only its vectors are quantized and written. Otherwise
    the cache is dequantized, updated and quantized again (every vector's
    scale recomputed).
    """
    update = jnp.asarray(update)
    spec = _spec_of(q)
    if update.shape[-1] != q.shape[-1] or q.scale.shape[-1] != 1:
        full = jax.lax.dynamic_update_slice(
            dequantize(q, jnp.float32), update.astype(jnp.float32), indices
        )
        return quantize_kv(full, spec)
    new = quantize_kv(update, spec)
    idx = list(indices[:-1]) + [jnp.zeros((), jnp.asarray(indices[-1]).dtype)]
    value = jax.lax.dynamic_update_slice(q.value, new.value, idx)
    scale = jax.lax.dynamic_update_slice(q.scale, new.scale.astype(q.scale.dtype), idx)
    return QArray(value, scale, None, q.format, q.shape, q.pack_axis)


def cache_nbytes(q) -> int:
    """Bytes of a cache leaf: a `QArray`'s codes and scales, or a float array's."""
    if isinstance(q, QArray):
        return q.nbytes
    return int(np.size(q)) * np.dtype(q.dtype).itemsize
