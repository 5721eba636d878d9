"""Weight axes in the dot's terms (`jq.flax.weight_axes`), the kernel's storage layout
(`jq.lowering.weight_layout`) and GPTQ / AWQ / SmoothQuant through layout ops.

One small model is written twice: with Flax Dense kernels ``(K, N)``, and as Hugging Face's
GPT-2 writes its ``Conv1D``: the kernel stored ``(N, K)`` and read through ``kernel.T``. With
the same weights, every verb must give the same outputs on both.
"""

import re
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jq


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
    vd = jax.jit(dense.init)(jax.random.key(1), x)  # jitted: eager init dispatches op by op
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
    sp = {s.name: s for s in qv.plan.sites}["fc/kernel"]
    if jq.lowering.weight_layout() == "kn":  # (K, N): this CPU's dot layout
        assert q.shape == (24, 32) and q.scale.shape == (1, 32) and sp.weight_perm == (1, 0)
    else:  # (N, K), as stored, read without the model's transpose
        assert q.shape == (32, 24) and q.scale.shape == (32, 1) and sp.weight_perm == (0, 1)
    assert qv.weight("params/fc/kernel").scale.shape == (32, 1)  # the model's (out, in)
    w = np.asarray(vc["params"]["fc"]["kernel"])  # (out, in): one scale per row
    np.testing.assert_allclose(
        qv.weight("params/fc/kernel").scale[:, 0], np.abs(w).max(axis=1) / 127, rtol=1e-6
    )
    gpu = jq.convert(conv, vc, jq.presets.w8_weight_only(), args=(x,), target="gpu")
    assert gpu.variables["params/fc/kernel"].shape == (32, 24)  # already (N, K)
    assert {s.weight_perm for s in gpu.plan.sites} == {(0, 1)}  # read as stored, no transpose


@pytest.mark.cpu_only(reason="reads XLA:CPU's compiled HLO")
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
    nk = jq.convert(
        conv, vc, rules, jq.calibrate(conv, vc, rules, [x], progress=False), target="gpu"
    )
    text = jax.export.export(f, platforms=("cuda",))(nk, x).mlir_module()
    lines = re.findall(r"stablehlo\.dot_general[^\n]*", text)
    int_dots = [ln for ln in lines if "xi8>, tensor<" in ln]
    assert len(int_dots) == 2 and "%arg" in int_dots[0].split(",")[1]  # proj: N 8 padded to 16
    assert "x [1] : (tensor<16x24xi8>, tensor<32x24xi8>)" in int_dots[0]  # reads (N, K)
    assert not re.search(r"stablehlo\.transpose[^\n]*xi8>", text)
    assert all("xi32>, tensor<" not in ln for ln in lines)


_W4 = jq.presets.w4_weight_only(8)
_ALGOS = {
    "gptq": lambda m, v, b: jq.gptq(m, v, _W4, b, sequential=False, progress=False),
    "awq": lambda m, v, b: jq.awq(m, v, _W4, b, n_grid=4, clip_grid=4, progress=False),
    "smoothquant": lambda m, v, b: jq.smoothquant(
        m, v, jq.presets.w8a8_static(), b, progress=False
    ),
}


@pytest.mark.slow  # 5-10 s each: two runs of the algorithm, compiled per layout
@pytest.mark.parametrize("algo", sorted(_ALGOS))
def test_gptq_awq_smoothquant_are_layout_independent(pair, algo):
    dense, vd, conv, vc, x = pair
    batches = [x, x * 0.5]
    with warnings.catch_warnings():
        # a site the algorithm cannot handle falls back to round-to-nearest (or no smoothing)
        # with a warning: here none may
        warnings.simplefilter("error", UserWarning)
        qd = _ALGOS[algo](dense, vd, batches)
        qc = _ALGOS[algo](conv, vc, batches)
    _close(jq.apply(conv, qc, x), jq.apply(dense, qd, x))


class Decoder(nn.Module):
    """Gemma / MaxText-style einsum weights: (D, H, Dh) query, stacked (2, D, KV, Dh) key and
    value, (H, Dh, D) output, stacked (2, D, F) gate / up, (F, D) down."""

    @nn.compact
    def __call__(self, x):
        d, h, dh, f = 16, 2, 4, 24
        init = nn.initializers.normal(0.3)
        wq = self.param("wq", init, (d, h, dh))
        wkv = self.param("wkv", init, (2, d, h, dh))
        wo = self.param("wo", init, (h, dh, d))
        wgu = self.param("wgu", init, (2, d, f))
        wd = self.param("wd", init, (f, d))
        q = jnp.einsum("btd,dhk->bthk", x, wq)
        k = jnp.einsum("bsd,dhk->bshk", x, wkv[0])
        v = jnp.einsum("bsd,dhk->bshk", x, wkv[1])
        a = jax.nn.softmax(jnp.einsum("bthk,bshk->bhts", q, k), -1)
        x = x + jnp.einsum("bthk,hkd->btd", jnp.einsum("bhts,bshk->bthk", a, v), wo)
        g = jnp.einsum("btd,df->btf", x, wgu[0])
        u = jnp.einsum("btd,df->btf", x, wgu[1])
        return x + jnp.einsum("btf,fd->btd", jax.nn.gelu(g) * u, wd)


