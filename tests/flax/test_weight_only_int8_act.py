"""Weight-only presets on CPU: per-token int8 activations (default) against float activations.

The default execution of `presets.w8_weight_only` / `w4_weight_only` quantizes
each token's activation to int8 (``s = max|x_row| / 127``, round to nearest)
and runs the integer dot; ``activations="float"`` keeps float activations. Both
are checked against numpy float64 references built from the stored integer
weights and scales, and their difference against the bound of activation
rounding: ``|y_int8 - y_float| <= s_row / 2 * sum_k |w[k, n]|`` per output.
"""

import flax.linen as nn
import jax
import numpy as np
import pytest

import jq
from jq import presets


class TwoDense(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(256, use_bias=False, name="a")(x)
        return nn.Dense(8, use_bias=False, name="b")(h)


@pytest.fixture(scope="module")
def model():
    m = TwoDense()
    x = np.random.RandomState(0).randn(3, 256).astype(np.float32)
    x[1] *= 30.0  # rows of very different ranges: per-token scales matter
    return m, m.init(jax.random.key(0), x), x


def _dequant(q: jq.QArray) -> np.ndarray:
    """float64 weights from the stored integers and scales (numpy only)."""
    v = np.asarray(q.int_value(), np.float64)
    s = np.asarray(q.scale, np.float64)
    if s.shape[0] not in (1, v.shape[0]):  # groups along K
        s = np.repeat(s, v.shape[0] // s.shape[0], axis=0)
    return v * s


def _per_token_ref(x, w):
    s = np.abs(x).max(axis=1, keepdims=True) / 127.0
    xq = np.clip(np.round(x / s), -127, 127)
    return (xq * s) @ w, s


@pytest.mark.parametrize(
    "make", [presets.w8_weight_only, lambda **k: presets.w4_weight_only(128, **k)]
)
def test_int8_activations_match_reference_and_stay_within_the_rounding_bound(model, make):
    m, v, x = model
    q_int = jq.convert(m, v, make(), args=(x,))
    q_flt = jq.convert(m, v, make(activations="float"), args=(x,))
    wa = _dequant(q_int.weight("params/a/kernel"))  # (K, N), the model's orientation
    wb = _dequant(q_int.weight("params/b/kernel"))
    np.testing.assert_array_equal(wa, _dequant(q_flt.weight("params/a/kernel")))
    f = jax.jit(lambda q, x: jq.apply(m, q, x))
    y_int, y_flt = np.asarray(f(q_int, x)), np.asarray(f(q_flt, x))
    x64 = x.astype(np.float64)
    # float activations: exactly x @ dequantized weights (float32 rounding only)
    h_flt = x64 @ wa
    np.testing.assert_allclose(y_flt, h_flt @ wb, rtol=1e-4, atol=1e-4 * np.abs(y_flt).max())
    # int8 activations: the per-token scheme, layer by layer
    h_int, s1 = _per_token_ref(x64, wa)
    ref, _ = _per_token_ref(h_int, wb)
    np.testing.assert_allclose(y_int, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    # first layer (the output matches the reference): the difference is bounded by half an activation step per product
    bound = s1 / 2 * np.abs(wa).sum(axis=0, keepdims=True)
    assert np.all(np.abs(h_int - h_flt) <= bound + 1e-9)
    # and the relative error of the whole model is small: about 1/254 per activation
    err = np.abs(y_int - y_flt).max() / np.abs(y_flt).max()
    assert 0 < err < 0.02


def test_nan_row_stays_in_its_row(model):
    m, v, x = model
    q = jq.convert(m, v, presets.w8_weight_only(), args=(x,))
    xb = x.copy()
    xb[1, 7] = np.nan
    y = np.asarray(jax.jit(lambda q, x: jq.apply(m, q, x))(q, xb))
    y0 = np.asarray(jax.jit(lambda q, x: jq.apply(m, q, x))(q, x))
    assert np.isnan(y[1]).all()
    np.testing.assert_array_equal(y[[0, 2]], y0[[0, 2]])


@pytest.mark.parametrize("lhs_shape, scale_axes", [((2, 3, 64), (0,)), ((1, 64), (0,))])
def test_rhs_blocks_as_rows_match_int64_reference(lhs_shape, scale_axes):
    """int8 activations x int4 weights in groups of 16 along K: block-masked rows, one dot."""
    rs = np.random.RandomState(3)
    w = rs.randn(64, 24).astype(np.float32)
    x = rs.randn(*lhs_shape).astype(np.float32)
    qw = jq.quantize(w, None, jq.QuantSpec("int4", axis=-1, block_axis=0, block_size=16))
    qx = jq.quantize(x, None, jq.QuantSpec("int8", axis=scale_axes))
    dn = (((x.ndim - 1,), (0,)), ((), ()))
    y = np.asarray(jax.jit(jq.ops.dot_general, static_argnums=2)(qx, qw, dn))
    vx = np.asarray(qx.int_value(), np.int64).reshape(-1, 64)
    vw = np.asarray(qw.int_value(), np.int64)
    sw = np.asarray(qw.scale, np.float64)  # (4, 24)
    sx = np.broadcast_to(np.asarray(qx.scale, np.float64), x.shape[:-1] + (1,)).reshape(-1, 1)
    ref = sum((vx[:, g * 16 : (g + 1) * 16] @ vw[g * 16 : (g + 1) * 16]) * sw[g] for g in range(4))
    ref = (ref * sx).reshape(x.shape[:-1] + (24,))
    np.testing.assert_allclose(y, ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max())
