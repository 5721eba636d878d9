"""Regression tests for issue 15 (no silent wrong answers), bugs 2, 3, 4, 6, 7 and 8.

Each test states the wrong answer it guards against. Expectations come from the
float model run directly (its dropout masks, BatchNorm statistics, activations),
or from an observer run by hand, never from jq itself.
"""

import functools
import os
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import models
import numpy as np
import pytest
from flax import nnx
from models import NnxMLP

import jq
from jq import calibration as cal
from jq.flax import checkpoint

MLP = functools.partial(models.MLP, bias_init=nn.initializers.normal(0.5))

KEY = jax.random.key(0)


def static_rules(act=None, **act_kw):
    act = act if act is not None else jq.QuantSpec("int8", calibration=cal.MinMax(), **act_kw)
    return [jq.Rule(".*", weight=jq.QuantSpec("int8", axis=-1), activation=act)]


# ----------------------------------------------------------------------------- models
class NnxTrainable(nnx.Module):
    """BatchNorm on the input (its statistics do not depend on quantization), dropout inside.

    Returns the logits and the dropout layer applied to ones: the mask, scaled by 1 / keep.
    """

    def __init__(self, rngs):
        self.bn = nnx.BatchNorm(8, rngs=rngs)
        self.l1 = nnx.Linear(8, 16, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)
        self.l2 = nnx.Linear(16, 4, rngs=rngs)

    def __call__(self, x):
        h = self.drop(nnx.relu(self.l1(self.bn(x))))
        return self.l2(h), self.drop(jnp.ones((3, 16)))


class LinenTrain(nn.Module):
    """A required keyword (`train`) and BatchNorm on the input."""

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.BatchNorm(use_running_average=not train)(x)
        x = nn.Dropout(0.5, deterministic=not train)(nn.relu(nn.Dense(16)(x)))
        return nn.Dense(4)(x)


class LinenRunningAvg(nn.Module):
    """`use_running_average` as a required keyword; `extra=True` adds a third Dense site."""

    @nn.compact
    def __call__(self, x, *, use_running_average: bool, extra: bool = False):
        x = nn.BatchNorm(use_running_average=use_running_average)(x)
        x = nn.relu(nn.Dense(16)(x))
        if extra:
            x = nn.relu(nn.Dense(16, name="extra")(x))
        return nn.Dense(4, name="head")(x)


class ScanLayer(nn.Module):
    @nn.compact
    def __call__(self, c, _):
        return nn.relu(nn.Dense(16)(c)), None


class Stack(nn.Module):
    @nn.compact
    def __call__(self, x):
        h, _ = nn.scan(
            ScanLayer, variable_axes={"params": 0}, split_rngs={"params": True}, length=3
        )(name="layers")(x, None)
        return h


def _x(shape=(8, 8), seed=1):
    return jax.random.normal(jax.random.key(seed), shape)


# ----------------------------------------------------------------------------- bug 2: nnx state
def test_nnx_qat_advances_dropout_and_batchnorm_like_the_float_model():
    """Bug 2: `qat.apply(update_stats=True)` kept the RNG count, so every step reused one mask."""
    x = _x()
    ref, model = NnxTrainable(nnx.Rngs(0)), NnxTrainable(nnx.Rngs(0))
    q = jq.qat(model, static_rules())
    qv = q.init(None, x)
    # init observes the first batch for the ranges but leaves the model's state as it is
    assert int(qv["state"]["variables"]["drop/rngs/count"]) == 0
    np.testing.assert_array_equal(qv["state"]["variables"]["bn/mean"], np.zeros(8, np.float32))

    step = jax.jit(lambda st: q.apply({**qv, "state": st}, x, update_stats=True))
    state, masks = qv["state"], []
    for _ in range(4):
        (_, mask), state = step(state)
        masks.append(np.asarray(mask))
    want = [np.asarray(ref(x)[1]) for _ in range(4)]  # the float model, called as in training
    assert len({m.tobytes() for m in want}) == 4  # the reference masks do differ
    for got, exp in zip(masks, want):
        np.testing.assert_array_equal(got, exp)
    ref_state = nnx.state(ref)
    assert int(state["variables"]["drop/rngs/count"]) == int(
        ref_state["drop"]["rngs"]["count"][...]
    )
    for k in ("mean", "var"):
        np.testing.assert_allclose(
            state["variables"][f"bn/{k}"], ref_state["bn"][k][...], rtol=1e-5, atol=1e-7
        )


