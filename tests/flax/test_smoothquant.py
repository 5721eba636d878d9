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
from jq.flax.smoothquant import smoothquant
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
    plain = jq.convert(m, v, RULES, jq.calibrate(m, v, RULES, batches, progress=False))
    # the runtime-multiply path (fold=True would fold Dense_0's factors into the LayerNorm)
    sq = smoothquant(m, v, RULES, batches, fold=False, progress=False)
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
        np.asarray(jq.dequantize(sq.weight("params/Dense_0/kernel"))),
        w0,
        atol=float(np.abs(w0).max()) / 127,
    )
    # checkpoints keep the factors (the checks above have run when orbax is absent)
    pytest.importorskip("orbax.checkpoint", reason="jq checkpoints need orbax-checkpoint")
    checkpoint.save(tmp_path / "sq", sq)
    back = checkpoint.restore(tmp_path / "sq")
    np.testing.assert_array_equal(
        np.asarray(back.smooth["Dense_0/kernel"]), np.asarray(sq.smooth["Dense_0/kernel"])
    )
    np.testing.assert_array_equal(np.asarray(jq.apply(m, back, x)), np.asarray(jq.apply(m, sq, x)))


def test_flax_smoothquant_bad_input(outlier_model):
    m, v, batches = outlier_model
    with pytest.raises(ValueError, match="batches.*empty"):
        smoothquant(m, v, RULES, [], progress=False)
    with pytest.raises(ValueError, match="alpha"):
        smoothquant(m, v, RULES, batches, alpha=2.0, progress=False)
    with pytest.raises(TypeError, match="fold"):
        smoothquant(m, v, RULES, batches, fold="yes", progress=False)


# ----------------------------------------------------------------------------- folding
def _n_multiplies(m, qv, x) -> int:
    return jax.jit(lambda a: jq.apply(m, qv, a)).lower(x).as_text().count("stablehlo.multiply")


def test_fold_single_site_matches_runtime_multiply(outlier_model):
    m, v, batches = outlier_model
    x = jax.random.normal(jax.random.key(99), (128, 32))
    folded = smoothquant(m, v, RULES, batches, progress=False)
    runtime = smoothquant(m, v, RULES, batches, fold=False, progress=False)
    # Dense_0 (after the LayerNorm) is folded; Dense_1 (after a relu) keeps the runtime multiply
    assert set(folded.smooth) == {"Dense_1/kernel"}
    assert set(runtime.smooth) == {"Dense_0/kernel", "Dense_1/kernel"}
    s = np.asarray(runtime.smooth["Dense_0/kernel"]).reshape(-1)
    ln = v["params"]["LayerNorm_0"]
    for name in ("scale", "bias"):
        np.testing.assert_allclose(
            np.asarray(folded.variables[f"params/LayerNorm_0/{name}"]),
            np.asarray(ln[name]) / s,
            rtol=1e-6,
        )
    # one site, so the same factors: identical weight codes and (up to rounding) activation scales
    qf, qr = folded.variables["params/Dense_0/kernel"], runtime.variables["params/Dense_0/kernel"]
    np.testing.assert_array_equal(np.asarray(qf.value), np.asarray(qr.value))
    np.testing.assert_array_equal(np.asarray(qf.scale), np.asarray(qr.scale))
    a_scale = float(runtime.activations["Dense_0/kernel"].scale)
    np.testing.assert_allclose(
        float(folded.activations["Dense_0/kernel"].scale), a_scale, rtol=1e-5
    )
    # x * (g / s) + b / s and (x * g + b) * (1 / s) differ by float rounding only, which can at
    # most flip one Dense_0 input code (a change <= a_scale * max|W0| in a hidden unit), and that
    # at most one Dense_1 input code: |dy| <= (a_scale * max|W0| + a_scale_1) * max|W1|
    yf, yr = jq.apply(m, folded, x), jq.apply(m, runtime, x)
    w0 = float(jnp.max(jnp.abs(jq.dequantize(qr))))
    w1 = float(jnp.max(jnp.abs(jq.dequantize(runtime.variables["params/Dense_1/kernel"]))))
    a1 = float(runtime.activations["Dense_1/kernel"].scale)
    np.testing.assert_allclose(
        np.asarray(yf), np.asarray(yr), rtol=0, atol=(a_scale * w0 + a1) * w1
    )
    # the lowered program has one multiply fewer: the smoothing is gone from inference
    assert _n_multiplies(m, folded, x) == _n_multiplies(m, runtime, x) - 1


