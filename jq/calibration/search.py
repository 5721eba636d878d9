"""Range selection for `jq.calibration.Histogram`: entropy, MSE and percentile searches.

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

import numpy as np

from jq import numerics


def quantile(h, edges, q):
    """Value below which a share `q` of the histogram lies (linear within a bin)."""
    cdf = np.cumsum(h)
    total = cdf[-1]
    target = q * total
    j = int(np.searchsorted(cdf, target, side="left"))
    j = min(j, len(h) - 1)
    before = cdf[j - 1] if j > 0 else 0.0
    frac = 0.0 if h[j] == 0 else (target - before) / h[j]
    return edges[j] + float(np.clip(frac, 0.0, 1.0)) * (edges[j + 1] - edges[j])


def folded(h, offset, w):
    """Histogram of ``|x|`` on bins ``[k*w, (k+1)*w)``, k >= 0 (exact: the lattice holds 0)."""
    lat = offset + np.arange(len(h))
    k = np.where(lat >= 0, lat, -lat - 1)
    out = np.zeros(int(k.max()) + 1)
    np.add.at(out, k, h)
    return out


def percentile_range(h, offset, w, lo, hi, p, symmetric):
    if symmetric:
        a = folded(h, offset, w)
        edges = np.arange(len(a) + 1) * w
        t = min(quantile(a, edges, p / 100.0), max(-lo, hi))
        return -t, t
    edges = (offset + np.arange(len(h) + 1)) * w
    cut = (100.0 - p) / 200.0
    r_lo = quantile(h, edges, cut)
    r_hi = quantile(h, edges, 1.0 - cut)
    return float(np.clip(r_lo, lo, hi)), float(np.clip(r_hi, lo, hi))


def smooth(d, valid, eps, dtype):
    """MXNet / ORT smoothing of each row: zeros become `eps`, taken evenly from the non-zeros."""
    is_zero = ((d == 0) & valid).astype(dtype)
    is_nonzero = ((d != 0) & valid).astype(dtype)
    n_zero = is_zero.sum(axis=-1, keepdims=True, dtype=np.float64)
    n_nonzero = is_nonzero.sum(axis=-1, keepdims=True, dtype=np.float64)
    eps1 = (eps * n_zero / np.maximum(n_nonzero, 1)).astype(dtype)
    sm = d.astype(dtype) + (dtype(eps) * is_zero - eps1 * is_nonzero)
    return sm / np.sum(sm, axis=-1, keepdims=True), n_nonzero[..., 0] > 0


def kl(p, q, valid, dtype):
    ps, ok_p = smooth(p, valid, 1e-4, dtype)
    qs, ok_q = smooth(q, valid, 1e-4, dtype)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        terms = ps * np.log(ps / qs)
    terms = np.where(valid & (ps > 0), terms, dtype(0))
    terms = np.where(valid & ~((ps > 0) & (qs > 0)), dtype(np.inf), terms)
    kl = np.sum(terms, axis=-1).astype(np.float64)
    return np.where(ok_p & ok_q, kl, np.inf)


def kl_rows(p, q, valid):
    """``KL(P || Q)`` of each row (its valid prefix) after ORT's smoothing.

    All rows are scored at once in float64; the rows within 0.1% of the best are
    then re-scored one by one in float32 on their exact length, as ONNX Runtime
    computes them, because its KL curve has near-ties that float32 rounding
    decides. The returned scores order the candidates as ORT's do.
    """
    scores = kl(p, q, valid, np.float64)
    best = np.min(scores)
    if not np.isfinite(best):
        return scores
    close = np.nonzero(scores <= best + 1e-3 * abs(best) + 1e-12)[0]
    out = np.full(scores.shape, np.inf)
    for r in close:
        n = int(valid[r].sum())
        ones = np.ones(n, bool)
        out[r] = kl(p[r, :n], q[r, :n], ones, np.float32)
    return out


def side_levels(dtype, symmetric, positive):
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


def entropy_range(h, offset, w, lo, hi, levels, symmetric, side_levels=None):
    """KL threshold search (see the module docstring).

    ``side_levels=None``: ORT's two-sided windows with `levels` levels; otherwise
    the one-sided search on ``|x|`` with the grid's `side_levels` on the data's side.
    """
    if side_levels is not None:  # one-sided data: windows [0, i) of |x| with the side's levels
        nq = side_levels
        z = folded(h, offset, w)
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
        scores = kl_rows(*p_and_q(slice(None))[:3])
    else:  # float64 throughout; in chunks of rows (up to 4096 candidates x 4096 bins)
        step = max(1, (1 << 21) // int(n.max()))
        parts = []
        for r in range(0, len(n), step):
            p, q, valid, bias = p_and_q(slice(r, r + step))
            parts.append(kl(p, q, valid, np.float64) - bias)
        scores = np.concatenate(parts)
    best = int(np.argmin(scores))
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


def sawtooth_integral(y):
    """``H(y) = int_0^y (u - round(u))^2 du = n / 12 + r^3 / 3`` (n = round(y), r = y - n)."""
    n = np.floor(y + 0.5)
    r = y - n
    return n / 12.0 + r**3 / 3.0


def grid_error(a, b, c, r_lo, r_hi, levels):
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
        inside = s**3 * sawtooth_integral((np.clip(x, lo, hi) - lo) / s)
        above = (np.maximum(x, hi) - hi) ** 3 / 3.0
        return below + inside + above

    width = b - a
    dens = c / width
    return ((antiderivative(b[None, :]) - antiderivative(a[None, :])) * dens[None, :]).sum(axis=1)


def argmin_coarse_to_fine(cands, err_fn, coarse=256):
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


def edges_up_to(limit, w):
    """Lattice edges ``k * w`` in ``(0, limit)`` plus `limit` itself, ascending."""
    k = np.arange(1, int(np.ceil(limit / w)) + 1) * w
    return np.unique(np.concatenate([k[k < limit], [limit]]))


def mse_range(h, offset, w, lo, hi, levels, symmetric):
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
        t = edges_up_to(amax, w)
        best = argmin_coarse_to_fine(t, lambda v: grid_error(a, b, c, -v, v, levels))
        return -float(t[best]), float(t[best])
    lo0, hi0 = min(lo, 0.0), max(hi, 0.0)
    # stage 1: shrink both ends proportionally toward zero
    frac = np.arange(1, 1025) / 1024.0
    f = frac[argmin_coarse_to_fine(frac, lambda v: grid_error(a, b, c, v * lo0, v * hi0, levels))]
    best_lo, best_hi = f * lo0, f * hi0
    hi_cands = edges_up_to(hi0, w) if hi0 > 0 else np.zeros(0)
    lo_cands = -edges_up_to(-lo0, w) if lo0 < 0 else np.zeros(0)
    for _ in range(2):  # stage 2: coordinate descent over lattice edges
        if hi_cands.size:
            i = argmin_coarse_to_fine(
                hi_cands,
                lambda v, lo_=best_lo: grid_error(a, b, c, np.full(v.shape, lo_), v, levels),
            )
            best_hi = float(hi_cands[i])
        if lo_cands.size:
            i = argmin_coarse_to_fine(
                lo_cands,
                lambda v, hi_=best_hi: grid_error(a, b, c, v, np.full(v.shape, hi_), levels),
            )
            best_lo = float(lo_cands[i])
    return max(best_lo, lo), min(best_hi, hi)
