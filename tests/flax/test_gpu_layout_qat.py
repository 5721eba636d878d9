"""Flax level of the accelerator paths: (N, K) weights from ``convert(target=)``, bf16
models between quantized sites, and ``jq.qat(forward="int8" | "fp8")``."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from models import MLP

import jq
from jq.calibration import MinMax


class Deep(nn.Module):
    """Three Dense layers with ReLU: Dense_0 (24 -> 32), Dense_1 (32 -> 32), Dense_2 (32 -> 8)."""

    @nn.compact
    def __call__(self, x):
        for _ in range(2):
            x = nn.relu(nn.Dense(32)(x))
        return nn.Dense(8)(x)


def _rules(fmt="int8", static=True):
    act = jq.QuantSpec(fmt, calibration=MinMax() if static else None)
    return [jq.Rule(".*", weight=jq.QuantSpec(fmt, axis=-1), activation=act)]


def _setup(model=None, dtype=jnp.float32, fmt="int8"):
    model = model or Deep()
    x = jax.random.normal(jax.random.key(1), (16, 24)).astype(dtype)
    v = jax.tree.map(lambda a: a.astype(dtype), model.init(jax.random.key(0), x))
    rules = _rules(fmt)
    stats = jq.calibrate(model, v, rules, [x], progress=False)
    return model, v, x, rules, stats


def _run(model, qv, x):
    return jax.jit(lambda q, x: jq.apply(model, q, x))(qv, x)


def test_gpu_target_stores_nk_weights_and_gives_the_same_outputs():
    model, v, x, rules, stats = _setup()
    kn = jq.convert(model, v, rules, stats)
    nk = jq.convert(model, v, rules, stats, target="gpu")
    cpu = None if jq.lowering.weight_layout() == "kn" else (1, 0)  # this CPU's layout
    assert [s.weight_perm for s in kn.plan.sites] == [cpu] * 3
    assert [s.weight_perm for s in nk.plan.sites] == [(1, 0)] * 3
    for i, (k, n) in enumerate([(24, 32), (32, 32), (32, 8)]):
        q = nk.variables[f"params/Dense_{i}/kernel"]
        assert q.shape == (n, k) and q.scale.shape == (n, 1)
        np.testing.assert_array_equal(
            nk.weight(f"params/Dense_{i}/kernel").value,
            kn.weight(f"params/Dense_{i}/kernel").value,
        )
    np.testing.assert_array_equal(_run(model, nk, x), _run(model, kn, x))


def test_quantize_model_forwards_target():
    model, v, x, rules, _ = _setup()
    qm = jq.quantize_model(model, v, [x], rules, target="gpu", progress=False)
    assert [s.weight_perm for s in qm.variables.plan.sites] == [(1, 0)] * 3
    kn = jq.quantize_model(model, v, [x], rules, progress=False)
    np.testing.assert_array_equal(qm.apply(x), kn.apply(x))


def test_cuda_export_dots_read_the_stored_nk_weights_directly():
    model, v, x, rules, stats = _setup()
    nk = jq.convert(model, v, rules, stats, target="tpu")
    exp = jax.export.export(jax.jit(lambda q, x: jq.apply(model, q, x)), platforms=("cuda",))(
        nk, jax.ShapeDtypeStruct((32, 24), jnp.float32)
    )
    text = exp.mlir_module()
    dots = re.findall(
        r"stablehlo\.dot_general %\S+, (%\S+), contracting_dims = \[1\] x \[1\][^\n]*:\s*"
        r"\(tensor<32x\d+xi8>, tensor<(\d+)x(\d+)xi8>\) -> tensor<32x\d+xi32>",
        text,
    )
    assert [(n, k) for _, n, k in dots] == [("32", "24"), ("32", "32"), ("16", "32")]  # N 8 -> 16
    assert all(w.startswith("%arg") for w, _, _ in dots[:2])  # no transpose of the weight
    assert "xf32>, tensor<" not in "".join(re.findall(r"dot_general[^\n]*", text))


def test_target_is_checked():
    with pytest.raises(ValueError, match=r"jq.convert: target must be one of"):
        jq.convert(MLP(), None, _rules(), target="h200")


def test_bf16_model_stays_bf16_between_quantized_sites():
    model, v, x, rules, stats = _setup(dtype=jnp.bfloat16)
    qv = jq.convert(model, v, rules, stats, target="gpu")
    y = _run(model, qv, x)
    assert y.dtype == jnp.bfloat16
    text = jax.jit(lambda q, x: jq.apply(model, q, x)).lower(qv, x).as_text()
    # the float work between the int8 dots (bias, ReLU) is bf16: no float32 activation is added
    assert not re.search(r"stablehlo\.add [^\n]*tensor<16x32xf32>", text)
    m32, v32, x32, r32, s32 = _setup()
    y32 = _run(m32, jq.convert(m32, v32, r32, s32), x32)
    np.testing.assert_allclose(np.asarray(y, np.float32), y32, atol=0.1)


@pytest.mark.parametrize(("fmt", "forward", "dot_types"), [
    ("int8", "int8", ("i8",)),
    ("e4m3", "fp8", ("f8E4M3FN",)),
])  # fmt: skip
def test_qat_real_forward_keeps_fake_quant_gradients(fmt, forward, dot_types):
    model, v, x, rules, _ = _setup(fmt=fmt)
    rules = _rules(fmt)

    def step(q):
        qv = q.init(v, x)

        def loss(p):
            return jnp.sum(q.apply({**qv, "params": p}, x) ** 2)

        lowered = jax.jit(jax.value_and_grad(loss)).lower(qv["params"])
        return lowered.compile()(qv["params"]), lowered.as_text()

    (l_fake, g_fake), _ = step(jq.qat(model, rules))
    (l_real, g_real), text = step(jq.qat(model, rules, forward=forward))
    # the weight (rhs) of three forward dots is 8-bit (the lhs is u8 in the CPU VNNI form)
    dots = re.findall(r"dot_general[^\n]*:\s*\(tensor<[\dx]+x\w+>, tensor<[\dx]+x(\w+)>", text)
    assert sum(d in dot_types for d in dots) == 3
    np.testing.assert_allclose(l_real, l_fake, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g_real), jax.tree.leaves(g_fake), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_qat_forward_is_checked():
    model, v, x, _, _ = _setup()
    with pytest.raises(ValueError, match=r"jq.qat: forward must be one of"):
        jq.qat(model, _rules(), forward="int4")
    with pytest.raises(ValueError, match=r"passes no gradient to learned scales"):
        jq.qat(model, _rules(), forward="int8", activations="lsq")
    q = jq.qat(model, _rules("e4m3"), forward="int8")
    with pytest.raises(
        ValueError, match=r"forward='int8' needs int8 weight and activation formats"
    ):
        q.apply(q.init(v, x), x)


class Attn(nn.Module):
    """DenseGeneral kernels: (24, 2, 8) contracted on axis 0, (2, 8, 24) on axes 0 and 1."""

    @nn.compact
    def __call__(self, x):
        h = nn.DenseGeneral((2, 8))(x)
        return nn.DenseGeneral(24, axis=(-2, -1))(nn.relu(h))


def test_gpu_target_moves_every_contracting_axis_last_and_checkpoints_it(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    del ocp
    model, v, x, rules, stats = _setup(Attn())
    kn = jq.convert(model, v, rules, stats)
    nk = jq.convert(model, v, rules, stats, target="gpu")
    assert [s.weight_perm for s in nk.plan.sites] == [(1, 2, 0), (2, 0, 1)]
    assert nk.variables["params/DenseGeneral_0/kernel"].shape == (2, 8, 24)
    assert nk.variables["params/DenseGeneral_1/kernel"].shape == (24, 2, 8)
    np.testing.assert_array_equal(_run(model, nk, x), _run(model, kn, x))
    from jq.flax import checkpoint

    checkpoint.save(tmp_path / "ck", nk)
    back = checkpoint.restore(tmp_path / "ck")
    assert back.plan == nk.plan
    np.testing.assert_array_equal(_run(model, back, x), _run(model, nk, x))
    rows = jq.report(model, v, back, x)  # reads the weights back in the model's layout
    assert all(r["weight_sqnr_db"] > 30 for r in rows)
