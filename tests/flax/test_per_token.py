"""Per token is per token on any rank: ``w8a8_dynamic(per_token=True)`` and ``axis="rows"``.

The probe: a token 50x larger than the rest must change no other token's output,
and each token's output must equal a numpy reference that quantizes that token
alone (``S = max|x| / 127``, ``q = round(x / S)``, int64 dot, per-channel weight).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jq
from jq import ops, presets

D, N = 16, 8


def _np_per_token(x, w):
    """Per-token int8 x per-channel int8, exact integer dot, float64 rescale."""
    x = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
    w = np.asarray(w, np.float64)
    sw = np.abs(w).max(axis=0, keepdims=True) / 127
    qw = np.round(w / sw).astype(np.int64)
    sx = np.abs(x).max(axis=1, keepdims=True) / 127
    qx = np.round(x / sx).astype(np.int64)
    return (qx @ qw) * sx * sw


def _probe(shape, seed=0):
    x = np.random.RandomState(seed).randn(*shape).astype(np.float32)
    xo = x.copy()
    flat = xo.reshape(-1, D)
    flat[1] *= 50.0  # one outlier token: [0, 1] on (batch, tokens, features)
    return x, xo


@pytest.fixture(scope="module")
def dense():
    m = nn.Dense(N, use_bias=False)
    v = m.init(jax.random.key(0), jnp.zeros((1, D)))
    rules = presets.w8a8_dynamic(per_token=True)
    qv = jq.convert(m, v, rules, args=(jnp.zeros((2, 3, D)),))
    return m, v, qv


@pytest.mark.parametrize("shape", [(6, D), (2, 3, D), (2, 1, 3, D)])
def test_w8a8_dynamic_per_token_on_rank_2_3_4(dense, shape):
    m, v, qv = dense
    x, xo = _probe(shape)
    y, yo = (np.asarray(jq.apply(m, qv, a)).reshape(-1, N) for a in (x, xo))
    # the outlier changes its own token only
    np.testing.assert_array_equal(np.delete(yo, 1, 0), np.delete(y, 1, 0))
    assert np.abs(yo[1] - y[1]).max() > 1.0
    w = v["params"]["kernel"]
    np.testing.assert_allclose(yo, _np_per_token(xo, w), rtol=1e-5, atol=1e-5)


def test_rows_spec_at_the_ops_level_dot_einsum_qat_conv():
    x, xo = _probe((2, 3, D), seed=1)
    w = np.random.RandomState(2).randn(D, N).astype(np.float32)
    wspec = jq.QuantSpec("int8", axis=-1)
    qw = jq.quantize(w, None, wspec)
    rows = jq.QuantSpec("int8", axis="rows")
    dn = (((2,), (0,)), ((), ()))
    k = jq.quantize(np.random.RandomState(4).randn(3, 3, 2, 4).astype(np.float32), None, wspec)
    img = np.random.RandomState(3).randn(2, 5, 5, 2).astype(np.float32)
    img[1] *= 50.0

    @jax.jit
    def run(xo, img):
        conv = lambda a: ops.conv_general_dilated(  # noqa: E731
            a, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"), lhs_spec=rows
        )
        return {
            "dot": ops.dot_general(xo, qw, dn, lhs_spec=rows),
            "einsum": ops.einsum("btd,dn->btn", xo, qw, lhs_spec=rows),
            "qat_int": ops.qat_dot_general(
                xo, w, dn, lhs_spec=rows, rhs_spec=wspec, int_forward=True
            ),
            "qat_fake": ops.qat_dot_general(xo, w, dn, lhs_spec=rows, rhs_spec=wspec),
        }, (conv(img)[0], conv(img[:1])[0])

    got, (conv_both, conv_alone) = run(xo, img)
    want = _np_per_token(xo, w)
    for name, y in got.items():
        np.testing.assert_allclose(
            np.asarray(y).reshape(-1, N), want, rtol=1e-5, atol=1e-5, err_msg=name
        )
    # a convolution contracts features and the window: one scale per example
    np.testing.assert_array_equal(conv_both, conv_alone)


def test_rows_spec_is_for_dynamic_activations_only():
    with pytest.raises(ValueError, match="dynamic activations"):
        jq.QuantSpec("int8", axis="rows", calibration=jq.calibration.MinMax())
    with pytest.raises(ValueError, match="Rule.weight: axis='rows' is for activations"):
        jq.Rule(".*", weight=jq.QuantSpec("int8", axis="rows"))
    with pytest.raises(ValueError, match="resolved by the op"):
        jq.qparams_from_array(jnp.ones((2, 3)), jq.QuantSpec("int8", axis="rows"))
    assert jq.QuantSpec("int8", axis=("rows",)) == jq.QuantSpec("int8", axis="rows")


def test_qat_fake_quant_per_token_on_rank_3(dense):
    m, v, _ = dense
    x, xo = _probe((2, 3, D), seed=5)
    q = jq.qat(m, presets.w8a8_dynamic(per_token=True))
    qv = q.init(v, x)
    y, yo = (np.asarray(q.apply(qv, a)).reshape(-1, N) for a in (x, xo))
    np.testing.assert_array_equal(np.delete(yo, 1, 0), np.delete(y, 1, 0))
    np.testing.assert_allclose(yo, _np_per_token(xo, v["params"]["kernel"]), rtol=1e-5, atol=1e-5)


def test_per_token_spec_survives_a_checkpoint(dense, tmp_path):
    m, v, _ = dense
    x = _probe((2, 3, D), seed=6)[1]
    qm = jq.quantize_model(m, v, [x], presets.w8a8_dynamic(per_token=True))
    path = str(tmp_path / "m.safetensors")
    qm.save(path, format="safetensors")
    back = jq.load_model(path, m)
    assert back.variables.plan.sites[0].activation.per_row
    np.testing.assert_array_equal(np.asarray(back.apply(x)), np.asarray(qm.apply(x)))
