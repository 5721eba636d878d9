"""Calibration observers: pure, jittable range estimators in the optax style.

Every observer is a frozen, hashable dataclass with three pure methods::

    state = obs.init(x)              # empty statistics for batches shaped like x
    state = obs.update(state, x)     # add one batch; jittable, no host sync
    lo, hi = obs.range(state)        # on the host; channel shape or scalars

plus ``obs.merge(state_a, state_b)`` to combine the statistics of
data-parallel shards. States are `NamedTuple` pytrees (they jit, vmap and
checkpoint unchanged); statistics are kept in keepdims form (``(1, C)`` for a
``(N, C)`` input observed along ``axis=1``) and `range` returns the channel
shape ``(C,)`` or scalars, which ``jq.qparams_from_range(lo, hi, spec)`` takes
directly.

Bad input: integer input and a rank or channel-count mismatch raise at once.
NaN / inf raise in `update` on concrete input; under jit they are counted in
``state.nonfinite`` and `range` raises with the count (``nonfinite="ignore"``
drops them, counts them and warns). `range` before any `update` raises.
"""

from jq.calibration.histogram import Histogram, HistogramState
from jq.calibration.minmax import (
    MinMax,
    MinMaxState,
    MovingAverageMinMax,
    MovingAverageMinMaxState,
)

__all__ = [
    "Histogram",
    "HistogramState",
    "MinMax",
    "MinMaxState",
    "MovingAverageMinMax",
    "MovingAverageMinMaxState",
]
