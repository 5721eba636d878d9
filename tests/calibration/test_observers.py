"""Behaviour of the calibration observers against independent expectations."""

import functools
import warnings

import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jq
import jq.calibration as cal

OBSERVERS = {
    "minmax": cal.MinMax,
    "ema": cal.MovingAverageMinMax,
    "entropy": lambda **kw: cal.Histogram(num_bins=64, method="entropy", **kw),
    "mse": lambda **kw: cal.Histogram(num_bins=64, method="mse", **kw),
    "percentile": lambda **kw: cal.Histogram(num_bins=64, method="percentile", **kw),
}


@functools.cache
def _jitted(obs):
    return jax.jit(obs.update)  # one compile per observer and input shape


def _feed(obs, xs, jit=True):
    state = obs.init(xs[0])
    update = _jitted(obs) if jit else obs.update
    for x in xs:
        state = update(state, x)
    return state


class TestMinMax:
    @pytest.mark.parametrize(
        "axis,stat_shape",
        [
            pytest.param(None, (), id="tensor"),
            pytest.param(1, (4,), id="channel"),
            pytest.param(-1, (4,), id="neg"),
        ],
    )
    def test_range_is_exact(self, variant, axis, stat_shape):
        xs = [np.random.default_rng(i).standard_normal((8, 4)).astype(np.float32) for i in range(3)]
        obs = cal.MinMax(axis=axis)
        state = obs.init(xs[0])
        for x in xs:
            state = variant(obs.update)(state, x)
        lo, hi = obs.range(state)
        chex.assert_shape([lo, hi], stat_shape)
        allx = np.concatenate(xs)
        red = None if axis is None else 0
        np.testing.assert_array_equal(lo, allx.min(axis=red))
        np.testing.assert_array_equal(hi, allx.max(axis=red))

    def test_feeds_qparams_from_range(self):
        x = jnp.array([[1.0, -2.0, 0.5], [-3.0, 4.0, 0.25]])
        obs = cal.MinMax(axis=-1)
        lo, hi = obs.range(obs.update(obs.init(x), x))
        qp = jq.qparams_from_range(lo, hi, jq.QuantSpec("int8", axis=-1))
        np.testing.assert_allclose(qp.scale, np.array([3.0, 4.0, 0.5]) / 127, rtol=1e-6)

    def test_merge_equals_one_stream(self):
        rng = np.random.default_rng(0)
        xs = [rng.standard_normal((16, 3)).astype(np.float32) for _ in range(4)]
        obs = cal.MinMax(axis=1)
        merged = obs.merge(_feed(obs, xs[:2]), _feed(obs, xs[2:]))
        for got, want in zip(obs.range(merged), obs.range(_feed(obs, xs))):
            np.testing.assert_array_equal(got, want)


class TestMovingAverage:
    def test_hand_computed(self):
        obs = cal.MovingAverageMinMax(averaging_constant=0.5)
        xs = [jnp.array([-1.0, 2.0]), jnp.array([-3.0, 4.0]), jnp.array([1.0, 1.0])]
        lo, hi = obs.range(_feed(obs, xs))
        # lo: -1 -> -1 + .5(-3 + 1) = -2 -> -2 + .5(1 + 2) = -0.5 ; hi: 2 -> 3 -> 2
        np.testing.assert_allclose([lo, hi], [-0.5, 2.0])

    @hypothesis.settings(max_examples=8, deadline=None)
    @hypothesis.given(st.integers(0, 2**16), st.sampled_from([0.01, 0.37, 1.0]))
    def test_matches_float32_recurrence(self, seed, c):
        rng = np.random.default_rng(seed)
        xs = [(rng.standard_normal((5, 3)) * (1 + i)).astype(np.float32) for i in range(4)]
        obs = cal.MovingAverageMinMax(averaging_constant=c, axis=1)
        lo, hi = obs.range(_feed(obs, xs))
        m_lo, m_hi = xs[0].min(0), xs[0].max(0)
        c32 = np.float32(c)
        for x in xs[1:]:
            m_lo = m_lo + c32 * (x.min(0) - m_lo)
            m_hi = m_hi + c32 * (x.max(0) - m_hi)
        np.testing.assert_allclose(lo, m_lo, rtol=1e-6)
        np.testing.assert_allclose(hi, m_hi, rtol=1e-6)

    def test_merge_is_union_of_shard_ranges(self):
        obs = cal.MovingAverageMinMax()
        a = _feed(obs, [jnp.array([-1.0, 1.0])])
        b = _feed(obs, [jnp.array([-2.0, 0.5])])
        np.testing.assert_allclose(obs.range(obs.merge(a, b)), [-2.0, 1.0])

    def test_bad_constant(self):
        with pytest.raises(ValueError, match="averaging_constant"):
            cal.MovingAverageMinMax(averaging_constant=0.0)


