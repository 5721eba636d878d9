"""Flax integration: rules, calibrate -> convert -> apply, QAT -> convert, reports, checkpoints."""

import os
import warnings

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from models import MLP, NnxMLP

import jq
import jq.hlo
from jq import calibration as cal
from jq.flax import checkpoint

KEY = jax.random.key(0)


def static_rules(fmt="int8", ops=("dot", "conv", "embed")):
    return [
        jq.Rule(
            ".*",
            ops=ops,
            weight=jq.QuantSpec(fmt, axis=-1),
            activation=jq.QuantSpec("int8", calibration=cal.MinMax()),
        )
    ]


def rel_err(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


# ----------------------------------------------------------------------------- models
class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3))(x))
        x = nn.relu(nn.Conv(8, (3, 3), feature_group_count=2)(x))  # grouped
        return nn.Dense(10)(x.reshape(x.shape[0], -1))


class Block(nn.Module):
    @nn.compact
    def __call__(self, x, mask=None):
        h = nn.LayerNorm()(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=16)(h, mask=mask)
        h = nn.LayerNorm()(x)
        return x + nn.Dense(16)(nn.gelu(nn.Dense(32)(h)))


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


class ScanBlk(nn.Module):
    @nn.compact
    def __call__(self, c, _):
        return c + nn.Dense(16)(nn.relu(nn.Dense(16)(c))), None


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


@pytest.fixture(scope="module")
def mlp():
    m = MLP()
    x = jax.random.normal(KEY, (16, 8))
    return m, m.init(KEY, x), x


# ----------------------------------------------------------------------------- rules
def test_rule_validation():
    with pytest.raises(ValueError, match="not a valid regex"):
        jq.Rule("(")
    with pytest.raises(ValueError, match="unknown kinds"):
        jq.Rule(".*", ops=("matmul",))
    with pytest.raises(ValueError, match="both None"):
        jq.Rule(".*", weight=None, activation=None)
    with pytest.raises(TypeError, match="QuantSpec"):
        jq.Rule(".*", weight="int8")
    assert jq.Rule(".*").mode == "weight_only"
    assert jq.Rule(".*", activation=jq.QuantSpec("int8")).mode == "dynamic"
    assert jq.Rule(".*", activation=jq.QuantSpec("int8", calibration=cal.MinMax())).mode == "static"


def test_sites_first_match_wins_and_unmatched_warns(mlp):
    m, v, x = mlp
    rules = [
        jq.Rule("Dense_1", weight=jq.QuantSpec("int4", axis=-1)),
        jq.Rule(".*", activation=jq.QuantSpec("int8")),
        jq.Rule("Conv.*"),
    ]
    with pytest.warns(UserWarning, match=r"rules\[2\].*matches no site"):
        rows = jq.sites(m, v, rules, x)
    by = {r["site"]: r for r in rows}
    assert by["Dense_0/kernel"]["rule"] == 1 and by["Dense_0/kernel"]["mode"] == "dynamic"
    assert by["Dense_1/kernel"]["rule"] == 0 and by["Dense_1/kernel"]["mode"] == "weight_only"
    assert by["Dense_0/kernel"]["weight"] == (8, 32)
    assert by["Dense_0/kernel"]["inputs"] == ((16, 8), (8, 32))
    # unmatched sites stay float
    rows = jq.sites(m, v, [jq.Rule("Dense_0")], x)
    assert {r["site"]: r["mode"] for r in rows} == {
        "Dense_0/kernel": "weight_only",
        "Dense_1/kernel": "float",
    }
    assert "Dense_0/kernel" in jq.format_table(rows)


# ----------------------------------------------------------------------------- static int8 against numpy
def _np_quant(x, scale):
    return np.clip(np.round(x / scale), -127, 127).astype(np.int64)


def test_static_mlp_matches_numpy_integer_reference(mlp):
    m, v, x = mlp
    batches = [x[:8], x[8:]]
    rules = static_rules()
    stats = jq.calibrate(m, v, batches, rules, progress=False)
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


def test_report_sqnr_and_clipping(mlp):
    m, v, x = mlp
    rules = static_rules()
    stats = jq.calibrate(m, v, [x * 0.5], rules, progress=False)  # calibrated on a narrower range
    qv = jq.convert(m, v, rules, stats)
    rows = {r["site"]: r for r in jq.report(m, v, qv, x)}
    r0 = rows["Dense_0/kernel"]
    xs = np.abs(np.asarray(x))
    expected_clip = np.mean(xs > 127.5 * (xs.max() * 0.5 / 127))
    assert r0["act_clip_frac"] == pytest.approx(expected_clip, abs=1e-6)
    assert r0["act_clip_frac"] > 0
    assert r0["weight_sqnr_db"] > 35 and r0["act_sqnr_db"] > 5


