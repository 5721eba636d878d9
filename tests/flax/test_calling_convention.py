"""One calling convention: (model, variables, rules, batches, *, inputs=, model_kwargs=)."""

import flax.linen as nn
import jax
import numpy as np
import pytest
from models import MLP

import jq
from jq.flax import stream

STATIC = [jq.Rule(".*", activation=jq.QuantSpec("int8", calibration=jq.calibration.MinMax()))]


@pytest.fixture(scope="module")
def mlp():
    m = MLP(hidden=16, out=4)
    xs = [np.random.RandomState(i).randn(3, 8).astype(np.float32) for i in range(3)]
    return m, m.init(jax.random.key(0), xs[0]), xs


def _ranges(stats):
    return {k: (np.asarray(lo), np.asarray(hi)) for k, (lo, hi) in stats.ranges().items()}


def test_old_order_and_kwargs_warn_with_the_new_call_and_give_the_same_stats(mlp):
    m, v, xs = mlp
    new = jq.calibrate(m, v, STATIC, xs, progress=False)
    with pytest.warns(DeprecationWarning, match=r"jq.calibrate\(model, variables, rules, batches"):
        old = jq.calibrate(m, v, xs, STATIC, progress=False)
    with pytest.warns(DeprecationWarning, match="model_kwargs="):
        jq.calibrate(m, v, STATIC, xs, kwargs={}, progress=False)
    hand = {"Dense_0/kernel": (min(x.min() for x in xs), max(x.max() for x in xs))}
    for stats in (new, old):
        lo, hi = _ranges(stats)["Dense_0/kernel"]
        np.testing.assert_array_equal([lo, hi], hand["Dense_0/kernel"])  # MinMax: exact
    with pytest.raises(TypeError, match="once"):
        jq.calibrate(m, v, STATIC, xs, kwargs={}, model_kwargs={}, progress=False)


def test_every_batch_verb_rejects_a_bare_array(mlp):
    m, v, xs = mlp
    calls = {
        "calibrate": lambda: jq.calibrate(m, v, STATIC, xs[0]),
        "gptq": lambda: jq.gptq(m, v, STATIC, xs[0]),
        "smoothquant": lambda: jq.smoothquant(m, v, STATIC, xs[0]),
        "sensitivity": lambda: jq.sensitivity(m, v, STATIC, xs[0]),
        "auto_quantize": lambda: jq.auto_quantize(m, v, xs[0], lambda y, b: 0.0),
        "cast": lambda: jq.cast(m, v, "bfloat16", xs[0]),
        "quantize_model": lambda: jq.quantize_model(m, v, xs[0], STATIC),
    }
    for name, call in calls.items():
        with pytest.raises(
            TypeError, match=rf"jq.{name}: `batches` is an array .*wrap it in a list"
        ):
            call()


def test_forwarded_kwargs_mixup_is_an_error(mlp):
    m, v, xs = mlp
    qv = jq.convert(m, v, [jq.Rule(".*")], args=(xs[0],))
    qm = jq.QuantizedModel(m, qv)
    qat = jq.qat(m, STATIC)
    calls = {
        "apply": lambda: jq.apply(m, qv, xs[0], kwargs={"train": False}),
        "sites": lambda: jq.sites(m, v, STATIC, xs[0], model_kwargs={}),
        "report": lambda: jq.report(m, v, qv, xs[0], kwargs={}),
        "qat.init": lambda: qat.init(v, xs[0], kwargs={}),
        "QuantizedModel.apply": lambda: qm.apply(xs[0], model_kwargs={}),
    }
    for name, call in calls.items():
        with pytest.raises(TypeError, match=rf"jq.{name} forwards keyword arguments"):
            call()


def test_model_call_forms():
    x, m = np.ones((2, 3), np.float32), np.zeros((2,), np.float32)
    assert stream.model_call(x)[0][0] is x
    assert stream.model_call((x, m)) == ((x, m), {})
    args, kw = stream.model_call(
        {"x": x, "m": m}, lambda b: ((b["x"],), {"mask": b["m"]}), {"t": 1}
    )
    assert args == (x,) and kw == {"t": 1, "mask": m}
    assert stream.model_call((x, 3), lambda b: b[0]) == ((x,), {})


class Scaled(nn.Module):
    @nn.compact
    def __call__(self, x, scale: float = 1.0, shift=0.0):
        return nn.Dense(3)(x * scale + shift)


def test_dict_batches_model_kwargs_and_per_batch_kwargs_reach_the_model():
    m = Scaled()
    rng = np.random.RandomState(0)
    xs = [rng.randn(2, 4).astype(np.float32) for _ in range(2)]
    v = m.init(jax.random.key(0), xs[0])
    lo, hi = min(x.min() for x in xs), max(x.max() for x in xs)
    dicts = [{"image": x, "shift": np.float32(1.0)} for x in xs]
    cases = [
        (dict(inputs=lambda b: b["image"]), (lo, hi)),
        (dict(inputs=lambda b: b["image"], model_kwargs={"scale": 2.0}), (2 * lo, 2 * hi)),
        (dict(inputs=lambda b: (b["image"], {"shift": b["shift"]})), (lo + 1, hi + 1)),
    ]
    for kw, want in cases:
        stats = jq.calibrate(m, v, STATIC, dicts, progress=False, **kw)
        got = _ranges(stats)["Dense_0/kernel"]
        np.testing.assert_allclose(got, np.float32(want), rtol=1e-6)


def test_progress_bar_total_is_len_batches(mlp, monkeypatch):
    m, v, xs = mlp
    seen = []
    real = stream.tqdm

    def spy(*a, **kw):
        seen.append(kw.get("total"))
        return real(*a, **kw)

    monkeypatch.setattr(stream, "tqdm", spy)
    jq.calibrate(m, v, STATIC, xs, progress=False)
    jq.calibrate(m, v, STATIC, iter(xs), progress=False)
    assert seen == [3, None]


def test_new_and_old_gptq_order_agree(mlp):
    m, v, xs = mlp
    rules = [jq.Rule(".*", weight=jq.QuantSpec("int4", axis=-1), ops=("dot",))]
    new = jq.gptq(m, v, rules, xs, rtn=True, progress=False)
    with pytest.warns(DeprecationWarning, match=r"jq.gptq\(model, variables, rules, batches"):
        old = jq.gptq(m, v, xs, rules, rtn=True, progress=False)
    leaves = zip(jax.tree_util.tree_leaves(new), jax.tree_util.tree_leaves(old))
    for a, b in leaves:
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # round to nearest on int4 per channel: within half a step of the float weights
    w = np.asarray(v["params"]["Dense_0"]["kernel"])
    wq = np.asarray(jq.dequantize(new.variables["params/Dense_0/kernel"]))
    assert np.all(np.abs(wq - w) <= np.abs(w).max(0) / 7 / 2 + 1e-6)
