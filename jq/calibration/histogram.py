"""Streaming histogram observer with entropy, MSE and percentile range selection.

The histogram
=============

Each channel keeps ``2 * num_bins`` int32 counts on a *lattice* anchored at
zero: bin ``j`` covers ``[(offset + j) * width, (offset + j + 1) * width)`` for
an integer ``offset``. The first batch uses ONNX Runtime's layout,
``[-amax, amax]`` in ``num_bins`` bins (``width = 2 * amax / num_bins``), placed
in the middle of the stored bins: later batches up to twice as wide land in the
same bins, exactly as ORT's appended bins would.

When a later batch falls outside the stored interval, the width is multiplied
by the smallest power of two ``2**k`` that covers the union, and the union is
centred in the new window (so the next widening on either side finds headroom)
with the new offset a multiple of the new width. Every new bin is then the
union of exactly ``2**k`` old lattice bins, so the old counts are re-binned by
an integer index map (``new = floor((offset + j) / 2**k) - new_offset``) with no
interpolation: the total count is conserved exactly and no count moves out of
the interval it was observed in. (ORT instead keeps the width and appends bins,
so its histogram grows without bound; a jitted state needs a fixed shape.) The
batch itself is added with one jitted scatter-add of ones into the flat
``(channels * 2 * num_bins,)`` count vector; a batch that fits skips the
re-binning (`lax.cond`), and a batch without NaN / inf skips the masking.
Exact data extrema are kept beside the counts.

Because the lattice contains zero, folding the histogram onto ``|x|`` (for the
symmetric methods) is exact too.

Range selection (on the host, NumPy; one channel at a time)
============================================================

* ``"percentile"``: ``symmetric=False`` returns the ``(100 - p) / 2`` and
  ``100 - (100 - p) / 2`` percentiles of the signed data; ``symmetric=True``
  returns ``(-t, t)`` with ``t`` the ``p``-th percentile of ``|x|``. Within a
  bin the CDF is interpolated linearly (ONNX Runtime returns the bin's left
  edge, so jq is up to one bin above it). The result is clipped to the data's
  extrema.
* ``"entropy"``: the KL-divergence threshold search of TensorRT (S. Migacz,
  "8-bit Inference with TensorRT", GTC 2017), vectorised over all candidate
  windows. For each window, ``P`` is the window's counts with the counts
  outside it added to its edge bin (clipping), ``Q`` is the window quantized
  to the grid's levels and expanded back (each level's count spread evenly
  over its bins where ``P`` is non-zero); both are smoothed as in MXNet /
  ONNX Runtime (zeros become ``1e-4``, taken evenly from the non-zeros) and
  normalised, and the window with the smallest ``KL(P || Q)`` wins (the
  first on ties). In both variants below the *zero bin* ``[0, w)`` is its own
  level: zero is a point of every grid (the zero point) and an edge of the
  lattice, so ``Q`` keeps the zero bin's count instead of spreading it.

  *Two-sided channels* (``lo < 0 < hi``) follow ONNX Runtime's
  ``EntropyCalibrater``. For each candidate ``i`` the window is the lattice
  bins ``[-i, i]`` around the zero bin (``2i + 1`` bins, ``[-i*w, (i+1)*w)``);
  ``Q`` merges ``m = n // L`` bins per level (the last level also takes the
  remainder bins' counts; the remainder bins get ``q = 0``) and each level's
  spread count is truncated to an integer. Candidates run from ``i = L // 2``
  to the window that just holds the data; the range ``(-i*w, (i+1)*w)`` is
  clipped to the data's extrema (``symmetric=True``: ``(-t, t)``). All
  candidates are scored in float64; those within 0.1% of the best are
  re-scored in float32 on their own length, as ORT computes them, because
  ORT's KL curve has near-ties that float32 rounding decides. On equal
  histograms jq then picks ORT's threshold (a zero bin without a spike of
  its own changes nothing measurable). ``L`` is the number of levels of the
  target grid (``dtype`` and ``symmetric``: 255 for symmetric int8, 256 for
  affine int8 / uint8, 15 / 16 for int4), where ORT defaults to
  ``num_quantized_bins=128``.

  *One-sided channels* (``lo >= 0`` or ``hi <= 0``: ReLU outputs, softmax
  probabilities, pixels) are searched as TensorRT does, on the histogram of
  ``|x|`` with windows ``[0, i*w)``, ``i`` from ``L`` to the window that holds
  the largest ``|x|``, and ``L`` the grid's levels on the data's side: all of
  them for an affine grid (256 for int8 and uint8: the zero point moves to the
  grid's end), those from the zero point to the grid's end for a symmetric one
  (128 for int8 and uint8). Level ``k`` holds the window's bins
  ``[k*n/L, (k+1)*n/L)`` and ``Q`` is spread in float, as Migacz describes.
  The range is ``(lo, i*w)`` clipped to the data (mirrored for ``hi <= 0``;
  ``symmetric=True``: ``(-t, t)``). ORT's variant clipped softmax outputs to
  ``[0, 0.126]`` (char-LM bpc +91%) and ReLU outputs to a fraction of their
  range, for four reasons, each fixed here:

  1. *Zero spike.* Masked attention and ReLU put 40-80% of the count in the
     zero bin. Spread over its level, that count is a KL loss that grows with
     the bins per level (about ``p0 * log m``), so the smallest window won.
     Hence the zero bin's own level. (NVIDIA's pytorch-quantization drops the
     spike instead: ``bins[0] = bins[1]``.)
  2. *Levels.* ORT's windows ``[-i, i]`` give one-sided data half the levels
     that an affine grid has there (and jq searched with 128 of 256).
  3. *Remainder bins.* With ``q = 0`` on the ``n mod L`` remainder bins (the
     top of a one-sided window), every window except multiples of ``L`` bins
     is penalised: an affine int8 search saw thresholds at a quarter, half,
     three quarters or all of the range only. The integer truncation zeroed
     ``Q`` on sparse tails, again favouring clipping.
  4. *Last window.* The first batch puts the data's maximum on a lattice edge,
     in the bin just past the largest window ``[0, amax)``, so a point mass at
     the maximum (saturated pixels, a softmax 1.0) always counted as clipped.

  One more correction, for finite samples: the plug-in KL of ``N`` counts is
  biased upward by about ``(K - L) / 2N`` (``K`` non-zero bins, ``L``
  non-empty levels; G. A. Miller, 1955), so a window over a sparse tail (one
  or two counts per bin) looked costly from sampling noise alone. The
  one-sided search subtracts that bias from each window's score.

  Limits: KL weighs a clipped value by its probability, not by how far it is
  clipped, and the loss it sees inside the levels next to zero grows with the
  bins per level where the density is singular at zero (softmax). With a
  symmetric grid (128 levels on ``[0, t]``) on flat attention (softmax of
  N(0, 4) to N(0, 9) logits) it still clips the largest 0.15-0.6% of the
  values; the affine grid keeps them. ``"mse"`` (the default) minimises the
  squared error itself. With more levels than bins (e.g. int16) nothing is
  clipped.
* ``"mse"``: the range whose quantization grid minimises the expected squared
  error, rounding plus clipping, of the histogram's distribution (values
  uniform within each bin). For a grid of ``L`` levels from ``lo`` to ``hi``
  (``S = (hi - lo) / (L - 1)``), the error of a bin is integrated in closed
  form: ``(x - lo)^2`` below ``lo``, ``(x - hi)^2`` above ``hi`` and the
  rounding sawtooth in between, whose antiderivative is
  ``S^3 * (n / 12 + r^3 / 3)`` with ``y = (x - lo) / S``, ``n = round(y)``,
  ``r = y - n``. ``symmetric=True`` searches ``(-t, t)`` over every lattice
  edge ``t``; otherwise the search shrinks ``(lo, hi)`` proportionally toward
  zero and then refines ``hi`` and ``lo`` in turn over all lattice edges (two
  rounds of coordinate descent). The grid is modelled with ``lo`` on a level,
  ignoring the rounding of the zero point. PyTorch's ``HistogramObserver``
  minimises a similar L2 norm with a greedy quantile walk and a bin-centre
  model of the grid, so the two agree to a few bins, not exactly.

Entropy and MSE support integer target formats; percentile ignores ``dtype``.

References:
  S. Migacz, "8-bit Inference with TensorRT", GTC 2017 (the KL search).
  ONNX Runtime, ``onnxruntime/quantization/calibrate.py``, ``HistogramCollector``
  (the two-sided variant and the histogram layout).
  NVIDIA TensorRT, ``tools/pytorch-quantization``, ``calib/histogram.py``
  (``|x|`` histogram, 256 levels for unsigned data, the zero bin).
  G. A. Miller, "Note on the bias of information estimates", 1955.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jq import numerics
from jq.calibration import _common

__all__ = ["Histogram", "HistogramState"]

_METHODS = ("entropy", "mse", "percentile")
_MIN_WIDTH = 1e-30  # bin width of an all-zero channel
_MAX_SHIFT = 120  # growth exponent cap (2**-120 is still a normal float32)


class HistogramState(NamedTuple):
    """Per-channel histograms on a zero-anchored lattice (keepdims form)."""

    counts: jax.Array  # shape=stat_shape + (2 * num_bins,), dtype=int32
    offset: jax.Array  # shape=stat_shape, dtype=int32: lattice index of bin 0
    width: jax.Array  # shape=stat_shape, dtype=float32: bin width, 0 before any finite value
    lo: jax.Array  # shape=stat_shape, dtype=float32: smallest finite value seen (+inf before)
    hi: jax.Array  # shape=stat_shape, dtype=float32: largest finite value seen (-inf before)
    count: jax.Array  # shape=(), dtype=int32: batches seen
    nonfinite: jax.Array  # shape=(), dtype=int32: NaN / inf values seen


def _levels(dtype: str, symmetric: bool) -> int:
    fmt = numerics.get_format(dtype)
    qmin, qmax = fmt.grid(narrow_range=symmetric and fmt.signed)
    return qmax - qmin + 1


@dataclasses.dataclass(frozen=True)
class Histogram:
    """Streaming histogram; `range` picks the range by entropy, MSE or percentile.

    See the module docstring for the binning, the exact re-binning and each
    method's algorithm.

    The default method is ``"mse"``: it minimises the squared quantization
    error of the target grid, the quantity that matters, and clips only where
    that pays. Measured (issue 15): char-LM static int8 bpc +0.11% over float
    (``experiments/results/charlm.md``; ORT-style entropy: +90.85%, min-max
    +0.10%); the CNN of ``experiments/digits.py`` (static int8, per-channel
    weights), relative logit error on the 540 test images: 0.0079 (ORT-style
    entropy 0.0307, min-max 0.0082; the entropy search fixed here: 0.0082).

    Attributes:
      num_bins: bins per channel (>= 16); counts are int32.
      method: ``"mse"`` (default), ``"entropy"`` or ``"percentile"``.
      percentile: for ``"percentile"``, the share of values kept, in (0, 100].
      symmetric: return ``(-t, t)``; percentile is then taken on ``|x|``, MSE
        and entropy model a grid symmetric around zero.
      dtype: target format that MSE and entropy optimise for (an integer
        format: ``"int8"``, ``"uint8"``, ``"int16"``, ``"int4"``).
      axis: channel axis kept (negative allowed); None means per tensor. A
        per-channel result equals the per-tensor result of each channel.
      nonfinite: ``"raise"`` (default) or ``"ignore"``, as for `MinMax`.

    Example usage::

      >>> import jax, jq.calibration as cal
      >>> obs = cal.Histogram(num_bins=256, method="percentile", percentile=99.0)
      >>> x = jax.random.normal(jax.random.key(0), (4096,))
      >>> state = jax.jit(obs.update)(obs.init(x), x)
      >>> state.counts.shape, int(state.counts.sum())
      ((1, 512), 4096)
    """

    num_bins: int = 2048
    method: str = "mse"
    percentile: float = 99.99
    symmetric: bool = False
    dtype: str = "int8"
    axis: int | None = None
    nonfinite: str = "raise"

    def __post_init__(self):
        nb = self.num_bins
        if isinstance(nb, bool) or not isinstance(nb, (int, np.integer)) or nb < 16:
            raise ValueError(f"Histogram.num_bins must be an int >= 16, got {nb!r}")
        object.__setattr__(self, "num_bins", int(nb))
        if self.method not in _METHODS:
            raise ValueError(f"Histogram.method must be one of {_METHODS}, got {self.method!r}")
        p = self.percentile
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 < float(p) <= 100.0:
            raise ValueError(f"Histogram.percentile must be in (0, 100], got {p!r}")
        object.__setattr__(self, "percentile", float(p))
        if not isinstance(self.symmetric, (bool, np.bool_)):
            raise TypeError(f"Histogram.symmetric must be a bool, got {self.symmetric!r}")
        object.__setattr__(self, "symmetric", bool(self.symmetric))
        fmt = numerics.get_format(self.dtype)
        object.__setattr__(self, "dtype", fmt.name)
        if self.method in ("entropy", "mse") and not fmt.is_integer:
            raise ValueError(
                f"Histogram(method={self.method!r}) needs an integer target dtype "
                f"(int8, uint8, int16, int4), got {fmt.name!r}"
            )
        object.__setattr__(self, "axis", _common.check_axis(self.axis, "Histogram"))
        _common.check_nonfinite(self.nonfinite, "Histogram")

    @property
    def levels(self) -> int:
        """Number of grid levels of the target format (255 for symmetric int8)."""
        return _levels(self.dtype, self.symmetric)

    # -- streaming ---------------------------------------------------------------------------
    def init(self, x: jax.Array) -> HistogramState:
        """An empty state for batches shaped like `x` (only shape and dtype are used)."""
        x = _common.check_float_input(x, "Histogram", "init")
        shape = _common.stat_shape(x.shape, self.axis, "Histogram")
        inf = jnp.full(shape, jnp.inf, jnp.float32)
        zero = jnp.zeros((), jnp.int32)
        return HistogramState(
            counts=jnp.zeros(shape + (2 * self.num_bins,), jnp.int32),
            offset=jnp.zeros(shape, jnp.int32),
            width=jnp.zeros(shape, jnp.float32),
            lo=inf,
            hi=-inf,
            count=zero,
            nonfinite=zero,
        )

    def update(self, state: HistogramState, x: jax.Array) -> HistogramState:
        """Adds one batch; re-bins (exactly, by powers of two) when the range widens.

        Jittable with no host sync: the bin layout is data, not a Python value.

        Raises:
          TypeError: `x` is not floating point.
          ValueError: rank or channel count differ from the state; NaN / inf in a
            concrete `x` with ``nonfinite="raise"``.
        """
        nb = 2 * self.num_bins
        x = _common.check_float_input(x, "Histogram", "update")
        _common.check_update_shape(x, state.lo.shape, self.axis, "Histogram")
        _common.raise_on_concrete_nonfinite(x, self.nonfinite, "Histogram")
        b_lo, b_hi, n_bad = _common.batch_stats(x, self.axis)
        lo = jnp.minimum(state.lo, b_lo)
        hi = jnp.maximum(state.hi, b_hi)
        seen = lo <= hi
        w0, off0 = _initial_lattice(jnp.where(seen, lo, 0.0), jnp.where(seen, hi, 0.0), nb)
        fresh = state.width == 0
        width = jnp.where(fresh, w0, state.width)
        offset = jnp.where(fresh, off0, state.offset)
        counts, offset, width = _grow(
            state.counts, offset, width, jnp.where(seen, lo, 0.0), jnp.where(seen, hi, 0.0), nb
        )
        width = jnp.where(seen, width, 0.0)
        offset = jnp.where(seen, offset, 0)
        counts = _scatter(counts, x, n_bad > 0, offset, width, self.axis, nb)
        return HistogramState(
            counts, offset, width, lo, hi, state.count + 1, state.nonfinite + n_bad
        )

    def merge(self, a: HistogramState, b: HistogramState) -> HistogramState:
        """Combines two shards' histograms; jittable.

        Per channel, the histogram with the wider bins is grown (exactly, as in
        `update`) to cover both; the other's bins are then added to the bin that
        holds each bin's centre. The total count is conserved exactly; a count
        moves by at most half a bin of the merged histogram. Two histograms on
        nested lattices (e.g. shards of one stream) merge exactly.
        """
        nb = 2 * self.num_bins
        use_a = a.width >= b.width
        base_counts = jnp.where(use_a[..., None], a.counts, b.counts)
        base_off = jnp.where(use_a, a.offset, b.offset)
        base_w = jnp.where(use_a, a.width, b.width)
        other_counts = jnp.where(use_a[..., None], b.counts, a.counts)
        other_off = jnp.where(use_a, b.offset, a.offset)
        other_w = jnp.where(use_a, b.width, a.width)
        lo = jnp.minimum(a.lo, b.lo)
        hi = jnp.maximum(a.hi, b.hi)
        seen = lo <= hi
        counts, off, w = _grow(
            base_counts, base_off, base_w, jnp.where(seen, lo, 0.0), jnp.where(seen, hi, 0.0), nb
        )
        # bin centres of the other histogram, mapped into the grown base lattice
        j = jnp.arange(nb, dtype=jnp.float32)
        centres = (other_off[..., None].astype(jnp.float32) + j + 0.5) * other_w[..., None]
        safe_w = jnp.where(w > 0, w, 1.0)[..., None]
        idx = jnp.floor(centres / safe_w - off[..., None].astype(jnp.float32))
        idx = jnp.clip(idx, 0, nb - 1).astype(jnp.int32)
        counts = _add_per_channel(counts, idx, other_counts)
        return HistogramState(counts, off, w, lo, hi, a.count + b.count, a.nonfinite + b.nonfinite)

    # -- range selection (host) --------------------------------------------------------------
    def range(self, state: HistogramState) -> tuple[jax.Array, jax.Array]:
        """``(lo, hi)`` float32 arrays of the channel shape, or scalars per tensor.

        Raises:
          ValueError: no update yet; non-finite values were counted (``"raise"``);
            a channel never saw a finite value.
        """
        _common.host_checks("Histogram", state.count, state.nonfinite, self.nonfinite)
        counts = np.asarray(state.counts).reshape(-1, 2 * self.num_bins)
        offset = np.asarray(state.offset).reshape(-1)
        width = np.asarray(state.width, np.float64).reshape(-1)
        lo = np.asarray(state.lo, np.float64).reshape(-1)
        hi = np.asarray(state.hi, np.float64).reshape(-1)
        if not np.all(lo <= hi):
            raise ValueError("Histogram.range: some channel never saw a finite value")
        out = np.array(
            [
                self._channel_range(counts[c], int(offset[c]), width[c], lo[c], hi[c])
                for c in range(counts.shape[0])
            ],
            np.float64,
        ).reshape(-1, 2)
        r_lo = jnp.asarray(out[:, 0], jnp.float32)
        r_hi = jnp.asarray(out[:, 1], jnp.float32)
        if self.axis is None:
            return r_lo.reshape(()), r_hi.reshape(())
        return r_lo, r_hi

    def _channel_range(self, h, offset, w, lo, hi) -> tuple[float, float]:
        amax = max(-lo, hi)
        if hi == lo:  # constant (or all-zero) channel: nothing to choose
            return (-amax, amax) if self.symmetric else (lo, hi)
        h = h.astype(np.float64)
        if self.method == "percentile":
            return _percentile(h, offset, w, lo, hi, self.percentile, self.symmetric)
        if self.method == "entropy":
            side = None
            if lo >= 0 or hi <= 0:  # one-sided: the grid's levels on the data's side
                side = _side_levels(self.dtype, self.symmetric, positive=lo >= 0)
            return _entropy(h, offset, w, lo, hi, self.levels, self.symmetric, side)
        return _mse(h, offset, w, lo, hi, self.levels, self.symmetric)


# -- device side: lattice, growth, scatter ---------------------------------------------------


def _initial_lattice(lo, hi, nb):
    """ORT's first histogram, ``[-amax, amax]`` in ``nb / 2`` bins, centred in `nb` bins."""
    amax = jnp.maximum(jnp.abs(lo), jnp.abs(hi))
    w = jnp.maximum(4.0 * amax / nb, _MIN_WIDTH).astype(jnp.float32)
    return w, jnp.full(lo.shape, -(nb // 2), jnp.int32)


def _grow(counts, offset, width, need_lo, need_hi, nb):
    """Coarsens each channel's lattice by ``2**k`` until it covers ``[need_lo, need_hi]``.

    Returns ``(counts, offset, width)``; the counts are re-binned by an exact
    integer map, so their total is unchanged.
    """
    f32 = jnp.float32
    bottom = offset.astype(f32) * width
    top = (offset + nb).astype(f32) * width
    fits = (need_lo >= bottom) & (need_hi <= top)
    lo_n = jnp.minimum(bottom, need_lo)
    hi_n = jnp.maximum(top, need_hi)
    safe_w = jnp.where(width > 0, width, 1.0)
    ratio = (hi_n - lo_n) / ((nb - 1) * safe_w)
    k = jnp.clip(jnp.ceil(jnp.log2(jnp.maximum(ratio, 1.0))), 1, _MAX_SHIFT)

    def lattice(k):
        w2 = safe_w * jnp.exp2(k)
        inv = jnp.exp2(-k)
        # centre the covered interval, so later widenings on either side find headroom
        off2 = jnp.floor(0.5 * (lo_n + hi_n) / w2) - nb // 2
        off2 = jnp.where(off2 * w2 > lo_n, jnp.floor(lo_n / w2), off2)
        # the old first / last lattice bins must land inside the new window
        first_old = jnp.floor(offset.astype(f32) * inv)
        last_old = jnp.floor((offset + nb - 1).astype(f32) * inv)
        off2 = jnp.clip(off2, last_old - (nb - 1), first_old)
        ok = ((off2 + nb) * w2 >= hi_n) & (off2 * w2 <= lo_n)
        return w2, off2, ok

    _, _, ok = lattice(k)
    k = jnp.where(ok, k, jnp.minimum(k + 1, _MAX_SHIFT))
    w2, off2, _ = lattice(k)
    k = jnp.where(fits, 0.0, k)
    w2 = jnp.where(fits, width, w2)
    off2 = jnp.where(fits, offset.astype(f32), off2)

    def rebin(counts):
        j = jnp.arange(nb, dtype=f32)
        # (offset + j) < 2**24 and 2**-k is a power of two: the product and floor are exact
        old = offset[..., None].astype(f32) + j
        idx = jnp.floor(old * jnp.exp2(-k)[..., None]) - off2[..., None]
        idx = jnp.clip(idx, 0, nb - 1).astype(jnp.int32)
        return _add_per_channel(jnp.zeros_like(counts), idx, counts)

    # most batches fit: skip the (channels x bins) scatter then
    counts = jax.lax.cond(jnp.all(fits), lambda c: c, rebin, counts)
    return counts, off2.astype(jnp.int32), w2.astype(f32)


def _add_per_channel(dest, idx, values):
    """``dest[..., idx[..., j]] += values[..., j]`` per channel, as one flat scatter-add."""
    nb = dest.shape[-1]
    nch = int(np.prod(dest.shape[:-1]))
    base = (jnp.arange(nch, dtype=jnp.int32) * nb).reshape(dest.shape[:-1] + (1,))
    flat = dest.reshape(-1).at[(idx + base).reshape(-1)].add(values.reshape(-1))
    return flat.reshape(dest.shape)


def _scatter(counts, x, any_bad, offset, width, axis, nb):
    """Adds the finite values of `x` to the counts (one scatter-add of ones)."""
    safe_w = jnp.where(width > 0, width, 1.0)
    size = counts.size

    def indices(x, finite):
        xs = x if finite is None else jnp.where(finite, x, 0.0)
        idx = jnp.clip(jnp.floor(xs / safe_w - offset.astype(jnp.float32)), 0, nb - 1)
        idx = idx.astype(jnp.int32)
        if axis is not None:
            idx = idx + jax.lax.broadcasted_iota(jnp.int32, x.shape, axis % x.ndim) * nb
        if finite is not None:
            idx = jnp.where(finite, idx, size)  # out of bounds: dropped
        return idx

    idx = jax.lax.cond(
        any_bad, lambda x: indices(x, jnp.isfinite(x)), lambda x: indices(x, None), x
    )
    flat = counts.reshape(-1).at[idx.reshape(-1)].add(1, mode="drop")
    return flat.reshape(counts.shape)


# -- host side: the three methods (float64 NumPy, one channel) -------------------------------


def _quantile(h, edges, q):
    """Value below which a share `q` of the histogram lies (linear within a bin)."""
    cdf = np.cumsum(h)
    total = cdf[-1]
    target = q * total
    j = int(np.searchsorted(cdf, target, side="left"))
    j = min(j, len(h) - 1)
    before = cdf[j - 1] if j > 0 else 0.0
    frac = 0.0 if h[j] == 0 else (target - before) / h[j]
    return edges[j] + float(np.clip(frac, 0.0, 1.0)) * (edges[j + 1] - edges[j])


def _folded(h, offset, w):
    """Histogram of ``|x|`` on bins ``[k*w, (k+1)*w)``, k >= 0 (exact: the lattice holds 0)."""
    lat = offset + np.arange(len(h))
    k = np.where(lat >= 0, lat, -lat - 1)
    out = np.zeros(int(k.max()) + 1)
    np.add.at(out, k, h)
    return out


def _percentile(h, offset, w, lo, hi, p, symmetric):
    if symmetric:
        a = _folded(h, offset, w)
        edges = np.arange(len(a) + 1) * w
        t = min(_quantile(a, edges, p / 100.0), max(-lo, hi))
        return -t, t
    edges = (offset + np.arange(len(h) + 1)) * w
    cut = (100.0 - p) / 200.0
    r_lo = _quantile(h, edges, cut)
    r_hi = _quantile(h, edges, 1.0 - cut)
    return float(np.clip(r_lo, lo, hi)), float(np.clip(r_hi, lo, hi))


def _smooth(d, valid, eps, dtype):
    """MXNet / ORT smoothing of each row: zeros become `eps`, taken evenly from the non-zeros."""
    is_zero = ((d == 0) & valid).astype(dtype)
    is_nonzero = ((d != 0) & valid).astype(dtype)
    n_zero = is_zero.sum(axis=-1, keepdims=True, dtype=np.float64)
    n_nonzero = is_nonzero.sum(axis=-1, keepdims=True, dtype=np.float64)
    eps1 = (eps * n_zero / np.maximum(n_nonzero, 1)).astype(dtype)
    sm = d.astype(dtype) + (dtype(eps) * is_zero - eps1 * is_nonzero)
    return sm / np.sum(sm, axis=-1, keepdims=True), n_nonzero[..., 0] > 0


def _kl(p, q, valid, dtype):
    ps, ok_p = _smooth(p, valid, 1e-4, dtype)
    qs, ok_q = _smooth(q, valid, 1e-4, dtype)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        terms = ps * np.log(ps / qs)
    terms = np.where(valid & (ps > 0), terms, dtype(0))
    terms = np.where(valid & ~((ps > 0) & (qs > 0)), dtype(np.inf), terms)
    kl = np.sum(terms, axis=-1).astype(np.float64)
    return np.where(ok_p & ok_q, kl, np.inf)


def _kl_rows(p, q, valid):
    """``KL(P || Q)`` of each row (its valid prefix) after ORT's smoothing.

    All rows are scored at once in float64; the rows within 0.1% of the best are
    then re-scored one by one in float32 on their exact length, as ONNX Runtime
    computes them, because its KL curve has near-ties that float32 rounding
    decides. The returned scores order the candidates as ORT's do.
    """
    kl = _kl(p, q, valid, np.float64)
    best = np.min(kl)
    if not np.isfinite(best):
        return kl
    close = np.nonzero(kl <= best + 1e-3 * abs(best) + 1e-12)[0]
    out = np.full(kl.shape, np.inf)
    for r in close:
        n = int(valid[r].sum())
        ones = np.ones(n, bool)
        out[r] = _kl(p[r, :n], q[r, :n], ones, np.float32)
    return out


def _side_levels(dtype, symmetric, positive):
    """Grid levels in ``[0, t]`` (`positive`) or ``[-t, 0]`` for a one-sided channel, zero included.

    Affine: the zero point moves to the end of the grid, so all ``qmax - qmin + 1``
    levels cover the data's side (256 for int8 and uint8). Symmetric: only the
    levels from the zero point to the grid's end (128 for int8 and uint8).
    """
    fmt = numerics.get_format(dtype)
    qmin, qmax = fmt.grid(narrow_range=symmetric and fmt.signed)
    if not symmetric:
        return qmax - qmin + 1
    z = 0 if fmt.signed else (qmax - qmin + 1) // 2 + qmin
    return qmax - z + 1 if positive else z - qmin + 1


def _entropy(h, offset, w, lo, hi, levels, symmetric, side_levels=None):
    """KL threshold search (see the module docstring).

    ``side_levels=None``: ORT's two-sided windows with `levels` levels; otherwise
    the one-sided search on ``|x|`` with the grid's `side_levels` on the data's side.
    """
    if side_levels is not None:  # one-sided data: windows [0, i) of |x| with the side's levels
        nq = side_levels
        z = _folded(h, offset, w)
        amax = max(-lo, hi)
        # the last candidate holds the bin of the largest |x| (bins are [k w, (k + 1) w))
        sizes = np.arange(nq, min(len(z), int(np.floor(amax / w)) + 1) + 1)
        start = np.zeros_like(sizes)
        end = sizes
        zero_col = np.zeros_like(sizes)
    else:  # ORT: windows of lattice bins [-i, i] around the zero bin, i = nq // 2 ... M
        nq = levels
        lat = offset + np.arange(len(h))
        m = int(max(-lat[0], lat[-1] + 1))
        z = np.zeros(2 * m)
        z[lat + m] = h
        # like ORT, candidates stop at the window that just holds the data
        i_max = min(m, int(np.ceil(max(-lo, hi) / w - 1e-6)))
        sizes = np.arange(nq // 2, i_max + 1)
        start = m - sizes
        end = np.minimum(m + sizes + 1, 2 * m)
        zero_col = sizes
    if sizes.size == 0:  # as many levels as bins: clipping cannot help
        amax = max(-lo, hi)
        return (-amax, amax) if symmetric else (lo, hi)
    n = end - start
    cz = np.concatenate([[0.0], np.cumsum(z)])
    ort = side_levels is None

    def p_and_q(sel):
        """``P``, ``Q``, the valid mask and the KL bias of the candidate windows `sel` (rows)."""
        st, en, nn, z0 = start[sel], end[sel], n[sel], zero_col[sel]
        cols = np.arange(int(nn.max()))
        rows = np.arange(len(nn))
        valid = cols[None, :] < nn[:, None]
        win = np.where(valid, z[np.minimum(st[:, None] + cols, len(z) - 1)], 0.0)
        p = win.copy()
        p[:, 0] += cz[st]
        p[rows, nn - 1] += cz[-1] - cz[en]
        nzp = (p != 0) & valid
        if ort:
            # ORT merges n // nq bins per level (the last level also takes the remainder's
            # count, but the remainder bins get q = 0) and truncates the spread to an integer
            merged = nn // nq
            group = cols[None, :] // np.maximum(merged[:, None], 1)
            group = np.where(valid & (group < nq), group, nq)
            group = np.where(valid & (cols[None, :] >= nq * merged[:, None]), nq + 1, group)
        else:
            # Migacz: every bin of the window belongs to one of the nq levels (level k
            # holds the bins [k n / nq, (k + 1) n / nq)); a level's count is spread evenly,
            # in float, over its bins where p is non-zero (q = 0 where p = 0)
            group = np.where(valid, (cols[None, :] * nq) // nn[:, None], nq)
        # zero is a grid point (the zero point) and a lattice edge: the zero bin's count
        # (exact zeros: ReLU, masked softmax, padding) is reproduced, not spread over its level
        zc = np.minimum(z0, len(cols) - 1)
        zero_in = (z0 < nn) & nzp[rows, zc]
        group[rows[zero_in], zc[zero_in]] = nq + 2
        ng = nq + 3
        flat = (group + rows[:, None] * ng).ravel()
        size = len(nn) * ng
        gsum = np.bincount(flat, weights=win.ravel(), minlength=size).reshape(len(nn), ng)
        gnz = np.bincount(flat, weights=nzp.ravel(), minlength=size).reshape(len(nn), ng)
        if ort:  # the remainder's count goes to the last level
            gsum[:, nq - 1] += gsum[:, nq + 1]
        spread = np.where(gnz > 0, gsum / np.maximum(gnz, 1), 0.0)
        if ort:
            spread = np.trunc(spread)
        spread[:, nq : nq + 2] = 0.0  # outside the window; ORT's remainder bins
        q = np.take_along_axis(spread, group, 1)
        if not ort:  # as in MXNet and TensorRT (ORT keeps q where p = 0)
            q = np.where(nzp, q, 0.0)
        q[rows[zero_in], zc[zero_in]] = win[rows[zero_in], zc[zero_in]]
        # Miller-Madow: the plug-in KL of N counts is biased up by (K - L) / 2N (K non-zero
        # bins, L non-empty levels); sparse tails (K >> L) would otherwise look costly
        bias = (nzp.sum(1) - (gnz > 0).sum(1)) / (2.0 * cz[-1])
        return p, q, valid, bias

    if ort:
        kl = _kl_rows(*p_and_q(slice(None))[:3])
    else:  # float64 throughout; in chunks of rows (up to 4096 candidates x 4096 bins)
        step = max(1, (1 << 21) // int(n.max()))
        parts = []
        for r in range(0, len(n), step):
            p, q, valid, bias = p_and_q(slice(r, r + step))
            parts.append(_kl(p, q, valid, np.float64) - bias)
        kl = np.concatenate(parts)
    best = int(np.argmin(kl))
    if side_levels is not None:
        t = min(float(sizes[best] * w), max(-lo, hi))
        if symmetric:
            return -t, t
        return (lo, max(t, lo)) if lo >= 0 else (min(-t, hi), hi)
    r_lo, r_hi = -float(sizes[best] * w), float((end[best] - m) * w)
    if symmetric:
        t = min(max(-r_lo, r_hi), max(-lo, hi))
        return -t, t
    return max(r_lo, lo), min(r_hi, hi)


def _sawtooth_integral(y):
    """``H(y) = int_0^y (u - round(u))^2 du = n / 12 + r^3 / 3`` (n = round(y), r = y - n)."""
    n = np.floor(y + 0.5)
    r = y - n
    return n / 12.0 + r**3 / 3.0


def _grid_error(a, b, c, r_lo, r_hi, levels):
    """Expected squared error of bins ``[a, b)`` (counts c, uniform within) per candidate range.

    Args:
      a, b, c: (bins,) arrays; r_lo, r_hi: (candidates,) arrays with r_lo < r_hi.

    Returns:
      (candidates,) summed error, in units of count * x^2.
    """
    lo = r_lo[:, None]
    hi = r_hi[:, None]
    s = (hi - lo) / (levels - 1)

    def antiderivative(x):  # continuous, zero at lo; the clip makes each piece constant outside
        below = (np.minimum(x, lo) - lo) ** 3 / 3.0
        inside = s**3 * _sawtooth_integral((np.clip(x, lo, hi) - lo) / s)
        above = (np.maximum(x, hi) - hi) ** 3 / 3.0
        return below + inside + above

    width = b - a
    dens = c / width
    return ((antiderivative(b[None, :]) - antiderivative(a[None, :])) * dens[None, :]).sum(axis=1)


def _argmin_coarse_to_fine(cands, err_fn, coarse=256):
    """Index of the candidate with the smallest error: every k-th first, then all near the best.

    The error is a sum over many bins and varies smoothly with the candidate, so a
    stride-k pass followed by a full pass over the 4k neighbours finds the minimum
    at a sixth of the cost of evaluating every candidate.
    """
    stride = max(1, len(cands) // coarse)
    idx = np.arange(0, len(cands), stride)
    if idx[-1] != len(cands) - 1:
        idx = np.append(idx, len(cands) - 1)
    best = int(idx[int(np.argmin(err_fn(cands[idx])))])
    if stride == 1:
        return best
    near = np.arange(max(0, best - 2 * stride), min(len(cands), best + 2 * stride + 1))
    return int(near[int(np.argmin(err_fn(cands[near])))])


def _edges_up_to(limit, w):
    """Lattice edges ``k * w`` in ``(0, limit)`` plus `limit` itself, ascending."""
    k = np.arange(1, int(np.ceil(limit / w)) + 1) * w
    return np.unique(np.concatenate([k[k < limit], [limit]]))


def _mse(h, offset, w, lo, hi, levels, symmetric):
    nzb = np.nonzero(h)[0]
    a = (offset + nzb) * w
    b = a + w
    # the data extrema are exact: tighten the outermost bins to them
    a = np.maximum(a, lo)
    b = np.minimum(b, hi)
    b = np.maximum(b, a + 1e-12 * max(abs(lo), abs(hi), 1e-30))
    c = h[nzb]
    amax = max(-lo, hi)
    if symmetric:
        t = _edges_up_to(amax, w)
        best = _argmin_coarse_to_fine(t, lambda v: _grid_error(a, b, c, -v, v, levels))
        return -float(t[best]), float(t[best])
    lo0, hi0 = min(lo, 0.0), max(hi, 0.0)
    # stage 1: shrink both ends proportionally toward zero
    frac = np.arange(1, 1025) / 1024.0
    f = frac[_argmin_coarse_to_fine(frac, lambda v: _grid_error(a, b, c, v * lo0, v * hi0, levels))]
    best_lo, best_hi = f * lo0, f * hi0
    hi_cands = _edges_up_to(hi0, w) if hi0 > 0 else np.zeros(0)
    lo_cands = -_edges_up_to(-lo0, w) if lo0 < 0 else np.zeros(0)
    for _ in range(2):  # stage 2: coordinate descent over lattice edges
        if hi_cands.size:
            i = _argmin_coarse_to_fine(
                hi_cands,
                lambda v, lo_=best_lo: _grid_error(a, b, c, np.full(v.shape, lo_), v, levels),
            )
            best_hi = float(hi_cands[i])
        if lo_cands.size:
            i = _argmin_coarse_to_fine(
                lo_cands,
                lambda v, hi_=best_hi: _grid_error(a, b, c, v, np.full(v.shape, hi_), levels),
            )
            best_lo = float(lo_cands[i])
    return max(best_lo, lo), min(best_hi, hi)