def test_nnx_qat_apply_without_update_stats_refuses_to_drop_state():
    x = _x()
    model = NnxTrainable(nnx.Rngs(0))
    q = jq.qat(model, static_rules())
    qv = q.init(None, x)
    with pytest.raises(ValueError, match=r"update_stats=True.*model\.eval\(\)") as e:
        q.apply(qv, x)
    assert "drop/rngs/count" in str(e.value) and "bn/mean" in str(e.value)
    model.eval()  # evaluation: nothing changes, so the plain call is fine
    out, mask = q.apply(qv, x)
    np.testing.assert_array_equal(mask, np.ones((3, 16)))
    assert out.shape == (8, 4)


def test_nnx_apply_in_train_mode_raises_or_threads_state():
    """Bug 2: `jq.apply` on an nnx module left in train mode gave one frozen dropout mask."""
    x = _x()
    model, ref = NnxTrainable(nnx.Rngs(0)), NnxTrainable(nnx.Rngs(0))
    rules = static_rules()
    with pytest.warns(RuntimeWarning, match=r"model\.eval\(\) before calibrating"):
        stats = jq.calibrate(model, None, rules, [x], progress=False)
    qv = jq.convert(model, None, rules, stats)  # converting a train-mode module is fine
    with pytest.raises(ValueError, match=r"drop/rngs/count.*mutable=True"):
        jq.apply(model, qv, x)
    apply = jax.jit(lambda q, x: jq.apply(model, q, x, mutable=True))
    masks = []
    for _ in range(3):
        (_, mask), qv = apply(qv, x)
        masks.append(np.asarray(mask))
    for got in masks:
        np.testing.assert_array_equal(got, np.asarray(ref(x)[1]))
    assert isinstance(qv.variables["l1/kernel"], jq.QArray)  # quantized weights stay quantized
    model.eval()
    out, mask = jq.apply(model, qv, x)
    np.testing.assert_array_equal(mask, np.ones((3, 16)))


# ----------------------------------------------------------------------------- bug 3: kwargs
def test_convert_of_qat_variables_uses_recorded_and_caller_kwargs():
    """Bug 3: convert dropped the caller's kwargs and QAT.init did not record them."""
    x = _x()
    m = LinenRunningAvg()
    v = m.init(KEY, x, use_running_average=False)
    rules = static_rules()
    q = jq.qat(m, rules)
    qv = q.init(v, x, use_running_average=True)
    # the recorded keyword lets convert trace a model whose keyword is required
    qvi = jq.convert(m, qv, rules)
    np.testing.assert_allclose(
        jq.apply(m, qvi, x, use_running_average=True),
        q.apply(qv, x, use_running_average=True),
        atol=1e-5,
    )
    assert {s.name for s in qvi.plan.sites} == {"Dense_0/kernel", "head/kernel"}
    # the caller's kwargs win over the recorded ones: `extra=True` makes a third site appear
    v2 = m.init(KEY, x, use_running_average=False, extra=True)
    qv2 = jq.qat(m, rules).init(v2, x, use_running_average=True, extra=False)
    with pytest.raises(
        ValueError, match="no range for static site 'extra/kernel'"
    ):  # never tracked
        jq.convert(m, qv2, rules, model_kwargs={"extra": True})
    qvi2 = jq.convert(
        m, qv2, jq.Rule(".*"), model_kwargs={"extra": True}
    )  # weight-only: no ranges needed
    assert {s.name for s in qvi2.plan.sites} == {"Dense_0/kernel", "extra/kernel", "head/kernel"}


