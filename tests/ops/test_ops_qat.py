"""Tests for the QAT ops `jq.ops.qat_dot_general / qat_einsum / qat_conv_general_dilated`."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from opsref import DENSE, SPECS, normal, quantize_jit

import jq
from jq import ops


# ---------------------------------------------------------------------------------------
# QAT
# ---------------------------------------------------------------------------------------
class TestQat:
    def setup_method(self):
        self.x = normal(50, (6, 16)) * 1.5
        self.w = normal(51, (16, 3))
        self.aspec = jq.QuantSpec("int8")
        self.qp = jq.qparams_from_range(-2.0, 2.0, self.aspec)  # clips some of x

    def _f(self, int_forward):
        return lambda x, w: ops.qat_dot_general(
            x,
            w,
            DENSE,
            lhs_spec=self.aspec,
            lhs_qparams=self.qp,
            rhs_spec=SPECS["i8_col"],
            int_forward=int_forward,
        )

    def test_forward_is_fake_quant_and_int_forward_agrees(self):
        xq = jq.dequantize(quantize_jit(self.x, self.qp, self.aspec))
        wq = jq.dequantize(quantize_jit(self.w, None, SPECS["i8_col"]))
        ref = np.asarray(xq, np.float64) @ np.asarray(wq, np.float64)
        # jitted: eagerly, each of the op's primitives compiles on its own (~25 s on 2 cores)
        for int_forward in (False, True):
            y = jax.jit(self._f(int_forward))(self.x, self.w)
            np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)

    @pytest.mark.parametrize(
        "int_forward", [pytest.param(False, id="fake"), pytest.param(True, id="int_forward")]
    )
    def test_gradients_match_ste_formula(self, int_forward):
        g = normal(52, (6, 3))
        loss = lambda x, w: jnp.sum(self._f(int_forward)(x, w) * g)  # noqa: E731
        gx, gw = jax.jit(jax.grad(loss, argnums=(0, 1)))(self.x, self.w)
        x, w = np.asarray(self.x, np.float64), np.asarray(self.w, np.float64)
        s = float(self.qp.scale)
        mask_x = np.abs(np.round(x / s)) <= 127
        assert 0 < mask_x.mean() < 1  # the clip is exercised
        xq = np.clip(np.round(x / s), -127, 127) * s
        sw = np.abs(w).max(0, keepdims=True) / 127
        wq = np.round(w / sw) * sw
        np.testing.assert_allclose(gx, mask_x * (np.asarray(g) @ wq.T), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(gw, xq.T @ np.asarray(g), rtol=1e-4, atol=1e-5)

    def test_half_format_gradient_is_identity_inside_range(self):
        """A plain cast (float16) has the identity STE gradient: d/dx sum(x.w) = w^T."""
        spec = jq.QuantSpec("float16")
        x = jnp.asarray([[0.3, -1.2, 2.0]], jnp.float32)
        w = jnp.asarray([[1.0], [0.5], [-0.25]], jnp.float32)
        f = lambda x: jnp.sum(ops.qat_dot_general(x, w, DENSE, lhs_spec=spec))  # noqa: E731
        g = jax.grad(f)(x)
        np.testing.assert_allclose(g, w.T, rtol=1e-6)

    @pytest.mark.parametrize(
        "int_forward", [pytest.param(False, id="fake"), pytest.param(True, id="int_forward")]
    )
    def test_trains_with_optax_under_jit(self, int_forward):
        x = normal(53, (128, 16))
        w_true = normal(54, (16, 3))
        y = x @ w_true
        opt = optax.adam(3e-2)
        w = jnp.full((16, 3), 0.01)
        state = opt.init(w)

        @jax.jit
        def step(w, state):
            def loss(w):
                pred = ops.qat_dot_general(
                    x,
                    w,
                    DENSE,
                    lhs_spec=self.aspec,
                    rhs_spec=SPECS["i8_col"],
                    int_forward=int_forward,
                )
                return jnp.mean((pred - y) ** 2)

            val, grad = jax.value_and_grad(loss)(w)
            upd, state = opt.update(grad, state, w)
            return optax.apply_updates(w, upd), state, val

        first = None
        for _ in range(150):
            w, state, val = step(w, state)
            first = float(val) if first is None else first
        assert float(val) < 0.02 * first

    def test_qat_einsum_and_conv(self):
        q, k = normal(55, (2, 3, 8)), normal(56, (2, 4, 8))
        ref = np.einsum(
            "bqd,bkd->bqk",
            np.asarray(jq.fake_quant(q, None, self.aspec)),
            np.asarray(jq.fake_quant(k, None, SPECS["i8"])),
        )

        @jax.jit
        def einsums(q, k):
            kw = dict(lhs_spec=self.aspec, rhs_spec=SPECS["i8"])
            return (
                ops.qat_einsum("bqd,bkd->bqk", q, k, **kw),
                ops.qat_einsum("bqd,bkd->bqk", q, k, int_forward=True, **kw),
            )

        for y in einsums(q, k):
            np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
        x, w = normal(57, (1, 5, 5, 3)), normal(58, (3, 3, 3, 4))
        kw = dict(
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            lhs_spec=self.aspec,
            rhs_spec=SPECS["i8_col"],
        )

        @jax.jit
        def convs(x):
            def loss(x, int_forward):
                y = ops.qat_conv_general_dilated(
                    x, w, (1, 1), "SAME", int_forward=int_forward, **kw
                )
                return jnp.sum(y * jnp.cos(y)), y

            (_, a), ga = jax.value_and_grad(loss, has_aux=True)(x, False)
            (_, b), gb = jax.value_and_grad(loss, has_aux=True)(x, True)
            return a, b, ga, gb

        a, b, ga, gb = convs(x)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
        # same VJP from the float residuals; the cotangent cos(y) - y sin(y) differs
        # only through the forward values, which agree to float32 rounding
        np.testing.assert_allclose(ga, gb, rtol=1e-4, atol=1e-4)
