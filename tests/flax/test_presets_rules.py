"""`jq.presets`: plain rule lists; `skip=` and `keep_first_last=` resolved on a real model."""

import functools
import warnings

import flax.linen as nn
import jax
import numpy as np
import pytest
from flax import nnx
from models import BNCNN, NnxBlock

import jq
from jq import presets


@pytest.fixture(scope="module")
def cnn():
    m = BNCNN(out=4)
    x = np.random.RandomState(0).rand(2, 8, 8, 1).astype(np.float32)
    return m, m.init(jax.random.key(0), x), x


def _selected(m, v, rules, x):
    return {r["site"]: r["mode"] for r in jq.sites(m, v, rules, x) if r["mode"] != "float"}


ALL = ["Conv_0/kernel", "Conv_1/kernel", "Dense_0/kernel"]


@pytest.mark.parametrize(
    "make, mode",
    [
        (presets.w8a8_static, "static"),
        (presets.w8a8_dynamic, "dynamic"),
        (functools.partial(presets.w8_weight_only, activations="float"), "weight_only"),
        (presets.fp8, "dynamic"),
    ],
)
def test_presets_are_rule_lists_and_skip_first_last(cnn, make, mode):
    m, v, x = cnn
    rules = make()
    assert isinstance(rules, list) and all(isinstance(r, jq.Rule) for r in rules)
    assert _selected(m, v, rules, x) == dict.fromkeys(ALL, mode)
    # first and last dot/conv in evaluation order: the stem conv and the classifier
    assert _selected(m, v, make(keep_first_last=True), x) == {"Conv_1/kernel": mode}
    assert _selected(m, v, make(skip=("Conv_1",)), x) == {
        "Conv_0/kernel": mode,
        "Dense_0/kernel": mode,
    }
    # a prefix skips the subtree; a name is matched whole (Conv_ alone skips nothing, and says so)
    assert _selected(m, v, make(skip=("Conv_.",)), x) == {"Dense_0/kernel": mode}
    with pytest.warns(UserWarning, match=r"skip pattern 'Conv_' matches no module"):
        assert _selected(m, v, make(skip=("Conv_",)), x) == dict.fromkeys(ALL, mode)


def test_skip_patterns_matching_nothing_warn_and_matching_ones_do_not(cnn):
    m, v, x = cnn
    with pytest.warns(UserWarning, match=r"rules\[0\] skip pattern 'Conv' matches no module"):
        jq.sites(m, v, presets.w8a8_dynamic(skip=("Conv", "Dense_0")), x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jq.sites(m, v, presets.w8a8_dynamic(skip=("Conv_0", "Dense_.*")), x)


def test_weight_only_default_runs_dots_with_int8_activations_convs_float(cnn):
    m, v, x = cnn
    assert _selected(m, v, presets.w8_weight_only(), x) == {
        "Conv_0/kernel": "weight_only",
        "Conv_1/kernel": "weight_only",
        "Dense_0/kernel": "dynamic",
    }
    for make in (presets.w8_weight_only, presets.w4_weight_only):
        with pytest.raises(ValueError, match="activations='int16'; expected 'int8'"):
            make(activations="int16")


def test_keep_first_last_on_an_nnx_transformer_and_the_quantized_output():
    blk = NnxBlock(nnx.Rngs(0), d=16, out=3)
    x = np.random.RandomState(1).randn(2, 4, 16).astype(np.float32)
    sel = _selected(blk, None, presets.w8_weight_only(keep_first_last=True), x)
    every = _selected(blk, None, presets.w8_weight_only(), x)
    # query, key and value read the same first activation: all three stay float
    kept = {"attn/query/kernel", "attn/key/kernel", "attn/value/kernel", "head/kernel"}
    assert set(every) - set(sel) == kept
    qv = jq.convert(blk, None, presets.w8_weight_only(keep_first_last=True), args=(x,))
    kinds = {k: isinstance(w, jq.QArray) for k, w in qv.variables.items() if k.endswith("kernel")}
    assert kinds and not any(q for k, q in kinds.items() if k.startswith("head"))
    assert kinds["mlp/kernel"]


def test_w4_groups_and_static_calibration_names(cnn):
    (r,) = presets.w4_weight_only(group_size=32)
    assert (r.weight.format, r.weight.axis, r.weight.group_size, r.ops) == (
        "int4",
        "out",
        32,
        ("dot",),
    )
    (r,) = presets.w8a8_static("percentile")
    assert isinstance(r.activation.calibration, jq.calibration.Histogram)
    with pytest.raises(ValueError, match="jq.presets.w8a8_static: calibration='bogus'"):
        presets.w8a8_static("bogus")
    with pytest.raises(ValueError, match="skip_positions"):
        jq.Rule(".*", skip_positions=("middle",))


class _TwoInputs(nn.Module):
    """A linen attention block on x, a projection of the raw input later, and two heads."""

    @nn.compact
    def __call__(self, x):
        h = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8)(nn.LayerNorm()(x))
        h = nn.relu(nn.Dense(8, name="mid")(h)) + nn.Dense(8, name="skip")(x)
        return nn.Dense(3, name="head_a")(h), nn.Dense(2, name="head_b")(h)


def test_keep_first_last_covers_every_site_on_the_first_and_last_activation():
    m = _TwoInputs()
    x = np.random.RandomState(2).randn(2, 4, 8).astype(np.float32)
    v = m.init(jax.random.key(0), x)
    every = _selected(m, v, presets.w8_weight_only(), x)
    sel = _selected(m, v, presets.w8_weight_only(keep_first_last=True), x)
    att = "MultiHeadDotProductAttention_0"
    assert set(every) - set(sel) == {
        f"{att}/query/kernel", f"{att}/key/kernel", f"{att}/value/kernel",
        "skip/kernel", "head_a/kernel", "head_b/kernel",
    }  # fmt: skip
