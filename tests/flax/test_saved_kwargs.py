"""What a model is called with is part of it: `model_kwargs` recorded by `convert`, saved and
restored by checkpoints, used by `apply` / `export` / `QuantizedModel`, overridden by callers."""

import flax.linen as nn
import jax
import numpy as np
import pytest

import jq

pytest.importorskip("safetensors", reason="the optional safetensors extra")
pytest.importorskip("orbax.checkpoint", reason="jq checkpoints need orbax-checkpoint")


class BNMLP(nn.Module):
    """``train`` is required (BatchNorm in training mode mutates ``batch_stats``)."""

    @nn.compact
    def __call__(self, x, *, train, gain=1.0):
        h = nn.BatchNorm(use_running_average=not train)(nn.Dense(16)(x))
        return gain * nn.Dense(4)(nn.relu(h))


@pytest.fixture(scope="module")
def bn():
    m = BNMLP()
    x = np.random.RandomState(0).randn(4, 8).astype(np.float32)
    return m, m.init(jax.random.key(0), x, train=False), x


KW = {"train": False, "gain": 2.0}


@pytest.fixture(scope="module")
def saved(bn, tmp_path_factory):
    m, v, x = bn
    qm = jq.quantize_model(m, v, [x], jq.presets.w8a8_dynamic(), model_kwargs=KW, progress=False)
    d = tmp_path_factory.mktemp("kw")
    qm.save(d / "q.safetensors", format="safetensors")
    qm.save(d / "q")
    return d, qm, np.asarray(qm.apply(x))


def test_quantize_model_kwargs_survive_save_and_load(bn, saved):
    (m, _, x), (d, qm, y) = bn, saved
    assert dict(qm.variables.plan.model_kwargs) == KW
    back = jq.load_model(d / "q.safetensors", m)
    assert dict(back.variables.plan.model_kwargs) == KW
    np.testing.assert_array_equal(np.asarray(back.apply(x)), y)
    # a caller's keyword wins over the recorded one: gain 3 against gain 2
    np.testing.assert_allclose(np.asarray(back.apply(x, gain=3.0)), 1.5 * y, rtol=1e-6)


def test_export_uses_the_restored_kwargs(bn, saved):
    (m, _, x), (d, _, y) = bn, saved
    qv = jq.load_model(d / "q", m).variables  # orbax
    assert dict(qv.plan.model_kwargs) == KW
    f = jq.load_exported(jq.export(m, qv, x))
    np.testing.assert_array_equal(np.asarray(f(x)), y)


def test_qat_init_kwargs_reach_the_converted_model(bn):
    m, v, x = bn
    q = jq.qat(m, jq.presets.w8a8_dynamic())
    qm = q.convert(q.init(v, x, train=False))
    assert dict(qm.variables.plan.model_kwargs) == {"train": False}
    yf = np.asarray(m.apply(v, x, train=False))
    y = np.asarray(qm.apply(x))
    assert np.linalg.norm(y - yf) / np.linalg.norm(yf) < 0.05


def test_recorded_kwargs_are_plain_values_for_the_converted_method(bn):
    m, v, x = bn
    qv = jq.convert(
        m, v, jq.presets.w8_weight_only(), args=(x,), model_kwargs={"train": False, "gain": 1.0}
    )
    assert qv.plan.model_kwargs == (("gain", 1.0), ("train", False))
    assert qv.plan.method is None
    assert qv.plan.call_kwargs() == {"gain": 1.0, "train": False}
    assert qv.plan.call_kwargs("__call__") == {"gain": 1.0, "train": False}
    assert qv.plan.call_kwargs("attend") == {}  # another method: its own keywords
    assert jq.flax.qvars.record_kwargs(
        {"train": False, "mask": np.ones(3), "mutable": ["batch_stats"], "rngs": {}}
    ) == (("train", False),)
