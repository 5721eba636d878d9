"""Gradients through the integer ops and `jq.apply`: straight-through for quantized activations.

The references are independent of jq's rule: the STE mask is recomputed in
numpy from the scale, and the float gradient comes from `jax.grad` / `jax.vjp`
of the float model or of the float `jax.lax` op on the dequantized weight.
"""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from models import MLP

import jq
from jq import calibration as cal
from jq import ops

DENSE = (((1,), (0,)), ((), ()))
NHWC = ("NHWC", "HWIO", "NHWC")
I8 = jq.QuantSpec("int8")
W8 = jq.QuantSpec("int8", axis=-1)


def _normal(seed, shape, scale=1.0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape) * scale, jnp.float32)


def _cos(a, b):
    a, b = np.ravel(np.asarray(a, np.float64)), np.ravel(np.asarray(b, np.float64))
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _deq(q):
    """Dequantized weight in float64, from the stored integers (independent of jq.dequantize)."""
    v = np.asarray(q.int_value(), np.float64)
    z = 0.0 if q.zero_point is None else np.asarray(q.zero_point, np.float64)
    return (v - z) * np.asarray(q.scale, np.float64)


def _np_fake_quant(x, scale, spec):
    """numpy ``(clip(round(x / S)) * S`` and the straight-through mask (symmetric int8)."""
    x = np.asarray(x, np.float32)
    inv = np.float32(1.0) / np.asarray(scale, np.float32)
    v = np.round(x * inv)  # numpy rounds half to even, as jnp.round
    inside = (v >= spec.qmin) & (v <= spec.qmax)
    y = np.clip(v, spec.qmin, spec.qmax).astype(np.float64) * np.asarray(scale, np.float64)
    return y, inside


