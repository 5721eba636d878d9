"""Tests for `jq.ops.dot_general`: the integer path, all modes, overflow, errors."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opsref import (
    DENSE,
    F32_EPS,
    SPECS,
    dequantize_f64,
    normal,
    np_dot_general,
    quantize_jit,
    rounding_tol,
)

import jq
from jq import ops


# ---------------------------------------------------------------------------------------
# the integer path against the dequantized reference
# ---------------------------------------------------------------------------------------
class TestIntegerPath:
    @pytest.mark.parametrize(
        "lname,rname",
        [
            pytest.param("i8", "i8_col", id="i8_i8col"),
            pytest.param("u8_aff", "i8_col", id="u8aff_i8col"),
            pytest.param("i8_aff", "i8_aff_col", id="i8aff_i8affcol"),
            pytest.param("u8_sym", "u8_col", id="u8sym_u8col"),
            pytest.param("i8_row", "i4_col", id="i8row_i4col"),
            pytest.param("u8_row", "i8_aff_col", id="u8row_i8affcol"),
            pytest.param("i16", "i8_col", id="i16_i8col"),
            pytest.param("i16_aff", "i16_col", id="i16aff_i16col"),
            pytest.param("i8", "i8_blk", id="i8_i8blk"),
            pytest.param("u8_aff", "i4_blk", id="u8aff_i4blk"),
            pytest.param("i8_aff", "u8_blk", id="i8aff_u8blk"),
            pytest.param("i8_lblk", "i8_col", id="i8lblk_i8col"),
            pytest.param("i8_lblk", "i8_blk", id="i8lblk_i8blk"),
        ],
    )
    def test_matches_dequantized_reference(self, lname, rname):
        x = normal(0, (6, 32)) + 0.3
        w = normal(1, (32, 5))
        ql = quantize_jit(x, None, SPECS[lname])
        qr = quantize_jit(w, None, SPECS[rname])
        ref = np_dot_general(dequantize_f64(ql), dequantize_f64(qr), DENSE)
        tol = rounding_tol(dequantize_f64(ql), dequantize_f64(qr), DENSE)
        y = jax.jit(ops.dot_general, static_argnums=2)(ql, qr, DENSE)
        assert y.dtype == jnp.float32
        assert y.shape == (6, 5)
        np.testing.assert_array_less(np.abs(np.asarray(y, np.float64) - ref), tol)

    @settings(max_examples=5, deadline=None)
    @given(
        b=st.integers(1, 2),
        m=st.integers(1, 5),
        k=st.integers(1, 40),
        n=st.integers(1, 4),
        lfmt=st.sampled_from(["i8", "u8_aff", "i8_aff", "i16"]),
        rfmt=st.sampled_from(["i8", "i8_aff", "u8_aff", "i4"]),
        transpose_rhs=st.booleans(),
        seed=st.integers(0, 2**16),
    )
    def test_batched_dims_property(self, b, m, k, n, lfmt, rfmt, transpose_rhs, seed):
        """lhs (b, m, k) x rhs (b, k, n) or (b, n, k): any batch/contracting placement."""
        x = normal(seed, (b, m, k))
        w = normal(seed + 1, (b, n, k) if transpose_rhs else (b, k, n))
        dn = (((2,), (2 if transpose_rhs else 1,)), ((0,), (0,)))
        ql = quantize_jit(x, None, SPECS[lfmt])
        qr = quantize_jit(w, None, SPECS[rfmt])
        y = np.asarray(jax.jit(ops.dot_general, static_argnums=2)(ql, qr, dn), np.float64)
        ref = np_dot_general(dequantize_f64(ql), dequantize_f64(qr), dn)
        np.testing.assert_array_less(
            np.abs(y - ref), rounding_tol(dequantize_f64(ql), dequantize_f64(qr), dn)
        )

    def test_integer_values_are_exact(self):
        """Scale 1, zero points: the result is the exact integer sum (hand-checkable)."""
        v = np.array([[1, 2, 3], [250, 0, 7]], np.uint8)
        w = np.array([[1, -1], [2, 5], [-128, 3]], np.int8)
        ql = jq.QArray(
            jnp.asarray(v), jnp.ones((1, 1)), jnp.full((1, 1), 3, jnp.int32), "uint8", (2, 3)
        )
        qr = jq.QArray(
            jnp.asarray(w), jnp.ones((1, 2)), jnp.asarray([[2, -1]], jnp.int32), "int8", (3, 2)
        )
        # sum_k (v - 3)(w - z): row 0: (-2)(-1)+(-1)(0)+(0)(-130) = 2 ; (-2)(0)+(-1)(6)+0 = -6
        # row 1: 247*(-1) + (-3)*0 + 4*(-130) = -767 ; 247*0 + (-3)*6 + 4*4 = -2
        np.testing.assert_array_equal(ops.dot_general(ql, qr, DENSE), [[2.0, -6.0], [-767.0, -2.0]])

    def test_vmap_over_quantized_dot(self):
        x = normal(2, (3, 4, 16))
        qr = quantize_jit(normal(3, (16, 6)), None, SPECS["i8_col"])
        one = jax.jit(lambda a: ops.dot_general(a, qr, DENSE, lhs_spec=SPECS["i8"]))
        y = jax.jit(jax.vmap(one))(x)
        for i in range(3):
            np.testing.assert_allclose(y[i], one(x[i]), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------
# modes against the float dot, within the quantization bound
# ---------------------------------------------------------------------------------------
def _quant_bound(x, w, sx, sw):
    """|x.w - x^.w^| <= sum_k (S_x/2 |w| + |x^| S_w/2), elementwise, plus rounding."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    sx, sw = np.broadcast_to(sx, x.shape), np.broadcast_to(sw, w.shape)
    return 0.5 * (sx @ np.abs(w) + (np.abs(x) + sx) @ sw) + 1e-4