def test_convert_of_qat_variables_without_record_takes_caller_kwargs():
    x = _x()
    m = LinenTrain()
    v = m.init(KEY, x, train=False)
    rules = static_rules()
    qv = jq.qat(m, rules).init(v, x, train=False)
    del qv["state"]["example_kwargs"]  # e.g. restored from an older checkpoint
    with pytest.raises(TypeError, match="train"):
        jq.convert(m, qv, rules)
    qvi = jq.convert(m, qv, rules, model_kwargs={"train": False})
    assert qvi.plan.model_kind == "linen"


def test_linen_qat_step_merges_mutable_collections():
    """Bug 3: with mutable=["batch_stats"] the updates were left for the user to merge."""
    x = _x()
    m = LinenTrain()
    v = m.init(KEY, x, train=False)
    rules = static_rules()
    q = jq.qat(m, rules)
    qv = q.init(v, x, train=False)

    @jax.jit
    def step(state, key):
        return q.apply(
            {**qv, "state": state},
            x,
            train=True,
            rngs={"dropout": key},
            mutable=["batch_stats"],
            update_stats=True,
        )

    state = qv["state"]
    ref_vars = v
    for i in range(3):
        (out, updates), state = step(state, jax.random.key(i))
        _, ref_upd = m.apply(
            ref_vars, x, train=True, rngs={"dropout": jax.random.key(i)}, mutable=["batch_stats"]
        )
        ref_vars = {**ref_vars, **ref_upd}
        for k in ("mean", "var"):  # BatchNorm on the input: the float model's statistics exactly
            np.testing.assert_allclose(
                state["variables"]["batch_stats"]["BatchNorm_0"][k],
                ref_vars["batch_stats"]["BatchNorm_0"][k],
                rtol=1e-6,
            )
        np.testing.assert_array_equal(
            state["variables"]["batch_stats"]["BatchNorm_0"]["mean"],
            updates["batch_stats"]["BatchNorm_0"]["mean"],
        )
    assert out.shape == (8, 4)
    # convert picks up the merged statistics: inference matches the QAT forward pass in eval mode
    trained = {**qv, "state": state}
    qvi = jq.convert(m, trained, rules)
    np.testing.assert_allclose(
        jq.apply(m, qvi, x, train=False), q.apply(trained, x, train=False), atol=1e-5
    )


# ----------------------------------------------------------------------------- bug 4: scan
def test_calibration_stats_ranges_inside_nn_scan():
    """Bug 4: `CalibrationStats.ranges()` raised TypeError for sites inside nn.scan."""
    x = _x((6, 16))
    m = Stack()
    v = m.init(KEY, x)
    stats = jq.calibrate(m, v, static_rules(), [x, 2.0 * x], progress=False)
    ranges = stats.ranges()
    lo, hi = ranges["layers/Dense_0/kernel"]
    assert lo.shape == hi.shape == (3,)
    # by hand: the input of layer i, over both batches
    k = v["params"]["layers"]["Dense_0"]["kernel"]
    b = v["params"]["layers"]["Dense_0"]["bias"]
    for i in range(3):
        ins = []
        for batch in (x, 2.0 * x):
            h = batch
            for j in range(i):
                h = jax.nn.relu(h @ k[j] + b[j])
            ins.append(h)
        np.testing.assert_allclose(lo[i], min(float(a.min()) for a in ins), rtol=1e-6)
        np.testing.assert_allclose(hi[i], max(float(a.max()) for a in ins), rtol=1e-6)
    # the observer itself, handed a stacked state, says what to do instead of a TypeError
    with pytest.raises(ValueError, match="stacked"):
        cal.MinMax().range(stats.states["layers/Dense_0/kernel"])
    # stats assembled without scan lengths (e.g. merged shards) infer them from the state
    bare = jq.CalibrationStats(stats.states, stats.observers, 2, stats.example, stats.site_names)
    np.testing.assert_array_equal(bare.ranges()["layers/Dense_0/kernel"][1], hi)


