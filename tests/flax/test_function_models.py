"""Any JAX function of a parameter pytree as a model, and tied embedding tables.

A function model is ``fn(params, *args, **kwargs)``: its sites are named by the
pytree's key paths, every verb takes it with its params, and its outputs can be
any pytree. A tied table (one parameter read by a gather and by a dot) works
under every preset and rule combination: each use is quantized as its rule
says, from one shared `QArray` when all uses agree, else from a copy per use.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jq
from jq import presets
from jq.flax.adapter import hf_function
from jq.quantize import QArray

KEY = jax.random.key(0)
PRESETS = {
    "w8a8_static": presets.w8a8_static,
    "w8a8_dynamic": presets.w8a8_dynamic,
    "w8_weight_only": presets.w8_weight_only,
    "w4_weight_only": presets.w4_weight_only,
    "fp8": presets.fp8,
}


# ---------------------------------------------------------------------------------------
# hand-written models
# ---------------------------------------------------------------------------------------
def mlp_params(key=KEY, d=128, h=128, o=8):
    k1, k2 = jax.random.split(key)
    return {
        "l1": {"w": jax.random.normal(k1, (d, h)) / np.sqrt(d), "b": jnp.full((h,), 0.1)},
        "l2": {"w": jax.random.normal(k2, (h, o)) / np.sqrt(h), "b": jnp.zeros((o,))},
    }


def mlp(p, x, *, scale=1.0):
    """A pure-JAX MLP whose output is a dict (a pytree, not an array)."""
    h = jax.nn.relu(x @ p["l1"]["w"] + p["l1"]["b"])
    return {"logits": scale * (h @ p["l2"]["w"] + p["l2"]["b"]), "hidden": h}


@pytest.fixture(scope="module")
def mlp_data():
    p = mlp_params()
    xs = [jax.random.normal(jax.random.key(i), (4, 128)) for i in range(2)]
    return p, xs


def test_function_sites_are_named_by_key_paths(mlp_data):
    p, xs = mlp_data
    rows = jq.sites(mlp, p, presets.w8a8_static(), xs[0])
    assert [(r["site"], r["module"], r["kind"], r["weight"]) for r in rows] == [
        ("l1/w", "l1", "dot", (128, 128)),
        ("l2/w", "l2", "dot", (128, 8)),
    ]
    # a rule selects a function's site by its key path, as a module path
    qv = jq.convert(mlp, p, [jq.Rule("l2")], args=(xs[0],))
    assert [s.name for s in qv.plan.sites] == ["l2/w"]
    assert isinstance(qv.variables["l2/w"], QArray) and not isinstance(qv.variables["l1/w"], QArray)


def test_function_weight_only_matches_numpy_reference(mlp_data):
    """w8 weight-only on a function: each kernel per output column, by an int64 numpy reference."""
    p, xs = mlp_data
    qm = jq.quantize_model(
        mlp, p, [xs[0]], presets.w8_weight_only(activations="float"), progress=False
    )

    def q8(w):
        w = np.asarray(w, np.float64)
        s = np.abs(w).max(0, keepdims=True) / 127
        return np.clip(np.round(w / s), -127, 127) * s

    x = np.asarray(xs[1], np.float64)
    h = np.maximum(x @ q8(p["l1"]["w"]) + np.asarray(p["l1"]["b"]), 0)
    want = h @ q8(p["l2"]["w"]) + np.asarray(p["l2"]["b"])
    got = qm(xs[1])
    assert set(got) == {"logits", "hidden"}
    np.testing.assert_allclose(np.asarray(got["logits"]), want, rtol=2e-5, atol=2e-5)


def test_function_one_liner_save_load_export(mlp_data, tmp_path):
    """The acceptance path: a pure-JAX MLP through quantize_model, save, load and export."""
    p, xs = mlp_data
    qm = jq.quantize_model(mlp, p, xs, presets.w8a8_static(), model_kwargs={"scale": 2.0})
    y = qm(xs[1])
    ref = mlp(p, xs[1], scale=2.0)
    assert float(jnp.max(jnp.abs(y["logits"] - ref["logits"]))) < 0.05 * float(
        jnp.max(jnp.abs(ref["logits"]))
    )
    assert "QuantizedModel(mlp)" in qm.summary()
    qm.save(tmp_path / "ck")
    qm.save(tmp_path / "ck.safetensors", format="safetensors")
    for path in (tmp_path / "ck", tmp_path / "ck.safetensors"):
        back = jq.load_model(path, mlp)
        y2 = back(xs[1], scale=2.0)
        np.testing.assert_array_equal(np.asarray(y2["logits"]), np.asarray(y["logits"]))
    blob = qm.export(xs[1][:1])
    out = jq.load_exported(blob)(xs[1])
    assert set(out) == {"logits", "hidden"}
    np.testing.assert_allclose(np.asarray(out["logits"]), np.asarray(y["logits"]), atol=1e-5)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Linear:
    weight: jax.Array
    bias: jax.Array


def test_equinox_style_params_and_static(tmp_path):
    """Params as a list of dataclasses (an Equinox model partitioned into params and static):
    sites are named by attribute paths; load_model rebuilds the structure from params_like."""
    k1, k2 = jax.random.split(KEY)
    params = [
        Linear(jax.random.normal(k1, (16, 32)) / 4, jnp.zeros(32)),
        Linear(jax.random.normal(k2, (32, 4)) / 6, jnp.zeros(4)),
    ]
    static = {"act": jax.nn.gelu}  # non-array parts stay in the closure

    def model(ps, x):
        for i, layer in enumerate(ps):
            x = x @ layer.weight + layer.bias
            if i == 0:
                x = static["act"](x)
        return x

    x = jax.random.normal(KEY, (3, 16))
    qm = jq.quantize_model(model, params, [x], presets.w8a8_dynamic(), progress=False)
    assert [s.name for s in qm.variables.plan.sites] == ["0/weight", "1/weight"]
    y = qm(x)
    np.testing.assert_allclose(np.asarray(y), np.asarray(model(params, x)), atol=0.05)
    qm.save(tmp_path / "ck")
    with pytest.raises(ValueError, match="params_like does not match"):
        jq.load_model(tmp_path / "ck", model, params_like=params[:1])
    back = jq.load_model(tmp_path / "ck", model, params_like=params)
    np.testing.assert_array_equal(np.asarray(back(x)), np.asarray(y))


def test_haiku_style_apply_with_slashed_module_names():
    """Haiku's ``apply(params, rng, x)`` with module names holding '/': the key paths name the sites."""
    params = {
        "mlp/~/linear_0": {"w": jax.random.normal(KEY, (8, 16)) / 3, "b": jnp.zeros(16)},
        "mlp/~/linear_1": {"w": jax.random.normal(KEY, (16, 2)) / 4, "b": jnp.zeros(2)},
    }

    def apply(params, rng, x):
        h = jax.nn.relu(x @ params["mlp/~/linear_0"]["w"] + params["mlp/~/linear_0"]["b"])
        return h @ params["mlp/~/linear_1"]["w"] + params["mlp/~/linear_1"]["b"]

    x = jax.random.normal(KEY, (2, 8))
    fn = lambda p, x: apply(p, None, x)  # noqa: E731
    rows = jq.sites(
        fn, params, presets.w8_weight_only(activations="float", skip=("mlp/~/linear_1",)), x
    )
    assert [(r["site"], r["mode"]) for r in rows] == [
        ("mlp/~/linear_0/w", "weight_only"),
        ("mlp/~/linear_1/w", "float"),
    ]
    qv = jq.convert(fn, params, presets.w8_weight_only(activations="float"), args=(x,))
    np.testing.assert_allclose(
        np.asarray(jq.apply(fn, qv, x)), np.asarray(fn(params, x)), atol=0.02
    )


