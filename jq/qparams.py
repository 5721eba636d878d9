"""`QuantSpec` (how to quantize) and `QParams` (the scale and zero point).

The affine scheme maps a real ``x`` to an integer ``x_q`` by::

    x_q = clip(round_half_even(x * (1 / S)) + Z, qmin, qmax)
    x   ~ S * (x_q - Z)

(``x * (1 / S)`` rather than ``x / S``, as PyTorch computes it: XLA turns a
division by a broadcast scale into that product anyway, so writing it keeps
every path bit-identical.)

The symmetric scheme fixes ``Z = 0`` for signed formats (with the narrow grid,
so int8 is ``[-127, 127]``) and ``Z = 128`` for uint8 (ONNX Runtime's
convention). Parameters are per tensor (``axis=None``), per channel along one or
more axes (``axis=1``, ``axis=-1``, ``axis=(0, 2)``), per row (``axis="rows"``, for
activations: one scale for each position of every axis the op does not contract,
so per token on ``(batch, tokens, features)``; the op that reads the tensor
resolves it, `QuantSpec.for_operand`), or per block: ``block_size``
consecutive elements along ``block_axis`` share one scale (combinable with
per-channel axes, e.g. GPTQ-style group scales of a ``(K, N)`` kernel are
``axis=-1, block_axis=0, block_size=128``).

A weight spec may instead name axes by what they are to the weight's dot:
``axis="out"`` gives one scale per output channel, varying over every axis
of the weight that the dot does not contract (heads included), and
``group_size=128`` adds blocks of 128 along the contraction. The model verbs
(`jq.calibrate`, `jq.convert`, ...) resolve such a spec against each site's
dataflow (`jq.flax.weight_axes`); a bare array has no dot, so the array-level
functions here need integer axes.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from jq import checks as _checks
from jq import numerics

__all__ = [
    "QParams",
    "QuantSpec",
    "broadcast_qparams",
    "qparams_from_array",
    "qparams_from_range",
    "reduce_range",
]

Scheme = Literal["symmetric", "affine"]

#: ``QuantSpec(axis=ROWS)``: one scale per row of an operand, i.e. per position of every
#: axis that the op reading it does not contract (stored as ``axis=("rows",)``).
ROWS = "rows"

#: ``QuantSpec(axis=OUT)``: one scale per output channel of the weight's dot
OUT = "out"


def _as_axes(axis) -> tuple[int, ...] | tuple[str] | str | None:
    if axis is None:
        return None
    if axis == ROWS or (isinstance(axis, (tuple, list)) and tuple(axis) == (ROWS,)):
        return (ROWS,)
    if isinstance(axis, str):
        if axis != OUT:
            raise ValueError(
                f"QuantSpec.axis={axis!r}: the named axes are 'out' (weights: per output channel "
                "of the weight's dot) and 'rows' (dynamic activations: per row / token); "
                "otherwise pass None, an int or a tuple of ints"
            )
        return OUT
    if isinstance(axis, (int, np.integer)):
        return (int(axis),)
    if isinstance(axis, (tuple, list)) and all(isinstance(a, (int, np.integer)) for a in axis):
        if len(set(axis)) != len(axis):
            raise ValueError(f"QuantSpec.axis={tuple(axis)} repeats an axis")
        return tuple(int(a) for a in axis)
    raise TypeError(
        f"QuantSpec.axis must be None, 'out', {ROWS!r}, an int or a tuple of ints, got {axis!r}"
    )


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """How to quantize one tensor. Frozen and hashable: it fits in a `jq.Rule` and in jit.

    Attributes:
      format: target format name (``"int8"``, ``"uint8"``, ``"int16"``, ``"int4"``,
        ``"float8_e4m3fn"`` / ``"e4m3"``, ``"float8_e5m2"`` / ``"e5m2"``,
        ``"float16"``, ``"bfloat16"``).
      scheme: ``"symmetric"`` (Z = 0; uint8 uses Z = 128) or ``"affine"``.
      axis: channel axis or axes that keep their own parameters (negative axes
        allowed); None means per tensor. ``"rows"`` (dynamic activations only):
        one scale per row, that is per position of every axis of the operand
        that the op does not contract: per token on ``(tokens, features)`` and
        ``(batch, tokens, features)`` inputs of a Dense (any rank), per example
        for a convolution (its window contracts the spatial axes). The op
        resolves it (`for_operand`); ``axis=0`` is per position of axis 0 only.
        ``"out"`` (weights in rules only): per output channel of the weight's
        dot, i.e. every stored axis the dot does not contract, whatever the
        model's layout (a ``(D, H, Dh)`` query kernel gets ``H * Dh`` scales,
        HF GPT-2's ``(out, in)`` Conv1D kernel one per row).
      group_size: with ``axis="out"``: blocks of `group_size` elements along
        the dot's contraction share one scale (GPTQ / AWQ groups). When it does
        not divide the contraction, the largest divisor not above it is used,
        or one scale per output channel when that divisor is below a quarter
        of it; `QuantizedVariables.summary` says which.
      block_size: if set, ``block_size`` consecutive elements along `block_axis`
        share one scale.
      block_axis: the axis cut into blocks (required with `block_size`).
      narrow_range: drop the most negative code (int8 -> [-127, 127]). Defaults to
        True for the symmetric scheme on signed formats, False otherwise.
      calibration: an observer (e.g. ``jq.calibration.MinMax()``). For an
        activation spec, naming one makes quantization *static* (ranges
        calibrated ahead of time); None makes it *dynamic* (ranges computed at
        run time).
    """

    format: str = "int8"
    scheme: Scheme = "symmetric"
    axis: int | tuple[int, ...] | None = None
    block_size: int | None = None
    block_axis: int | None = None
    narrow_range: bool | None = None
    calibration: Any = None
    group_size: int | None = None

    def __post_init__(self):
        fmt = numerics.get_format(self.format)
        object.__setattr__(self, "format", fmt.name)
        if self.scheme not in ("symmetric", "affine"):
            raise ValueError(
                f"QuantSpec.scheme must be 'symmetric' or 'affine', got {self.scheme!r}"
            )
        if self.scheme == "affine" and not fmt.is_integer:
            raise ValueError(
                f"QuantSpec: the affine scheme needs an integer format, got {fmt.name!r}; "
                "float formats are symmetric"
            )
        object.__setattr__(self, "axis", None if self.axis is None else _as_axes(self.axis))
        if self.axis is not None and len(self.axis) == 1:
            object.__setattr__(self, "axis", self.axis)
        if self.per_row and (self.calibration is not None or self.block_size is not None):
            raise ValueError(
                "QuantSpec(axis='rows') is for dynamic activations (each call's rows); it takes "
                "no calibration observer and no blocks"
            )
        if self.group_size is not None:
            if (
                isinstance(self.group_size, bool)
                or not isinstance(self.group_size, (int, np.integer))
                or self.group_size < 1
            ):
                raise ValueError(
                    f"QuantSpec.group_size must be a positive int, got {self.group_size!r}"
                )
            if self.axis != OUT:
                raise ValueError(
                    "QuantSpec.group_size goes with axis='out' (groups along the dot's contraction, "
                    "one scale per output channel and group); with integer axes use "
                    "block_axis / block_size"
                )
            if not fmt.scaled:
                raise ValueError(
                    f"QuantSpec: format {fmt.name!r} is a plain cast and has no groups"
                )
            object.__setattr__(self, "group_size", int(self.group_size))
        if self.axis == OUT and self.block_size is not None:
            raise ValueError(
                "QuantSpec: axis='out' takes group_size= for blocks along the contraction, "
                f"not block_axis / block_size (got block_axis={self.block_axis!r})"
            )
        if (self.block_size is None) != (self.block_axis is None):
            raise ValueError(
                "QuantSpec: block_size and block_axis go together, got "
                f"block_size={self.block_size!r}, block_axis={self.block_axis!r}"
            )
        if self.block_axis is not None and (
            isinstance(self.block_axis, bool) or not isinstance(self.block_axis, (int, np.integer))
        ):
            raise TypeError(f"QuantSpec.block_axis must be an int, got {self.block_axis!r}")
        if self.block_size is not None:
            if (
                isinstance(self.block_size, bool)
                or not isinstance(self.block_size, (int, np.integer))
                or self.block_size < 1
            ):
                raise ValueError(
                    f"QuantSpec.block_size must be a positive int, got {self.block_size!r}"
                )
            if not fmt.scaled:
                raise ValueError(
                    f"QuantSpec: format {fmt.name!r} is a plain cast and has no blocks"
                )
        if self.narrow_range is None:
            object.__setattr__(
                self,
                "narrow_range",
                bool(self.scheme == "symmetric" and fmt.is_integer and fmt.signed),
            )

    # -- derived ---------------------------------------------------------------------------
    @property
    def fmt(self) -> numerics.Format:
        return numerics.get_format(self.format)

    @property
    def qmin(self) -> float:
        fmt = self.fmt
        return fmt.grid(self.narrow_range)[0] if fmt.is_integer else fmt.qmin

    @property
    def qmax(self) -> float:
        fmt = self.fmt
        return fmt.grid(self.narrow_range)[1] if fmt.is_integer else fmt.qmax

    @property
    def is_static(self) -> bool:
        return self.calibration is not None

    @property
    def per_tensor(self) -> bool:
        return self.axis is None and self.block_size is None

    @property
    def per_row(self) -> bool:
        """``axis="rows"``: one scale per position of every non-contracting axis."""
        return self.axis == (ROWS,)

    def for_operand(self, ndim: int, contract) -> QuantSpec:
        """This spec for a rank-`ndim` operand that an op contracts over `contract`.

        A per-row spec (``axis="rows"``) becomes per channel along every axis not in
        `contract` (per tensor if there is none); any other spec is returned as is.
        """
        if not self.per_row:
            return self
        contract = {a % ndim for a in contract}
        free = tuple(a for a in range(ndim) if a not in contract)
        return self.replace(axis=free or None)

    @property
    def semantic(self) -> bool:
        """True for ``axis="out"``: the axes are named by the weight's dot, resolved per site."""
        return self.axis == OUT

    def _check_concrete(self, name: str) -> None:
        if self.semantic:
            raise ValueError(
                f"QuantSpec(axis='out'{'' if self.group_size is None else f', group_size={self.group_size}'}) "
                f"names axes by a weight's dot, which `{name}` does not have: the model verbs "
                "(jq.convert, jq.calibrate, jq.quantize_model, ...) resolve it per site; for a bare "
                "array pass integer axes (axis=..., block_axis=..., block_size=...)"
            )

    def replace(self, **kw) -> QuantSpec:
        return dataclasses.replace(self, **kw)

    def channel_axes(self, ndim: int, name: str = "x") -> tuple[int, ...]:
        """Channel axes made non-negative for a rank-`ndim` tensor; checks the range."""
        self._check_concrete(name)
        if self.axis is None:
            return ()
        if self.per_row:
            raise ValueError(
                f"QuantSpec(axis='rows') for `{name}`: per-row scales are resolved by the op "
                "that contracts the tensor (jq.ops dot_general / einsum / conv_general_dilated "
                "and their qat_* forms, for dynamic activations); here the contracting axes are "
                "unknown. Name the channel axes instead (axis=0, axis=(0, 1), ...)"
            )
        out = []
        for a in self.axis:
            if not -ndim <= a < ndim:
                raise ValueError(f"QuantSpec.axis={a} is out of range for `{name}` of rank {ndim}")
            out.append(a % ndim)
        if len(set(out)) != len(out):
            raise ValueError(
                f"QuantSpec.axis={self.axis} names the same axis twice for rank {ndim}"
            )
        return tuple(out)

    def canonical_block_axis(self, ndim: int, name: str = "x") -> int | None:
        if self.block_axis is None:
            return None
        a = self.block_axis
        if not -ndim <= a < ndim:
            raise ValueError(
                f"QuantSpec.block_axis={a} is out of range for `{name}` of rank {ndim}"
            )
        a %= ndim
        if a in self.channel_axes(ndim, name):
            raise ValueError(f"QuantSpec.block_axis={self.block_axis} is also a channel axis")
        return a

    def param_shape(self, shape: tuple[int, ...], name: str = "x") -> tuple[int, ...]:
        """Shape of the scale for a tensor of `shape` (same rank: keepdims form)."""
        shape = tuple(shape)
        ndim = len(shape)
        axes = self.channel_axes(ndim, name)
        baxis = self.canonical_block_axis(ndim, name)
        out = [1] * ndim
        for a in axes:
            out[a] = shape[a]
        if baxis is not None:
            if shape[baxis] % self.block_size:
                raise ValueError(
                    f"QuantSpec.block_size={self.block_size} does not divide dimension "
                    f"{baxis} (size {shape[baxis]}) of `{name}` with shape {shape}"
                )
            out[baxis] = shape[baxis] // self.block_size
        return tuple(out)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QParams:
    """Scale and zero point; a pytree.

    Attributes:
      scale: float32 array, positive; scalar (per tensor), the channel shape
        (as observers return it) or the keepdims shape of the tensor.
      zero_point: int32 array of the scale's shape, or None (symmetric signed
        and float formats, where Z = 0).
    """

    scale: jax.Array
    zero_point: jax.Array | None = None

    def replace(self, **kw) -> QParams:
        return dataclasses.replace(self, **kw)


