"""Messages that name the cause: missing ``inputs=``, an nnx decode step without
``mutable=True``, an advanced cache given to `jq.kv_cache`, ``skip=`` patterns that match
nothing; and the kv_cache docstring states the scale dtype it stores."""

import importlib
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from models import MLP, NnxMLP

import jq
from jq import presets

X = np.ones((4, 8), np.float32)
Y = np.zeros(4, np.int32)


@pytest.fixture(scope="module")
def mlp():
    m = MLP(hidden=8, out=3)
    return m, m.init(jax.random.key(0), X)


@pytest.mark.parametrize(
    "batch, hint",
    [
        ({"label": Y, "image": X}, 'inputs=lambda b: b["image"]'),
        ((X, Y), "inputs=lambda b: b[0]"),
    ],
)
def test_batches_without_inputs_name_the_fix(mlp, batch, hint):
    m, v = mlp
    for call in (
        lambda: jq.calibrate(m, v, presets.w8a8_static(), [batch]),
        lambda: jq.quantize_model(m, v, presets.w8a8_dynamic(), [batch]),
        lambda: jq.sensitivity(m, v, presets.w8a8_dynamic(), [batch]),
        lambda: jq.gptq(m, v, presets.w4_weight_only(group_size=None), [batch]),
    ):
        with pytest.raises(TypeError, match="because inputs= was not given") as e:
            call()
        assert hint in str(e.value)
    # with inputs= the same batches work
    jq.calibrate(m, v, presets.w8a8_static(), [batch], inputs=lambda b: b["image"] if
                 isinstance(b, dict) else b[0])  # fmt: skip


def test_nnx_tuple_batch_without_inputs():
    nm = NnxMLP(nnx.Rngs(0), din=8, hidden=8, out=3)
    with pytest.raises(TypeError, match=r"inputs=lambda b: b\[0\]"):
        jq.calibrate(nm, None, presets.w8a8_static(), [(X, Y)])


def _nnx_attention():
    att = nnx.MultiHeadAttention(
        num_heads=2, in_features=8, qkv_features=8, decode=True, rngs=nnx.Rngs(0)
    )
    att.init_cache((1, 4, 8))
    return att


def test_nnx_decode_without_mutable_names_the_cache():
    att = _nnx_attention()
    x = jnp.ones((1, 1, 8))
    rules = [jq.kv_cache_rule("int8")]
    qv = jq.kv_cache(att, jq.convert(att, None, rules, args=(x,)), rules)
    with pytest.raises(ValueError, match="writes its decode cache") as e:
        jq.apply(att, qv, x)
    assert "mutable=True" in str(e.value) and "cache_index" in str(e.value)
    assert "dropout" not in str(e.value)
    out, qv2 = jq.apply(att, qv, x, mutable=True)
    # 8: the advanced cache is refused by kv_cache, with its index
    with pytest.raises(ValueError, match=r"already been advanced \(cache_index = 1\)"):
        jq.kv_cache(att, qv2, rules)


class _Attn(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8, decode=True)(x)


def test_linen_kv_cache_refuses_an_advanced_cache_and_states_its_scale_dtype():
    m = _Attn()
    xs = jnp.ones((1, 4, 8))
    v = m.init(jax.random.key(0), xs)
    rules = [jq.kv_cache_rule("int8")]
    qv = jq.convert(m, v, rules, args=(xs[:, :1],), model_kwargs={"mutable": ["cache"]})
    fresh = jq.kv_cache(m, qv, rules)
    _, upd = jq.apply(m, qv, xs[:, :1], mutable=["cache"])
    _, upd = jq.apply(m, jq.with_cache(qv, upd), xs[:, :1], mutable=["cache"])
    with pytest.raises(ValueError, match=r"'MultiHeadDotProductAttention_0'.*cache_index = 2"):
        jq.kv_cache(m, jq.with_cache(qv, upd), rules)
    # 12: the module docstring names the dtype of the scales kv_cache stores
    key = next(k for k in fresh.variables if k.endswith("cached_key"))
    dtype = np.dtype(fresh.variables[key].scale.dtype).name
    assert dtype == "bfloat16"
    doc = importlib.import_module("jq.flax.kv_cache").__doc__
    assert f"one {dtype} scale per token and head" in doc and "float32 scale" not in doc


def test_nnx_calls_emit_no_flax_state_deprecation():
    nm = NnxMLP(nnx.Rngs(0), din=8, hidden=8, out=3)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        qv = jq.convert(nm, None, presets.w8a8_dynamic(), args=(X,))
        jq.apply(nm, qv, X)
        jq.sites(nm, None, presets.w8a8_dynamic(), X)
    msgs = [str(w.message) for w in seen if issubclass(w.category, DeprecationWarning)]
    assert not [m for m in msgs if "nnx.State" in m or "to_flat_state" in m], msgs
