"""`jq.sensitivity`: per-site quantization sensitivity."""

import flax.linen as nn
import jax
import numpy as np
import pytest
from models import agreement, first

import jq
from jq import calibration as cal

KEY = jax.random.key(0)


# ----------------------------------------------------------------------------- sensitivity
def _np_int8_per_channel(w):
    s = np.max(np.abs(w), axis=0, keepdims=True) / 127.0
    return np.clip(np.round(w / s), -127, 127) * s


def _np_forward(p, x):
    h = np.maximum(x @ p["fragile"]["kernel"] + p["fragile"]["bias"], 0)
    h = np.maximum(h @ p["mid"]["kernel"] + p["mid"]["bias"], 0)
    return h @ p["head"]["kernel"] + p["head"]["bias"]


def test_sensitivity_ranks_the_fragile_layer_first(outlier):
    m, v, batches = outlier
    rules = [jq.Rule(".*", weight=jq.QuantSpec("int8", axis=-1))]
    res = jq.sensitivity(m, v, rules, batches, agreement, inputs=first)
    assert res.float_metric == 1.0
    assert [r["site"] for r in res.rows][0] == "fragile/kernel"
    drops = [r["drop"] for r in res.rows]
    assert drops == sorted(drops, reverse=True) and drops[0] > 0.2
    # independent numpy reference of the one-site-quantized model (weight-only int8, per output channel)
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), v["params"])
    for row in res.rows:
        layer = row["site"].split("/")[0]
        q = {k: dict(d) for k, d in p.items()}
        q[layer]["kernel"] = _np_int8_per_channel(p[layer]["kernel"])
        ref = [_np_forward(p, np.asarray(b[0], np.float64)) for b in batches]
        out = [_np_forward(q, np.asarray(b[0], np.float64)) for b in batches]
        se = sum(np.sum((o - r) ** 2) for o, r in zip(out, ref))
        sig = sum(np.sum(r**2) for r in ref)
        assert row["mse"] == pytest.approx(se / sum(r.size for r in ref), rel=1e-3)
        assert row["sqnr_db"] == pytest.approx(10 * np.log10(sig / se), abs=0.01)
        acc = np.mean([np.mean(np.argmax(o, -1) == np.asarray(b[1])) for o, b in zip(out, batches)])
        assert row["metric"] == pytest.approx(acc, abs=1 / 64 + 1e-9)
    text = str(res)
    assert text.splitlines()[0] == "float metric: 1" and "fragile/kernel" in text.splitlines()[3]


def test_sensitivity_static_rules_and_no_metric(outlier):
    m, v, batches = outlier
    rules = [
        jq.Rule(
            ".*",
            weight=jq.QuantSpec("int4", axis=-1),
            activation=jq.QuantSpec("int8", calibration=cal.MinMax()),
        )
    ]
    res = jq.sensitivity(m, v, rules, batches, inputs=first)
    assert res.float_metric is None and "drop" not in res.rows[0]
    sq = [r["sqnr_db"] for r in res.rows]
    assert sq == sorted(sq) and res.rows[0]["site"] == "fragile/kernel"
    # int4 zeroes every fragile weight but the outlier row: the layer outputs only its bias
    assert sq[0] < 3.0 and sq[-1] > 10.0
    # calibration statistics passed in give the same numbers
    stats = jq.calibrate(m, v, rules, [b[0] for b in batches], progress=False)
    again = jq.sensitivity(m, v, rules, batches, inputs=first, stats=stats)
    assert [r["sqnr_db"] for r in again.rows] == pytest.approx(sq, abs=1e-6)


def test_sensitivity_tied_embedding_is_one_row():
    class TiedLM(nn.Module):
        @nn.compact
        def __call__(self, ids):
            emb = nn.Embed(50, 16)
            return emb.attend(nn.relu(nn.Dense(16)(emb(ids))))

    ids = jax.random.randint(jax.random.key(1), (4, 6), 0, 50)
    m = TiedLM()
    v = jax.jit(m.init)(KEY, ids)
    res = jq.sensitivity(m, v, [jq.Rule(".*", weight=jq.QuantSpec("int4", axis=-1))], [ids])
    assert sorted(r["site"] for r in res.rows) == [
        "Dense_0/kernel",
        "Embed_0/embedding + Embed_0.attend/embedding",
    ]


def test_sensitivity_bad_input(outlier):
    m, v, batches = outlier
    with pytest.raises(ValueError, match="batches"):
        jq.sensitivity(m, v, [jq.Rule()], [])
    with pytest.raises(ValueError, match="no site"):
        jq.sensitivity(m, v, [jq.Rule("nothing")], batches, inputs=first)
    with pytest.raises(TypeError, match="rules"):
        jq.sensitivity(m, v, ["int8"], batches, inputs=first)
