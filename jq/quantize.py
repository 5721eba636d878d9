"""Pure quantize / dequantize / fake-quant functions and the `QArray` pytree.

Everything here is plain JAX: it works under `jax.jit`, `jax.vmap` and
`jax.grad`, and its data (`QArray`, `QParams`) are pytrees.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jq import checks as _checks
from jq import numerics
from jq.qparams import QParams, QuantSpec, broadcast_qparams, qparams_from_array

__all__ = [
    "QArray",
    "dequantize",
    "fake_quant",
    "lsq_fake_quant",
    "pack_int4",
    "quantize",
    "unpack_int4",
]


# ---------------------------------------------------------------------------------------
# int4 packing
# ---------------------------------------------------------------------------------------
def pack_int4(values: jax.Array, axis: int = -1) -> jax.Array:
    """Packs int4 values (held in an integer array, range [-8, 7]) two per uint8.

    Element ``2i`` goes to the low nibble and ``2i + 1`` to the high nibble of
    byte ``i`` along `axis` (two's complement nibbles). An odd length is padded
    with one zero.

    Raises:
      TypeError: `values` is not an integer array.
      ValueError: a value lies outside [-8, 7] (concrete inputs; a checkify
        check under jit).
    """
    values = jnp.asarray(values)
    if not jnp.issubdtype(values.dtype, jnp.integer):
        raise TypeError(f"pack_int4: `values` must be an integer array, got {values.dtype}")
    axis = _canonical(axis, values.ndim, "pack_int4", "values")
    if isinstance(values, jax.core.Tracer):
        _checks.debug_check(
            jnp.all((values >= -8) & (values <= 7)),
            "pack_int4: values outside the int4 range [-8, 7]",
        )
    else:
        v = np.asarray(values)
        if v.size and (v.min() < -8 or v.max() > 7):
            raise ValueError(
                f"pack_int4: `values` must lie in the int4 range [-8, 7], got min {v.min()}, max {v.max()}"
            )
    n = values.shape[axis]
    if n % 2:
        pad = [(0, 0)] * values.ndim
        pad[axis] = (0, 1)
        values = jnp.pad(values, pad)
    v = values.astype(jnp.uint8) & 0xF
    lo = lax_slice(v, axis, 0)
    hi = lax_slice(v, axis, 1)
    return lo | (hi << 4)


def lax_slice(x, axis, start):
    idx = [slice(None)] * x.ndim
    idx[axis] = slice(start, None, 2)
    return x[tuple(idx)]


def unpack_int4(packed: jax.Array, size: int, axis: int = -1) -> jax.Array:
    """Inverse of `pack_int4`: uint8 bytes -> int8 values in [-8, 7], `size` along `axis`."""
    packed = jnp.asarray(packed)
    if packed.dtype != jnp.uint8:
        raise TypeError(f"unpack_int4: `packed` must be uint8, got {packed.dtype}")
    axis = _canonical(axis, packed.ndim, "unpack_int4", "packed")
    # sign-extend each nibble: shift it to the top of an int8, then arithmetic-shift back
    lo = (packed << 4).astype(jnp.int8) >> 4
    hi = packed.astype(jnp.int8) >> 4
    both = jnp.stack([lo, hi], axis=axis + 1)
    shape = list(packed.shape)
    shape[axis] *= 2
    out = both.reshape(shape)
    return jax.lax.slice_in_dim(out, 0, size, axis=axis)


def _canonical(axis, ndim, fn, name):
    if not -ndim <= axis < ndim:
        raise ValueError(f"{fn}: axis={axis} is out of range for `{name}` of rank {ndim}")
    return axis % ndim


# ---------------------------------------------------------------------------------------
# QArray
# ---------------------------------------------------------------------------------------
@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["value", "scale", "zero_point"],
    meta_fields=["format", "shape", "pack_axis"],
)
@dataclasses.dataclass(frozen=True)
class QArray:
    """Low-precision values plus the parameters that map them back to floats.

    Invariants:
      * `shape` is the logical shape; `scale.ndim == len(shape)`.
      * `scale` has size 1 on every axis but channel axes (full size) and the
        block axis (``shape[axis] // block_size``).
      * ``dequantize(q) == scale * (value - zero_point)`` in float32
        (``zero_point`` None means 0).
      * int4 values are packed two per uint8 along `pack_axis`; every other
        format stores `value` in its own dtype with ``value.shape == shape``.
    """

    value: jax.Array
    scale: jax.Array
    zero_point: jax.Array | None
    format: str
    shape: tuple[int, ...]
    pack_axis: int | None = None

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def fmt(self) -> numerics.Format:
        return numerics.get_format(self.format)

    @property
    def dtype(self):
        """The dtype `dequantize` returns by default (the scale's)."""
        return self.scale.dtype

    @property
    def nbytes(self) -> int:
        """Bytes held: values plus scales plus zero points."""
        n = (
            self.value.size * self.value.dtype.itemsize
            + self.scale.size * self.scale.dtype.itemsize
        )
        if self.zero_point is not None:
            n += self.zero_point.size * self.zero_point.dtype.itemsize
        return int(n)

    def int_value(self) -> jax.Array:
        """The logical values (int4 unpacked to int8), shape `shape`."""
        if self.pack_axis is None:
            return self.value
        # count the packed axis from the end, so that leading axes added by vmap or
        # removed by scan (which leave the static `shape` as it was) do not shift it
        axis = self.pack_axis - len(self.shape) if self.pack_axis >= 0 else self.pack_axis
        return unpack_int4(self.value, self.shape[axis], axis)

    def dequantize(self, dtype=None) -> jax.Array:
        return dequantize(self, dtype)

    def __repr__(self) -> str:
        return (
            # fields may hold PartitionSpecs or shardings (jq.sharding), which have no shape
            f"QArray(format={self.format}, shape={self.shape}, "
            f"scale_shape={getattr(self.scale, 'shape', self.scale)}, "
            f"zero_point={'yes' if self.zero_point is not None else 'no'}, packed={self.pack_axis is not None})"
        )


def _check_float(x, fn):
    x = jnp.asarray(x) if not isinstance(x, jax.Array) else x
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{fn}: `x` must be a floating-point array, got dtype {x.dtype}")
    return x


def _check_no_nan(x, fn: str) -> None:
    """NaN has no integer code (it would silently become 0): raise on concrete input.

    Under jit this is a `jq.value_checks` check. (+-inf saturates to the ends of
    the grid, as ONNX's QuantizeLinear does; `fake_quant` and the ops keep NaN.)
    """
    if isinstance(x, jax.core.Tracer):
        _checks.debug_check(~jnp.any(jnp.isnan(x)), f"{fn}: NaN in `x` has no integer code")
        return
    n = int(np.count_nonzero(np.isnan(np.asarray(x, np.float32))))
    if n:
        raise ValueError(
            f"{fn}: `x` holds {n} NaN value(s) of {x.size}; NaN has no integer code (it would "
            "be stored as 0). Clean the input, or use jq.fake_quant / jq.ops, which keep NaN"
        )


def _check_qparams(qp: QParams, spec: QuantSpec, fn: str) -> None:
    """Caller-given parameters that cannot quantize: raise (concrete) or checkify (traced).

    A zero or non-finite scale turns every value into 0 or NaN; a zero point
    that is not a whole number puts the grid off its codes; fp8 has no zero
    point. (A negative scale is allowed: it mirrors the grid, and LSQ may learn
    one.)
    """
    if not isinstance(qp, QParams):
        raise TypeError(f"{fn}: `qp` must be a jq.QParams or None, got {type(qp).__name__}")
    if not spec.fmt.scaled:
        return
    if qp.zero_point is not None and not spec.fmt.is_integer:
        raise ValueError(
            f"{fn}: format {spec.format!r} has no zero point, but `qp.zero_point` is set"
        )
    scale, zp = qp.scale, qp.zero_point
    if not isinstance(scale, jax.core.Tracer):
        s = np.asarray(scale, np.float64)
        bad = ~(np.isfinite(s) & (s != 0))
        if bad.any():
            raise ValueError(
                f"{fn}: `qp.scale` must be finite and non-zero, got {s[bad].reshape(-1)[:3].tolist()} "
                f"({int(bad.sum())} of {s.size}); a zero scale maps every value to 0, a non-finite one to NaN"
            )
    else:
        _checks.debug_check(
            jnp.all(jnp.isfinite(scale) & (scale != 0)),
            f"{fn}: `qp.scale` must be finite and non-zero",
        )
    if zp is not None and jnp.issubdtype(jnp.result_type(zp), jnp.floating):
        if not isinstance(zp, jax.core.Tracer):
            z = np.asarray(zp, np.float64)
            if not np.all(z == np.round(z)):
                raise ValueError(
                    f"{fn}: `qp.zero_point` must hold whole numbers (int32), got "
                    f"{z[z != np.round(z)].reshape(-1)[:3].tolist()}; round it first"
                )
        else:
            _checks.debug_check(
                jnp.all(zp == jnp.round(zp)), f"{fn}: `qp.zero_point` must hold whole numbers"
            )


def expand_blocks(p: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Repeats block parameters so they broadcast against `shape` (axes aligned at the end)."""
    off = len(shape) - p.ndim
    for a in range(max(0, -off), p.ndim):
        ps, xs = p.shape[a], shape[a + off]
        if ps not in (1, xs):
            p = jnp.repeat(p, xs // ps, axis=a)
    return p


def quantize(x: jax.Array, qp: QParams | None, spec: QuantSpec) -> QArray:
    """Quantizes `x` with parameters `qp` under `spec`.

    ``x_q = clip(round_half_even(x * (1 / S)) + Z, qmin, qmax)`` for integer
    formats; ``x_q = cast(clip(x * (1 / S), -max, max))`` for fp8 (round to
    nearest even); a saturating cast for fp16 / bf16. The reciprocal ``1 / S``
    is computed once per scale: XLA rewrites ``x / S`` into that product for a
    broadcast or constant `S` and not otherwise, so writing it out keeps eager,
    jit, per-tensor and per-channel results bit-identical (PyTorch computes it
    the same way).

    Args:
      x: floating-point array.
      qp: `QParams` (scalar, channel-shaped or keepdims-shaped), or None to take
        min-max parameters from `x` itself (weights, dynamic activations).
      spec: the `QuantSpec`.

    Returns:
      A `QArray`; int4 values are packed two per byte along the last axis.

    Raises:
      TypeError: `x` is not floating point.
      ValueError: the spec's axes do not fit `x`, or `qp` has the wrong shape;
        with ``qp=None``, NaN or inf in `x` (scaled formats). Under jit the
        latter is a `checkify` check: run
        ``checkify.checkify(jax.jit(f), errors=checkify.user_checks)`` to see it.
    """
    x = _check_float(x, "quantize")
    if qp is None:  # (a NaN makes the range non-finite: qparams_from_array raises)
        qp = qparams_from_array(x, spec)
    else:
        _check_qparams(qp, spec, "quantize")
        _check_no_nan(x, "quantize")
    return encode(x, qp, spec)


def encode(x: jax.Array, qp: QParams, spec: QuantSpec, nonfinite: float | None = None) -> QArray:
    """`quantize`'s map itself, for callers that handle non-finite values themselves.

    No value checks: without `nonfinite`, a NaN in `x` gets an arbitrary code
    (0). `jq.ops` uses it for float operands whose non-finite rows it sets to
    NaN in the output.

    Args:
      nonfinite: the value NaN and inf map to (`nonfinite_mark`): an integer
        code outside the spec's grid, so that the codes themselves show which
        rows were not finite, or NaN for fp8 (e4m3fn has no inf), which a float
        dot then propagates like the unquantized one.
    """
    qp = broadcast_qparams(qp, x.shape, spec)
    fmt = spec.fmt
    inv = expand_blocks(1.0 / qp.scale.astype(jnp.float32), x.shape)
    xf = x.astype(jnp.float32)
    if fmt.is_integer:
        v = jnp.round(xf * inv)
        if qp.zero_point is not None:
            v = v + expand_blocks(qp.zero_point, x.shape).astype(jnp.float32)
        v = jnp.clip(v, spec.qmin, spec.qmax)
        if nonfinite is not None:
            v = jnp.where(jnp.isfinite(xf), v, float(nonfinite))
        v = v.astype(fmt.dtype)
    else:
        v = jnp.clip(xf * inv, fmt.qmin, fmt.qmax)
        if nonfinite is not None:
            v = jnp.where(jnp.isfinite(xf), v, nonfinite)
        v = v.astype(fmt.dtype)
    pack_axis = None
    if fmt.name == "int4" and x.ndim:
        pack_axis = x.ndim - 1
        v = (
            pack_int4(v, pack_axis)
            if not isinstance(v, jax.core.Tracer)
            else _pack_traced(v, pack_axis)
        )
    return QArray(
        v, qp.scale.astype(jnp.float32), qp.zero_point, fmt.name, tuple(x.shape), pack_axis
    )


def nonfinite_mark(spec: QuantSpec) -> float | None:
    """What `encode` can map NaN / inf to without colliding with a finite value's code.

    * an unblocked int8 spec on the narrow grid (``[-127, 127]``, the symmetric
      default): -128, the code the grid leaves free (a row holds it exactly
      when it held a NaN or inf);
    * fp8 (e4m3fn, e5m2): NaN, which a float dot carries to every output the
      row reaches, as the unquantized dot would;
    * None otherwise (a full integer grid has no free code; blocks, int4).
    """
    fmt = spec.fmt
    if spec.block_size is not None:
        return None
    if not fmt.is_integer:
        return float("nan") if fmt.name.startswith("float8") else None
    if fmt.name != "int8" or spec.qmin == fmt.qmin:
        return None
    return float(fmt.qmin)


def _pack_traced(v, axis):
    # values were just clipped to the int4 grid, so no range check is needed
    n = v.shape[axis]
    if n % 2:
        pad = [(0, 0)] * v.ndim
        pad[axis] = (0, 1)
        v = jnp.pad(v, pad)
    u = v.astype(jnp.uint8) & 0xF
    return lax_slice(u, axis, 0) | (lax_slice(u, axis, 1) << 4)


def dequantize(q: QArray, dtype=None) -> jax.Array:
    """``scale * (value - zero_point)``, in `dtype` (default: the scale's, float32)."""
    if not isinstance(q, QArray):
        raise TypeError(f"dequantize: expected a QArray, got {type(q).__name__}")
    v = q.int_value().astype(jnp.float32)
    # v.shape rather than q.shape: equal, except for leading axes added by vmap
    if q.zero_point is not None:
        v = v - expand_blocks(q.zero_point, v.shape).astype(jnp.float32)
    out = v * expand_blocks(q.scale, v.shape)
    return out.astype(dtype or q.scale.dtype)


# ---------------------------------------------------------------------------------------
# fake quantization
# ---------------------------------------------------------------------------------------
def _fq_forward(x, scale, zp, spec):
    """Quantize-dequantize in float; returns (y, inside_mask)."""
    fmt = spec.fmt
    xf = x.astype(jnp.float32)
    inv = 1.0 / scale  # as in `quantize`
    if fmt.is_integer:
        v = jnp.round(xf * inv) + zp
        inside = (v >= spec.qmin) & (v <= spec.qmax)
        y = (jnp.clip(v, spec.qmin, spec.qmax) - zp) * scale
    else:
        v = xf * inv
        inside = (v >= fmt.qmin) & (v <= fmt.qmax)
        y = jnp.clip(v, fmt.qmin, fmt.qmax).astype(fmt.dtype).astype(jnp.float32) * scale
    return y.astype(x.dtype), inside


def _expanded(qp: QParams, shape) -> tuple[jax.Array, jax.Array]:
    """Scale and zero point (0 when None) as float32, repeated to broadcast against `shape`."""
    scale = expand_blocks(qp.scale.astype(jnp.float32), shape)
    zp = (
        jnp.zeros((), jnp.float32)
        if qp.zero_point is None
        else expand_blocks(qp.zero_point, shape).astype(jnp.float32)
    )
    return scale, zp


def fake_quant_with_mask(x: jax.Array, qp: QParams, spec: QuantSpec):
    """``dequantize(quantize(x, qp, spec))`` in float32, and the mask where it does not clip.

    No checks: `qp` is already broadcast to keepdims form (`jq.ops` uses this
    for its straight-through tangents, inside a `jax.custom_jvp`).
    """
    return _fq_forward(x.astype(jnp.float32), *_expanded(qp, x.shape), spec)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _fake_quant_ste(x, scale, zp, spec):
    return _fq_forward(x, scale, zp, spec)[0]


def _ste_fwd(x, scale, zp, spec):
    y, inside = _fq_forward(x, scale, zp, spec)
    return y, (inside, scale, zp)


def _ste_bwd(spec, res, g):
    inside, scale, zp = res
    return (jnp.where(inside, g, 0).astype(g.dtype), jnp.zeros_like(scale), jnp.zeros_like(zp))


_fake_quant_ste.defvjp(_ste_fwd, _ste_bwd)


def _prepare(x, qp, spec, fn):
    x = _check_float(x, fn)
    if qp is None:
        qp = qparams_from_array(jax.lax.stop_gradient(x), spec)
    else:
        _check_qparams(qp, spec, fn)
    qp = broadcast_qparams(qp, x.shape, spec)
    return (x, *_expanded(qp, x.shape))


def fake_quant(x: jax.Array, qp: QParams | None, spec: QuantSpec) -> jax.Array:
    """Quantize-then-dequantize in float, with the straight-through estimator.

    The forward pass equals ``dequantize(quantize(x, qp, spec))``. The gradient
    with respect to `x` is 1 where the rounded value ``round(x / S) + Z`` lies in
    ``[qmin, qmax]`` and 0 where it is clipped (PyTorch's fake-quantize
    definition). `qp` receives no gradient; use `lsq_fake_quant` to learn it.

    Args:
      x: floating-point array.
      qp: `QParams`, or None for min-max parameters of `x` itself.
      spec: the `QuantSpec`.

    Returns:
      An array of `x`'s shape and dtype.
    """
    x, scale, zp = _prepare(x, qp, spec, "fake_quant")
    if not spec.fmt.scaled:  # fp16 / bf16: a rounding cast; identity gradient inside range
        return _fake_quant_ste(x, scale, zp, spec)
    return _fake_quant_ste(x, jax.lax.stop_gradient(scale), jax.lax.stop_gradient(zp), spec)


def _round_ste(v):
    return v + jax.lax.stop_gradient(jnp.round(v) - v)


def _grad_scale(v, g):
    """Value `v`, gradient multiplied by `g`."""
    return jax.lax.stop_gradient(v - v * g) + v * g


def lsq_fake_quant(
    x: jax.Array, qp: QParams, spec: QuantSpec, grad_scale: float | None = None
) -> jax.Array:
    """Fake quantization with a learned scale and zero point (LSQ / LSQ+).

    Forward: ``y = (clip(round(x / S + Z), qmin, qmax) - Z) * S`` with Z rounded
    (straight through). Backward (Esser et al., 2020; Bhalgat et al., 2020):

    * ``dy/dx = 1`` inside the grid, 0 outside;
    * ``dy/dS = round(x/S + Z) - (x/S + Z)`` inside, ``q_clip - Z`` outside;
    * ``dy/dZ = 0`` inside, ``-S`` outside;

    with the gradients of S and Z multiplied by ``g = 1 / sqrt(numel * qmax)``.

    Args:
      x: floating-point array.
      qp: the learned `QParams`: ``scale`` (float, positive) and ``zero_point``
        (float, or None for symmetric). The zero point may be a float array; it
        is rounded in the forward pass.
      spec: an integer `QuantSpec`.
      grad_scale: overrides ``g``.

    References:
      Esser et al., "Learned Step Size Quantization", ICLR 2020.
      Bhalgat et al., "LSQ+: Improving low-bit quantization through learnable
      offsets and better initialization", CVPR-W 2020.
    """
    x = _check_float(x, "lsq_fake_quant")
    if not spec.fmt.is_integer:
        raise ValueError(f"lsq_fake_quant: needs an integer format, got {spec.format!r}")
    qp = broadcast_qparams(qp, x.shape, spec)
    g = grad_scale if grad_scale is not None else 1.0 / math.sqrt(x.size * spec.qmax)
    scale = expand_blocks(_grad_scale(qp.scale.astype(jnp.float32), g), x.shape)
    if qp.zero_point is None:
        zp = jnp.zeros((), jnp.float32)
    else:
        zp = _round_ste(expand_blocks(_grad_scale(qp.zero_point.astype(jnp.float32), g), x.shape))
    v = _round_ste(x.astype(jnp.float32) * (1.0 / scale) + zp)
    # an explicit mask, not jnp.clip: clip's gradient is 1/2 where v == qmin or qmax
    # exactly, which every value rounding to the grid's ends would hit
    vr = jax.lax.stop_gradient(v)
    inside = (vr >= spec.qmin) & (vr <= spec.qmax)
    v = jnp.where(inside, v, jnp.clip(vr, spec.qmin, spec.qmax))
    y = (v - zp) * scale
    return y.astype(x.dtype)