class TestModes:
    def setup_method(self):
        self.x = normal(10, (4, 48))
        self.w = normal(11, (48, 8), 0.2)
        self.ref = np.asarray(self.x, np.float64) @ np.asarray(self.w, np.float64)

    def _check(self, y, sx, sw):
        assert y.shape == (4, 8)
        np.testing.assert_array_less(
            np.abs(np.asarray(y, np.float64) - self.ref), _quant_bound(self.x, self.w, sx, sw)
        )

    def test_static(self, variant):
        spec = jq.QuantSpec("int8")
        qp = jq.qparams_from_range(-4.0, 4.0, spec)
        y = variant(
            lambda x, w: ops.dot_general(
                x, w, DENSE, lhs_spec=spec, lhs_qparams=qp, rhs_spec=SPECS["i8_col"]
            )
        )(self.x, self.w)
        sw = np.abs(np.asarray(self.w)).max(0, keepdims=True) / 127
        self._check(y, 4.0 / 127, sw)
        # equals the integer dot of the explicitly quantized operands
        ql = quantize_jit(self.x, qp, spec)
        qr = quantize_jit(self.w, None, SPECS["i8_col"])
        np.testing.assert_allclose(y, ops.dot_general(ql, qr, DENSE), rtol=1e-6, atol=1e-6)

    def test_dynamic_per_tensor(self, variant):
        y = variant(
            lambda x, w: ops.dot_general(
                x, w, DENSE, lhs_spec=SPECS["u8_aff"], rhs_spec=SPECS["i8_col"]
            )
        )(self.x, self.w)
        x = np.asarray(self.x)
        sx = (x.max() - x.min()) / 255
        sw = np.abs(np.asarray(self.w)).max(0, keepdims=True) / 127
        self._check(y, sx, sw)

    def test_dynamic_per_row(self, variant):
        x = self.x * jnp.asarray([[0.01], [1.0], [10.0], [100.0]])
        self.ref = np.asarray(x, np.float64) @ np.asarray(self.w, np.float64)
        y = variant(
            lambda x, w: ops.dot_general(
                x, w, DENSE, lhs_spec=SPECS["i8_row"], rhs_spec=SPECS["i8_col"]
            )
        )(x, self.w)
        sx = np.abs(np.asarray(x)).max(1, keepdims=True) / 127
        sw = np.abs(np.asarray(self.w)).max(0, keepdims=True) / 127
        self.x, xs = x, self.x
        self._check(y, sx, sw)
        self.x = xs
        # the small row keeps its own (tiny) scale: far better than per tensor
        y_tensor = ops.dot_general(x, self.w, DENSE, lhs_spec=SPECS["i8"], rhs_spec=SPECS["i8_col"])
        err_row = np.abs(np.asarray(y) - self.ref)[0].max()
        err_tensor = np.abs(np.asarray(y_tensor) - self.ref)[0].max()
        assert err_row * 100 < err_tensor

    @pytest.mark.parametrize(
        "name",
        [
            pytest.param("i8", id="int8_tensor"),
            pytest.param("i8_row", id="int8_row"),
            pytest.param("u8_aff", id="uint8_affine"),
            pytest.param("u8_row", id="uint8_row"),
            pytest.param("u8_sym", id="uint8_sym"),
            pytest.param("i16", id="int16"),
        ],
    )
    def test_dynamic_qparams_equal_min_max_qparams(self, name):
        x = self.x.at[1, 3].set(-7.5).at[2, 0].set(0.0)
        a = jax.jit(ops.dynamic_qparams, static_argnums=1)(x, SPECS[name])
        b = jq.qparams_from_array(x, SPECS[name])
        np.testing.assert_array_equal(a.scale, b.scale)
        assert (a.zero_point is None) == (b.zero_point is None)
        if a.zero_point is not None:
            np.testing.assert_array_equal(a.zero_point, b.zero_point)

    @pytest.mark.parametrize(
        "rname",
        [
            pytest.param("i8_col", id="int8"),
            pytest.param("i4_col", id="int4"),
            pytest.param("u8_col", id="uint8"),
        ],
    )
    def test_weight_only(self, rname):
        qr = quantize_jit(self.w, None, SPECS[rname])
        y = ops.dot_general(self.x, qr, DENSE)
        ref = np.asarray(self.x, np.float64) @ dequantize_f64(qr)
        np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
        # no integer quantization of the activation: the error is the weight's alone
        sw = np.asarray(qr.scale, np.float64)
        np.testing.assert_array_less(
            np.abs(np.asarray(y) - self.ref),
            0.5 * np.abs(np.asarray(self.x)) @ np.broadcast_to(sw, self.w.shape) + 1e-4,
        )

    def test_weight_only_bf16_activations(self):
        qr = quantize_jit(self.w, None, SPECS["i8_col"])
        xb = self.x.astype(jnp.bfloat16)
        y = ops.dot_general(xb, qr, DENSE, preferred_element_type=jnp.bfloat16)
        assert y.dtype == jnp.bfloat16
        ref = np.asarray(xb.astype(jnp.float32), np.float64) @ dequantize_f64(qr)
        np.testing.assert_allclose(np.asarray(y, np.float32), ref, rtol=2e-2, atol=2e-2)

    @pytest.mark.parametrize(
        "rname", [pytest.param("i4_blk", id="int4"), pytest.param("i8_blk", id="int8")]
    )
    def test_block_scaled_weight_only_and_integer(self, rname):
        qr = quantize_jit(self.w, None, SPECS[rname])
        assert qr.scale.shape == (6, 8)
        ref = np.asarray(self.x, np.float64) @ dequantize_f64(qr)
        np.testing.assert_allclose(ops.dot_general(self.x, qr, DENSE), ref, rtol=1e-5, atol=1e-5)
        ql = quantize_jit(self.x, None, SPECS["u8_aff"])
        y = ops.dot_general(ql, qr, DENSE)
        ref = dequantize_f64(ql) @ dequantize_f64(qr)
        np.testing.assert_array_less(
            np.abs(np.asarray(y) - ref), rounding_tol(dequantize_f64(ql), dequantize_f64(qr), DENSE)
        )

    def test_blocks_on_a_free_axis(self):
        """Blocks along the output axis are a coarse per-channel scale: no split needed."""
        spec = jq.QuantSpec("int8", scheme="affine", block_axis=1, block_size=4)
        qr = quantize_jit(self.w, None, spec)
        assert qr.scale.shape == (1, 2)
        ql = quantize_jit(self.x, None, SPECS["u8_aff"])
        ref = dequantize_f64(ql) @ dequantize_f64(qr)
        y = jax.jit(ops.dot_general, static_argnums=2)(ql, qr, DENSE)
        np.testing.assert_array_less(
            np.abs(np.asarray(y) - ref), rounding_tol(dequantize_f64(ql), dequantize_f64(qr), DENSE)
        )
        y = jax.jit(ops.dot_general, static_argnums=2)(self.x, qr, DENSE)
        ref = np.asarray(self.x, np.float64) @ dequantize_f64(qr)
        np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)

    @pytest.mark.parametrize(
        "fmt,dt",
        [
            pytest.param("bfloat16", ml_dtypes.bfloat16, id="bf16"),
            pytest.param("float16", np.float16, id="fp16"),
        ],
    )
    def test_half_formats_accumulate_in_float32(self, fmt, dt):
        spec = jq.QuantSpec(fmt)
        y = ops.dot_general(self.x, self.w, DENSE, lhs_spec=spec, rhs_spec=spec)
        xc = np.asarray(self.x).astype(dt).astype(np.float64)
        wc = np.asarray(self.w).astype(dt).astype(np.float64)
        np.testing.assert_allclose(y, xc @ wc, rtol=1e-5, atol=1e-5)
        assert y.dtype == jnp.float32

    def test_fp8_e4m3(self):
        spec = jq.QuantSpec("e4m3")
        ql = quantize_jit(self.x, None, spec)
        qr = quantize_jit(self.w, None, jq.QuantSpec("e4m3", axis=-1))
        assert ql.value.dtype == jnp.float8_e4m3fn
        y = ops.dot_general(ql, qr, DENSE)
        ref = _deq_float(ql) @ _deq_float(qr)
        np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
        # 3 mantissa bits: relative error per element <= 2^-4, so bounded by sum|x||w| / 8
        bound = np.abs(np.asarray(self.x)) @ np.abs(np.asarray(self.w)) / 8 + 1e-3
        np.testing.assert_array_less(np.abs(np.asarray(y) - self.ref), bound)

    def test_output_dtype(self):
        qr = quantize_jit(self.w, None, SPECS["i8_col"])
        y = ops.dot_general(
            self.x, qr, DENSE, preferred_element_type=jnp.bfloat16, lhs_spec=SPECS["i8"]
        )
        assert y.dtype == jnp.bfloat16
        y = ops.dot_general(
            self.x, qr, DENSE, preferred_element_type=jnp.int32, lhs_spec=SPECS["i8"]
        )
        assert y.dtype == jnp.float32
        # plain float operands: exactly jax.lax.dot_general
        np.testing.assert_array_equal(
            ops.dot_general(self.x, self.w, DENSE), jax.lax.dot_general(self.x, self.w, DENSE)
        )


