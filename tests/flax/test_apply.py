"""calibrate -> convert -> apply on linen and nnx models: integer results against numpy, model
kinds, StableHLO on every platform, bad input."""

import warnings

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from models import MLP, Block, NnxMLP, ScanBlk, rel_err, static_rules

import jq
import jq.hlo

KEY = jax.random.key(0)


# ----------------------------------------------------------------------------- models
class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3))(x))
        x = nn.relu(nn.Conv(8, (3, 3), feature_group_count=2)(x))  # grouped
        return nn.Dense(10)(x.reshape(x.shape[0], -1))


class NnxBlock(nnx.Module):
    def __init__(self, rngs):
        self.ln = nnx.LayerNorm(16, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(
            num_heads=2, in_features=16, qkv_features=16, decode=False, rngs=rngs
        )
        self.l1 = nnx.Linear(16, 32, rngs=rngs)
        self.l2 = nnx.Linear(32, 16, rngs=rngs)

    def __call__(self, x, mask=None):
        x = x + self.attn(self.ln(x), mask=mask)
        return x + self.l2(nnx.gelu(self.l1(x)))


class Custom(nn.Module):
    """Weights used through `x @ w` and `jnp.einsum`, not through a Flax layer."""

    @nn.compact
    def __call__(self, x):
        w = self.param("w", nn.initializers.normal(0.3), (8, 16))
        v = self.param("v", nn.initializers.normal(0.3), (16, 4))
        return jnp.einsum("bi,io->bo", jax.nn.relu(x @ w), v)


class TiedLM(nn.Module):
    def setup(self):
        self.emb = nn.Embed(20, 16)
        self.blocks = nn.scan(
            ScanBlk, variable_axes={"params": 0}, split_rngs={"params": True}, length=3
        )()

    def __call__(self, tokens):
        h, _ = self.blocks(self.emb(tokens), None)
        return self.emb.attend(h)

    def logits(self, h):
        return self.emb.attend(h)


# ----------------------------------------------------------------------------- static int8 against numpy
def _np_quant(x, scale):
    return np.clip(np.round(x / scale), -127, 127).astype(np.int64)


def test_static_mlp_matches_numpy_integer_reference(mlp):
    m, v, x = mlp
    batches = [x[:8], x[8:]]
    rules = static_rules()
    stats = jq.calibrate(m, v, rules, batches, progress=False)
    qv = jq.convert(m, v, rules, stats)
    y = jax.jit(lambda q, x: jq.apply(m, q, x))(qv, x)

    # independent reference: per-tensor activation scale amax/127 over the calibration data (seen
    # by the *float* model), per-output-channel weight scale amax/127, int64 matmul, float rescale.
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), v["params"])
    xn = np.asarray(x, np.float64)
    h_float = np.maximum(xn @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"], 0)
    h = xn
    for name, cal_in in (("Dense_0", xn), ("Dense_1", h_float)):
        w, b = p[name]["kernel"], p[name]["bias"]
        sx = np.abs(cal_in).max() / 127
        sw = np.abs(w).max(axis=0) / 127
        out = (_np_quant(h, sx) @ _np_quant(w, sw)) * sx * sw + b
        h = np.maximum(out, 0)
    np.testing.assert_allclose(np.asarray(y), out, rtol=1e-4, atol=1e-4)


def test_convert_sizes_int8_and_int4(mlp):
    m, v, x = mlp
    n_float = (8 * 32 + 32 * 10) * 4
    q8 = jq.convert(m, v, [jq.Rule(".*", weight=jq.QuantSpec("int8", axis=-1))], args=(x,))
    q4 = jq.convert(m, v, [jq.Rule(".*", weight=jq.QuantSpec("int4", axis=-1))], args=(x,))
    b8, b4 = q8.nbytes(), q4.nbytes()
    assert b8["float"] == b4["float"] == n_float
    scales = (32 + 10) * 4
    assert b8["quantized"] == n_float // 4 + scales
    assert b4["quantized"] == n_float // 8 + scales
    # no float kernel remains
    for path in ("params/Dense_0/kernel", "params/Dense_1/kernel"):
        assert isinstance(q4.variables[path], jq.QArray)
        assert q4.variables[path].value.dtype == jnp.uint8
    assert "->" in q8.summary()


def test_dynamic_and_weight_only_close_to_float(mlp):
    m, v, x = mlp
    yf = m.apply(v, x)
    for act in (
        jq.QuantSpec("int8"),
        jq.QuantSpec("int8", axis=0),
        None,
    ):  # per tensor, per row, weight-only
        rules = [jq.Rule(".*", weight=jq.QuantSpec("int8", axis=-1), activation=act)]
        qv = jq.convert(m, v, rules, args=(x,))
        assert rel_err(jq.apply(m, qv, x, rules=rules), yf) < 0.02


# ----------------------------------------------------------------------------- other models
def test_linen_cnn_grouped_conv_integer():
    m = CNN()
    x = jax.random.normal(KEY, (4, 8, 8, 1))
    v = m.init(KEY, x)
    rules = static_rules()
    qv = jq.convert(m, v, rules, jq.calibrate(m, v, rules, [x], progress=False))
    fn = jax.jit(lambda q, x: jq.apply(m, q, x))
    assert rel_err(fn(qv, x), m.apply(v, x)) < 0.03
    # on every platform, cuda included (XLA:GPU has no integer convolution), jq.ops lowers a
    # conv to patches x the integer dot: one dot per layer, the grouped conv's batched by group
    text = jax.export.export(fn, platforms=("cuda",))(qv, x).mlir_module()
    ints = jq.hlo.integer_ops(text)
    assert len(ints) == 3 and not any("convolution" in ln for ln in ints)
    assert sum("batching_dims" in ln and "tensor<2x" in ln for ln in ints) == 1  # 2 groups


def test_linen_transformer_block_with_attention_einsums():
    m = Block()
    x = jax.random.normal(KEY, (2, 5, 16))
    mask = nn.make_causal_mask(jnp.ones((2, 5)))
    v = m.init(KEY, x, mask)
    yf = m.apply(v, x, mask=mask)
    for ops, n_act in ((("dot",), 0), (("dot", "act_dot"), 2)):
        rules = static_rules(ops=ops)
        rows = jq.sites(m, v, rules, x, mask=mask)
        assert sum(r["kind"] == "act_dot" and r["mode"] == "static" for r in rows) == n_act
        stats = jq.calibrate(m, v, rules, [x], model_kwargs={"mask": mask}, progress=False)
        qv = jq.convert(m, v, rules, stats)
        y = jax.jit(lambda q, x, mk: jq.apply(m, q, x, mask=mk))(qv, x, mask)
        assert rel_err(y, yf) < 0.05
        text = jax.jit(lambda q, x, mk: jq.apply(m, q, x, mask=mk)).lower(qv, x, mask).as_text()
        assert len(jq.hlo.integer_ops(text)) == 6 + n_act  # q, k, v, out, 2 MLP (+ qk, av)


def test_nnx_mlp_and_module_not_mutated():
    m = NnxMLP(nnx.Rngs(0))
    before = jax.tree_util.tree_map(np.array, nnx.state(m))
    x = jax.random.normal(KEY, (16, 8))
    rules = static_rules()
    qv = jq.convert(m, None, rules, jq.calibrate(m, None, rules, [x], progress=False))
    assert isinstance(qv.variables["l1/kernel"], jq.QArray)
    assert rel_err(jq.apply(m, qv, x), m(x)) < 0.02
    chex.assert_trees_all_equal(before, jax.tree_util.tree_map(np.array, nnx.state(m)))
    with pytest.raises(ValueError, match="nnx model carries its own state"):
        jq.convert(m, {"params": {}}, rules, args=(x,))


def test_nnx_transformer_block():
    m = NnxBlock(nnx.Rngs(0))
    x = jax.random.normal(KEY, (2, 5, 16))
    mask = nnx.make_causal_mask(jnp.ones((2, 5)))
    rules = static_rules(ops=("dot", "act_dot"))
    qv = jq.convert(
        m,
        None,
        rules,
        jq.calibrate(m, None, rules, [x], model_kwargs={"mask": mask}, progress=False),
    )
    y = jax.jit(lambda q, x, mk: jq.apply(m, q, x, mask=mk))(qv, x, mask)
    assert rel_err(y, m(x, mask=mask)) < 0.05


def test_custom_matmul_and_einsum_weights_are_found():
    m = Custom()
    x = jax.random.normal(KEY, (4, 8))
    v = m.init(KEY, x)
    rows = jq.sites(m, v, static_rules(), x)
    assert {(r["site"], r["kind"]) for r in rows} == {("w", "dot"), ("v", "dot")}
    qv = jq.convert(m, v, static_rules(), jq.calibrate(m, v, static_rules(), [x], progress=False))
    assert isinstance(qv.variables["params/w"], jq.QArray) and isinstance(
        qv.variables["params/v"], jq.QArray
    )
    assert rel_err(jq.apply(m, qv, x), m.apply(v, x)) < 0.03
    assert (
        len(jq.hlo.integer_ops(jax.jit(lambda q, x: jq.apply(m, q, x)).lower(qv, x).as_text())) == 2
    )


def test_scan_layers_get_per_layer_scales_and_tied_embedding():
    m = TiedLM()
    t = jax.random.randint(KEY, (4, 5), 0, 20)
    v = m.init(KEY, t)
    rules = static_rules()
    stats = jq.calibrate(m, v, rules, [t], progress=False)
    assert stats.states["blocks/Dense_0/kernel"].count.shape == (3,)  # one observer per layer
    qv = jq.convert(m, v, rules, stats)
    k = qv.variables["params/blocks/Dense_0/kernel"]
    w = np.asarray(v["params"]["blocks"]["Dense_0"]["kernel"])
    np.testing.assert_allclose(np.asarray(k.scale)[:, 0, :], np.abs(w).max(axis=1) / 127, rtol=1e-6)
    e = qv.variables["params/emb/embedding"]
    assert e.scale.shape == (20, 1)  # one scale per row: gathers and the tied head share it
    assert rel_err(jq.apply(m, qv, t), m.apply(v, t)) < 0.03
    h = jax.random.normal(KEY, (2, 16))
    y = jq.apply(m, qv, h, method=TiedLM.logits)
    assert rel_err(y, m.apply(v, h, method=TiedLM.logits)) < 0.02
    text = jax.jit(lambda q, t: jq.apply(m, q, t)).lower(qv, t).as_text()
    assert len(jq.hlo.integer_ops(text)) == 3  # two scanned Dense (one body) + tied head


# ----------------------------------------------------------------------------- StableHLO on all platforms
@pytest.mark.parametrize("kind", ["linen", "nnx"])
def test_static_int8_lowering_on_cpu_cuda_tpu(kind):
    x = jax.random.normal(KEY, (4, 8))
    if kind == "linen":
        m = MLP()
        v = m.init(KEY, x)
    else:
        m, v = NnxMLP(nnx.Rngs(0)), None
    rules = static_rules()
    qv = jq.convert(m, v, rules, jq.calibrate(m, v, rules, [x], progress=False))

    def f(x):
        return jq.apply(m, qv, x)

    per = jq.hlo.integer_ops_by_platform(f, x)
    assert {p: len(v) for p, v in per.items()} == {"cpu": 2, "cuda": 2, "tpu": 2}
    text = jax.export.export(jax.jit(f), platforms=("cpu", "cuda", "tpu"))(x).mlir_module()
    assert not jq.hlo.float_ops(text)  # no dequantize-then-float dot anywhere
    for branches in jq.hlo.case_branches(text):
        for b in branches:
            if "dot_general" in b:
                assert jq.hlo.integer_ops(b) and not jq.hlo.float_ops(b)


# ----------------------------------------------------------------------------- bad input
def test_calibrate_empty_iterator(mlp):
    m, v, _ = mlp
    with pytest.raises(ValueError, match="empty"):
        jq.calibrate(m, v, static_rules(), iter([]))


def test_static_rule_without_stats(mlp):
    m, v, x = mlp
    with pytest.raises(ValueError, match="no statistics"):
        jq.convert(m, v, static_rules(), args=(x,))
    with pytest.raises(ValueError, match="example input"):
        jq.convert(m, v, [jq.Rule(".*")])


def test_apply_with_variables_of_another_model(mlp):
    m, v, x = mlp
    qv = jq.convert(m, v, [jq.Rule(".*")], args=(x,))
    other = Custom()
    with pytest.raises(ValueError, match="belong to another model"):
        jq.apply(other, qv, x)
    wider = nn.Dense(4)
    with pytest.raises(ValueError, match="another model"):
        jq.apply(wider, qv, x)


def test_rule_spec_that_does_not_fit(mlp):
    m, v, x = mlp
    with pytest.raises(ValueError, match="out of range"):
        jq.convert(m, v, [jq.Rule(".*", weight=jq.QuantSpec("int8", axis=5))], args=(x,))
    with pytest.raises(ValueError, match="contract"):  # per-channel scale on the contracting axis
        jq.convert(m, v, [jq.Rule(".*", weight=jq.QuantSpec("int8", axis=0))], args=(x,))
    with pytest.raises(ValueError, match="block_size"):
        jq.convert(
            m,
            v,
            [jq.Rule(".*", weight=jq.QuantSpec("int8", block_size=3, block_axis=0))],
            args=(x,),
        )


def test_apply_rules_consistency(mlp):
    m, v, x = mlp
    qv = jq.convert(m, v, [jq.Rule(".*", activation=jq.QuantSpec("int8"))], args=(x,))
    with pytest.raises(ValueError, match="disagree"):
        jq.apply(m, qv, x, rules=[jq.Rule(".*", activation=jq.QuantSpec("uint8", scheme="affine"))])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jq.apply(m, qv, x, rules=[jq.Rule(".*", activation=jq.QuantSpec("int8"))])


def test_nnx_scan_stacked_layers():
    class Layer(nnx.Module):
        def __init__(self, rngs):
            self.l = nnx.Linear(16, 16, rngs=rngs)

        def __call__(self, x):
            return x + nnx.relu(self.l(x))

    class Stack(nnx.Module):
        def __init__(self, rngs):
            @nnx.split_rngs(splits=3)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def make(rngs):
                return Layer(rngs)

            self.layers = make(rngs)

        def __call__(self, x):
            @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
            def body(layer, x):
                return layer(x)

            return body(self.layers, x)

    m = Stack(nnx.Rngs(0))
    x = jax.random.normal(KEY, (4, 16))
    rules = static_rules()
    qv = jq.convert(m, None, rules, jq.calibrate(m, None, rules, [x], progress=False))
    k = qv.variables["layers/l/kernel"]
    w = np.asarray(m.layers.l.kernel[...])
    np.testing.assert_allclose(np.asarray(k.scale)[:, 0, :], np.abs(w).max(axis=1) / 127, rtol=1e-6)
    assert rel_err(jq.apply(m, qv, x), m(x)) < 0.02
