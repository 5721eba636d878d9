"""`jq.lowering.weight_layout`: the stored layout of a quantized weight per target / CPU class."""

import flax.linen as nn
import jax
import numpy as np
import pytest

import jq
from jq import lowering


def _feat(kind_flags, arch="x86_64"):
    return lowering.CpuFeatures(arch, frozenset(kind_flags), "test")


@pytest.mark.parametrize(
    "feat, want",
    [
        (_feat({"avx2", "avx512f", "avx512_vnni"}), "nk"),  # measured
        (_feat({"avx2"}), "nk"),  # measured (ops_avx2.md)
        (_feat({"avx2", "avx_vnni"}), "nk"),  # assumed like AVX-512 VNNI
        (_feat({"asimddp"}, "aarch64"), "kn"),  # unmeasured: the model's layout
    ],
)
def test_cpu_policy_per_class(monkeypatch, feat, want):
    monkeypatch.setattr(lowering, "cpu_features", lambda: feat)
    assert lowering.weight_layout("cpu") == want
    assert lowering.weight_layout(None) == want
    assert lowering.weight_layout("gpu") == lowering.weight_layout("tpu") == "nk"


def test_unknown_target():
    with pytest.raises(ValueError, match="weight_layout: target must be one of"):
        lowering.weight_layout("npu")


def test_convert_target_cpu_stores_the_policy_layout_and_computes_the_same():
    m = nn.Dense(6)
    x = np.random.RandomState(0).randn(2, 16).astype(np.float32)
    v = m.init(jax.random.key(0), x)
    rules = jq.presets.w8_weight_only()
    q0 = jq.convert(m, v, rules, args=(x,))  # target None: this CPU, as "cpu"
    qc = jq.convert(m, v, rules, args=(x,), target="cpu")
    qg = jq.convert(m, v, rules, args=(x,), target="gpu")  # (N, K) on every host
    want = (6, 16) if lowering.weight_layout("cpu") == "nk" else (16, 6)
    assert q0.variables["params/kernel"].value.shape == want
    assert qc.variables["params/kernel"].value.shape == want
    assert qg.variables["params/kernel"].value.shape == (6, 16)
    for q in (q0, qc, qg):  # the model's orientation back
        assert q.weight("params/kernel").shape == (16, 6)
    np.testing.assert_allclose(jq.apply(m, qc, x), jq.apply(m, qg, x), rtol=1e-6, atol=1e-6)