def _deq_float(q):
    return np.asarray(q.value.astype(jnp.float32), np.float64) * np.asarray(q.scale, np.float64)


# ---------------------------------------------------------------------------------------
# accumulator overflow
# ---------------------------------------------------------------------------------------
class TestOverflow:
    def test_bounds_are_hand_computed(self):
        # floor((2^31 - 1) / (255 * 128)) = 65793; / (128 * 128) = 131071; / (32768 * 128) = 511
        assert ops.max_safe_contraction(np.uint8, np.int8) == 65793
        assert ops.max_safe_contraction(np.int8, np.int8) == 131071
        assert ops.max_safe_contraction(np.int16, np.int8) == 511

    def _extreme(self, k):
        ql = jq.QArray(jnp.full((2, k), 255, jnp.uint8), jnp.ones((1, 1)), None, "uint8", (2, k))
        qr = jq.QArray(jnp.full((k, 3), -128, jnp.int8), jnp.ones((1, 1)), None, "int8", (k, 3))
        return ql, qr

    @pytest.mark.parametrize(
        "k", [pytest.param(65793, id="at_bound"), pytest.param(70000, id="past_bound")]
    )
    def test_uint8_int8_never_wraps(self, k):
        ql, qr = self._extreme(k)
        y = jax.jit(ops.dot_general, static_argnums=2)(ql, qr, DENSE)
        exact = 255 * -128 * k  # -2,147,483,520 and -2,284,800,000: both exact in float32
        np.testing.assert_array_equal(y, np.full((2, 3), exact, np.float32))
        # a single int32 accumulation would have wrapped around: shown with a raw XLA:CPU dot
        # (XLA:GPU's raw integer dots are what jq works around: wrong at K = 3, tiny shapes
        # that do not compile)
        if k > 65793 and jax.default_backend() == "cpu":
            naive = jax.lax.dot_general(ql.value, qr.value, DENSE, preferred_element_type=jnp.int32)
            assert int(naive[0, 0]) != exact

    def test_int16_int8_long_contraction_is_exact(self):
        k = 600  # > 511: int16 x int8 in one int32 accumulator could overflow
        rng = np.random.default_rng(0)
        v = rng.choice([-32768, 32767, -32767, 30000], size=(3, k)).astype(np.int16)
        w = rng.choice([-128, 127], size=(k, 2)).astype(np.int8)
        ql = jq.QArray(jnp.asarray(v), jnp.ones((1, 1)), None, "int16", (3, k))
        qr = jq.QArray(jnp.asarray(w), jnp.ones((1, 1)), None, "int8", (k, 2))
        exact = v.astype(np.int64) @ w.astype(np.int64)
        y = np.asarray(ops.dot_general(ql, qr, DENSE), np.float64)
        # float32 result: within a few float32 ulps of the exact int64 sum
        np.testing.assert_allclose(y, exact, rtol=0, atol=4 * F32_EPS * np.abs(exact).max())
        v = np.full((1, k), -32768, np.int16)
        w = np.full((k, 1), -128, np.int8)
        ql = jq.QArray(jnp.asarray(v), jnp.ones((1, 1)), None, "int16", (1, k))
        qr = jq.QArray(jnp.asarray(w), jnp.ones((1, 1)), None, "int8", (k, 1))
        # 32768 * 128 * 600 = 2,516,582,400 > 2^31 - 1
        np.testing.assert_array_equal(ops.dot_general(ql, qr, DENSE), [[2516582400.0]])

    def test_int16_int16(self):
        v = np.full((1, 5), -32768, np.int16)
        ql = jq.QArray(jnp.asarray(v), jnp.ones((1, 1)), None, "int16", (1, 5))
        qr = jq.QArray(jnp.asarray(v.T.copy()), jnp.ones((1, 1)), None, "int16", (5, 1))
        np.testing.assert_array_equal(ops.dot_general(ql, qr, DENSE), [[5.0 * 2**30]])