# ----------------------------------------------------------------------------- other models
def test_linen_cnn_grouped_conv_integer():
    m = CNN()
    x = jax.random.normal(KEY, (4, 8, 8, 1))
    v = m.init(KEY, x)
    rules = static_rules()
    qv = jq.convert(m, v, rules, jq.calibrate(m, v, [x], rules, progress=False))
    assert rel_err(jq.apply(m, qv, x), m.apply(v, x)) < 0.03
    # on every platform, cuda included (XLA:GPU has no integer convolution), jq.ops lowers a
    # conv to patches x the integer dot: one dot per layer, the grouped conv's batched by group
    fn = jax.jit(lambda q, x: jq.apply(m, q, x))
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
        stats = jq.calibrate(m, v, [x], rules, kwargs={"mask": mask}, progress=False)
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
    qv = jq.convert(m, None, rules, jq.calibrate(m, None, [x], rules, progress=False))
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
        m, None, rules, jq.calibrate(m, None, [x], rules, kwargs={"mask": mask}, progress=False)
    )
    y = jax.jit(lambda q, x, mk: jq.apply(m, q, x, mask=mk))(qv, x, mask)
    assert rel_err(y, m(x, mask=mask)) < 0.05


def test_custom_matmul_and_einsum_weights_are_found():
    m = Custom()
    x = jax.random.normal(KEY, (4, 8))
    v = m.init(KEY, x)
    rows = jq.sites(m, v, static_rules(), x)
    assert {(r["site"], r["kind"]) for r in rows} == {("w", "dot"), ("v", "dot")}
    qv = jq.convert(m, v, static_rules(), jq.calibrate(m, v, [x], static_rules(), progress=False))
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
    stats = jq.calibrate(m, v, [t], rules, progress=False)
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
    qv = jq.convert(m, v, rules, jq.calibrate(m, v, [x], rules, progress=False))

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


# ----------------------------------------------------------------------------- QAT
def _train(q, qv, x, y, steps=20):
    opt = optax.adamw(
        1e-2, mask=lambda t: {"params": True, "quant": False} if isinstance(t, dict) else t
    )
    tr = {"params": qv["params"], "quant": qv["quant"]}
    opt_state = opt.init(tr)

    @jax.jit
    def step(tr, state, opt_state):
        def loss(tr):
            out, ns = q.apply({**tr, "state": state}, x, update_stats=True)
            return optax.softmax_cross_entropy_with_integer_labels(out, y).mean(), ns

        (lv, ns), g = jax.value_and_grad(loss, has_aux=True)(tr)
        u, opt_state = opt.update(g, opt_state, tr)
        return optax.apply_updates(tr, u), ns, opt_state, lv, g

    state, losses = qv["state"], []
    for _ in range(steps):
        tr, state, opt_state, lv, g = step(tr, state, opt_state)
        losses.append(float(lv))
    return {**tr, "state": state}, losses, g


@pytest.mark.parametrize("activations,weights", [("ema", "minmax"), ("lsq", "lsq")])
@pytest.mark.parametrize("kind", ["linen", "nnx"])
def test_qat_trains_and_converts_to_matching_inference(kind, activations, weights):
    x = jax.random.normal(KEY, (64, 8))
    y = jax.random.randint(jax.random.key(1), (64,), 0, 10)
    if kind == "linen":
        m = MLP()
        v = m.init(KEY, x)
    else:
        m, v = NnxMLP(nnx.Rngs(0)), None
    rules = static_rules()
    q = jq.qat(m, rules, activations=activations, weights=weights)
    qv = q.init(v, x)
    r0 = qv["state"]["ranges"]["Dense_0/kernel" if kind == "linen" else "l1/kernel"]
    np.testing.assert_allclose(
        r0["hi"].reshape(()), np.asarray(x).max(), rtol=1e-6
    )  # first batch sets the range
    trained, losses, g = _train(q, qv, x, y)
    assert losses[-1] < losses[0]
    if activations == "lsq":
        assert all(float(jnp.abs(a["scale"]).sum()) > 0 for a in g["quant"]["activations"].values())
    qvi = jq.convert(m, trained, rules)
    np.testing.assert_allclose(
        np.asarray(jq.apply(m, qvi, x)), np.asarray(q.apply(trained, x)), atol=2e-5
    )


def test_qat_block_from_calibration_stats():
    m = Block()
    x = jax.random.normal(KEY, (2, 5, 16))
    v = m.init(KEY, x)
    rules = static_rules()
    stats = jq.calibrate(m, v, [x], rules, progress=False)
    q = jq.qat(m, rules)
    qv = q.init(v, x, stats=stats)
    lo, hi = stats.ranges()["Dense_0/kernel"]
    np.testing.assert_allclose(qv["state"]["ranges"]["Dense_0/kernel"]["hi"].reshape(()), hi)
    qvi = jq.convert(m, qv, rules)
    np.testing.assert_allclose(
        np.asarray(jq.apply(m, qvi, x)), np.asarray(q.apply(qv, x)), atol=2e-5
    )


class ScanMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(16)(x)
        h, _ = nn.scan(
            ScanBlk, variable_axes={"params": 0}, split_rngs={"params": True}, length=3
        )()(h, None)
        return nn.Dense(10)(h)


