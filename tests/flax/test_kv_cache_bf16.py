"""A bfloat16 model's KV cache quantized by `jq.kv_cache`: `apply` traces it in bfloat16."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import jq


class Attn(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.MultiHeadDotProductAttention(2, dtype=jnp.bfloat16, decode=True)(x, x)


def test_bf16_decode_step_with_int8_cache_matches_float_cache():
    m = Attn()
    x = jnp.asarray(np.random.RandomState(0).randn(1, 1, 16), jnp.bfloat16)
    v = m.init(jax.random.key(0), jnp.zeros((1, 4, 16), jnp.bfloat16))
    v = jax.tree.map(lambda a: a.astype(jnp.bfloat16) if a.dtype == jnp.float32 else a, v)
    assert v["cache"]["MultiHeadDotProductAttention_0"]["cached_key"].dtype == jnp.bfloat16
    rules = [jq.kv_cache_rule("int8")]
    qv = jq.convert(m, v, rules, args=(x,), model_kwargs={"mutable": ["cache"]})
    qv = jq.kv_cache(m, qv, rules)
    ys, yf = [], []
    st, fv = qv, v
    for t in range(3):  # three decode steps: the cache holds 1, 2, 3 tokens
        xt = x * (t + 1)
        y, upd = jq.apply(m, st, xt, mutable=["cache"])
        st = jq.with_cache(st, upd)
        y2, upd2 = m.apply(fv, xt, mutable=["cache"])
        fv = {**fv, **upd2}
        ys.append(np.asarray(y, np.float32))
        yf.append(np.asarray(y2, np.float32))
    assert y.dtype == jnp.bfloat16
    assert isinstance(st.variables["cache/MultiHeadDotProductAttention_0/cached_key"], jq.QArray)
    np.testing.assert_allclose(np.stack(ys), np.stack(yf), atol=0.05 * np.abs(yf).max())