# ---------------------------------------------------------------------------------------
# jq.ops: the straight-through rule against hand-computed expectations
# ---------------------------------------------------------------------------------------
class TestOpsGrad:
    def setup_method(self):
        self.x = _normal(0, (6, 16), 1.5)  # static range [-2, 2] below: some values clip
        self.w = _normal(1, (16, 5))
        self.qw = jq.quantize(self.w, None, W8)
        self.c = _normal(2, (6, 5))  # cotangent
        self.qp = jq.qparams_from_range(-2.0, 2.0, I8)

    def test_dot_static_input_gradient_is_masked_float_gradient(self, variant):
        def loss(x):
            y = ops.dot_general(x, self.qw, DENSE, lhs_spec=I8, lhs_qparams=self.qp)
            return jnp.sum(y * self.c)

        g = variant(jax.grad(loss))(self.x)
        _, inside = _np_fake_quant(self.x, self.qp.scale, I8)
        assert (~inside).sum() > 3  # the test covers clipped values
        assert inside.sum() > 60
        want = np.where(inside, np.asarray(self.c, np.float64) @ _deq(self.qw).T, 0.0)
        np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-5)

    def test_dot_dynamic_per_token_gradient_and_weight_scale_gradient(self, variant):
        spec = jq.QuantSpec("int8", axis=0)  # one scale per row: nothing clips

        def loss(x, scale):
            qw = jq.QArray(self.qw.value, scale, None, "int8", self.qw.shape)
            return jnp.sum(ops.dot_general(x, qw, DENSE, lhs_spec=spec) * self.c)

        gx, gs = variant(jax.grad(loss, argnums=(0, 1)))(self.x, self.qw.scale)
        c = np.asarray(self.c, np.float64)
        np.testing.assert_allclose(gx, c @ _deq(self.qw).T, rtol=1e-5, atol=1e-5)
        # d/dS_n sum_mn c[m,n] sum_k fq(x)[m,k] v[k,n] S_n = sum_m c[m,n] (fq(x) @ v)[m,n]
        amax = np.abs(np.asarray(self.x)).max(axis=1, keepdims=True)
        fqx, inside = _np_fake_quant(self.x, amax.astype(np.float32) / np.float32(127), spec)
        assert inside.all()
        want_s = np.sum(c * (fqx @ np.asarray(self.qw.int_value(), np.float64)), axis=0)
        np.testing.assert_allclose(np.ravel(gs), want_s, rtol=1e-4, atol=1e-4)

    def test_dot_float_rhs_with_static_spec(self):
        # an activation as the rhs (e.g. attention's k): gradient of both operands
        x, r = _normal(3, (4, 8)), _normal(4, (8, 6), 2.0)
        qpr = jq.qparams_from_range(-2.5, 2.5, I8)
        c = _normal(5, (4, 6))

        def loss(x, r):
            y = ops.dot_general(x, r, DENSE, lhs_spec=I8, rhs_spec=I8, rhs_qparams=qpr)
            return jnp.sum(y * c)

        gx, gr = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, r)
        amax = np.float32(np.abs(np.asarray(x)).max())
        fqx, inx = _np_fake_quant(x, amax / np.float32(127), I8)
        fqr, inr = _np_fake_quant(r, qpr.scale, I8)
        assert (~inr).sum() > 0
        c = np.asarray(c, np.float64)
        np.testing.assert_allclose(gx, np.where(inx, c @ fqr.T, 0.0), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(gr, np.where(inr, fqx.T @ c, 0.0), rtol=1e-5, atol=1e-5)

    def test_jvp_is_linear_and_einsum_agrees(self):
        t = _normal(6, self.x.shape)

        def f(x):
            return ops.einsum("mk,kn->mn", x, self.qw, lhs_spec=I8, lhs_qparams=self.qp)

        y, dy = jax.jvp(f, (self.x,), (t,))
        _, dy2 = jax.jvp(f, (self.x,), (2.0 * t,))
        _, inside = _np_fake_quant(self.x, self.qp.scale, I8)
        want = np.where(inside, np.asarray(t, np.float64), 0.0) @ _deq(self.qw)
        np.testing.assert_allclose(dy, want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(dy2, 2 * want, rtol=1e-5, atol=1e-5)
        # the primal is the integer path, bit for bit
        qx = jq.quantize(self.x, self.qp, I8)
        np.testing.assert_array_equal(y, ops.einsum("mk,kn->mn", qx, self.qw))

    @pytest.mark.parametrize(
        "static", [pytest.param(True, id="static"), pytest.param(False, id="dynamic")]
    )
    def test_conv_gradient_is_masked_float_conv_vjp(self, static):
        x = _normal(7, (2, 6, 6, 3), 1.5)
        w = _normal(8, (3, 3, 3, 4))
        qw = jq.quantize(w, None, W8)
        c = _normal(9, (2, 3, 3, 4))
        qp = self.qp if static else None
        kw = dict(window_strides=(2, 2), padding="SAME", dimension_numbers=NHWC)

        def loss(x):
            y = ops.conv_general_dilated(x, qw, **kw, lhs_spec=I8, lhs_qparams=qp)
            return jnp.sum(y * c)

        g = jax.jit(jax.grad(loss))(x)
        scale = self.qp.scale if static else np.abs(np.asarray(x)).max() / np.float32(127)
        _, inside = _np_fake_quant(x, scale, I8)
        wf = jnp.asarray(_deq(qw), jnp.float32)
        _, vjp = jax.vjp(lambda a: jax.lax.conv_general_dilated(a, wf, **kw), x)
        want = np.where(inside, np.asarray(vjp(c)[0]), 0.0)
        np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-5)
        # and the primal is unchanged
        y = ops.conv_general_dilated(x, qw, **kw, lhs_spec=I8, lhs_qparams=qp)
        qx = jq.quantize(x, qp if static else jq.QParams(jnp.asarray(scale)), I8)
        np.testing.assert_array_equal(y, ops.conv_general_dilated(qx, qw, **kw))

    def test_per_example_gradients_under_vmap(self):
        spec = jq.QuantSpec("int8", axis=0)  # per token: a row's range is its own

        def loss(x, c):
            return jnp.sum(ops.dot_general(x, self.qw, DENSE, lhs_spec=spec) * c)

        batched = jax.grad(loss)(self.x, self.c)
        per_ex = jax.jit(jax.vmap(jax.grad(lambda x, c: loss(x[None], c[None]))))(self.x, self.c)
        np.testing.assert_allclose(per_ex, batched, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------
# jq.apply: gradients with respect to the input, against the float model
# ---------------------------------------------------------------------------------------
class CNN(nn.Module):
    # gelu, not relu: a relu whose input the quantization error moves across 0 changes a
    # small CNN's input gradient by about 1% (cosine 0.986-0.996 measured with relu), which
    # is the model's sensitivity, not jq's gradient rule
    @nn.compact
    def __call__(self, x):
        x = nn.gelu(nn.Conv(8, (3, 3))(x))
        x = nn.gelu(nn.Conv(8, (3, 3), strides=(2, 2))(x))
        return nn.Dense(10)(x.reshape(x.shape[0], -1))


@functools.cache
def _setup(model_name: str, mode: str):
    model, shape = {"mlp": (MLP(), (8, 16)), "cnn": (CNN(), (4, 8, 8, 3))}[model_name]
    x = _normal(10, shape)
    v = model.init(jax.random.key(0), x)
    act = {"static": I8.replace(calibration=cal.MinMax()), "dynamic": I8, "weight_only": None}[mode]
    rules = [jq.Rule(".*", weight=W8, activation=act)]
    if mode == "static":
        # calibrated on a wider batch, so that nothing clips at `x` (a clipped value has a
        # zero straight-through gradient, as in jq.fake_quant)
        stats = jq.calibrate(model, v, rules, [x, 1.25 * x], progress=False)
        qv = jq.convert(model, v, rules, stats)
    else:
        qv = jq.convert(model, v, rules, args=(x,))
    c = _normal(11, (shape[0], 10))
    return model, v, qv, x, c


@functools.cache
def _float_input_grad(model_name: str):
    """The float model's input gradient (jitted: the CNN's eager grad takes ~25 s on 2 cores),
    one per model: every mode compares against the same float reference."""
    m, v, _, x, c = _setup(model_name, "dynamic")
    return jax.jit(jax.grad(lambda x: jnp.sum(m.apply(v, x) * c)))(x)


class TestApplyGrad:
    @pytest.mark.parametrize("model", ("mlp", "cnn"))
    @pytest.mark.parametrize("mode", ("static", "dynamic", "weight_only"))
    def test_input_gradient_matches_float_model(self, model, mode):
        m, v, qv, x, c = _setup(model, mode)

        def quant_loss(x):
            return jnp.sum(jq.apply(m, qv, x) * c)

        gf = _float_input_grad(model)
        gj = jax.jit(jax.grad(quant_loss))(x)
        assert _cos(gj, gf) > 0.99
        if model == "mlp":  # eager grad dispatches op by op: the CNN's takes ~25 s on 2 cores
            g = jax.grad(quant_loss)(x)
            assert _cos(g, gf) > 0.99
            np.testing.assert_allclose(gj, g, rtol=1e-4, atol=1e-5 * float(jnp.abs(g).max()))

    @pytest.mark.parametrize("model", ("mlp", "cnn"))
    @pytest.mark.parametrize("mode", ("static", "dynamic"))
    def test_per_example_gradients_under_jit_and_vmap(self, model, mode):
        m, v, qv, x, c = _setup(model, mode)

        def per_example(apply_fn):
            def loss(xi, ci):
                return jnp.sum(apply_fn(xi[None])[0] * ci)

            return jax.jit(jax.vmap(jax.grad(loss)))(x, c)

        g = per_example(lambda xi: jq.apply(m, qv, xi))
        gf = per_example(lambda xi: m.apply(v, xi))
        chex.assert_shape(g, x.shape)
        assert _cos(g, gf) > 0.99
        # no example is left with a zero or unrelated gradient (the bound is loose: one MLP
        # example whose quantization error flips one relu measured 0.90)
        for i in range(x.shape[0]):
            assert _cos(g[i], gf[i]) > 0.8, f"example {i}"
        # vmap gives what each example gives alone
        one = jax.jit(jax.grad(lambda xi, ci: jnp.sum(jq.apply(m, qv, xi[None])[0] * ci)))
        for i in (0, x.shape[0] - 1):
            np.testing.assert_allclose(g[i], one(x[i], c[i]), rtol=1e-5, atol=1e-6)