@pytest.mark.parametrize("weights", ["minmax", "lsq"])
def test_qat_lsq_activations_inside_nn_scan_train_and_convert(weights):
    """LSQ activation scales of scanned layers (one per layer) reach the scan body, train, and convert."""
    x = jax.random.normal(KEY, (64, 8))
    y = jax.random.randint(jax.random.key(1), (64,), 0, 10)
    m = ScanMLP()
    v = m.init(KEY, x)
    rules = static_rules()
    q = jq.qat(m, rules, activations="lsq", weights=weights)
    qv = q.init(v, x)
    acts = qv["quant"]["activations"]
    scanned = sorted(k for k in acts if k.startswith("ScanScanBlk_0/"))
    assert scanned == ["ScanScanBlk_0/Dense_0/kernel", "ScanScanBlk_0/Dense_1/kernel"]
    assert all(acts[k]["scale"].shape[0] == 3 for k in scanned)  # one scale per layer
    trained, losses, g = _train(q, qv, x, y)
    assert losses[-1] < losses[0]
    for k in scanned:
        gs = np.abs(np.asarray(g["quant"]["activations"][k]["scale"])).reshape(3, -1).sum(axis=1)
        assert np.all(gs > 0), gs  # every layer's scale is trained
        assert not np.allclose(trained["quant"]["activations"][k]["scale"], acts[k]["scale"])
    qvi = jq.convert(m, trained, rules)
    for k in scanned:  # the learned scales become the per-layer activation QParams
        np.testing.assert_array_equal(
            qvi.activations[k].scale, trained["quant"]["activations"][k]["scale"]
        )
    np.testing.assert_allclose(
        np.asarray(jq.apply(m, qvi, x)), np.asarray(q.apply(trained, x)), atol=2e-5
    )


def test_report_static_sites_inside_nn_scan():
    """`report` quantizes a scanned site's activation with that layer's QParams (they used to be stacked)."""
    x = jax.random.normal(KEY, (64, 8))
    m = ScanMLP()
    v = m.init(KEY, x)
    rules = static_rules()
    qv = jq.convert(m, v, rules, jq.calibrate(m, v, [x], rules, progress=False))
    rows = {r["site"]: r for r in jq.report(m, v, qv, x)}
    assert set(rows) == {
        "Dense_0/kernel",
        "Dense_1/kernel",
        "ScanScanBlk_0/Dense_0/kernel",
        "ScanScanBlk_0/Dense_1/kernel",
    }
    for r in rows.values():  # calibrated on this batch: nothing clips, int8 keeps > 30 dB
        assert r["act_clip_frac"] == 0.0 and r["act_sqnr_db"] > 30 and r["weight_sqnr_db"] > 30, r


# ----------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_checkpoint_round_trip_is_exact(tmp_path, mlp, fmt):
    pytest.importorskip("orbax.checkpoint", reason="jq checkpoints need orbax-checkpoint")
    m, v, x = mlp
    rules = static_rules(fmt)
    qv = jq.convert(m, v, rules, jq.calibrate(m, v, [x], rules, progress=False))
    checkpoint.save(tmp_path / "q", qv)
    names = set(os.listdir(tmp_path / "q"))
    assert names == {"jq_meta.json", "arrays"}
    r = checkpoint.restore(tmp_path / "q")
    assert jax.tree_util.tree_structure(r) == jax.tree_util.tree_structure(qv)
    chex.assert_trees_all_equal(r, qv)
    np.testing.assert_array_equal(jq.apply(m, r, x), jq.apply(m, qv, x))
    with pytest.raises(ValueError, match="not a jq checkpoint"):
        checkpoint.restore(tmp_path)


def test_checkpoint_nnx_with_rng_state(tmp_path):
    pytest.importorskip("orbax.checkpoint", reason="jq checkpoints need orbax-checkpoint")

    class WithDropout(NnxMLP):
        def __init__(self, rngs):
            super().__init__(rngs)
            self.drop = nnx.Dropout(0.5, deterministic=True, rngs=rngs)

        def __call__(self, x):
            return self.drop(super().__call__(x))

    m = WithDropout(nnx.Rngs(0))
    x = jax.random.normal(KEY, (4, 8))
    qv = jq.convert(m, None, [jq.Rule(".*", weight=jq.QuantSpec("int4", axis=-1))], args=(x,))
    checkpoint.save(tmp_path / "n", qv)
    np.testing.assert_array_equal(
        jq.apply(m, checkpoint.restore(tmp_path / "n"), x), jq.apply(m, qv, x)
    )


# ----------------------------------------------------------------------------- bad input
def test_calibrate_empty_iterator(mlp):
    m, v, _ = mlp
    with pytest.raises(ValueError, match="empty"):
        jq.calibrate(m, v, iter([]), static_rules())


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
    qv = jq.convert(m, None, rules, jq.calibrate(m, None, [x], rules, progress=False))
    k = qv.variables["layers/l/kernel"]
    w = np.asarray(m.layers.l.kernel[...])
    np.testing.assert_allclose(np.asarray(k.scale)[:, 0, :], np.abs(w).max(axis=1) / 127, rtol=1e-6)
    assert rel_err(jq.apply(m, qv, x), m(x)) < 0.02
