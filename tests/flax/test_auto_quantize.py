"""`jq.auto_quantize`: per-site precision under an accuracy budget."""

import jax
import numpy as np
import pytest
from models import agreement, first

import jq
from jq import calibration as cal

KEY = jax.random.key(0)


# ----------------------------------------------------------------------------- auto_quantize
def test_auto_quantize_keeps_the_fragile_layer_high(outlier):
    m, v, batches = outlier
    res = jq.auto_quantize(m, v, batches, agreement, max_drop=0.02, inputs=first)
    fmt = {r["modules"]: r["format"] for r in res.plan}
    assert fmt["fragile"] in ("bfloat16", "float32")
    assert fmt["mid"] in ("int4", "int8") and fmt["head"] in ("int4", "int8")
    assert res.float_metric == 1.0 and res.drop <= 0.02
    # the rules feed jq.convert as they are, and reproduce the measured metric and size
    for r in res.rules:
        assert r.path_regex in ("fragile", "mid", "head") and r.ops == ("dot",)
    qv = jq.convert(m, v, list(res.rules), args=(batches[0][0],))
    run = jax.jit(lambda q, a: jq.apply(m, q, a))
    got = np.mean([float(agreement(run(qv, b[0]), b)) for b in batches])
    assert got == pytest.approx(res.metric, abs=1e-9)
    assert res.size_bytes == qv.nbytes()["total_after"] < res.float_size_bytes
    assert res.float_size_bytes == sum(np.size(a) * 4 for a in jax.tree_util.tree_leaves(v))
    assert all(h["accepted"] == (res.float_metric - h["metric"] <= 0.02) for h in res.history)
    assert "fragile" in str(res)


def test_auto_quantize_budget_extremes(outlier):
    m, v, batches = outlier
    # any drop allowed: every layer at the cheapest candidate
    res = jq.auto_quantize(
        m, v, batches, agreement, max_drop=1.0, inputs=first, candidates=("int8", "float32")
    )
    assert {r["format"] for r in res.plan} == {"int8"}
    # int8 weights (1 byte) + float32 per-channel scales (4 bytes per output) + float32 biases
    p = v["params"]
    want = sum(p[k]["kernel"].size + 4 * p[k]["kernel"].shape[1] + 4 * p[k]["bias"].size for k in p)
    assert res.size_bytes == want
    # no drop allowed and only int4: only what costs nothing is lowered
    res = jq.auto_quantize(
        m, v, batches, agreement, max_drop=0.0, inputs=first, candidates=("int4",)
    )
    assert res.metric == res.float_metric
    assert "fragile" not in [r.path_regex for r in res.rules]


def test_auto_quantize_with_static_activations(outlier):
    m, v, batches = outlier
    act = jq.QuantSpec("int8", calibration=cal.MinMax())
    res = jq.auto_quantize(
        m,
        v,
        batches,
        agreement,
        max_drop=0.05,
        inputs=first,
        activation=act,
        candidates=("int8", "float32"),
    )
    assert all(r.activation == act for r in res.rules)
    assert "fragile" not in [r.path_regex for r in res.rules]
    stats = jq.calibrate(m, v, list(res.rules), [b[0] for b in batches], progress=False)
    qv = jq.convert(m, v, list(res.rules), stats=stats)
    run = jax.jit(lambda q, a: jq.apply(m, q, a))
    got = np.mean([float(agreement(run(qv, b[0]), b)) for b in batches])
    assert got == pytest.approx(res.metric, abs=1e-9)


def test_auto_quantize_bad_input(outlier):
    m, v, batches = outlier
    with pytest.raises(ValueError, match="batches"):
        jq.auto_quantize(m, v, [], agreement)
    with pytest.raises(ValueError, match="max_drop"):
        jq.auto_quantize(m, v, batches, agreement, max_drop=-0.1, inputs=first)
    with pytest.raises(ValueError, match="unknown format|candidate"):
        jq.auto_quantize(m, v, batches, agreement, candidates=("int3",), inputs=first)
    with pytest.raises(TypeError, match="metric_fn"):
        jq.auto_quantize(m, v, batches, None, inputs=first)
    with pytest.raises(ValueError, match="no site"):
        jq.auto_quantize(m, v, batches, agreement, ops=("conv",), inputs=first)
