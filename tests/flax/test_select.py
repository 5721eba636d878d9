"""Rules and site selection: validation, first match wins, unmatched sites warn."""

import jax
import pytest

import jq
import jq.hlo
from jq import calibration as cal

KEY = jax.random.key(0)


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


def test_root_module_parameter_is_selected_by_its_name():
    import flax.linen as nn
    import jax.numpy as jnp
    import numpy as np

    class Root(nn.Module):
        @nn.compact
        def __call__(self, x):
            w = self.param("w", nn.initializers.lecun_normal(), (8, 4))  # module path ''
            return nn.Dense(3)(x @ w)

    m = Root()
    x = jax.random.normal(KEY, (2, 8))
    v = m.init(KEY, x)
    spec = jq.QuantSpec("int8", axis=-1)
    rows = jq.sites(m, v, [jq.Rule("w", weight=spec)], x)
    assert [(r["site"], r["module"], r["rule"]) for r in rows] == [
        ("w", "", 0),
        ("Dense_0/kernel", "Dense_0", None),
    ]
    qv = jq.convert(m, v, [jq.Rule("w", weight=spec)], args=(x,))
    assert [s.name for s in qv.plan.sites] == ["w"]
    w = np.asarray(v["params"]["w"], np.float64)
    q = qv.weight("params/w")  # the model's orientation (stored in the dot's layout)
    scale = np.abs(w).max(axis=0) / 127.0  # symmetric narrow int8 per output column
    np.testing.assert_array_equal(np.asarray(q.value), np.round(w / scale).astype(np.int8))
    assert isinstance(qv.variables["params/Dense_0/kernel"], jnp.ndarray)  # not selected


def test_an_example_input_in_place_of_the_rules_is_named(mlp):
    m, v, x = mlp
    with pytest.raises(TypeError, match=r"rules must be a list of jq.Rule, got an array of shape"):
        jq.sites(m, v, x)