# ---------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------
class TestErrors:
    def test_mismatched_contracting_dims(self):
        with pytest.raises(ValueError, match="contracting dimensions do not match"):
            ops.dot_general(jnp.ones((2, 3)), jnp.ones((4, 5)), DENSE, rhs_spec=SPECS["i8"])

    def test_per_channel_scale_on_contracting_axis(self):
        qr = quantize_jit(normal(40, (8, 4)), None, jq.QuantSpec("int8", axis=0))
        with pytest.raises(ValueError, match="axis 0, which is a contracting axis"):
            ops.dot_general(normal(41, (2, 8)), qr, DENSE, lhs_spec=SPECS["i8"])
        with pytest.raises(ValueError, match="axis 0, which is a contracting axis"):
            ops.dot_general(normal(41, (2, 8)), qr, DENSE)  # weight-only too
        with pytest.raises(ValueError, match="lhs axis 1, a contracting axis"):
            ops.dot_general(
                normal(41, (2, 8)),
                normal(40, (8, 4)),
                DENSE,
                lhs_spec=jq.QuantSpec("int8", axis=1),
                rhs_spec=SPECS["i8_col"],
            )

    def test_scale_axis_must_match_dimension_numbers(self):
        # quantized per output channel for (K, N), but used as an (N, K) weight
        qr = quantize_jit(normal(42, (8, 8)), None, jq.QuantSpec("int8", axis=1))
        dn_nk = (((1,), (1,)), ((), ()))
        with pytest.raises(ValueError, match="rhs.*axis 1"):
            ops.dot_general(normal(43, (2, 8)), qr, dn_nk, lhs_spec=SPECS["i8"])

    def test_formats_that_cannot_combine(self):
        ql = quantize_jit(normal(44, (2, 8)), None, jq.QuantSpec("e4m3"))
        qr = quantize_jit(normal(45, (8, 3)), None, SPECS["i8_col"])
        with pytest.raises(ValueError, match="cannot combine"):
            ops.dot_general(ql, qr, DENSE)

    def test_misaligned_blocks(self):
        ql = quantize_jit(
            normal(46, (2, 32)), None, jq.QuantSpec("int8", block_axis=1, block_size=16)
        )
        qr = quantize_jit(normal(47, (32, 3)), None, SPECS["i8_blk"])
        with pytest.raises(ValueError, match="do not line up"):
            ops.dot_general(ql, qr, DENSE)

    def test_bad_operands_and_arguments(self):
        with pytest.raises(TypeError, match="`lhs` must be a float array"):
            ops.dot_general(jnp.ones((2, 3), jnp.int32), jnp.ones((3, 2)), DENSE)
        with pytest.raises(ValueError, match="lhs_qparams was given without lhs_spec"):
            ops.dot_general(
                jnp.ones((2, 3)),
                jnp.ones((3, 2)),
                DENSE,
                lhs_qparams=jq.qparams_from_range(-1.0, 1.0, SPECS["i8"]),
            )
        with pytest.raises(ValueError, match="dimension_numbers"):
            ops.dot_general(jnp.ones((2, 3)), jnp.ones((3, 2)), (((1,), (0, 1)), ((), ())))
        with pytest.raises(ValueError, match="out of range"):
            ops.dot_general(jnp.ones((2, 3)), jnp.ones((3, 2)), (((2,), (0,)), ((), ())))
        with pytest.raises(TypeError, match="rhs_spec must be a jq.QuantSpec"):
            ops.dot_general(jnp.ones((2, 3)), jnp.ones((3, 2)), DENSE, rhs_spec="int8")