@pytest.mark.slow
def test_function_gptq_awq_and_qat():
    """The other verbs take a function too: GPTQ, AWQ (over the batches) and QAT."""
    p = mlp_params(d=16, h=16)
    x = jax.random.normal(KEY, (8, 16))
    rules = [jq.Rule(weight=jq.QuantSpec("int4", axis=-1))]
    ref = mlp(p, x)["logits"]
    err = lambda q: float(jnp.mean((jq.apply(mlp, q, x)["logits"] - ref) ** 2))  # noqa: E731
    rtn = err(jq.convert(mlp, p, rules, args=(x,)))
    assert err(jq.gptq(mlp, p, rules, [x], progress=False)) <= rtn  # on its own batch
    assert err(jq.awq(mlp, p, rules, [x], progress=False)) <= rtn * 1.0001
    qat = jq.qat(mlp, presets.w8a8_dynamic())
    qv = qat.init(p, x)
    g = jax.jit(jax.grad(lambda prm: jnp.mean(qat.apply({**qv, "params": prm}, x)["logits"] ** 2)))(
        qv["params"]
    )
    assert float(jnp.abs(g["l1"]["w"]).sum()) > 0
    np.testing.assert_allclose(
        np.asarray(qat.convert(qv)(x)["logits"]),
        np.asarray(qat.apply(qv, x)["logits"]),
        atol=1e-4,
    )