@pytest.mark.parametrize(
    "obs",
    [
        cal.Histogram(num_bins=64, method="percentile", percentile=100.0),
        cal.MovingAverageMinMax(averaging_constant=1.0),
    ],
)
def test_calibration_stats_ranges_inside_nn_scan_other_observers(obs):
    x = _x((6, 16))
    m = Stack()
    v = m.init(KEY, x)
    stats = jq.calibrate(
        m, v, static_rules(jq.QuantSpec("int8", calibration=obs)), [x], progress=False
    )
    lo, hi = stats.ranges()["layers/Dense_0/kernel"]
    assert lo.shape == (3,)
    np.testing.assert_allclose(hi[0], float(x.max()), rtol=1e-6)  # layer 0 sees the input itself


# ----------------------------------------------------------------------------- bug 6: degenerate
@pytest.mark.parametrize("data", ["zeros", "constant"])
def test_degenerate_calibration_warns_naming_the_site(data):
    """Bug 6: an all-zero or constant calibration batch gave a zero-width range, silently."""
    m = MLP()
    x = _x((32, 8))
    v = m.init(KEY, x)
    bad = jnp.zeros_like(x) if data == "zeros" else jnp.full_like(x, 0.5)
    rules = static_rules()
    stats = jq.calibrate(m, v, rules, [bad], progress=False)
    with pytest.warns(RuntimeWarning, match=r"'Dense_0/kernel' was calibrated on constant") as rec:
        qv = jq.convert(m, v, rules, stats)
    named = [str(w.message) for w in rec if "constant activations" in str(w.message)]
    assert len(named) == 1 and "Dense_1/kernel" not in named[0]  # the other site varies
    # the range is exact for the data it saw ...
    np.testing.assert_allclose(jq.apply(m, qv, bad), m.apply(v, bad), rtol=0.02, atol=0.02)
    # ... and useless for anything else, which is why jq warns
    y, yf = jq.apply(m, qv, x), m.apply(v, x)
    assert float(jnp.linalg.norm(y - yf) / jnp.linalg.norm(yf)) > 0.1


