"""jq.kv_cache: quantized KV caches of unmodified linen / nnx attention in decode mode."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

import jq
from jq.kv_quant import update_slice

B, L, F, H = 2, 6, 32, 2
D = F // H


class _Attn(nn.Module):
    decode: bool = True

    @nn.compact
    def __call__(self, x):
        return nn.MultiHeadDotProductAttention(
            num_heads=H, qkv_features=F, decode=self.decode, deterministic=True
        )(x)


def _linen_setup(fmt, weight_rules=()):
    model = _Attn()
    xs = jax.random.normal(jax.random.key(1), (B, L, F))
    variables = model.init(jax.random.key(0), xs)
    rules = [*weight_rules, jq.kv_cache_rule(fmt)]
    qv = jq.convert(model, variables, rules, args=(xs[:, :1],), model_kwargs={"mutable": ["cache"]})
    return model, variables, xs, qv, jq.kv_cache(model, qv, rules)


def _decode(model, qv, xs):
    @jax.jit
    def step(q, x):
        out, upd = jq.apply(model, q, x, mutable=["cache"])
        return out, jq.with_cache(q, upd)

    outs = []
    for t in range(xs.shape[1]):
        o, qv = step(qv, xs[:, t : t + 1])
        outs.append(o)
    return np.concatenate(outs, axis=1), qv


def _np_bf16_up(s):
    """The smallest bfloat16 >= each float32 in `s` (the stored scale), as float64."""
    s = np.asarray(s, np.float32)
    b = s.astype(ml_dtypes.bfloat16)
    up = (b.view(np.uint16) + np.uint16(1)).view(ml_dtypes.bfloat16)
    return np.where(b.astype(np.float32) < s, up, b).astype(np.float64)


def _np_quant_int8(c):
    """Per-vector symmetric int8 round trip along the last axis, bfloat16 scales rounded up."""
    amax = np.abs(c).max(-1, keepdims=True)
    s = _np_bf16_up(np.where(amax > 0, amax / 127.0, 1.0))
    return np.clip(np.round(c / s), -127, 127) * s


def _np_decode(p, xs, quant):
    """Causal decoding with MultiHeadDotProductAttention's math, float64, K/V through `quant`."""
    f = lambda name: (np.asarray(p[name]["kernel"], np.float64), np.asarray(p[name]["bias"]))
    (wq, bq), (wk, bk), (wv, bv), (wo, bo) = (f(n) for n in ("query", "key", "value", "out"))
    x = np.asarray(xs, np.float64)
    q = np.einsum("blf,fhd->blhd", x, wq) + bq
    k = quant(np.einsum("blf,fhd->blhd", x, wk) + bk)
    v = quant(np.einsum("blf,fhd->blhd", x, wv) + bv)
    logits = np.einsum("bqhd,bkhd->bhqk", q / np.sqrt(D), k)
    causal = np.tril(np.ones((L, L), bool))
    logits = np.where(causal, logits, -np.inf)
    pr = np.exp(logits - logits.max(-1, keepdims=True))
    pr /= pr.sum(-1, keepdims=True)
    o = np.einsum("bhqk,bkhd->bqhd", pr, v)
    return np.einsum("bqhd,hdf->bqf", o, wo) + bo