@pytest.fixture(scope="module")
def decoder():
    x = jax.random.normal(jax.random.key(2), (2, 3, 16))
    m = Decoder()
    return m, jax.jit(m.init)(jax.random.key(3), x), x


def test_einsum_weights_get_a_scale_per_output_channel_heads_included(decoder):
    m, v, x = decoder
    rows = {r["site"]: r["axes"] for r in jq.sites(m, v, jq.presets.w8_weight_only(), x)}
    assert rows["wq"] == ("contracting", "output", "output")
    assert rows["wkv"] == rows["wkv[1]"] == ("select", "contracting", "output", "output")
    assert rows["wo"] == ("contracting", "contracting", "output")
    qv = jq.convert(m, v, jq.presets.w8_weight_only(), args=(x,))
    shapes = {k.split("/")[-1]: qv.weight(k).scale.shape for k in qv.variables}
    assert shapes == {
        "wq": (1, 2, 4),  # one per head and head dim, not one shared across heads
        "wkv": (2, 1, 2, 4),  # each of key and value its own
        "wo": (1, 1, 16),
        "wgu": (2, 1, 24),
        "wd": (1, 16),
    }
    wq = np.asarray(v["params"]["wq"])
    np.testing.assert_allclose(qv.weight("params/wq").scale[0], np.abs(wq).max(0) / 127, rtol=1e-6)


def test_w4_groups_run_along_the_contraction_and_adapt_to_its_size(decoder):
    m, v, x = decoder
    qm = jq.quantize_model(m, v, [x], jq.presets.w4_weight_only(16), progress=False)
    qv = qm.variables
    # wq contracts D = 16: one group; wd contracts F = 24: 16 does not divide it -> 12
    assert qv.variables["params/wq"].scale.shape == (1, 2, 4)
    assert qv.variables["params/wkv"].scale.shape == (2, 1, 2, 4)
    assert qv.variables["params/wd"].scale.shape == (2, 16)
    notes = {s.name: s.note for s in qv.plan.sites if s.note}
    assert (
        notes["wd"] == "group_size=16 -> 12: 16 does not divide the contraction (axis 0, size 24)"
    )
    assert "wd: group_size=16 -> 12" in qm.summary()
    assert "one scale per output channel" in notes["wo"]  # contraction (H, Dh): groups of Dh = 4
    y = m.apply(v, x)
    assert float(jnp.abs(qm.apply(x) - y).max() / jnp.abs(y).max()) < 0.2


def test_an_integer_axis_on_the_contraction_names_site_shape_roles_and_the_fix(pair):
    _, _, conv, vc, x = pair
    rules = [jq.Rule(".*", weight=jq.QuantSpec("int8", axis=-1))]
    with pytest.raises(ValueError) as e:
        jq.convert(conv, vc, rules, args=(x,))
    msg = str(e.value)
    for part in (
        "site 'fc/kernel'",
        "QuantSpec.axis=-1 is axis 1",
        "'params/fc/kernel' with shape (32, 24)",
        "(0: output 32, 1: contracting 24)",
        "axis='out'",
        "or axis=0",
    ):
        assert part in msg, (part, msg)
    # the right integer axis keeps its meaning
    ok = jq.convert(conv, vc, [jq.Rule(".*", weight=jq.QuantSpec("int8", axis=0))], args=(x,))
    ref = jq.convert(conv, vc, jq.presets.w8_weight_only(activations="float"), args=(x,))
    _close(jq.apply(conv, ok, x), jq.apply(conv, ref, x))


def test_semantic_specs_need_a_dot():
    spec = jq.QuantSpec("int4", axis="out", group_size=32)
    with pytest.raises(ValueError, match="names axes by a weight's dot"):
        jq.quantize(jnp.ones((4, 4)), None, spec)
    with pytest.raises(ValueError, match="group_size goes with axis='out'"):
        jq.QuantSpec("int4", axis=-1, group_size=32)
    with pytest.raises(ValueError, match="the named axes are 'out'"):
        jq.QuantSpec("int8", axis="in")
    with pytest.raises(ValueError, match="Rule.activation: axis='out'"):
        jq.Rule(".*", activation=jq.QuantSpec("int8", axis="out"))


def test_weight_layout_names_the_fast_dot_operand_per_target():
    cpu = jq.lowering.weight_layout()  # per CPU class (tests/test_weight_layout.py)
    assert cpu in ("kn", "nk") and jq.lowering.weight_layout("cpu") == cpu
    assert jq.lowering.weight_layout("gpu") == jq.lowering.weight_layout("tpu") == "nk"
    with pytest.raises(ValueError, match="target must be one of"):
        jq.lowering.weight_layout("h200")
