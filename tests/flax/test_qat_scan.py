"""QAT state: `QatVariables` is a pytree that reads like the dict it replaces, and LSQ activations
inside ``nn.scan`` compute what the same layers written out one by one compute."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from models import MLP, ScanBlk, ScanMLP, static_rules

import jq

KEY = jax.random.key(0)
LAYERS = ("Dense_0", "Dense_1")  # the two Dense of one ScanBlk


class Unrolled(nn.Module):
    """`ScanMLP` with its three scanned blocks written out: blocks ``blk0``, ``blk1``, ``blk2``."""

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(16)(x)
        for i in range(3):
            h, _ = ScanBlk(name=f"blk{i}")(h, None)
        return nn.Dense(10)(h)


def _unrolled_tree(scanned: dict, per_layer) -> dict:
    """The unrolled layout of a scanned tree: ``ScanScanBlk_0`` entries split into ``blk{i}``."""
    out = {k: v for k, v in scanned.items() if k != "ScanScanBlk_0"}
    for i in range(3):
        out[f"blk{i}"] = jax.tree_util.tree_map(
            lambda a, i=i: per_layer(a, i), scanned["ScanScanBlk_0"]
        )
    return out


def test_lsq_inside_nn_scan_matches_the_unrolled_model():
    x = jax.random.normal(KEY, (32, 8))
    target = jax.random.normal(jax.random.key(2), (32, 10))
    rules = static_rules()
    ms, mu = ScanMLP(), Unrolled()
    vs = ms.init(KEY, x)
    vu = {"params": _unrolled_tree(vs["params"], lambda a, i: a[i])}
    qs = jq.qat(ms, rules, activations="lsq", weights="lsq")
    qu = jq.qat(mu, rules, activations="lsq", weights="lsq")
    qvs = qs.init(vs, x)
    qvu = qu.init(vu, x)
    # the unrolled model gets exactly the scanned model's learned parameters, layer by layer
    quant_u = {"activations": {}, "weights": {}}
    for kind in ("activations", "weights"):
        for k, v in qvs["quant"][kind].items():
            if not k.startswith("ScanScanBlk_0/"):
                quant_u[kind][k] = v
                continue
            for i in range(3):
                quant_u[kind][k.replace("ScanScanBlk_0", f"blk{i}")] = jax.tree_util.tree_map(
                    lambda a, i=i: a[i], v
                )
    assert set(quant_u["activations"]) == set(qvu["quant"]["activations"])
    qvu = {**qvu, "quant": quant_u}

    def loss(q, qv):
        return lambda tr: jnp.mean((q.apply({**tr, "state": qv["state"]}, x) - target) ** 2)

    tr_s = {"params": qvs["params"], "quant": qvs["quant"]}
    tr_u = {"params": qvu["params"], "quant": qvu["quant"]}
    ls, gs = jax.jit(jax.value_and_grad(loss(qs, qvs)))(tr_s)
    lu, gu = jax.jit(jax.value_and_grad(loss(qu, qvu)))(tr_u)
    np.testing.assert_allclose(float(ls), float(lu), rtol=1e-5)  # the same forward pass
    for layer in LAYERS:
        k = f"ScanScanBlk_0/{layer}/kernel"
        for kind in ("activations", "weights"):
            g_scan = np.asarray(gs["quant"][kind][k]["scale"])
            assert np.abs(g_scan).reshape(3, -1).sum(axis=1).min() > 0  # every layer's scale learns
            for i in range(3):
                np.testing.assert_allclose(
                    g_scan[i],
                    gu["quant"][kind][f"blk{i}/{layer}/kernel"]["scale"],
                    rtol=1e-4,
                    atol=1e-6,
                )
        for i in range(3):
            np.testing.assert_allclose(
                np.asarray(gs["params"]["ScanScanBlk_0"][layer]["kernel"])[i],
                gu["params"][f"blk{i}"][layer]["kernel"],
                rtol=1e-4,
                atol=1e-6,
            )


def test_qat_variables_are_a_pytree_that_reads_like_a_dict():
    x = jax.random.normal(KEY, (16, 8))
    m = MLP()
    v = m.init(KEY, x)
    rules = static_rules()
    q = jq.qat(m, rules, activations="lsq")
    qv = q.init(v, x)
    assert isinstance(qv, jq.flax.QatVariables)
    assert set(qv) == {"params", "quant", "state"} and len(qv) == 3
    assert qv["params"] is qv.params and qv["quant"] is qv.quant and qv["state"] is qv.state
    as_dict = {**qv}
    assert set(as_dict) == {"params", "quant", "state"}
    doubled = jax.tree_util.tree_map(lambda a: a * 2, qv)
    assert isinstance(doubled, jq.flax.QatVariables)
    np.testing.assert_array_equal(
        doubled.params["Dense_0"]["kernel"], 2 * v["params"]["Dense_0"]["kernel"]
    )
    leaves = jax.tree_util.tree_leaves(qv)
    assert len(leaves) == len(jax.tree_util.tree_leaves(as_dict))
    # QAT.apply takes either form, with the same result (convert of `qv`: test_qat.py)
    np.testing.assert_array_equal(jax.jit(q.apply)(qv, x), q.apply(as_dict, x))
