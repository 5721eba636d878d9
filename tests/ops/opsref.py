"""Shared references of the jq.ops tests: float64 numpy dot_general, dequantization, the
specs every op test draws from."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

import jq

DENSE = (((1,), (0,)), ((), ()))
F32_EPS = float(np.finfo(np.float32).eps)


@functools.partial(jax.jit, static_argnums=2)
def quantize_jit(x, qp, spec):
    """jq.quantize, compiled once per shape (eager dispatch of many small ops is slow)."""
    return jq.quantize(x, qp, spec)


def dequantize_f64(q):
    """Dequantized values in float64 (independent of jq.dequantize)."""
    v = np.asarray(q.int_value(), np.float64)
    z = 0.0 if q.zero_point is None else expand_f64(np.asarray(q.zero_point, np.float64), q.shape)
    return (v - z) * expand_f64(np.asarray(q.scale, np.float64), q.shape)


def expand_f64(p, shape):
    p = p.reshape(p.shape if p.ndim == len(shape) else (1,) * (len(shape) - p.ndim) + p.shape)
    for a, (ps, xs) in enumerate(zip(p.shape, shape, strict=True)):
        if ps not in (1, xs):
            p = np.repeat(p, xs // ps, axis=a)
    return p


def np_dot_general(a, b, dn):
    """Reference dot_general in float64 via numpy einsum."""
    (lc, rc), (lb, rb) = dn
    letters = iter("abcdefghijklmnopqrstuvw")
    la = [None] * a.ndim
    ra = [None] * b.ndim
    for i, j in zip(lb, rb, strict=True):
        la[i] = ra[j] = next(letters)
    for i, j in zip(lc, rc, strict=True):
        la[i] = ra[j] = next(letters)
    for i in range(a.ndim):
        la[i] = la[i] or next(letters)
    for j in range(b.ndim):
        ra[j] = ra[j] or next(letters)
    out = [la[i] for i in lb]
    out += [la[i] for i in range(a.ndim) if i not in lb and i not in lc]
    out += [ra[j] for j in range(b.ndim) if j not in rb and j not in rc]
    spec = f"{''.join(la)},{''.join(ra)}->{''.join(out)}"
    return np.einsum(spec, np.asarray(a, np.float64), np.asarray(b, np.float64))


def rounding_tol(a, b, dn):
    """float32 rounding bound of a dot of float64 operands: ~ K eps sum|a||b|."""
    (lc, _), _ = dn
    k = int(np.prod([a.shape[i] for i in lc]))
    return 4 * (k + 8) * F32_EPS * np_dot_general(np.abs(a), np.abs(b), dn) + 1e-30


def normal(seed, shape, scale=1.0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape) * scale, jnp.float32)


# ---------------------------------------------------------------------------------------
# the integer path against the dequantized reference
# ---------------------------------------------------------------------------------------
SPECS = {
    "i8": jq.QuantSpec("int8"),
    "i8_aff": jq.QuantSpec("int8", scheme="affine"),
    "u8_aff": jq.QuantSpec("uint8", scheme="affine"),
    "u8_sym": jq.QuantSpec("uint8"),
    "i16": jq.QuantSpec("int16"),
    "i16_aff": jq.QuantSpec("int16", scheme="affine"),
    "i4": jq.QuantSpec("int4"),
    "i8_row": jq.QuantSpec("int8", axis=0),
    "u8_row": jq.QuantSpec("uint8", scheme="affine", axis=0),
    "i8_col": jq.QuantSpec("int8", axis=-1),
    "i8_aff_col": jq.QuantSpec("int8", scheme="affine", axis=-1),
    "u8_col": jq.QuantSpec("uint8", scheme="affine", axis=-1),
    "i4_col": jq.QuantSpec("int4", axis=-1),
    "i16_col": jq.QuantSpec("int16", axis=-1),
    "i8_blk": jq.QuantSpec("int8", axis=-1, block_axis=0, block_size=8),
    "i4_blk": jq.QuantSpec("int4", axis=-1, block_axis=0, block_size=8),
    "u8_blk": jq.QuantSpec("uint8", scheme="affine", axis=-1, block_axis=0, block_size=8),
    "i8_lblk": jq.QuantSpec("int8", block_axis=1, block_size=8),
}