class TestHistogramStreaming:
    @hypothesis.settings(max_examples=12, deadline=None)
    @hypothesis.given(
        st.lists(
            st.tuples(st.floats(-1e3, 1e3), st.floats(1e-3, 1e3), st.sampled_from([64])),
            min_size=1,
            max_size=5,
        ),
        st.sampled_from([None, 1]),
    )
    def test_total_count_conserved_when_range_widens(self, batches, axis):
        obs = cal.Histogram(num_bins=32, method="percentile", axis=axis)
        rng = np.random.default_rng(len(batches))
        xs = [(mu + s * rng.standard_normal((n, 2))).astype(np.float32) for mu, s, n in batches]
        state = _feed(obs, xs)
        counts = np.asarray(state.counts)
        nb = counts.shape[-1]
        per_channel = counts.reshape(-1, nb).sum(axis=1)
        want = sum(x.shape[0] for x in xs) * (1 if axis is not None else 2)
        np.testing.assert_array_equal(per_channel, want)
        # every count sits in a bin that overlaps the data range it came from
        edges_lo = (np.asarray(state.offset).reshape(-1, 1) + np.arange(nb)) * np.asarray(
            state.width
        ).reshape(-1, 1)
        w = np.asarray(state.width).reshape(-1, 1)
        occupied = counts.reshape(-1, nb) > 0
        lo = np.asarray(state.lo).reshape(-1, 1)
        hi = np.asarray(state.hi).reshape(-1, 1)
        assert np.all(
            ~occupied
            | ((edges_lo <= hi + 1e-6 * np.abs(hi)) & (edges_lo + w >= lo - 1e-6 * np.abs(lo)))
        )

    def test_rebinning_merges_bins_exactly(self):
        # ORT's first layout: 16 bins over [-8, 8], width 1, centred in 32 stored bins
        # (2x headroom); a batch at 20 forces a power-of-two wider width
        obs = cal.Histogram(num_bins=16, method="percentile")
        x1 = np.append(np.arange(-8.0, 8.0) + 0.5, -8.0).astype(np.float32)
        state = obs.update(obs.init(x1), x1)
        assert float(state.width.reshape(())) == 1.0
        assert int(state.offset.reshape(())) == -16
        np.testing.assert_array_equal(state.counts.reshape(-1), [0] * 8 + [2] + [1] * 15 + [0] * 8)
        state = obs.update(state, jnp.array([12.0]))  # inside the headroom: no re-binning
        assert float(state.width.reshape(())) == 1.0
        state = obs.update(state, jnp.array([20.0]))
        w = float(state.width.reshape(()))
        assert w == 2.0
        counts = np.asarray(state.counts).reshape(-1)
        edges = (int(state.offset.reshape(())) + np.arange(33)) * w
        assert edges[0] <= -8.0 and edges[-1] > 20.0
        hist_np, _ = np.histogram(np.append(x1, [12.0, 20.0]), bins=edges)
        np.testing.assert_array_equal(counts, hist_np)

    def test_jit_does_not_retrace_or_sync(self):
        obs = cal.Histogram(num_bins=128, method="entropy", axis=0)
        x = jnp.ones((3, 50))

        @jax.jit
        @chex.assert_max_traces(n=1)
        def step(state, x):
            return obs.update(state, x)

        state = obs.init(x)
        for i in range(4):
            state = step(state, x * (i + 1))
        assert int(state.counts.sum()) == 600

    def test_merge_conserves_and_matches_one_stream(self):
        rng = np.random.default_rng(1)
        xs = [(rng.standard_normal((200, 2)) * (1 + i)).astype(np.float32) for i in range(4)]
        obs = cal.Histogram(num_bins=256, method="percentile", percentile=99.0, axis=1)
        a, b = _feed(obs, xs[:2]), _feed(obs, xs[2:])
        merged = jax.jit(obs.merge)(a, b)
        np.testing.assert_array_equal(np.asarray(merged.counts).sum(-1).ravel(), [800, 800])
        whole = _feed(obs, xs)
        w = float(np.max(merged.width))
        for got, want in zip(obs.range(merged), obs.range(whole)):
            np.testing.assert_allclose(got, want, atol=2 * w)

    def test_scatter_add_equals_numpy_histogram(self):
        x = np.random.default_rng(3).standard_normal(5000).astype(np.float32)
        obs = cal.Histogram(num_bins=100)
        state = jax.jit(obs.update)(obs.init(x), x)
        w = float(state.width.reshape(()))
        edges = (int(state.offset.reshape(())) + np.arange(201)) * w
        np.testing.assert_array_equal(np.asarray(state.counts).ravel(), np.histogram(x, edges)[0])


