"""The one-liner (`jq.quantize_model`) and `jq.QuantizedModel`, as a user runs them."""

import flax.linen as nn
import jax
import numpy as np
import pytest
from flax import nnx
from models import BNCNN, MLP, NnxBlock

import jq


def _loader(shape, n, seed):
    r = np.random.RandomState(seed)
    return [(r.rand(*shape).astype(np.float32), r.randint(0, 3, shape[0])) for _ in range(n)]


def test_acceptance_user_script(tmp_path):
    cnn, cnn_loader = BNCNN(out=3), _loader((8, 8, 8, 1), 3, 0)
    cnn_vars = cnn.init(jax.random.key(0), cnn_loader[0][0])
    block, block_loader = NnxBlock(nnx.Rngs(0), d=16, out=3), _loader((4, 6, 16), 2, 1)
    cases = [
        ("cnn", cnn, cnn_vars, cnn_loader, jq.presets.w8a8_static()),
        ("block", block, None, block_loader, jq.presets.w8a8_dynamic()),
    ]
    for name, model, variables, loader, preset in cases:
        # ---- the user's script: ten lines, no jq-specific boilerplate ----
        qm = jq.quantize_model(model, variables, loader, preset, inputs=lambda b: b[0])
        x = loader[0][0]
        y_float = model.apply(variables, x) if variables is not None else model(x)
        y_int = qm.apply(x)
        path = tmp_path / f"{name}.safetensors"
        qm.save(path, format="safetensors")
        y_loaded = jq.load_model(path, model).apply(x)
        # ---- checks ----
        np.testing.assert_array_equal(np.asarray(y_loaded), np.asarray(y_int))
        y_float, y_int = np.asarray(y_float, np.float64), np.asarray(y_int, np.float64)
        rel = np.abs(y_int - y_float).max() / np.abs(y_float).max()
        assert 0 < rel < 0.05, (name, rel)  # quantized (not float), and close to float
        assert (y_int.argmax(-1) == y_float.argmax(-1)).mean() >= 0.75
        assert all(s.mode != "float" for s in qm.variables.plan.sites)


@pytest.fixture(scope="module")
def mlp_qm():
    m = MLP(hidden=16, out=4)
    xs = [np.random.RandomState(i).randn(3, 8).astype(np.float32) for i in range(2)]
    v = m.init(jax.random.key(0), xs[0])
    return m, v, xs, jq.quantize_model(m, v, xs, jq.presets.w8a8_static(), progress=False)


def test_quantized_model_is_the_explicit_workflow_and_a_pytree(mlp_qm):
    m, v, xs, qm = mlp_qm
    rules = jq.presets.w8a8_static()
    qv = jq.convert(m, v, rules, jq.calibrate(m, v, rules, xs, progress=False))
    for a, b in zip(jax.tree_util.tree_leaves(qm.variables), jax.tree_util.tree_leaves(qv)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    ref = jax.jit(lambda q, x: jq.apply(m, q, x))(qv, xs[0])
    np.testing.assert_array_equal(np.asarray(qm.apply(xs[0])), np.asarray(ref))
    # leaves are exactly the quantized variables; jax.jit takes the model
    assert len(jax.tree_util.tree_leaves(qm)) == len(jax.tree_util.tree_leaves(qv))
    y = jax.jit(lambda q, x: q.apply(x))(qm, xs[1])
    np.testing.assert_array_equal(np.asarray(y), np.asarray(qm.apply(xs[1])))
    # compiled once per input signature, and shared by copies of the pytree
    qm.apply(xs[0])
    copy = jax.tree_util.tree_map(lambda a: a, qm)
    copy.apply(xs[1])
    assert qm._bound.jitted._cache_size() == 1


def test_summary_report_plot_and_orbax(mlp_qm, tmp_path):
    pytest.importorskip("matplotlib", reason="report(plot=...) uses matplotlib")
    pytest.importorskip("orbax.checkpoint", reason="the orbax format")
    m, v, xs, qm = mlp_qm
    s = qm.summary()
    assert "Dense_0/kernel" in s and "Dense_1/kernel" in s and "static" in s
    rows = qm.report(xs[0], plot=tmp_path / "r.png")
    assert [r["site"] for r in rows] == ["Dense_0/kernel", "Dense_1/kernel"]
    assert (tmp_path / "r.png").stat().st_size > 1000
    assert all(r["weight_sqnr_db"] > 30 for r in rows)  # int8 per channel: about 40 dB
    qm.save(tmp_path / "ckpt")
    back = jq.load_model(tmp_path / "ckpt", m)
    np.testing.assert_array_equal(np.asarray(back.apply(xs[0])), np.asarray(qm.apply(xs[0])))
    with pytest.raises(ValueError, match="float_variables="):
        back.report(xs[0])
    with pytest.raises(ValueError, match="'orbax' or 'safetensors'"):
        qm.save(tmp_path / "x", format="pickle")


def test_qat_convert_needs_no_rules_again(mlp_qm):
    m, v, xs, _ = mlp_qm
    rules = jq.presets.w8a8_static()
    qat = jq.qat(m, rules)
    qv = qat.init(v, xs[0])
    qm = qat.convert(qv)
    ref = jq.convert(m, qv, rules)
    np.testing.assert_array_equal(np.asarray(qm.apply(xs[0])), np.asarray(jq.apply(m, ref, xs[0])))


CALLS = []


class Counting(nn.Module):
    @nn.compact
    def __call__(self, x):
        CALLS.append(1)  # runs once per trace of the model
        return nn.Dense(3)(nn.relu(nn.Dense(5)(x)))


def test_convert_traces_the_model_at_most_twice():
    m = Counting()
    xs = [np.random.RandomState(0).randn(2, 4).astype(np.float32)]
    v = m.init(jax.random.key(0), xs[0])
    rules = jq.presets.w8a8_static()
    stats = jq.calibrate(m, v, rules, xs, progress=False)
    CALLS.clear()
    jq.convert(m, v, rules, stats)
    assert 1 <= len(CALLS) <= 2