def _is_concrete(*xs) -> bool:
    return not any(isinstance(x, jax.core.Tracer) for x in xs)


def _check_range(lo, hi):
    """Raises ValueError on concrete bad ranges; under jit registers checkify checks."""
    if _is_concrete(lo, hi):
        lo_np, hi_np = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
        if not (np.all(np.isfinite(lo_np)) and np.all(np.isfinite(hi_np))):
            raise ValueError(
                f"qparams_from_range: lo/hi must be finite, got lo={lo_np}, hi={hi_np} "
                "(NaN or inf in the range; check the calibration data)"
            )
        if np.any(lo_np > hi_np):
            bad = np.argwhere(lo_np > hi_np)[:3].tolist() if lo_np.ndim else []
            raise ValueError(
                f"qparams_from_range: lo > hi (lo={lo_np}, hi={hi_np}; first bad index {bad})"
            )
    else:
        _checks.debug_check(
            jnp.all(jnp.isfinite(lo)) & jnp.all(jnp.isfinite(hi)),
            "qparams_from_range: lo/hi must be finite (NaN or inf in the range)",
        )
        _checks.debug_check(jnp.all(lo <= hi), "qparams_from_range: lo > hi")


def _recip(n: float) -> np.float32:
    # Divisions by a constant are multiplications by its float32 reciprocal: XLA
    # rewrites `a / c` into `a * (1 / c)` for constant or broadcast divisors but
    # not otherwise, so writing the product keeps eager, jit, per-tensor and
    # per-channel results bit-identical.
    return np.float32(1.0 / n)