def test_function_errors_name_the_problem(mlp_data):
    p, xs = mlp_data
    with pytest.raises(ValueError, match="needs its parameter pytree"):
        jq.sites(mlp, None, presets.w8a8_dynamic(), xs[0])
    with pytest.raises(TypeError, match="function fn\\(params"):
        jq.sites(42, p, presets.w8a8_dynamic(), xs[0])
    with pytest.raises(ValueError, match="method= selects a method"):
        jq.sites(mlp, p, presets.w8a8_dynamic(), xs[0], method="encode")


def test_hf_duck_typing_needs_module_params_config():
    class NotHF:
        params = {}
        config = None

        def __call__(self, x, params=None):
            return x

    assert hf_function(NotHF()) is None  # no linen `module`
    NotHF.module = nn.Dense(2)
    fn, default = hf_function(NotHF())
    assert default == {} and fn({}, 3) == 3


# ---------------------------------------------------------------------------------------
# tied embedding tables
# ---------------------------------------------------------------------------------------
class TiedAttend(nn.Module):
    """The issue's repro (128 wide, so that int4 groups of 128 fit): the table ``wte`` is gathered
    and used again as the output head through ``Embed.attend``; also returns the gathered rows."""

    @nn.compact
    def __call__(self, ids):
        emb = nn.Embed(300, 128, name="wte")
        e = emb(ids)
        return emb.attend(nn.Dense(128)(e)), e


@pytest.fixture(scope="module")
def tied():
    m = TiedAttend()
    ids = jnp.asarray(np.random.RandomState(0).randint(0, 300, (2, 5)))
    return m, m.init(KEY, ids), ids


def _rows_q8(table):
    """Symmetric int8 per row, by numpy: the tied head's (and the gather's) reference."""
    t = np.asarray(table, np.float64)
    s = np.abs(t).max(1, keepdims=True) / 127
    return np.clip(np.round(t / s), -127, 127) * s


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_tied_head_every_preset(tied, preset):
    m, v, ids = tied
    qm = jq.quantize_model(m, v, [ids], PRESETS[preset](), progress=False)
    logits, e = qm(ids)
    ref, e0 = m.apply(v, ids)
    err = float(jnp.max(jnp.abs(logits - ref)) / jnp.max(jnp.abs(ref)))
    assert err < (0.2 if preset == "w4_weight_only" else 0.1), err
    names = [s.name for s in qm.variables.plan.sites]
    assert "wte.attend/embedding" in names  # the head, by a name a user searches for
    if "wte/embedding" not in names:  # the gather is not quantized: its rows stay float
        np.testing.assert_array_equal(np.asarray(e), np.asarray(e0))
    assert "wte.attend" in qm.summary()


RULE_FOR = {
    None: None,
    "int8": jq.QuantSpec("int8", axis=-1),
    "int4": jq.QuantSpec("int4", axis=-1),
    "fp8": jq.QuantSpec("float8_e4m3fn", axis=-1),
}