class TestHistogramMethods:
    @pytest.mark.parametrize("p", [99.0, 99.9, 90.0])
    def test_percentile_matches_numpy(self, p):
        x = np.random.default_rng(0).standard_t(3.0, 20000).astype(np.float32)
        obs = cal.Histogram(num_bins=2048, method="percentile", percentile=p)
        state = obs.update(obs.init(x), x)
        w = float(state.width.reshape(()))
        lo, hi = obs.range(state)
        # the histogram quantile lies in the bin of the order statistic that crosses
        # the quantile: between its neighbours, give or take one bin
        srt = np.sort(x)

        def bracket(q, values):
            k = q * len(values)
            i = int(np.floor(k)) - 1
            return values[max(i, 0)] - 1.01 * w, values[min(i + 2, len(values) - 1)] + 1.01 * w

        for got, q in ((lo, (100 - p) / 200), (hi, 1 - (100 - p) / 200)):
            a, b = bracket(q, srt)
            assert a <= float(got) <= b, (q, float(got), a, b)
        sym = cal.Histogram(num_bins=2048, method="percentile", percentile=p, symmetric=True)
        lo, hi = sym.range(sym.update(sym.init(x), x))
        a, b = bracket(p / 100, np.sort(np.abs(x)))
        assert float(lo) == -float(hi) and a <= float(hi) <= b

    @pytest.mark.parametrize(
        "dtype,symmetric", [("int8", True), ("uint8", False), ("int4", True), ("int8", False)]
    )
    def test_mse_minimises_simulated_error(self, dtype, symmetric):
        # the error of the chosen range, measured by really quantizing the data,
        # is within 1% of the best range found by a fine brute-force scan
        rng = np.random.default_rng(5)
        x = np.concatenate([rng.standard_normal(20000), rng.standard_t(2, 500)]).astype(np.float32)
        if not symmetric:  # skewed and continuous (a point mass would test Z rounding instead)
            x = (rng.gamma(2.0, 1.0, x.size) - 1.0 + 0.1 * x).astype(np.float32)
        obs = cal.Histogram(num_bins=1024, method="mse", symmetric=symmetric, dtype=dtype)
        lo, hi = (float(v) for v in obs.range(obs.update(obs.init(x), x)))
        spec = jq.QuantSpec(dtype, scheme="symmetric" if symmetric else "affine")

        def err(lo, hi):
            qp = jq.qparams_from_range(lo, hi, spec)
            return float(np.mean((np.asarray(jq.fake_quant(x, qp, spec)) - x) ** 2))

        scan = np.linspace(0.05, 1.0, 400)
        best = min(err(f * min(x.min(), 0), f * x.max()) for f in scan)
        if not symmetric:  # also scan hi alone (lo at the data minimum)
            best = min(best, min(err(x.min(), f * x.max()) for f in scan))
        assert err(lo, hi) <= 1.01 * best, (lo, hi, err(lo, hi), best)

    def test_entropy_clips_heavy_tail(self):
        rng = np.random.default_rng(2)
        x = np.concatenate([rng.standard_normal(50000), [60.0, -55.0]]).astype(np.float32)
        obs = cal.Histogram(num_bins=2048, method="entropy")
        lo, hi = obs.range(obs.update(obs.init(x), x))
        # the two outliers are clipped; the bulk (|x| < 4.5) is kept
        assert 3.0 < float(hi) < 20.0 and -20.0 < float(lo) < -3.0

    @pytest.mark.parametrize("method", ["entropy", "mse", "percentile"])
    def test_per_channel_equals_per_tensor_per_channel(self, method):
        rng = np.random.default_rng(4)
        xs = [
            (rng.standard_normal((300, 3)) * [1.0, 5.0, 0.1] + [0.0, 2.0, 0.0]).astype(np.float32)
            for _ in range(3)
        ]
        xs = [np.concatenate([x[:, :2], np.maximum(x[:, 2:], 0)], axis=1) for x in xs]
        obs = cal.Histogram(num_bins=256, method=method, percentile=99.0, axis=1)
        lo, hi = obs.range(_feed(obs, xs))
        chex.assert_shape([lo, hi], (3,))
        single = cal.Histogram(num_bins=256, method=method, percentile=99.0)
        for c in range(3):
            want = single.range(_feed(single, [x[:, c] for x in xs]))
            np.testing.assert_allclose([lo[c], hi[c]], want, rtol=1e-6, atol=1e-6)

    def test_unsigned_entropy_is_one_sided(self):
        x = np.abs(np.random.default_rng(0).standard_normal(20000)).astype(np.float32)
        obs = cal.Histogram(method="entropy", dtype="uint8")
        lo, hi = obs.range(obs.update(obs.init(x), x))
        assert float(lo) == float(x.min()) and 2.0 < float(hi) <= float(x.max())