def test_representative_calibration_does_not_warn():
    m = MLP()
    x = _x((32, 8))
    v = m.init(KEY, x)
    rules = static_rules()
    stats = jq.calibrate(m, v, rules, [x], progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        jq.convert(m, v, rules, stats)


def test_qat_zero_learned_scale_is_refused():
    m = MLP()
    x = _x((16, 8))
    v = m.init(KEY, x)
    rules = static_rules()
    q = jq.qat(m, rules, activations="lsq")
    qv = q.init(v, x)
    acts = dict(qv["quant"]["activations"])
    acts["Dense_1/kernel"] = {
        **acts["Dense_1/kernel"],
        "scale": jnp.zeros_like(acts["Dense_1/kernel"]["scale"]),
    }
    bad = {**qv, "quant": {**qv["quant"], "activations": acts}}
    with pytest.raises(ValueError, match=r"'Dense_1/kernel' is zero or not finite"):
        jq.convert(m, bad, rules)


# ----------------------------------------------------------------------------- bug 7: contradicting specs
def test_rule_rejects_observer_axis_that_contradicts_the_spec():
    with pytest.raises(ValueError, match=r"MinMax\(axis=0\).*per tensor"):
        jq.Rule(".*", activation=jq.QuantSpec("int8", calibration=cal.MinMax(axis=0)))
    with pytest.raises(ValueError, match=r"another channel axis"):
        jq.Rule(".*", activation=jq.QuantSpec("int8", axis=0, calibration=cal.MinMax(axis=1)))
    with pytest.raises(ValueError, match=r"one channel axis"):
        jq.Rule(".*", activation=jq.QuantSpec("int8", axis=(0, 1), calibration=cal.MinMax()))
    with pytest.raises(ValueError, match=r"per block"):
        jq.Rule(
            ".*",
            activation=jq.QuantSpec("int8", block_size=4, block_axis=1, calibration=cal.MinMax()),
        )


def test_rule_derives_observer_axis_from_the_spec_and_calibrates_per_channel():
    m = MLP()
    x = _x((16, 8))
    v = m.init(KEY, x)
    r = jq.Rule(
        ".*",
        weight=jq.QuantSpec("int8", axis=-1),
        activation=jq.QuantSpec("int8", axis=0, calibration=cal.MinMax()),
    )
    assert r.activation.calibration == cal.MinMax(axis=0)
    stats = jq.calibrate(m, v, [r], [x], progress=False)
    lo, hi = stats.ranges()["Dense_0/kernel"]
    np.testing.assert_allclose(hi, np.asarray(x).max(axis=1), rtol=1e-6)  # one range per row
    qv = jq.convert(m, v, [r], stats)  # used to fail here: "QParams with shape () do not fit"
    y, yf = jq.apply(m, qv, x), m.apply(v, x)
    assert float(jnp.linalg.norm(y - yf) / jnp.linalg.norm(yf)) < 0.03


def test_observer_axis_of_other_sign_is_checked_once_the_rank_is_known():
    m = MLP()
    x = _x((16, 8))
    v = m.init(KEY, x)
    same = jq.Rule(".*", activation=jq.QuantSpec("int8", axis=0, calibration=cal.MinMax(axis=-2)))
    jq.calibrate(m, v, [same], [x], progress=False)  # -2 is axis 0 of a rank-2 activation
    other = jq.Rule(".*", activation=jq.QuantSpec("int8", axis=0, calibration=cal.MinMax(axis=-1)))
    with pytest.raises(ValueError, match=r"site 'Dense_0/kernel'.*different axes"):
        jq.calibrate(m, v, [other], [x], progress=False)


def test_histogram_target_format_follows_the_spec_or_raises():
    # left at its default, the histogram searches the spec's grid (uint8 here) ...
    spec = jq.QuantSpec(
        "uint8", scheme="affine", calibration=cal.Histogram(num_bins=128, method="mse")
    )
    r = jq.Rule(".*", activation=spec)
    assert r.activation.calibration.dtype == "uint8"
    x = jax.nn.relu(_x((256, 8)))
    obs_r = r.activation.calibration
    want = cal.Histogram(num_bins=128, method="mse", dtype="uint8")
    got_range = obs_r.range(obs_r.update(obs_r.init(x), x))
    want_range = want.range(want.update(want.init(x), x))
    np.testing.assert_array_equal(np.asarray(got_range), np.asarray(want_range))
    # ... an explicit other grid is a contradiction
    with pytest.raises(ValueError, match=r"dtype='int4'.*uint8"):
        jq.Rule(
            ".*",
            activation=jq.QuantSpec(
                "uint8", scheme="affine", calibration=cal.Histogram(method="entropy", dtype="int4")
            ),
        )
    with pytest.raises(ValueError, match=r"integer grid.*float8_e4m3fn"):
        jq.Rule(".*", activation=jq.QuantSpec("e4m3", calibration=cal.Histogram(method="mse")))
    # percentile has no grid: anything goes
    jq.Rule(".*", activation=jq.QuantSpec("e4m3", calibration=cal.Histogram(method="percentile")))


# ----------------------------------------------------------------------------- bug 8: messages
def test_wrong_input_width_names_the_input_linen():
    m = MLP()
    x = _x((4, 8))
    v = m.init(KEY, x)
    qv = jq.convert(m, v, [jq.Rule(".*")], args=(x,))
    with pytest.raises(ValueError, match=r"inputs do not fit.*args\[0\]: float32\(4, 7\)") as e:
        jq.apply(m, qv, jnp.ones((4, 7)))
    assert "(7, 32)" in str(e.value) and "(8, 32)" in str(e.value)


def test_wrong_input_width_names_the_input_nnx():
    m = NnxMLP(nnx.Rngs(0))
    x = _x((4, 8))
    qv = jq.convert(m, None, [jq.Rule(".*")], args=(x,))
    with pytest.raises(
        TypeError, match=r"does not run on these inputs \(args\[0\]: float32\(4, 7\)\)"
    ):
        jq.apply(m, qv, jnp.ones((4, 7)))


def test_checkpoint_errors_name_the_real_functions(tmp_path):
    with pytest.raises(TypeError, match=r"jq\.flax\.checkpoint\.save"):
        checkpoint.save(tmp_path / "x", {"not": "qvars"})
    os.makedirs(tmp_path / "empty")
    with pytest.raises(ValueError, match=r"jq\.flax\.checkpoint\.restore"):
        checkpoint.restore(tmp_path / "empty")
