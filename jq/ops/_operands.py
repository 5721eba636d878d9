"""Operands of the quantized ops: checks, parameter layouts and run-time ranges.

An operand is a float array or a `QArray` whose scale and zero point are in
keepdims form (rank of the array, size 1 on unscaled axes). A scale axis is
either a channel axis (full size) or a block axis (size ``n / block_size``).
Per-channel scales must lie on non-contracting axes, since they are folded on
the output; blocks along the contraction split it (see `jq.ops._kernels`).

A float operand with a spec is quantized by `jq.ops._float_operands` before
the op sees it, statically from `QParams` or dynamically from its own min-max
(`dynamic_qparams`, over its finite rows only: `finite_rows`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jq.qparams import (
    QParams,
    QuantSpec,
    broadcast_qparams,
    qparams_from_array,
    qparams_from_range,
)
from jq.quantize import QArray


def param_layout(q: QArray, name: str) -> tuple[tuple[int, ...], int | None, int | None]:
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


def check_scales(q: QArray, contract: tuple[int, ...], name: str):
    channel, baxis, bsize = param_layout(q, name)
    for a in channel:
        if a in contract and q.shape[a] > 1:
            free = tuple(b for b in range(q.ndim) if b not in contract)
            raise ValueError(
                f"`{name}`: a per-channel scale lies on axis {a}, which is a contracting axis of "
                f"this dot (`{name}` has shape {tuple(q.shape)}, contracting axes {tuple(contract)}); "
                f"per-channel scales must be on non-contracting axes {free} (per-block scales, "
                "block_axis/block_size, vary the scale along the contraction; model rules take "
                "QuantSpec(axis='out'), which finds those axes)"
            )
    return baxis, bsize


def expand_free_blocks(q: QArray, contract: tuple[int, ...], name: str) -> QArray:
    """Repeats per-block parameters that lie on a non-contracting axis to full size.

    Only blocks along the contraction need the block-split dot; elsewhere a
    block scale is just a coarser per-channel scale.
    """
    _, baxis, bsize = param_layout(q, name)
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


def as_qarray_params(q: QArray) -> QArray:
    """QArray with scale / zero point in keepdims form (scalar parameters reshaped)."""
    scale = _keepdims(q.scale, q.ndim)
    zp = _keepdims(q.zero_point, q.ndim)
    if scale is q.scale and zp is q.zero_point:
        return q
    return QArray(q.value, scale, zp, q.format, q.shape, q.pack_axis)


def check_spec_args(side: str, x, spec, qp) -> None:
    """Raises for a `{side}_spec` / `{side}_qparams` that the op cannot apply.

    A float operand with a `QuantSpec` never reaches an op's body: the
    `float_operands` decorator quantizes it first. What is left here are the
    misuses: parameters without a spec, a spec for a `QArray`, a spec that is
    not a `QuantSpec`.
    """
    if spec is None:
        if qp is not None:
            raise ValueError(
                f"{side}_qparams was given without {side}_spec; pass the QuantSpec too"
            )
        return
    if isinstance(x, QArray):
        applies = "lhs_spec / lhs_qparams apply" if side == "lhs" else "rhs_spec applies"
        raise ValueError(f"{side} is already a QArray; {applies} only to a float {side}")
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"{side}_spec must be a jq.QuantSpec, got {type(spec).__name__}")
    raise AssertionError(f"a float {side} with {side}_spec reached the op unquantized")


def operand_qparams(
    x, spec: QuantSpec, qp: QParams | None, contract, name: str, rows, ok
) -> QParams:
    """Keepdims `QParams` for a float operand: `qp` broadcast (static), or dynamic.

    The dynamic range comes from the finite rows only: `ok` is `finite_rows`
    over the axes `rows` (see `_dynamic_qparams_rows`).
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
    return _dynamic_qparams_rows(jax.lax.stop_gradient(x), spec, rows, ok, name)


def finite_rows(x, axes) -> jax.Array:
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
    """`dynamic_qparams` over the finite rows of `x` only (`ok`: `finite_rows` over `rows`).

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


def result_dtype(preferred_element_type):
    """The op's result dtype: `preferred_element_type` when floating, else float32."""
    if preferred_element_type is not None and jnp.issubdtype(
        jnp.dtype(preferred_element_type), jnp.floating
    ):
        return jnp.dtype(preferred_element_type)
    return jnp.dtype(jnp.float32)


def check_operand(x, name):
    """A `QArray` in keepdims form, or `x` as a float array (TypeError otherwise)."""
    if isinstance(x, QArray):
        return as_qarray_params(x)
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
            f"`{name}` must be a float array or a jq.QArray, got an array of dtype {x.dtype}"
        )
    return x
