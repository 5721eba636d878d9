"""Weight axes in the dot's terms (`jq.flax.weight_axes`), the kernel's storage layout
(`jq.lowering.weight_layout`) and GPTQ / AWQ / SmoothQuant through layout ops.

One small model is written twice: with Flax Dense kernels ``(K, N)``, and as Hugging Face's
GPT-2 writes its ``Conv1D``: the kernel stored ``(N, K)`` and read through ``kernel.T``. With
the same weights, every verb must give the same outputs on both.
"""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jq
from jq.calibration import MinMax


class Conv1D(nn.Module):
    """HF GPT-2's FlaxConv1D: kernel (out, in), ``dot_general(x, kernel.T)``."""

    features: int

    @nn.compact
    def __call__(self, x):
        k = self.param("kernel", nn.initializers.normal(0.2), (self.features, x.shape[-1]))
        b = self.param("bias", nn.initializers.normal(0.1), (self.features,))
        return jax.lax.dot_general(x, k.T, (((x.ndim - 1,), (0,)), ((), ()))) + b


class Net(nn.Module):
    """LayerNorm -> fc(24 -> 32) -> gelu -> proj(32 -> 8), in either layout."""

    conv1d: bool = False

    @nn.compact
    def __call__(self, x):
        layer = Conv1D if self.conv1d else (lambda n, name: nn.Dense(n, name=name))
        h = nn.LayerNorm(name="ln")(x)
        h = nn.gelu(layer(32, name="fc")(h))
        return layer(8, name="proj")(h)


def _pair():
    x = jax.random.normal(jax.random.key(0), (16, 24)) * jnp.linspace(0.2, 3.0, 24)
    dense = Net()
    vd = dense.init(jax.random.key(1), x)
    vc = jax.tree.map(lambda a: a, vd)  # the same weights, stored (out, in)
    for n in ("fc", "proj"):
        vc["params"][n]["kernel"] = vd["params"][n]["kernel"].T
    return dense, vd, Net(conv1d=True), vc, x


@pytest.fixture(scope="module")
def pair():
    return _pair()


def _close(a, b):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize(
    "preset", ["w8a8_static", "w8a8_dynamic", "w8_weight_only", "w4_weight_only", "fp8"]
)
def test_presets_give_the_same_model_in_both_layouts(pair, preset):
    dense, vd, conv, vc, x = pair
    rules = getattr(jq.presets, preset)()
    if preset == "w4_weight_only":
        rules = jq.presets.w4_weight_only(16)
    qd = jq.quantize_model(dense, vd, [x], rules, progress=False)
    qc = jq.quantize_model(conv, vc, [x], rules, progress=False)
    _close(qc.apply(x), qd.apply(x))
    assert not np.allclose(qd.apply(x), dense.apply(vd, x), atol=1e-6)  # it did quantize


def test_conv1d_weights_are_stored_k_n_and_scaled_per_output_row(pair):
    _, _, conv, vc, x = pair
    qv = jq.convert(conv, vc, jq.presets.w8_weight_only(), args=(x,))
    q = qv.variables["params/fc/kernel"]
    assert q.shape == (24, 32) and q.scale.shape == (1, 32)  # (K, N): the CPU dot's layout
    sp = {s.name: s for s in qv.plan.sites}["fc/kernel"]
    assert sp.weight_perm == (1, 0)
    w = np.asarray(vc["params"]["fc"]["kernel"])  # (out, in): one scale per row
    np.testing.assert_allclose(q.scale[0], np.abs(w).max(axis=1) / 127, rtol=1e-6)
    gpu = jq.convert(conv, vc, jq.presets.w8_weight_only(), args=(x,), target="gpu")
    assert gpu.variables["params/fc/kernel"].shape == (32, 24)  # already (N, K)
    assert {s.weight_perm for s in gpu.plan.sites} == {(0, 1)}  # read as stored, no transpose


def test_static_int8_on_out_in_weights_is_one_u8s8_dot_with_no_transpose(pair):
    _, _, conv, vc, x = pair
    rules = jq.presets.w8a8_static()
    qv = jq.convert(conv, vc, rules, jq.calibrate(conv, vc, rules, [x], progress=False))
    f = jax.jit(lambda q, x: jq.apply(conv, q, x))
    hlo = f.lower(qv, x).compile().as_text()
    assert not re.search(r"s8\[[\d,]*\]\S* transpose\(", hlo)
    dots = re.findall(r"= (\w+)\[[\d,]*\]\{[\d,]*\} dot\((%[\w.-]+), (%[\w.-]+)\)", hlo)
    assert len(dots) == 2 and {d[0] for d in dots} == {"s32"}
    types = dict(re.findall(r"(%[\w.-]+) = (\w+)\[", hlo))
    assert {(types[a], types[b]) for _, a, b in dots} == {("u8", "s8")}  # no s32 x s32 dot
    # the exported cuda module: i8 x i8 dots that read the (N, K) argument directly
    nk = jq.convert(conv, vc, rules, jq.calibrate(conv, vc, rules, [x], progress=False), target="gpu")
    text = jax.export.export(f, platforms=("cuda",))(nk, x).mlir_module()
    lines = re.findall(r"stablehlo\.dot_general[^\n]*", text)
    int_dots = [ln for ln in lines if "xi8>, tensor<" in ln]
    assert len(int_dots) == 2 and "%arg" in int_dots[0].split(",")[1]  # proj: N 8 padded to 16
    assert "x [1] : (tensor<16x24xi8>, tensor<32x24xi8>)" in int_dots[0]  # reads (N, K)
    assert not re.search(r"stablehlo\.transpose[^\n]*xi8>", text)
    assert all("xi32>, tensor<" not in ln for ln in lines)


def test_gptq_awq_smoothquant_are_layout_independent(pair):
    dense, vd, conv, vc, x = pair
    w4 = jq.presets.w4_weight_only(8)
    batches = [x, x * 0.5]
    for name, f in [
        ("gptq", lambda m, v: jq.gptq(m, v, w4, batches, progress=False)),
        ("awq", lambda m, v: jq.awq(m, v, w4, batches, progress=False)),
        (
            "smoothquant",
            lambda m, v: jq.smoothquant(m, v, jq.presets.w8a8_static(), batches, progress=False),
        ),
    ]:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # no RTN / no-smoothing fallback
            qd, qc = f(dense, vd), f(conv, vc)
        _close(jq.apply(conv, qc, x), jq.apply(dense, qd, x))
        rtn = jq.convert(dense, vd, w4, args=(x,)) if name != "smoothquant" else None
        if rtn is not None:  # the algorithm changed something
            assert not np.allclose(jq.apply(dense, qd, x), jq.apply(dense, rtn, x))
