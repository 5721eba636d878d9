"""Min-max observers: running extrema and their exponential moving average.

`MinMax` keeps the tightest bounds seen so far; `MovingAverageMinMax` follows
PyTorch's ``MovingAverageMinMaxObserver``: the first batch initialises the
average, then every batch moves it by ``m <- m + c * (batch_stat - m)``.

Both are frozen, hashable dataclasses with pure methods; their state is a
`NamedTuple` pytree, so `update` jits, vmaps and checkpoints unchanged.

Where jq differs from the references on purpose: the observers return the
*range*; the scale follows from ``jq.qparams_from_range``, which for
symmetric int8 gives ``S = amax / 127`` (ONNX Runtime's choice) where
PyTorch's observers give ``amax / 127.5`` (``(max - min) / (qmax - qmin)``
over a widened ``[-amax, amax]``). The ranges themselves agree exactly
(min-max) or to float32 rounding (moving average).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jq.calibration import _common

__all__ = ["MinMax", "MinMaxState", "MovingAverageMinMax", "MovingAverageMinMaxState"]


class MinMaxState(NamedTuple):
    """Running extrema (keepdims form, see `jq.calibration`)."""

    lo: jax.Array  # shape=stat_shape, dtype=float32 (+inf before any finite value)
    hi: jax.Array  # shape=stat_shape, dtype=float32 (-inf before any finite value)
    count: jax.Array  # shape=(), dtype=int32: batches seen
    nonfinite: jax.Array  # shape=(), dtype=int32: NaN / inf values seen


@dataclasses.dataclass(frozen=True)
class MinMax:
    """Running extrema; `range` gives the tightest bounds seen so far.

    ``lo = min over all batches of min(x)``, ``hi = max ... max(x)``, per tensor
    or per channel along `axis`.

    Attributes:
      axis: channel axis kept (negative allowed); None means per tensor.
      nonfinite: ``"raise"`` (default): NaN / inf in a concrete batch raises in
        `update`; under jit they are counted in the state and `range` raises
        with the count. ``"ignore"``: they are dropped, counted and reported by
        a warning in `range`.

    Example usage::

      >>> import jax.numpy as jnp, jq.calibration as cal
      >>> obs = cal.MinMax(axis=-1)
      >>> x = jnp.array([[1.0, -2.0], [3.0, 0.5]])
      >>> lo, hi = obs.range(obs.update(obs.init(x), x))
      >>> lo.tolist(), hi.tolist()
      ([1.0, -2.0], [3.0, 0.5])
    """

    axis: int | None = None
    nonfinite: str = "raise"

    def __post_init__(self):
        _common.check_fields(self, "MinMax")

    def init(self, x: jax.Array) -> MinMaxState:
        """An empty state for batches shaped like `x` (only shape and dtype are used)."""
        lo, hi = _common.empty_extrema(x, self.axis, "MinMax")
        zero = jnp.zeros((), jnp.int32)
        return MinMaxState(lo, hi, zero, zero)

    def update(self, state: MinMaxState, x: jax.Array) -> MinMaxState:
        """Adds one batch. Jittable, no host sync.

        Raises:
          TypeError: `x` is not floating point.
          ValueError: rank or channel count differ from the state; NaN / inf in a
            concrete `x` with ``nonfinite="raise"``.
        """
        x = _common.check_float_input(x, "MinMax", "update")
        _common.check_update_shape(x, state.lo.shape, self.axis, "MinMax")
        _common.raise_on_concrete_nonfinite(x, self.nonfinite, "MinMax")
        lo, hi, n_bad = _common.batch_stats(x, self.axis)
        return MinMaxState(
            jnp.minimum(state.lo, lo),
            jnp.maximum(state.hi, hi),
            state.count + 1,
            state.nonfinite + n_bad,
        )

    def merge(self, a: MinMaxState, b: MinMaxState) -> MinMaxState:
        """Combines the statistics of two shards: exact (min of mins, max of maxes)."""
        return MinMaxState(
            jnp.minimum(a.lo, b.lo),
            jnp.maximum(a.hi, b.hi),
            a.count + b.count,
            a.nonfinite + b.nonfinite,
        )

    def range(self, state: MinMaxState) -> tuple[jax.Array, jax.Array]:
        """``(lo, hi)`` as float32 arrays of the channel shape, or scalars per tensor.

        Raises:
          ValueError: no update yet; non-finite values were counted (``"raise"``);
            a channel never saw a finite value.
        """
        _common.host_checks("MinMax", state.count, state.nonfinite, self.nonfinite)
        lo, hi = (
            _common.squeeze_stat(state.lo, self.axis),
            _common.squeeze_stat(state.hi, self.axis),
        )
        _check_seen(lo, hi, "MinMax")
        return lo, hi


def _check_seen(lo, hi, owner: str):
    if not bool(jnp.all(lo <= hi)):
        raise ValueError(
            f"{owner}.range: some channel never saw a finite value (its batches were empty, "
            "or held only NaN / inf dropped by nonfinite='ignore')"
        )


class MovingAverageMinMaxState(NamedTuple):
    """Moving averages of the per-batch extrema (keepdims form)."""

    lo: jax.Array  # shape=stat_shape, dtype=float32 (+inf until the first finite batch)
    hi: jax.Array  # shape=stat_shape, dtype=float32 (-inf until the first finite batch)
    count: jax.Array  # shape=(), dtype=int32: batches seen
    nonfinite: jax.Array  # shape=(), dtype=int32: NaN / inf values seen


@dataclasses.dataclass(frozen=True)
class MovingAverageMinMax:
    """Exponential moving average of each batch's min and max (PyTorch's definition).

    The first batch (per channel, the first with a finite value) sets
    ``m = batch_stat``; every later batch gives ``m <- m + c * (batch_stat - m)``
    with ``c = averaging_constant``, computed in float32 in that order, as
    ``torch.ao.quantization.MovingAverageMinMaxObserver`` and ONNX Runtime's
    ``MinMaxCalibrater(moving_average=True)`` (one batch per
    ``collect_data``) do. A batch whose values are all non-finite leaves the
    average unchanged.

    Attributes:
      averaging_constant: ``c`` in ``(0, 1]``; 1 keeps only the last batch.
      axis: channel axis kept; None means per tensor.
      nonfinite: ``"raise"`` or ``"ignore"``, as for `MinMax`.
    """

    averaging_constant: float = 0.01
    axis: int | None = None
    nonfinite: str = "raise"

    def __post_init__(self):
        c = self.averaging_constant
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not 0.0 < float(c) <= 1.0:
            raise ValueError(f"MovingAverageMinMax.averaging_constant must be in (0, 1], got {c!r}")
        object.__setattr__(self, "averaging_constant", float(c))
        _common.check_fields(self, "MovingAverageMinMax")

    def init(self, x: jax.Array) -> MovingAverageMinMaxState:
        lo, hi = _common.empty_extrema(x, self.axis, "MovingAverageMinMax")
        zero = jnp.zeros((), jnp.int32)
        return MovingAverageMinMaxState(lo, hi, zero, zero)

    def update(self, state: MovingAverageMinMaxState, x: jax.Array) -> MovingAverageMinMaxState:
        """Adds one batch: ``m <- m + c * (batch_stat - m)`` (first batch: ``m = batch_stat``).

        Raises:
          TypeError, ValueError: as `MinMax.update`.
        """
        owner = "MovingAverageMinMax"
        x = _common.check_float_input(x, owner, "update")
        _common.check_update_shape(x, state.lo.shape, self.axis, owner)
        _common.raise_on_concrete_nonfinite(x, self.nonfinite, owner)
        b_lo, b_hi, n_bad = _common.batch_stats(x, self.axis)
        c = jnp.float32(self.averaging_constant)
        started = state.lo <= state.hi
        has_data = b_lo <= b_hi
        # computed only where both are finite, so inf - inf never makes a NaN
        safe_lo = jnp.where(started & has_data, state.lo, 0.0)
        safe_hi = jnp.where(started & has_data, state.hi, 0.0)
        avg_lo = safe_lo + c * (jnp.where(has_data, b_lo, 0.0) - safe_lo)
        avg_hi = safe_hi + c * (jnp.where(has_data, b_hi, 0.0) - safe_hi)
        lo = jnp.where(has_data, jnp.where(started, avg_lo, b_lo), state.lo)
        hi = jnp.where(has_data, jnp.where(started, avg_hi, b_hi), state.hi)
        return MovingAverageMinMaxState(lo, hi, state.count + 1, state.nonfinite + n_bad)

    def merge(
        self, a: MovingAverageMinMaxState, b: MovingAverageMinMaxState
    ) -> MovingAverageMinMaxState:
        """Combines two shards' averages as ``(min(lo_a, lo_b), max(hi_a, hi_b))``.

        An exponential moving average of the *global* per-step minimum cannot be
        recovered from the shards' averages (the min of a sum is not the sum of
        the mins). The merged range is the union of the shards' ranges: it is
        exact when the shards saw the same statistics, never narrower than any
        shard's range, and wider than the global average by at most the spread
        between shards. A shard that has seen nothing leaves the other unchanged.
        """
        return MovingAverageMinMaxState(
            jnp.minimum(a.lo, b.lo),
            jnp.maximum(a.hi, b.hi),
            jnp.maximum(a.count, b.count),
            a.nonfinite + b.nonfinite,
        )

    def range(self, state: MovingAverageMinMaxState) -> tuple[jax.Array, jax.Array]:
        """``(lo, hi)`` of the channel shape or scalars; raises like `MinMax.range`."""
        owner = "MovingAverageMinMax"
        _common.host_checks(owner, state.count, state.nonfinite, self.nonfinite)
        lo, hi = (
            _common.squeeze_stat(state.lo, self.axis),
            _common.squeeze_stat(state.hi, self.axis),
        )
        _check_seen(lo, hi, owner)
        return lo, hi
