"""GPTQ: the jitted algorithm against a plain numpy reference, RTN equivalences, bad input, Flax entry point."""

import functools
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import models
import numpy as np
import pytest
from flax import nnx

import jq
from jq import calibration as cal
from jq.flax.gptq import gptq
from jq.gptq_core import gptq_quantize, gptq_with_params, rtn_quantize

K, N, ROWS = 64, 24, 512


def correlated_inputs(seed=0, rows=ROWS, k=K):
    """Inputs with correlated features and a few large channels, like transformer activations."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(k, k)) / np.sqrt(k)
    x = rng.normal(size=(rows, k)) @ mix + 0.1 * rng.normal(size=(rows, k))
    x[:, :3] *= 8.0
    return x.astype(np.float32)


def weight(seed=1, k=K, n=N):
    return np.random.default_rng(seed).normal(size=(k, n)).astype(np.float32)


def hessian(x):
    return (2.0 * x.T.astype(np.float64) @ x / x.shape[0]).astype(np.float32)


def layer_err(x, w, wq):
    return float(np.sum((x @ w - x @ np.asarray(wq)) ** 2))


def numpy_gptq(w, h, spec, percdamp=0.01, act_order=False):
    """The paper's algorithm, unblocked: quantize row r, spread its error over rows > r.

    Per-column symmetric or affine min-max parameters (static groups from the
    original weights when `spec` has groups), float64 throughout.
    """
    w = w.astype(np.float64).copy()
    k, _ = w.shape
    h = h.astype(np.float64).copy()
    perm = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(k)
    g = spec.block_size or k
    qmin, qmax = spec.qmin, spec.qmax
    lo = np.minimum(w.reshape(k // g, g, -1).min(1), 0)
    hi = np.maximum(w.reshape(k // g, g, -1).max(1), 0)
    if spec.scheme == "symmetric":
        scale = np.maximum(-lo, hi) / qmax
        zp = np.zeros_like(scale)
    else:
        scale = (hi - lo) / (qmax - qmin)
        zp = np.clip(np.round(qmin - lo / scale), qmin, qmax)
    w, h = w[perm], h[perm][:, perm]
    h += percdamp * np.mean(np.diag(h)) * np.eye(k)
    u = np.linalg.cholesky(np.linalg.inv(h)).T
    codes = np.zeros_like(w)
    for r in range(k):
        s, z = scale[perm[r] // g], zp[perm[r] // g]
        q = np.clip(np.round(w[r] / s) + z, qmin, qmax)
        err = (w[r] - (q - z) * s) / u[r, r]
        w[r + 1 :] -= np.outer(u[r, r + 1 :], err)
        codes[r] = q
    codes = codes[np.argsort(perm)]
    rows = np.arange(k) // g
    return codes, (codes - zp[rows]) * scale[rows]


SPECS = {
    "int4_col": (jq.QuantSpec("int4", axis=-1), None),
    "int4_g16": (jq.QuantSpec("int4", axis=-1, block_axis=0, block_size=16), None),
    "int4_affine_g32": (jq.QuantSpec("int4", "affine", axis=-1, block_axis=0, block_size=32), None),
    "int3_g16": (jq.QuantSpec("int4", axis=-1, block_axis=0, block_size=16), 3),
    "int8_col": (jq.QuantSpec("int8", axis=-1), None),
}


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_layer_error_below_rtn(name, act_order):
    spec, bits = SPECS[name]
    x, w = correlated_inputs(), weight()
    res = gptq_quantize(w, hessian(x), spec, act_order=act_order, bits=bits)
    rtn = rtn_quantize(w, spec, bits=bits)
    assert layer_err(x, w, res.weight) < 0.7 * layer_err(x, w, rtn.weight)
    # the stored QArray is exactly the GPTQ weight, in the original row order
    np.testing.assert_array_equal(np.asarray(jq.dequantize(res.qarray)), np.asarray(res.weight))
    np.testing.assert_array_equal(np.asarray(res.qarray.int_value()), np.asarray(res.codes))
    if bits is not None:
        assert int(np.abs(np.asarray(res.codes)).max()) <= 2 ** (bits - 1)


@pytest.mark.parametrize("name", ["int4_col", "int4_affine_g32"])
@pytest.mark.parametrize("act_order", [False, True])
def test_matches_unblocked_numpy_reference(name, act_order):
    """Lazy blocks and the jitted loop change nothing but float rounding order."""
    spec, _ = SPECS[name]
    x, w = correlated_inputs(2), weight(3)
    h = hessian(x)
    # static groups so that the reference's parameters are the original weights' min-max
    res = gptq_quantize(w, h, spec, act_order=act_order, static_groups=True, block_size=16)
    ref_codes, ref_w = numpy_gptq(w, h, spec, act_order=act_order)
    agree = np.mean(np.asarray(res.codes) == ref_codes)
    assert agree > 0.99, agree
    e, e_ref = layer_err(x, w, res.weight), layer_err(x, w, ref_w)
    assert abs(e - e_ref) < 0.02 * e_ref


def test_lazy_block_size_does_not_change_the_result():
    spec = jq.QuantSpec("int4", axis=-1, block_axis=0, block_size=16)
    x, w = correlated_inputs(4), weight(5)
    h = hessian(x)
    a = gptq_quantize(w, h, spec, block_size=128)
    for bs in (16, 32, 5):  # 5 is lowered to a size that nests with the groups
        b = gptq_quantize(w, h, spec, block_size=bs)
        assert np.mean(np.asarray(a.codes) == np.asarray(b.codes)) > 0.99


@pytest.mark.parametrize("name", ["int4_col", "int4_g16", "int4_affine_g32"])
@pytest.mark.parametrize("act_order", [False, True])
def test_identity_hessian_is_rtn_exactly(name, act_order):
    spec, _ = SPECS[name]
    w = weight(6)
    want = jq.quantize(jnp.asarray(w), None, spec)  # jq's round-to-nearest with min-max scales
    for h in (np.eye(K, dtype=np.float32), np.diag(np.linspace(0.5, 3.0, K)).astype(np.float32)):
        res = gptq_quantize(w, h, spec, act_order=act_order)
        np.testing.assert_array_equal(np.asarray(res.qarray.value), np.asarray(want.value))
        np.testing.assert_array_equal(np.asarray(res.qarray.scale), np.asarray(want.scale))
        if want.zero_point is not None:
            np.testing.assert_array_equal(
                np.asarray(res.qarray.zero_point), np.asarray(want.zero_point)
            )


def test_huge_dampening_tends_to_rtn():
    spec = jq.QuantSpec("int4", axis=-1, block_axis=0, block_size=16)
    x, w = correlated_inputs(7), weight(8)
    rtn = np.asarray(jq.quantize(jnp.asarray(w), None, spec).int_value())
    codes = [np.asarray(gptq_quantize(w, hessian(x), spec, percdamp=d).codes) for d in (0.01, 1e8)]
    assert np.mean(codes[0] == rtn) < 0.9  # GPTQ moves many codes...
    np.testing.assert_array_equal(codes[1], rtn)  # ...and none once H is swamped by the damping


def test_dead_inputs_get_zero_weight_rows():
    x, w = correlated_inputs(9), weight(10)
    x[:, 5] = 0.0
    res = gptq_quantize(w, hessian(x), jq.QuantSpec("int8", axis=-1))
    np.testing.assert_array_equal(np.asarray(res.weight)[5], 0.0)


def test_act_order_static_groups_use_original_row_groups():
    spec = jq.QuantSpec("int4", axis=-1, block_axis=0, block_size=16)
    x, w = correlated_inputs(11), weight(12)
    res = gptq_quantize(w, hessian(x), spec, act_order=True)
    assert res.perm is not None and not np.array_equal(np.asarray(res.perm), np.arange(K))
    want = jq.qparams_from_array(jnp.asarray(w), spec)
    np.testing.assert_array_equal(np.asarray(res.qparams.scale), np.asarray(want.scale))
    with pytest.raises(ValueError, match="static_groups"):
        gptq_quantize(w, hessian(x), spec, act_order=True, static_groups=False)


def test_with_given_parameters_matches_plain_gptq():
    spec = jq.QuantSpec("int4", axis=-1)
    x, w = correlated_inputs(13), weight(14)
    res = gptq_quantize(w, hessian(x), spec)
    scale = np.broadcast_to(np.asarray(res.qparams.scale), w.shape)
    wq, codes = gptq_with_params(w, hessian(x), scale, np.zeros_like(scale), spec)
    np.testing.assert_array_equal(np.asarray(codes), np.asarray(res.codes))
    np.testing.assert_array_equal(np.asarray(wq), np.asarray(res.weight))


def test_bad_input():
    x, w = correlated_inputs(15, rows=16), weight(16)
    spec = jq.QuantSpec("int4", axis=-1)
    h = hessian(x)  # rank 16 < K = 64: singular
    with pytest.raises(ValueError, match="not positive definite.*percdamp=0"):
        gptq_quantize(w, h, spec, percdamp=0.0)
    gptq_quantize(w, h, spec)  # the default dampening makes it usable
    with pytest.raises(ValueError, match="block_size=48 does not divide the K=64"):
        gptq_quantize(w, h, jq.QuantSpec("int4", axis=-1, block_axis=0, block_size=48))
    with pytest.raises(ValueError, match="integer format"):
        gptq_quantize(w, h, jq.QuantSpec("float8_e4m3fn", axis=-1))
    with pytest.raises(ValueError, match="`h` must have shape"):
        gptq_quantize(w, h[:8, :8], spec)
    with pytest.raises(ValueError, match="finite"):
        gptq_quantize(np.where(np.arange(K)[:, None] == 3, np.nan, w).astype(np.float32), h, spec)
    with pytest.raises(ValueError, match="percdamp"):
        gptq_quantize(w, h, spec, percdamp=-1.0)
    with pytest.raises(ValueError, match="bits"):
        gptq_quantize(w, h, spec, bits=5)
    with pytest.raises(ValueError, match="output axis"):
        gptq_quantize(w, h, jq.QuantSpec("int4", axis=0))


# ----------------------------------------------------------------------------- Flax
def _mlp_data():
    m = MLP()
    batches = [jnp.asarray(correlated_inputs(20 + i, rows=128, k=32)) for i in range(3)]
    v = m.init(jax.random.key(0), batches[0])
    return m, v, batches


G_RULES = [jq.Rule(".*", weight=jq.QuantSpec("int4", axis=-1, block_axis=0, block_size=16))]


def test_flax_gptq_is_sequential_and_runs_in_apply():
    m, v, batches = _mlp_data()
    qv = gptq(m, v, G_RULES, batches, progress=False)
    assert isinstance(qv, jq.QuantizedVariables)
    k0, k1 = qv.variables["params/Dense_0/kernel"], qv.variables["params/Dense_1/kernel"]
    assert k0.format == "int4" and k0.pack_axis is not None and k0.scale.shape == (2, 48)
    assert k1.scale.shape == (3, 16)
    p = v["params"]
    spec = G_RULES[0].weight
    # layer 0: H from the calibration inputs themselves
    x = np.concatenate([np.asarray(b) for b in batches])
    r0 = gptq_quantize(np.asarray(p["Dense_0"]["kernel"]), hessian(x), spec)
    np.testing.assert_array_equal(np.asarray(k0.int_value()), np.asarray(r0.codes))
    # layer 1: H from the inputs the *quantized* layer 0 produces (sequential)
    h1 = np.maximum(x @ np.asarray(jq.dequantize(k0)) + np.asarray(p["Dense_0"]["bias"]), 0)
    r1 = gptq_quantize(np.asarray(p["Dense_1"]["kernel"]), hessian(h1), spec)
    assert np.mean(np.asarray(k1.int_value()) == np.asarray(r1.codes)) > 0.99
    # apply runs the stored weights; GPTQ beats round-to-nearest on held-out data
    xt = jnp.asarray(correlated_inputs(99, rows=256, k=32))
    y = m.apply(v, xt)
    rtn = jq.convert(m, v, G_RULES, args=(xt,))
    e_g = float(jnp.mean((jq.apply(m, qv, xt) - y) ** 2))
    e_r = float(jnp.mean((jq.apply(m, rtn, xt) - y) ** 2))
    assert e_g < e_r
    manual = h1_apply = np.maximum(
        np.asarray(xt) @ np.asarray(jq.dequantize(k0)) + np.asarray(p["Dense_0"]["bias"]), 0
    )
    manual = h1_apply @ np.asarray(jq.dequantize(k1)) + np.asarray(p["Dense_1"]["bias"])
    np.testing.assert_allclose(np.asarray(jq.apply(m, qv, xt)), manual, rtol=1e-4, atol=1e-4)


def test_flax_rtn_option_equals_convert():
    m, v, batches = _mlp_data()
    qv = gptq(m, v, G_RULES, batches, rtn=True, progress=False)
    ref = jq.convert(m, v, G_RULES, args=(batches[0],))
    for path in ("params/Dense_0/kernel", "params/Dense_1/kernel"):
        np.testing.assert_array_equal(
            np.asarray(qv.variables[path].value), np.asarray(ref.variables[path].value)
        )
        np.testing.assert_array_equal(
            np.asarray(qv.variables[path].scale), np.asarray(ref.variables[path].scale)
        )


def test_flax_gptq_act_order_round_trips_and_not_sequential():
    m, v, batches = _mlp_data()
    qv = gptq(m, v, G_RULES, batches, act_order=True, sequential=False, progress=False)
    p = v["params"]
    x = np.concatenate([np.asarray(b) for b in batches])
    h1 = np.maximum(
        x @ np.asarray(p["Dense_0"]["kernel"]) + np.asarray(p["Dense_0"]["bias"]), 0
    )  # float layer 0
    r1 = gptq_quantize(
        np.asarray(p["Dense_1"]["kernel"]), hessian(h1), G_RULES[0].weight, act_order=True
    )
    k1 = qv.variables["params/Dense_1/kernel"]
    assert np.mean(np.asarray(k1.int_value()) == np.asarray(r1.codes)) > 0.99
    # groups in the original row order: scales are the float weight's group min-max
    want = jq.qparams_from_array(p["Dense_1"]["kernel"], G_RULES[0].weight)
    np.testing.assert_array_equal(np.asarray(k1.scale), np.asarray(want.scale))
    xt = batches[0]
    manual = np.maximum(
        np.asarray(xt) @ np.asarray(jq.dequantize(qv.variables["params/Dense_0/kernel"]))
        + np.asarray(p["Dense_0"]["bias"]),
        0,
    ) @ np.asarray(jq.dequantize(k1)) + np.asarray(p["Dense_1"]["bias"])
    np.testing.assert_allclose(np.asarray(jq.apply(m, qv, xt)), manual, rtol=1e-4, atol=1e-4)


MLP = functools.partial(models.MLP, hidden=48, out=16)


class Tower(nn.Module):
    """Three projections of one input (one stage), a DenseGeneral with tied scales, and an Embed."""

    @nn.compact
    def __call__(self, tok):
        x = nn.Embed(20, 16)(tok)
        q, k, v = (nn.Dense(16, name=n)(x) for n in ("q", "k", "v"))
        h = nn.DenseGeneral((2, 8), name="heads")(q * k + v)
        return nn.Dense(8, name="out")(h.reshape(h.shape[:-2] + (16,)))


def test_flax_gptq_stages_fallbacks_static_activations_and_nnx():
    m = Tower()
    batches = [jax.random.randint(jax.random.key(i), (4, 32), 0, 20) for i in range(2)]
    v = m.init(jax.random.key(0), batches[0])
    rules = [
        jq.Rule(
            ".*",
            weight=jq.QuantSpec("int8", axis=-1),
            activation=jq.QuantSpec("int8", calibration=cal.MinMax()),
        )
    ]
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        qv, info = gptq(m, v, rules, batches, progress=False, return_info=True)
    assert any(
        "Embed_0/embedding" in str(x.message) and "round-to-nearest" in str(x.message) for x in w
    )
    methods = {r["site"]: r["method"] for r in info}
    assert methods == {
        "Embed_0/embedding": "rtn",
        "q/kernel": "gptq",
        "k/kernel": "gptq",
        "v/kernel": "gptq",
        "heads/kernel": "gptq",
        "out/kernel": "gptq",
    }
    # (16, 2, 8) kernel with axis=-1: one scale per last axis, shared by the 2 heads
    assert qv.weight("params/heads/kernel").scale.shape == (1, 1, 8)
    assert set(qv.activations) >= {"q/kernel", "heads/kernel", "out/kernel"}
    y, yq = m.apply(v, batches[0]), jq.apply(m, qv, batches[0])
    assert float(jnp.linalg.norm(yq - y) / jnp.linalg.norm(y)) < 0.05

    nm = models.NnxMLP(nnx.Rngs(0), din=32, hidden=48, out=16)
    _, _, xb = _mlp_data()
    before = np.asarray(nm.l1.kernel.value)
    qn = gptq(nm, None, G_RULES, xb, progress=False)
    np.testing.assert_array_equal(
        np.asarray(nm.l1.kernel.value), before
    )  # the module is not mutated
    assert qn.variables["l1/kernel"].scale.shape == (2, 48)
    yn = jq.apply(nm, qn, xb[0])
    assert float(jnp.linalg.norm(yn - nm(xb[0])) / jnp.linalg.norm(nm(xb[0]))) < 0.2


def test_flax_gptq_bad_input():
    m, v, batches = _mlp_data()
    with pytest.raises(ValueError, match="batches.*empty"):
        gptq(m, v, G_RULES, [], progress=False)
    with pytest.raises(ValueError, match="block_size=20 does not divide"):
        gptq(
            m,
            v,
            [jq.Rule(".*", weight=jq.QuantSpec("int4", axis=-1, block_axis=0, block_size=20))],
            batches,
            progress=False,
        )
    with pytest.raises(ValueError, match="not an integer format"):
        gptq(m, v, [jq.Rule(".*", weight=jq.QuantSpec("e4m3", axis=-1))], batches, progress=False)
    with pytest.raises(ValueError, match="not positive definite"):
        gptq(m, v, G_RULES, [batches[0][:8]], percdamp=0.0, progress=False)  # 8 rows < K = 32


class ScanBlk(nn.Module):
    @nn.compact
    def __call__(self, c, _):
        return c + nn.Dense(16)(nn.relu(nn.Dense(32)(c))), None


class ScanNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        blocks = nn.scan(
            ScanBlk, variable_axes={"params": 0}, split_rngs={"params": True}, length=3
        )
        return blocks()(x, None)[0]


def test_flax_gptq_scan_stacked_layers_get_their_own_hessians():
    m = ScanNet()
    xs = [jnp.asarray(correlated_inputs(30 + i, rows=64, k=16)) for i in range(2)]
    v = m.init(jax.random.key(0), xs[0])
    rules = [jq.Rule(".*", weight=jq.QuantSpec("int4", axis=-1, block_axis=0, block_size=16))]
    qv = gptq(m, v, rules, xs, progress=False)
    k_in = qv.variables["params/ScanScanBlk_0/Dense_1/kernel"]  # (3 layers, 16, 32): applied first
    assert k_in.scale.shape == (3, 1, 32)
    # layer 0 of the stack sees the model input: its GPTQ matches the standalone algorithm
    x = np.concatenate([np.asarray(b) for b in xs])
    w0 = np.asarray(v["params"]["ScanScanBlk_0"]["Dense_1"]["kernel"][0])
    r = gptq_quantize(w0, hessian(x), jq.QuantSpec("int4", axis=-1, block_axis=0, block_size=16))
    np.testing.assert_array_equal(np.asarray(k_in.int_value()[0]), np.asarray(r.codes))
    y = m.apply(v, xs[0])
    rtn = jq.convert(m, v, rules, args=(xs[0],))
    assert float(jnp.mean((jq.apply(m, qv, xs[0]) - y) ** 2)) < float(
        jnp.mean((jq.apply(m, rtn, xs[0]) - y) ** 2)
    )
