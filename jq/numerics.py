"""Number formats: storage dtype, integer grid, accumulation dtype, representable range.

Every low-precision format that jq knows is described by one frozen `Format`.
Formats are looked up by name (`get_format("int8")`); aliases such as
``"e4m3"`` or ``"bf16"`` resolve to the canonical name.

Integer formats map reals onto the grid ``[qmin, qmax]`` with
``x = S * (x_q - Z)``. Symmetric signed formats use the *narrow* range
(int8 is ``[-127, 127]``) so that the grid is symmetric around zero and
``-x`` is representable whenever ``x`` is. Float formats (fp8, fp16, bf16) keep
their own exponent and mantissa; fp8 uses a per-tensor / per-channel scale so
that the data fills ``[-max, max]``.

Example usage::

  >>> import jq
  >>> jq.numerics.format_info("float16").check(1e-12)
  'underflows to 0 in float16 (smallest subnormal 5.96e-08)'
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax.numpy as jnp
import ml_dtypes
import numpy as np

__all__ = [
    "FORMATS",
    "Format",
    "FormatInfo",
    "canonical_name",
    "format_info",
    "get_format",
]


@dataclasses.dataclass(frozen=True)
class Format:
    """A number format jq can quantize to.

    Attributes:
      name: canonical name, e.g. ``"int8"`` or ``"float8_e4m3fn"``.
      kind: ``"int"`` for integer grids, ``"float"`` for fp8 / fp16 / bf16.
      bits: bits per element as stored (int4 packs two per byte).
      dtype: the dtype that holds one logical element (int4 uses int8 logically
        and is packed two-per-uint8 in a `QArray`).
      qmin, qmax: the full integer grid (integer formats) or ``-max, max``
        (float formats).
      accum_dtype: accumulation dtype of a dot product on this format: int32 for
        integer formats, float32 for bf16 and fp8, float32 for fp16 by default.
      scaled: whether quantizing to this format uses a scale (integers and fp8);
        fp16 and bf16 are plain casts.
    """

    name: str
    kind: Literal["int", "float"]
    bits: int
    dtype: np.dtype
    qmin: float
    qmax: float
    accum_dtype: np.dtype
    scaled: bool

    @property
    def is_integer(self) -> bool:
        return self.kind == "int"

    @property
    def signed(self) -> bool:
        return self.qmin < 0

    def grid(self, narrow_range: bool) -> tuple[int, int]:
        """The integer grid ``(qmin, qmax)``; narrow drops the most negative value."""
        if not self.is_integer:
            raise ValueError(f"format {self.name!r} has no integer grid")
        qmin = int(self.qmin) + 1 if (narrow_range and self.signed) else int(self.qmin)
        return qmin, int(self.qmax)


def _int(name: str, bits: int, dtype, signed: bool) -> Format:
    if signed:
        qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    else:
        qmin, qmax = 0, 2**bits - 1
    return Format(name, "int", bits, np.dtype(dtype), qmin, qmax, np.dtype(np.int32), True)


def _float(name: str, dtype, accum, scaled: bool) -> Format:
    fi = ml_dtypes.finfo(dtype)
    bits = np.dtype(dtype).itemsize * 8
    return Format(
        name, "float", bits, np.dtype(dtype), -float(fi.max), float(fi.max), np.dtype(accum), scaled
    )


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        _int("int8", 8, np.int8, True),
        _int("uint8", 8, np.uint8, False),
        _int("int16", 16, np.int16, True),
        _int("int4", 4, np.int8, True),
        _float("float8_e4m3fn", ml_dtypes.float8_e4m3fn, np.float32, True),
        _float("float8_e5m2", ml_dtypes.float8_e5m2, np.float32, True),
        _float("float16", np.float16, np.float32, False),
        _float("bfloat16", ml_dtypes.bfloat16, np.float32, False),
    )
}

_ALIASES = {
    "i8": "int8",
    "s8": "int8",
    "u8": "uint8",
    "i16": "int16",
    "s16": "int16",
    "i4": "int4",
    "s4": "int4",
    "fp8": "float8_e4m3fn",
    "e4m3": "float8_e4m3fn",
    "fp8_e4m3": "float8_e4m3fn",
    "float8_e4m3": "float8_e4m3fn",
    "e5m2": "float8_e5m2",
    "fp8_e5m2": "float8_e5m2",
    "fp16": "float16",
    "half": "float16",
    "f16": "float16",
    "bf16": "bfloat16",
}


def canonical_name(name: str) -> str:
    """Resolves an alias (``"e4m3"``, ``"bf16"``, ...) to the canonical format name."""
    if not isinstance(name, str):
        raise TypeError(f"format must be a string such as 'int8', got {type(name).__name__}")
    key = name.lower()
    key = _ALIASES.get(key, key)
    if key not in FORMATS:
        known = ", ".join(sorted(FORMATS))
        raise ValueError(f"unknown format {name!r}; known formats: {known}")
    return key


def get_format(name: str | Format) -> Format:
    """Returns the `Format` for a name or alias; raises ValueError for unknown names."""
    if isinstance(name, Format):
        return name
    return FORMATS[canonical_name(name)]


@dataclasses.dataclass(frozen=True)
class FormatInfo:
    """What a format can represent.

    Attributes:
      name: canonical format name.
      max: largest finite value (for integer formats: qmax, the grid's top).
      min: most negative finite value (qmin for integer formats).
      smallest_normal: smallest positive normal value (1 for integers).
      smallest_subnormal: smallest positive value at all (1 for integers).
      eps: distance from 1.0 to the next representable value.
      bits: storage bits per element.
    """

    name: str
    max: float
    min: float
    smallest_normal: float
    smallest_subnormal: float
    eps: float
    bits: int

    def check(self, value: float) -> str:
        """Says how `value` fares when stored in this format (unscaled).

        For float formats the answer is that of an actual round-to-nearest-even
        cast of the float32 value (what ``x.astype(fmt)`` does in JAX), so values
        just below the smallest normal that round up to it count as normal, and
        values just above `max` that round down to it do not overflow.

        Returns one of: ``'normal in <fmt>'``, ``'subnormal in <fmt> (... precision lost)'``,
        ``'underflows to 0 in <fmt> ...'``, ``'overflows <fmt> (max ...)'``, ``'exact zero'``.
        """
        v = abs(float(value))
        if v == 0.0:
            return "exact zero"
        fmt = get_format(self.name)
        if fmt.is_integer:
            # an unscaled integer grid: round half to even, nothing is subnormal
            if not self.min <= np.round(float(value)) <= self.max:
                return f"overflows {self.name} (range [{self.min:.6g}, {self.max:.6g}])"
            if np.round(v) == 0.0:
                return f"underflows to 0 in {self.name} (integer step 1; quantize with a scale)"
            return f"normal in {self.name}"
        else:
            with np.errstate(over="ignore", invalid="ignore"):
                stored = abs(float(np.asarray(v, np.float32).astype(fmt.dtype)))
            # e4m3fn has no inf: an overflowing cast gives NaN
            v = self.max * 2 if not np.isfinite(stored) else stored
        if v > self.max:
            return f"overflows {self.name} (max {self.max:.6g})"
        if v == 0.0 or v <= self.smallest_subnormal / 2:  # exactly half rounds (to even) to 0
            return (
                f"underflows to 0 in {self.name} (smallest subnormal {self.smallest_subnormal:.3g})"
            )
        if v < self.smallest_normal:
            return (
                f"subnormal in {self.name} (below smallest normal "
                f"{self.smallest_normal:.3g}; precision lost)"
            )
        return f"normal in {self.name}"

    def representable(self, value: float) -> bool:
        """True when `value` is stored as a normal (full-precision) number or zero."""
        return self.check(value) in ("exact zero", f"normal in {self.name}")


def format_info(name: str | Format) -> FormatInfo:
    """Returns max, min, smallest normal, smallest subnormal and eps of a format.

    Example: ``format_info("float16").check(1e-12)`` tells you that a LayerNorm
    epsilon of 1e-12 underflows to zero in float16 (its smallest normal is about
    6.1e-5), while ``format_info("bfloat16").representable(1e-12)`` is True.
    """
    fmt = get_format(name)
    if fmt.is_integer:
        return FormatInfo(fmt.name, float(fmt.qmax), float(fmt.qmin), 1.0, 1.0, 1.0, fmt.bits)
    fi = ml_dtypes.finfo(fmt.dtype)
    return FormatInfo(
        fmt.name,
        float(fi.max),
        float(fi.min),
        float(fi.smallest_normal),
        float(fi.smallest_subnormal),
        float(fi.eps),
        fmt.bits,
    )


def jnp_dtype(fmt: Format):
    """The jax.numpy dtype of one logical element."""
    return jnp.dtype(fmt.dtype)
