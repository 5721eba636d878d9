"""`jq.cast`: the float16 / bfloat16 casting policy."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from models import Block

import jq

KEY = jax.random.key(0)


def rel_err(a, b):
    return float(jnp.linalg.norm(jnp.asarray(a, jnp.float32) - b) / jnp.linalg.norm(b))


# ----------------------------------------------------------------------------- models
class RMSNorm(nn.Module):
    """A custom norm written with jnp ops: its statistics follow the input dtype."""

    eps: float = 1e-12

    @nn.compact
    def __call__(self, x):
        var = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
        return (
            x
            * jax.lax.rsqrt(var + self.eps)
            * self.param("scale", nn.initializers.ones, (x.shape[-1],))
        )


class FragileNorm(nn.Module):
    """Small activations (|x| ~ 1e-4) into an eps=1e-12 norm: x**2 and eps underflow float16."""

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(32)(x) * 1e-4
        h = RMSNorm()(h)
        h = nn.relu(nn.Dense(32)(h))
        return jax.nn.log_softmax(nn.Dense(10)(h))


class Big(nn.Module):
    """A first layer whose activations reach ~5e5, beyond float16's 65504."""

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(32, kernel_init=nn.initializers.normal(3e4))(x)
        h = nn.LayerNorm()(h)
        return nn.Dense(4)(nn.relu(nn.Dense(16)(h)))


class Scanned(nn.Module):
    @nn.compact
    def __call__(self, x):
        blk = nn.scan(
            lambda mdl, c, _: (mdl(c), None),
            variable_axes={"params": 0},
            split_rngs={"params": True},
            length=2,
        )
        x, _ = blk(Block(), x, None)
        return x


class NnxFragile(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(16, 32, rngs=rngs)
        self.norm = nnx.LayerNorm(32, epsilon=1e-12, rngs=rngs)
        self.l2 = nnx.Linear(32, 4, rngs=rngs)

    def __call__(self, x):
        return self.l2(self.norm(self.l1(x) * 1e-4))


@pytest.fixture(scope="module")
def fragile_norm():
    x = jax.random.normal(jax.random.key(1), (8, 16))
    m = FragileNorm()
    return m, jax.jit(m.init)(KEY, x), x


# ----------------------------------------------------------------------------- cast
def test_float16_norm_epsilon_underflows_without_policy(fragile_norm):
    m, v, x = fragile_norm
    y = jax.jit(m.apply)(v, x)
    # the trap, by hand: 1e-12 and (1e-4)**2 are zero in float16
    assert np.float16(1e-12) == 0 and np.float16(1e-4) ** 2 == 0
    naive = jq.cast(m, v, "float16", keep=())
    assert not bool(jnp.all(jnp.isfinite(naive.apply(x))))
    cm = jq.cast(m, v, "float16", args=(x,))
    yc = cm.apply(x)
    assert yc.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(yc)))
    np.testing.assert_allclose(yc, y, atol=2e-2)
    assert rel_err(yc, y) < 5e-3
    # weights are stored in float16
    assert {str(leaf.dtype) for leaf in cm.leaves} == {"float16"}
    assert cm.nbytes() == sum(np.size(a) * 4 for a in jax.tree_util.tree_leaves(v)) // 2