class QKV(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm()(x)
        return nn.Dense(16, name="q")(h), nn.Dense(16, name="k")(h), nn.Dense(16, name="v")(h)


def test_fold_qkv_shares_one_factor_vector():
    m = QKV()
    batches = [jax.random.normal(jax.random.key(i), (64, 32)) for i in range(3)]
    v = m.init(jax.random.key(0), batches[0])
    scale = np.ones(32, np.float32)
    scale[[3, 17]] = 50.0
    v["params"]["LayerNorm_0"]["scale"] = jnp.asarray(scale)
    v["params"]["LayerNorm_0"]["bias"] = jax.random.normal(jax.random.key(7), (32,))
    folded = smoothquant(m, v, RULES, batches, progress=False)
    runtime = smoothquant(m, v, RULES, batches, fold=False, progress=False)
    assert folded.smooth == {}
    assert set(runtime.smooth) == {"q/kernel", "k/kernel", "v/kernel"}
    # independent SmoothQuant factors: max|X_j| of the LayerNorm output, max over the q|k|v rows
    ln = nn.LayerNorm()
    h = np.concatenate(
        [np.asarray(ln.apply({"params": v["params"]["LayerNorm_0"]}, b)) for b in batches]
    )
    w_cat = np.concatenate([np.asarray(v["params"][n]["kernel"]) for n in "qkv"], axis=1)
    s = np.sqrt(np.abs(h).max(0) / np.abs(w_cat).max(1))
    for name in ("scale", "bias"):
        np.testing.assert_allclose(
            np.asarray(folded.variables[f"params/LayerNorm_0/{name}"]),
            np.asarray(v["params"]["LayerNorm_0"][name]) / s,
            rtol=1e-5,
        )
    for n in "qkv":
        q = folded.weight(f"params/{n}/kernel")  # the model's (K, N) orientation
        want = np.asarray(v["params"][n]["kernel"]) * s[:, None]
        # within half a quantization step of diag(s) W, column by column
        err = np.abs(np.asarray(jq.dequantize(q)) - want)
        assert np.all(err <= 0.5 * np.asarray(q.scale) * (1 + 1e-4))
    # float identity: the folded LayerNorm and diag(s) W give the original model's output
    fv = jax.tree_util.tree_map(lambda a: a, v)
    for name in ("scale", "bias"):
        fv["params"]["LayerNorm_0"][name] = folded.variables[f"params/LayerNorm_0/{name}"]
    for n in "qkv":
        fv["params"][n]["kernel"] = v["params"][n]["kernel"] * jnp.asarray(s)[:, None]
    x = jax.random.normal(jax.random.key(99), (128, 32))
    for got, want in zip(m.apply(fv, x), m.apply(v, x)):
        np.testing.assert_allclose(
            np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(want)))
        )
    # and the folded int8 model beats plain static int8 on the outlier channels
    plain = jq.convert(m, v, RULES, jq.calibrate(m, v, RULES, batches, progress=False))
    ys = m.apply(v, x)
    err = lambda qv: sum(float(jnp.mean((a - b) ** 2)) for a, b in zip(jq.apply(m, qv, x), ys))  # noqa: E731
    assert err(folded) < 0.5 * err(plain)
    assert _n_multiplies(m, folded, x) == _n_multiplies(m, runtime, x) - 3


class Residual(nn.Module):
    """The LayerNorm output also feeds the residual sum: it cannot carry 1 / s."""

    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm()(x)
        return h + nn.Dense(32)(h)


class SharedGain(nn.Module):
    """``x * g`` feeds a Dense, but ``g`` is also used elsewhere."""

    @nn.compact
    def __call__(self, x):
        g = self.param("g", nn.initializers.ones, (32,))
        return nn.Dense(8)(x * g) + jnp.sum(g)


