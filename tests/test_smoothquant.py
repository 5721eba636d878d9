"""SmoothQuant: factors by hand, the float identity, outlier channels under static int8, Flax round trip."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jq
from jq import calibration as cal
from jq.flax import checkpoint
from jq.flax.ptq import smoothquant
from jq.smoothing import channel_absmax, smooth_activation, smooth_weight, smoothing_factors


def test_factors_by_hand():
    a = jnp.array([4.0, 1.0, 0.0, 9.0])
    w = jnp.array([1.0, 4.0, 2.0, 0.0])
    # sqrt(4 / 1), sqrt(1 / 4); zero statistics -> 1
    np.testing.assert_allclose(smoothing_factors(a, w), [2.0, 0.5, 1.0, 1.0], rtol=1e-6)
    # alpha = 1: s = max|X|, so every smoothed channel peaks at 1; alpha = 0: s = 1 / max|W|
    np.testing.assert_allclose(smoothing_factors(a, w, 1.0), [4.0, 1.0, 1.0, 1.0], rtol=1e-6)
    np.testing.assert_allclose(smoothing_factors(a, w, 0.0), [1.0, 0.25, 1.0, 1.0], rtol=1e-6)
    # 2 ** round(log2(s)): sqrt(9 / 1) = 3 -> 4 (log2 = 1.58), sqrt(1 / 3) = 0.577 -> 0.5 (log2 = -0.79)
    np.testing.assert_array_equal(
        smoothing_factors(jnp.array([9.0, 1.0]), jnp.array([1.0, 3.0]), power_of_two=True),
        [4.0, 0.5],
    )


def test_channel_absmax():
    x = jnp.array([[[1.0, -5.0], [2.0, 0.5]], [[-3.0, 1.0], [0.0, 0.0]]])
    np.testing.assert_array_equal(channel_absmax(x), [3.0, 5.0])
    np.testing.assert_array_equal(channel_absmax(x, axis=0), [5.0, 3.0])


@settings(max_examples=10, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from([0.25, 0.5, 0.85]))
def test_identity_exact_with_power_of_two_factors(seed, alpha):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(16, 12)).astype(np.float32) * np.exp(rng.normal(size=12) * 2).astype(
        np.float32
    )
    w = rng.normal(size=(12, 8)).astype(np.float32)
    s = smoothing_factors(channel_absmax(x), jnp.max(jnp.abs(w), axis=1), alpha, power_of_two=True)
    got = jnp.matmul(smooth_activation(x, s), smooth_weight(w, s), precision="highest")
    want = jnp.matmul(jnp.asarray(x), jnp.asarray(w), precision="highest")
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    # general factors: equal up to float rounding
    s = smoothing_factors(channel_absmax(x), jnp.max(jnp.abs(w), axis=1), alpha)
    got = jnp.matmul(smooth_activation(x, s), smooth_weight(w, s), precision="highest")
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def _outlier_inputs(seed=0, rows=256, k=64, n=32):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, k)).astype(np.float32)
    x[:, [3, 40]] *= 60.0  # outlier channels, as in LLM activations
    w = (rng.normal(size=(k, n)) / np.sqrt(k)).astype(np.float32)
    return x, w


def _w8a8(x, w):
    """Static per-tensor int8 activations (min-max), per-column int8 weights, as a float result."""
    a_spec, w_spec = jq.QuantSpec("int8"), jq.QuantSpec("int8", axis=-1)
    qp = jq.qparams_from_range(x.min(), x.max(), a_spec)
    xq = jq.dequantize(jq.quantize(jnp.asarray(x), qp, a_spec))
    wq = jq.dequantize(jq.quantize(jnp.asarray(w), None, w_spec))
    return np.asarray(xq) @ np.asarray(wq)


def test_smoothing_lowers_static_int8_error_on_outlier_channels():
    x, w = _outlier_inputs()
    y = x @ w
    plain = np.sum((_w8a8(x, w) - y) ** 2)
    s = smoothing_factors(channel_absmax(x), jnp.max(jnp.abs(jnp.asarray(w)), axis=1), 0.5)
    smoothed = np.sum(
        (_w8a8(np.asarray(smooth_activation(x, s)), np.asarray(smooth_weight(w, s))) - y) ** 2
    )
    assert smoothed < 0.5 * plain


def test_bad_input():
    with pytest.raises(ValueError, match="alpha"):
        smoothing_factors(jnp.ones(3), jnp.ones(3), 1.5)
    with pytest.raises(ValueError, match="equal length"):
        smoothing_factors(jnp.ones(3), jnp.ones(4))
    with pytest.raises(ValueError, match="act_absmax"):
        smoothing_factors(jnp.array([1.0, -1.0]), jnp.ones(2))
    with pytest.raises(ValueError, match="axis"):
        channel_absmax(jnp.ones((2, 3)), axis=2)


# ----------------------------------------------------------------------------- Flax
class LNMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm()(x)
        h = nn.relu(nn.Dense(64)(h))
        return nn.Dense(10)(h)


RULES = [
    jq.Rule(
        ".*",
        weight=jq.QuantSpec("int8", axis=-1),
        activation=jq.QuantSpec("int8", calibration=cal.MinMax()),
    )
]


@pytest.fixture(scope="module")
def outlier_model():
    m = LNMLP()
    batches = [jax.random.normal(jax.random.key(i), (64, 32)) for i in range(3)]
    v = m.init(jax.random.key(0), batches[0])
    scale = np.ones(32, np.float32)
    scale[[3, 17]] = 50.0  # LayerNorm gains that make two outlier channels
    v["params"]["LayerNorm_0"]["scale"] = jnp.asarray(scale)
    return m, v, batches


def test_flax_smoothquant_beats_plain_static_int8(outlier_model, tmp_path):
    m, v, batches = outlier_model
    x = jax.random.normal(jax.random.key(99), (128, 32))
    y = m.apply(v, x)
    plain = jq.convert(m, v, RULES, jq.calibrate(m, v, batches, RULES, progress=False))
    sq = smoothquant(m, v, batches, RULES, progress=False)
    assert set(sq.smooth) == {"Dense_0/kernel", "Dense_1/kernel"}
    assert sq.smooth["Dense_0/kernel"].shape == (1, 32)
    e_plain = float(jnp.mean((jq.apply(m, plain, x) - y) ** 2))
    e_sq = float(jnp.mean((jq.apply(m, sq, x) - y) ** 2))
    assert e_sq < 0.5 * e_plain
    # the stored weight is diag(s) W: without the 1 / s at the activation the output is wrong
    bare = dataclasses.replace(sq, smooth={})
    assert float(jnp.mean((jq.apply(m, bare, x) - y) ** 2)) > 10 * e_sq
    w0 = np.asarray(v["params"]["Dense_0"]["kernel"]) * np.asarray(
        sq.smooth["Dense_0/kernel"]
    ).reshape(-1, 1)
    np.testing.assert_allclose(
        np.asarray(jq.dequantize(sq.variables["params/Dense_0/kernel"])),
        w0,
        atol=float(np.abs(w0).max()) / 127,
    )
    # checkpoints keep the factors
    checkpoint.save(tmp_path / "sq", sq)
    back = checkpoint.restore(tmp_path / "sq")
    np.testing.assert_array_equal(
        np.asarray(back.smooth["Dense_0/kernel"]), np.asarray(sq.smooth["Dense_0/kernel"])
    )
    np.testing.assert_array_equal(np.asarray(jq.apply(m, back, x)), np.asarray(jq.apply(m, sq, x)))


def test_flax_smoothquant_bad_input(outlier_model):
    m, v, batches = outlier_model
    with pytest.raises(ValueError, match="batches.*empty"):
        smoothquant(m, v, [], RULES, progress=False)
    with pytest.raises(ValueError, match="alpha"):
        smoothquant(m, v, batches, RULES, alpha=2.0, progress=False)
