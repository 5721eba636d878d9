"""`jq.presets`: plain rule lists; `skip=` and `keep_first_last=` resolved on a real model."""

import functools

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
    # a prefix skips the subtree; a name is matched whole (Conv_ alone skips nothing)
    assert _selected(m, v, make(skip=("Conv_.",)), x) == {"Dense_0/kernel": mode}
    assert _selected(m, v, make(skip=("Conv_",)), x) == dict.fromkeys(ALL, mode)


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
    order = [r["site"] for r in jq.sites(blk, None, presets.w8_weight_only(), x)]
    weighted = [s for s in order if s in every]
    assert set(every) - set(sel) == {weighted[0], weighted[-1]}
    assert weighted[-1].startswith("head")
    qv = jq.convert(blk, None, presets.w8_weight_only(keep_first_last=True), args=(x,))
    kinds = {k: isinstance(w, jq.QArray) for k, w in qv.variables.items() if k.endswith("kernel")}
    assert kinds and not any(q for k, q in kinds.items() if k.startswith("head"))
    assert kinds["mlp/kernel"]


def test_w4_groups_and_static_calibration_names(cnn):
    (r,) = presets.w4_weight_only(group_size=32)
    assert (r.weight.format, r.weight.block_size, r.ops) == ("int4", 32, ("dot",))
    (r,) = presets.w8a8_static("percentile")
    assert isinstance(r.activation.calibration, jq.calibration.Histogram)
    with pytest.raises(ValueError, match="jq.presets.w8a8_static: calibration='bogus'"):
        presets.w8a8_static("bogus")
    with pytest.raises(ValueError, match="skip_positions"):
        jq.Rule(".*", skip_positions=("middle",))