def test_plain_mlp_runs_wholly_in_float16_with_float32_accumulation():
    class Mlp(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.relu(nn.Dense(32, name="a")(x))
            return nn.Dense(10, name="b")(h)

    m = Mlp()
    x = jax.random.normal(jax.random.key(1), (16, 8))
    v = jax.jit(m.init)(KEY, x)
    cm = jq.cast(m, v, "float16")
    y = np.asarray(cm.apply(x))
    # numpy reference: float16 storage, float32 dot accumulation rounded once to float16, float16 bias add
    p = jax.tree_util.tree_map(np.asarray, v["params"])

    def dense(a, d):
        acc = a.astype(np.float32) @ d["kernel"].astype(np.float16).astype(np.float32)
        return acc.astype(np.float16) + d["bias"].astype(np.float16)

    ref = dense(np.maximum(dense(np.asarray(x).astype(np.float16), p["a"]), 0), p["b"]).astype(
        np.float32
    )
    if jax.default_backend() == "cpu":
        np.testing.assert_array_equal(y, ref)
    else:  # the backend's float32 summation order (cuBLAS) may move a float16 rounding by one ulp
        np.testing.assert_allclose(y, ref, rtol=2**-9, atol=2**-9 * float(np.abs(ref).max()))
    assert float(np.max(np.abs(y - np.asarray(jax.jit(m.apply)(v, x))))) > 0  # it really is float16
    assert cm.report() == [] and "none kept" in cm.summary()


def test_float16_report_names_the_norm_and_its_epsilon(fragile_norm):
    m, v, x = fragile_norm
    cm = jq.cast(m, v, "float16", args=(x,))
    rows = cm.report()
    norm = [r for r in rows if r["module"] == "RMSNorm_0"]
    by_prim = {r["primitive"]: r for r in norm}
    assert by_prim["add"]["category"] == "norm"
    assert (
        "1e-12" in by_prim["add"]["reason"]
        and "underflows to 0 in float16" in by_prim["add"]["reason"]
    )
    assert by_prim["rsqrt"]["category"] == "norm"
    assert (
        by_prim["square"]["category"] == "reduction"
        and by_prim["reduce_sum"]["category"] == "reduction"
    )
    assert by_prim["mul"]["category"] == "norm"  # x * rsqrt(var + eps)
    # log_softmax: max shift, exp, sum, log
    loss = {r["primitive"]: r["category"] for r in rows if r["module"] == "-"}
    assert loss == {
        "reduce_max": "reduction",
        "exp": "softmax",
        "reduce_sum": "softmax",
        "log": "loss",
    }
    # no dot is kept: they run in float16 with float32 accumulation
    assert not [r for r in rows if r["primitive"] == "dot_general"]
    text = cm.summary()
    assert text.startswith("jq.cast(float16):") and "norm" in text
    assert "rsqrt" in jq.format_table(rows) and cm.table() == jq.format_table(
        rows, ["path", "primitive", "module", "category", "reason"]
    )


def test_bfloat16_holds_the_epsilon(fragile_norm):
    m, v, x = fragile_norm
    y = jax.jit(m.apply)(v, x)
    cm = jq.cast(m, v, "bf16", args=(x,))
    add = [r for r in cm.report() if r["module"] == "RMSNorm_0" and r["primitive"] == "add"][0]
    assert "normal in bfloat16" in add["reason"]
    assert rel_err(cm.apply(x), y) < 3e-2
    # bfloat16 has float32's exponent range: even the naive cast stays finite
    assert bool(jnp.all(jnp.isfinite(jq.cast(m, v, "bfloat16", keep=()).apply(x))))


def test_each_category_can_be_switched_off(fragile_norm):
    m, v, x = fragile_norm
    cm = jq.cast(m, v, "float16", args=(x,), keep=("softmax", "loss"))
    cats = {r["category"] for r in cm.report()}
    assert cats == {"softmax", "loss"}
    # the norm in float16 again: x**2 underflows, eps underflows, rsqrt(0) = inf
    assert not bool(jnp.all(jnp.isfinite(cm.apply(x))))
    # keep_modules brings it back whole
    cm = jq.cast(m, v, "float16", keep=("softmax", "loss"), keep_modules=("RMSNorm_0",))
    assert bool(jnp.all(jnp.isfinite(cm.apply(x))))
    assert {r["category"] for r in cm.report()} == {"softmax", "loss", "user"}


def test_literal_that_underflows_is_kept():
    class Clamp(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.Dense(8)(x)
            return jnp.log(jnp.maximum(jnp.abs(h), 1e-9))

    m = Clamp()
    x = jnp.zeros((2, 4))
    v = jax.jit(m.init)(KEY, x)
    cm = jq.cast(m, v, "float16", args=(x,))
    rows = {r["primitive"]: r for r in cm.report()}
    assert rows["max"]["category"] == "literal" and "1e-09" in rows["max"]["reason"]
    assert rows["log"]["category"] == "loss"
    # a zero input: float32 gives log(1e-9); float16 would give log(0) = -inf
    np.testing.assert_allclose(cm.apply(x), np.full((2, 8), np.log(np.float32(1e-9))), rtol=1e-6)
    assert float(jq.cast(m, v, "float16", keep=()).apply(x)[0, 0]) == -np.inf


def test_calibration_flags_overflow_and_keeps_it_in_float32():
    m = Big()
    x = jax.random.normal(jax.random.key(1), (8, 16))
    v = jax.jit(m.init)(KEY, x)
    y = jax.jit(m.apply)(v, x)
    # without calibration the first layer overflows float16
    assert not bool(jnp.all(jnp.isfinite(jq.cast(m, v, "float16").apply(x))))
    cm = jq.cast(m, v, "float16", batches=[x[:4], x[4:]])
    w = np.asarray(v["params"]["Dense_0"]["kernel"])
    want = float(np.max(np.abs(np.asarray(x, np.float64) @ w)))  # |x @ W| before the bias
    assert want > 65504
    dot_path = [
        r["path"]
        for r in cm.report()
        if r["primitive"] == "dot_general" and r["module"] == "Dense_0"
    ]
    assert len(dot_path) == 1 and cm.overflow[dot_path[0]] == pytest.approx(want, rel=1e-5)
    rows = cm.report()
    param = [r for r in rows if r["primitive"] == "parameter"]
    assert [r["path"] for r in param] == [
        "params/Dense_0/kernel"
    ]  # max |w| > 65504: stored float32
    assert float(np.max(np.abs(w))) > 65504
    assert (
        cm.leaves[
            [li.path for li in cm._static.adapter.leaves].index("params/Dense_0/kernel")
        ].dtype
        == jnp.float32
    )
    assert bool(jnp.all(jnp.isfinite(cm.apply(x))))
    assert rel_err(cm.apply(x), y) < 1e-2
    # bfloat16 does not overflow
    cb = jq.cast(m, v, "bfloat16", batches=[x])
    assert cb.overflow == {} and not [r for r in cb.report() if r["category"] == "overflow"]
    # headroom: flags values within a factor of the max
    ch = jq.cast(m, v, "float16", batches=[x], headroom=1e6)
    assert len(ch.overflow) > len(cm.overflow)


def test_attention_block_softmax_and_jit():
    m = Block()
    x = jax.random.normal(jax.random.key(2), (2, 5, 16))
    mask = nn.make_causal_mask(jnp.ones((2, 5)))
    v = jax.jit(m.init)(KEY, x, mask)
    y = jax.jit(m.apply)(v, x, mask)
    plain = jq.cast(m, v, "float16", args=(x,))
    soft = {
        r["primitive"]: r["category"]
        for r in plain.report()
        if r["module"] == "MultiHeadDotProductAttention_0"
    }
    assert soft == {
        "reduce_max": "reduction",
        "exp": "softmax",
        "reduce_sum": "softmax",
        "div": "softmax",
    }
    # with the mask, flax fills masked logits with float32's min (-3.4e38): calibration flags it
    cm = jq.cast(m, v, "float16", batches=[(x, mask)])
    over = {r["primitive"] for r in cm.report() if r["category"] == "overflow"}
    assert {"select_n", "reduce_max"} <= over
    yc = cm.apply(x, mask)
    assert rel_err(yc, y) < 5e-3
    # cm.apply is jitted; the model is also a pytree that an outer jit takes as an argument
    np.testing.assert_array_equal(jax.jit(lambda c, a, b: c.apply(a, b))(cm, x, mask), yc)


def test_scan():
    m = Scanned()
    x = jax.random.normal(jax.random.key(2), (2, 5, 16))
    v = jax.jit(m.init)(KEY, x)
    cm = jq.cast(m, v, "float16", batches=[x])  # calibration observes inside the scan body
    assert cm.overflow == {}
    assert rel_err(cm.apply(x), jax.jit(m.apply)(v, x)) < 5e-3
    assert any(
        r["primitive"] == "rsqrt" and r["path"].count(".") >= 1 for r in cm.report()
    )  # inside the scan


def test_nnx():
    nm = NnxFragile(nnx.Rngs(0))
    xx = jax.random.normal(jax.random.key(3), (8, 16))
    cn = jq.cast(nm, None, "float16", args=(xx,))
    assert rel_err(cn.apply(xx), jax.jit(lambda a: nm(a))(xx)) < 5e-3
    assert not bool(jnp.all(jnp.isfinite(jq.cast(nm, None, "float16", keep=()).apply(xx))))
    assert any("1e-12" in r["reason"] for r in cn.report())


def test_cast_bad_input(fragile_norm):
    m, v, x = fragile_norm
    with pytest.raises(ValueError, match="dtype"):
        jq.cast(m, v, "int8")
    with pytest.raises(ValueError, match="dtype"):
        jq.cast(m, v, "float64")
    with pytest.raises(ValueError, match="keep"):
        jq.cast(m, v, "float16", keep=("norms",))
    with pytest.raises(ValueError, match="keep_modules"):
        jq.cast(m, v, "float16", keep_modules=("(",))
    with pytest.raises(ValueError, match="headroom"):
        jq.cast(m, v, "float16", headroom=0.5)
    with pytest.raises(ValueError, match="batches"):
        jq.cast(m, v, "float16", batches=[])
    with pytest.raises(ValueError, match="example"):
        jq.cast(m, v, "float16").report()