@pytest.mark.parametrize("cls", [Residual, SharedGain])
def test_unfoldable_norm_keeps_runtime_multiply(cls):
    m = cls()
    batches = [jax.random.normal(jax.random.key(i), (32, 32)) for i in range(2)]
    v = m.init(jax.random.key(0), batches[0])
    with pytest.warns(UserWarning, match="not folded"):
        qv = smoothquant(m, v, RULES, batches, progress=False)
    assert set(qv.smooth) == {"Dense_0/kernel"}
    # the norm's parameters are untouched
    for path, leaf in jax.tree_util.tree_flatten_with_path(v["params"])[0]:
        key = "params/" + "/".join(str(k.key) for k in path)
        if "Dense" not in key:
            np.testing.assert_array_equal(np.asarray(qv.variables[key]), np.asarray(leaf))
    x = jax.random.normal(jax.random.key(5), (16, 32))
    ref = smoothquant(m, v, RULES, batches, fold=False, progress=False)
    np.testing.assert_array_equal(np.asarray(jq.apply(m, qv, x)), np.asarray(jq.apply(m, ref, x)))


def test_fold_nnx_layernorm():
    from flax import nnx

    class Block(nnx.Module):
        def __init__(self, rngs):
            self.ln = nnx.LayerNorm(32, rngs=rngs)
            self.fc = nnx.Linear(32, 16, rngs=rngs)

        def __call__(self, x):
            return self.fc(self.ln(x))

    model = Block(nnx.Rngs(0))
    scale = np.ones(32, np.float32)
    scale[[5, 20]] = 40.0
    model.ln.scale[...] = jnp.asarray(scale)
    batches = [jax.random.normal(jax.random.key(i), (64, 32)) for i in range(2)]
    folded = smoothquant(model, None, RULES, batches, progress=False)
    runtime = smoothquant(model, None, RULES, batches, fold=False, progress=False)
    assert folded.smooth == {} and set(runtime.smooth) == {"fc/kernel"}
    s = np.asarray(runtime.smooth["fc/kernel"]).reshape(-1)
    np.testing.assert_allclose(np.asarray(folded.variables["ln/scale"]), scale / s, rtol=1e-6)
    np.testing.assert_array_equal(
        np.asarray(folded.variables["fc/kernel"].value),
        np.asarray(runtime.variables["fc/kernel"].value),
    )
    x = jax.random.normal(jax.random.key(9), (32, 32))
    a_scale = float(runtime.activations["fc/kernel"].scale)
    w = float(jnp.max(jnp.abs(jq.dequantize(runtime.variables["fc/kernel"]))))
    np.testing.assert_allclose(
        np.asarray(jq.apply(model, folded, x)),
        np.asarray(jq.apply(model, runtime, x)),
        atol=2 * a_scale * w,
    )


class RMSBlock(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(16)(nn.RMSNorm()(x))


def test_fold_rmsnorm_scale_only():
    m = RMSBlock()
    batches = [jax.random.normal(jax.random.key(i), (64, 32)) for i in range(2)]
    v = m.init(jax.random.key(0), batches[0])
    scale = np.ones(32, np.float32)
    scale[[1, 30]] = 30.0
    v["params"]["RMSNorm_0"]["scale"] = jnp.asarray(scale)
    folded = smoothquant(m, v, RULES, batches, progress=False)
    runtime = smoothquant(m, v, RULES, batches, fold=False, progress=False)
    assert folded.smooth == {} and set(runtime.smooth) == {"Dense_0/kernel"}
    s = np.asarray(runtime.smooth["Dense_0/kernel"]).reshape(-1)
    np.testing.assert_allclose(
        np.asarray(folded.variables["params/RMSNorm_0/scale"]), scale / s, rtol=1e-6
    )
    x = jax.random.normal(jax.random.key(3), (32, 32))
    a_scale = float(runtime.activations["Dense_0/kernel"].scale)
    w = float(jnp.max(jnp.abs(jq.dequantize(runtime.variables["params/Dense_0/kernel"]))))
    np.testing.assert_allclose(
        np.asarray(jq.apply(m, folded, x)),
        np.asarray(jq.apply(m, runtime, x)),
        rtol=0,
        atol=2 * a_scale * w,
    )