def test_int8_cache_dtypes_bytes_and_decode_against_numpy():
    model, variables, xs, qv, qv8 = _linen_setup("int8")
    ck = qv8.variables["cache/MultiHeadDotProductAttention_0/cached_key"]
    assert isinstance(ck, jq.QArray) and ck.value.dtype == jnp.int8
    assert ck.value.shape == (B, L, H, D) and ck.scale.shape == (B, L, H, 1)
    assert ck.scale.dtype == jnp.bfloat16
    f32 = 2 * B * L * H * D * 4
    assert jq.kv_cache_bytes(qv) == f32
    assert jq.kv_cache_bytes(qv8) == 2 * (B * L * H * D + B * L * H * 2)  # (D + 2) / 4D of float32

    out8, after = _decode(model, qv8, xs)
    outf, _ = _decode(model, qv, xs)
    # the cache is still int8 after decoding, and holds the int8 round trip of every key
    ck = after.variables["cache/MultiHeadDotProductAttention_0/cached_key"]
    assert isinstance(ck, jq.QArray) and ck.value.dtype == jnp.int8
    assert int(after.variables["cache/MultiHeadDotProductAttention_0/cache_index"]) == L
    p = variables["params"]["MultiHeadDotProductAttention_0"]
    ref8 = _np_decode(p, xs, _np_quant_int8)
    ref = _np_decode(p, xs, lambda c: c)
    np.testing.assert_allclose(out8, ref8, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(outf, ref, atol=1e-4, rtol=1e-4)
    gap = np.abs(out8 - ref).max()
    assert 0 < gap < 2e-2 * np.abs(ref).max()  # quantized, and within int8 error


@pytest.mark.parametrize("fmt, dtype", [("e4m3", ml_dtypes.float8_e4m3fn), ("int4", np.uint8)])
def test_fp8_and_int4_caches(fmt, dtype):
    model, variables, xs, qv, qvq = _linen_setup(fmt)
    ck = qvq.variables["cache/MultiHeadDotProductAttention_0/cached_value"]
    assert ck.value.dtype == dtype
    out, _ = _decode(model, qvq, xs)
    ref = _np_decode(variables["params"]["MultiHeadDotProductAttention_0"], xs, lambda c: c)
    tol = {"e4m3": 0.08, "int4": 0.25}[fmt]
    assert np.abs(out - ref).max() < tol * np.abs(ref).max()


def test_int8_weights_and_int8_cache_together():
    w8 = jq.Rule(".*", ops=("dot",), weight=jq.QuantSpec("int8", axis=(1, 2)))
    out_rule = jq.Rule(".*/out", ops=("dot",), weight=jq.QuantSpec("int8", axis=-1))
    model, variables, xs, _, qv8 = _linen_setup("int8", (out_rule, w8))
    assert isinstance(
        qv8.variables["params/MultiHeadDotProductAttention_0/query/kernel"], jq.QArray
    )
    out, _ = _decode(model, qv8, xs)
    ref = _np_decode(variables["params"]["MultiHeadDotProductAttention_0"], xs, lambda c: c)
    assert np.abs(out - ref).max() < 3e-2 * np.abs(ref).max()


def test_int8_cache_with_integer_attention_dots():
    """act_dot rules (dynamic int8 q k^T and p v) read the quantized cache too."""
    act = jq.Rule(".*", ops=("act_dot",), weight=None, activation=jq.QuantSpec("int8"))
    model, variables, xs, qv, qv8 = _linen_setup("int8", (act,))
    assert {s.kind for s in qv8.plan.sites} == {"act_dot"}
    out, _ = _decode(model, qv8, xs)
    ref = _np_decode(variables["params"]["MultiHeadDotProductAttention_0"], xs, lambda c: c)
    assert 0 < np.abs(out - ref).max() < 3e-2 * np.abs(ref).max()


def test_nnx_multihead_attention_cache():
    att = nnx.MultiHeadAttention(
        num_heads=H, in_features=F, qkv_features=F, decode=True, rngs=nnx.Rngs(0)
    )
    att.init_cache((B, L, F))
    xs = jax.random.normal(jax.random.key(1), (B, L, F))
    rules = [jq.kv_cache_rule("int8")]
    qv = jq.kv_cache(att, jq.convert(att, None, rules, args=(xs[:, :1],)), rules)
    assert isinstance(qv.variables["cached_key"], jq.QArray)
    step = jax.jit(lambda q, x: jq.apply(att, q, x, mutable=True))
    outs = []
    for t in range(L):
        o, qv = step(qv, xs[:, t : t + 1])
        outs.append(o)
    assert isinstance(qv.variables["cached_value"], jq.QArray)
    assert qv.variables["cached_value"].value.dtype == jnp.int8
    ref = []
    for t in range(L):  # the float module decoding the same tokens
        ref.append(att(xs[:, t : t + 1]))
    ref = np.concatenate(ref, 1)
    out = np.concatenate(outs, 1)
    assert 0 < np.abs(out - ref).max() < 2e-2 * np.abs(ref).max()


def test_update_slice_writes_only_the_new_vectors():
    c = jax.random.normal(jax.random.key(2), (2, 5, 3, 8))
    q = jq.kv_quant.quantize_kv(c, jq.QuantSpec("int8"))
    new = jax.random.normal(jax.random.key(3), (2, 1, 3, 8)) * 10
    upd = update_slice(q, new, (0, 2, 0, 0))
    v0, v1 = np.asarray(q.value), np.asarray(upd.value)
    keep = np.ones(5, bool)
    keep[2] = False
    np.testing.assert_array_equal(v1[:, keep], v0[:, keep])
    np.testing.assert_array_equal(np.asarray(upd.scale)[:, keep], np.asarray(q.scale)[:, keep])
    np.testing.assert_allclose(
        np.asarray(jq.dequantize(upd, jnp.float32))[:, 2],
        _np_quant_int8(np.asarray(new, np.float64))[:, 0],
        rtol=1e-6,
        atol=1e-6,
    )


def test_kv_cache_errors():
    model, variables, xs, qv, _ = _linen_setup("int8")
    with pytest.raises(ValueError, match="jq.kv_cache: a cache format"):
        jq.kv_cache(
            model,
            qv,
            [jq.Rule(".*", ops=("kv_cache",), weight=None, activation=jq.QuantSpec("uint8"))],
        )
    with pytest.raises(ValueError, match="jq.kv_cache: a cache spec is symmetric"):
        jq.kv_cache(
            model,
            qv,
            [
                jq.Rule(
                    ".*", ops=("kv_cache",), weight=None, activation=jq.QuantSpec("int8", axis=0)
                )
            ],
        )
    with pytest.raises(ValueError, match="jq.kv_cache: no cached_key"):
        jq.kv_cache(model, qv, [jq.kv_cache_rule("int8", path_regex="nothing")])
    with pytest.raises(TypeError, match="jq.kv_cache: expected QuantizedVariables"):
        jq.kv_cache(model, variables, [jq.kv_cache_rule()])