def qparams_from_range(lo, hi, spec: QuantSpec) -> QParams:
    """Computes `QParams` covering ``[lo, hi]`` for `spec`.

    The range is first widened to include 0 so that 0.0 is exactly
    representable (``dequantize(quantize(0)) == 0``).

    * symmetric, signed: ``S = max(|lo|, |hi|) / qmax``, ``Z = 0``
      (int8: ``amax / 127``, ONNX Runtime's choice).
    * symmetric, uint8: ``S = 2 * amax / 255``, ``Z = 128``.
    * affine: ``S = (hi - lo) / (qmax - qmin)``, ``Z = round(qmin - lo / S)``.
    * fp8: ``S = amax / fmt.max``; fp16 / bf16: ``S = 1`` (plain cast).

    A zero-width range at 0 (all-zero data) gives ``S = 1`` and the usual Z:
    every value quantizes to Z and dequantizes to exactly 0. Scales are floored
    at the smallest normal float32 so they are never 0 or subnormal. Divisions
    by the grid size are multiplications by its float32 reciprocal (the same
    bits eager and under jit, for every granularity).

    Args:
      lo, hi: arrays of equal shape (scalar for per tensor, the channel shape or
        keepdims shape otherwise).
      spec: the `QuantSpec`.

    Returns:
      `QParams` with ``scale`` (float32) and ``zero_point`` (int32 or None) of
      the shape of `lo`.

    Raises:
      ValueError: lo > hi, or NaN / inf in lo or hi (on concrete inputs; under
        jit these are `checkify` checks: wrap the caller in
        ``checkify.checkify(f, errors=checkify.user_checks)`` to see them).
    """
    lo = jnp.asarray(lo, jnp.float32)
    hi = jnp.asarray(hi, jnp.float32)
    if lo.shape != hi.shape:
        raise ValueError(f"qparams_from_range: lo has shape {lo.shape} but hi has shape {hi.shape}")
    _check_range(lo, hi)
    fmt = spec.fmt
    lo = jnp.minimum(lo, 0.0)
    hi = jnp.maximum(hi, 0.0)
    tiny = jnp.finfo(jnp.float32).tiny
    if not fmt.scaled:
        return QParams(jnp.ones_like(lo), None)
    if not fmt.is_integer:
        amax = jnp.maximum(-lo, hi)
        scale = jnp.where(amax > 0, jnp.maximum(amax * _recip(fmt.qmax), tiny), 1.0)
        return QParams(scale, None)
    qmin, qmax = spec.qmin, spec.qmax
    if spec.scheme == "symmetric":
        amax = jnp.maximum(-lo, hi)
        if fmt.signed:
            scale = amax * _recip(qmax)
            zp = None
        else:  # uint8: centre the grid at 128, as ONNX Runtime does
            scale = amax * _recip((qmax - qmin) / 2.0)  # = 2 * amax / 255, without overflow
            zp = jnp.full(lo.shape, (qmax - qmin + 1) // 2 + qmin, jnp.int32)
        scale = jnp.where(amax > 0, jnp.maximum(scale, tiny), 1.0)
        return QParams(scale, zp)
    width = hi - lo
    levels = qmax - qmin
    # hi / n - lo / n when hi - lo overflows float32 (ranges near +-3.4e38)
    inv = _recip(levels)
    step = jnp.where(jnp.isfinite(width), width * inv, hi * inv - lo * inv)
    scale = jnp.where(width > 0, jnp.maximum(step, tiny), 1.0)
    zp = jnp.clip(jnp.round(qmin - lo / scale), qmin, qmax).astype(jnp.int32)
    return QParams(scale, zp)


def reduce_range(x: jax.Array, spec: QuantSpec, name: str = "x") -> tuple[jax.Array, jax.Array]:
    """Min and max of `x` per the spec's granularity, in keepdims form (float32).

    An empty `x` (or an empty channel) has nothing to cover: its range is ``(0, 0)``.
    """
    x = jnp.asarray(x)
    shape = spec.param_shape(x.shape, name)
    if x.size == 0:
        zero = jnp.zeros(shape, jnp.float32)
        return zero, zero
    baxis = spec.canonical_block_axis(x.ndim, name)
    xf = x.astype(jnp.float32)
    if baxis is not None:
        nb = shape[baxis]
        split = x.shape[:baxis] + (nb, spec.block_size) + x.shape[baxis + 1 :]
        xf = xf.reshape(split)
        # axis a of x is axis a (a <= baxis) or a + 1 (a > baxis) of the split array;
        # keep the channel axes and the block-index axis, reduce the rest (incl. baxis + 1)
        keep = {a if a <= baxis else a + 1 for a in spec.channel_axes(x.ndim, name)}
        keep.add(baxis)
        red = tuple(a for a in range(xf.ndim) if a not in keep)
        lo = jnp.min(xf, axis=red, keepdims=True).reshape(shape)
        hi = jnp.max(xf, axis=red, keepdims=True).reshape(shape)
        return lo, hi
    keep = spec.channel_axes(x.ndim, name)
    red = tuple(a for a in range(x.ndim) if a not in keep)
    return jnp.min(xf, axis=red, keepdims=True), jnp.max(xf, axis=red, keepdims=True)


def qparams_from_array(x: jax.Array, spec: QuantSpec, name: str = "x") -> QParams:
    """Min-max `QParams` for `x` itself (weights, or dynamic activations), keepdims shape.

    For the plain-cast formats (float16, bfloat16) the scale is 1 whatever `x`
    holds, so `x` may contain inf or NaN (the cast saturates or keeps NaN).
    """
    if not spec.fmt.scaled:
        x = jnp.asarray(x)
        return QParams(jnp.ones(spec.param_shape(x.shape, name), jnp.float32), None)
    lo, hi = reduce_range(x, spec, name)
    return qparams_from_range(lo, hi, spec)


def broadcast_qparams(
    qp: QParams, shape: tuple[int, ...], spec: QuantSpec, name: str = "x"
) -> QParams:
    """Reshapes `qp` to the keepdims parameter shape of a tensor of `shape`.

    Accepts a scalar (per tensor), the keepdims shape itself, or any shape
    that differs from it only by size-1 axes, such as the channel shape an
    observer returns: the non-1 sizes of the keepdims shape in axis order (for
    ``axis=-1, block_axis=0`` on a ``(K, N)`` kernel that is
    ``(K // block_size, N)``). A shape with the right size but another order of
    axes is rejected rather than silently reshaped.

    Raises:
      ValueError: `qp` does not fit.
    """
    target = spec.param_shape(shape, name)
    squeezed = tuple(t for t in target if t != 1)

    def fit(p):
        if p is None:
            return None
        p = jnp.asarray(p)
        if p.shape == target:
            return p
        # dropping or adding size-1 axes keeps the element order, so reshape is safe
        if tuple(d for d in p.shape if d != 1) == squeezed:
            return p.reshape(target)
        raise ValueError(
            f"QParams with shape {p.shape} do not fit `{name}` with shape {tuple(shape)} "
            f"under {spec!r}: expected {target} (or {squeezed})"
        )

    return QParams(fit(qp.scale), fit(qp.zero_point))