@pytest.mark.parametrize(
    "gather, head",
    [(None, "int8"), (None, "fp8"), ("int8", None), ("int8", "int8"), ("int4", "int8")],
)
def test_tied_rule_combinations(tied, gather, head):
    """Each use is quantized as its own rule says, and a use no rule selects stays float."""
    m, v, ids = tied
    table = v["params"]["wte"]["embedding"]
    rules = []  # the middle Dense matches no rule: it stays float
    if gather:
        rules.append(jq.Rule("wte", ops=("embed",), weight=RULE_FOR[gather]))
    if head:
        rules.append(jq.Rule("wte.attend", ops=("dot",), weight=RULE_FOR[head]))
    qv = jq.convert(m, v, rules, args=(ids,))
    logits, e = jq.apply(m, qv, ids)
    ref, e0 = m.apply(v, ids)
    if gather is None:
        np.testing.assert_array_equal(np.asarray(e), np.asarray(e0))
    elif gather == "int8":
        want = _rows_q8(table)[np.asarray(ids)]
        np.testing.assert_allclose(np.asarray(e), want, rtol=1e-6, atol=1e-7)
    if head is None:  # the head reads the float table
        hh = nn.Dense(128).apply({"params": v["params"]["Dense_0"]}, e)
        np.testing.assert_allclose(np.asarray(logits), np.asarray(hh @ table.T), rtol=1e-5)
    if head == "int8":
        # the head reads its own int8-per-row table, whatever the gather's rows are
        hh = np.asarray(nn.Dense(128).apply({"params": v["params"]["Dense_0"]}, e), np.float64)
        want = hh @ _rows_q8(table).T
        np.testing.assert_allclose(np.asarray(logits), want, rtol=1e-4, atol=1e-5)
    sites = {s.name: s for s in qv.plan.sites}
    assert ("wte.attend/embedding" in sites) == (head is not None)
    assert ("wte/embedding" in sites) == (gather is not None)
    # one table in storage when both uses agree; a float table plus copies otherwise
    stored = qv.variables["params/wte/embedding"]
    copies = [k for k in qv.variables if "@" in k]
    if gather and head and RULE_FOR[gather] == RULE_FOR[head]:
        assert isinstance(stored, QArray) and not copies
    elif head and not gather:
        assert not isinstance(stored, QArray) and copies == [
            "params/wte/embedding@wte.attend/embedding"
        ]


def test_tied_skip_by_head_name(tied):
    m, v, ids = tied
    qm = jq.quantize_model(m, v, [ids], presets.w8_weight_only(skip=("wte.attend",)))
    names = [s.name for s in qm.variables.plan.sites]
    assert names == ["wte/embedding", "Dense_0/kernel"]
    # the head reads the float table, the gather its own int8 copy
    assert not isinstance(qm.variables.variables["params/wte/embedding"], QArray)
    assert [k for k in qm.variables.variables if "@" in k] == ["params/wte/embedding@wte/embedding"]
    _, e = qm(ids)
    table = np.asarray(v["params"]["wte"]["embedding"], np.float64)
    np.testing.assert_allclose(np.asarray(e), _rows_q8(table)[np.asarray(ids)], rtol=1e-6)


def test_tied_checkpoint_keeps_per_use_copies(tied, tmp_path):
    m, v, ids = tied
    qm = jq.quantize_model(m, v, [ids], presets.fp8(), progress=False)
    qm.save(tmp_path / "ck.safetensors", format="safetensors")
    back = jq.load_model(tmp_path / "ck.safetensors", m)
    np.testing.assert_array_equal(np.asarray(back(ids)[0]), np.asarray(qm(ids)[0]))
    b = qm.variables.nbytes()
    # before: the float model; after: the float table (kept for the gather), its fp8 copy
    # for the head (one byte a value, one float32 scale a row) and the fp8 Dense
    assert b["total_before"] == 4 * (300 * 128 + 128 * 128 + 128)
    assert (
        b["total_after"] == 4 * 300 * 128 + (300 * 128 + 4 * 300) + (128 * 128 + 4 * 128) + 4 * 128
    )


def test_pure_function_tied_head_name():
    """A plain function's tied head: ``h @ table.T`` is named ``<table>.attend``."""
    p = {"emb": jax.random.normal(KEY, (50, 16)), "w": jax.random.normal(KEY, (16, 16)) / 4}

    def lm(p, ids):
        return (jnp.take(p["emb"], ids, axis=0) @ p["w"]) @ p["emb"].T

    ids = jnp.arange(6).reshape(2, 3)
    rows = jq.sites(lm, p, presets.fp8(), ids)
    assert [(r["site"], r["kind"], r["mode"]) for r in rows] == [
        ("emb", "embed", "float"),
        ("w", "dot", "dynamic"),
        ("emb.attend/emb", "dot", "dynamic"),
    ]
    qv = jq.convert(lm, p, presets.fp8(), args=(ids,))
    y = jq.apply(lm, qv, ids)
    ref = lm(p, ids)
    assert float(jnp.max(jnp.abs(y - ref)) / jnp.max(jnp.abs(ref))) < 0.1
