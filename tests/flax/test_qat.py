"""`jq.qat`: training with fake quantization (EMA / LSQ), and convert to matching inference."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from models import MLP, Block, NnxMLP, ScanMLP, static_rules

import jq
import jq.hlo

KEY = jax.random.key(0)


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
    stats = jq.calibrate(m, v, rules, [x], progress=False)
    q = jq.qat(m, rules)
    qv = q.init(v, x, stats=stats)
    lo, hi = stats.ranges()["Dense_0/kernel"]
    np.testing.assert_allclose(qv["state"]["ranges"]["Dense_0/kernel"]["hi"].reshape(()), hi)
    qvi = jq.convert(m, qv, rules)
    # jitted: the eager attention block dispatches hundreds of ops one by one
    np.testing.assert_allclose(
        np.asarray(jax.jit(lambda q_, x_: jq.apply(m, q_, x_))(qvi, x)),
        np.asarray(jax.jit(q.apply)(qv, x)),
        atol=2e-5,
    )


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