class TestBadInput:
    @pytest.mark.parametrize("name", OBSERVERS)
    def test_nan_raises_eagerly(self, name):
        obs = OBSERVERS[name]()
        x = jnp.array([1.0, jnp.nan, 2.0])
        with pytest.raises(ValueError, match="1 non-finite"):
            obs.update(obs.init(x), x)

    @pytest.mark.parametrize("name", OBSERVERS)
    def test_nonfinite_under_jit_is_counted_then_raises(self, name):
        obs = OBSERVERS[name]()
        x = jnp.array([1.0, jnp.inf, -jnp.inf, 2.0])
        state = jax.jit(obs.update)(obs.init(x), x)
        assert int(state.nonfinite) == 2
        with pytest.raises(ValueError, match="2 non-finite"):
            obs.range(state)

    @pytest.mark.parametrize("name", OBSERVERS)
    def test_ignore_drops_counts_and_warns(self, name):
        obs = OBSERVERS[name](nonfinite="ignore")
        x = jnp.array([1.0, jnp.nan, -2.0, 2.0])
        state = obs.update(obs.init(x), x)
        with pytest.warns(RuntimeWarning, match="1 non-finite"):
            lo, hi = obs.range(state)
        assert np.isfinite(lo) and np.isfinite(hi) and -2.0 <= float(lo) <= float(hi) <= 2.0

    @pytest.mark.parametrize("name", OBSERVERS)
    def test_integer_input_raises(self, name):
        obs = OBSERVERS[name]()
        with pytest.raises(TypeError, match="`x` must be a floating-point"):
            obs.init(jnp.arange(4))
        state = obs.init(jnp.zeros(4))
        with pytest.raises(TypeError, match="`x` must be a floating-point"):
            obs.update(state, jnp.arange(4))

    @pytest.mark.parametrize("name", OBSERVERS)
    def test_shape_mismatch_raises(self, name):
        obs = OBSERVERS[name](axis=1)
        state = obs.init(jnp.zeros((2, 3)))
        with pytest.raises(ValueError, match="3 channels"):
            obs.update(state, jnp.zeros((2, 4)))
        with pytest.raises(ValueError, match="rank"):
            obs.update(state, jnp.zeros((2, 3, 1)))
        obs.update(state, jnp.zeros((5, 3)))  # another batch size is fine

    @pytest.mark.parametrize("name", OBSERVERS)
    def test_range_before_update_raises(self, name):
        obs = OBSERVERS[name]()
        with pytest.raises(ValueError, match="no statistics yet"):
            obs.range(obs.init(jnp.zeros(3)))

    @pytest.mark.parametrize("name", OBSERVERS)
    def test_constant_and_zero_input_give_usable_range(self, name):
        for value in (0.0, 3.0, -2.5):
            obs = OBSERVERS[name]()
            x = jnp.full((4, 5), value)
            lo, hi = obs.range(_feed(obs, [x]))
            assert float(lo) <= value <= float(hi) or np.isclose([lo, hi], value).all()
            for spec in (jq.QuantSpec("int8"), jq.QuantSpec("uint8", scheme="affine")):
                qp = jq.qparams_from_range(lo, hi, spec)
                assert np.all(np.isfinite(qp.scale)) and np.all(qp.scale > 0)
                y = jq.dequantize(jq.quantize(x, qp, spec))
                np.testing.assert_allclose(y, x, rtol=1e-2, atol=1e-6)

    def test_bad_configuration(self):
        with pytest.raises(ValueError, match="method"):
            cal.Histogram(method="kl")
        with pytest.raises(ValueError, match="percentile"):
            cal.Histogram(percentile=0.0)
        with pytest.raises(ValueError, match="num_bins"):
            cal.Histogram(num_bins=4)
        with pytest.raises(ValueError, match="integer target"):
            cal.Histogram(method="mse", dtype="e4m3")
        with pytest.raises(ValueError, match="nonfinite"):
            cal.MinMax(nonfinite="skip")
        with pytest.raises(TypeError, match="axis"):
            cal.MinMax(axis=1.5)
        with pytest.raises(ValueError, match="out of range"):
            cal.MinMax(axis=3).init(jnp.zeros((2, 2)))

    def test_observers_are_hashable_and_fit_a_quantspec(self):
        spec = jq.QuantSpec("int8", calibration=cal.Histogram(method="mse"))
        assert hash(spec) == hash(jq.QuantSpec("int8", calibration=cal.Histogram(method="mse")))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert len({cal.MinMax(), cal.MinMax(), cal.MovingAverageMinMax()}) == 2
