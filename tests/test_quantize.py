"""Tests for `jq.quantize`: quantize / dequantize / fake_quant / LSQ, QArray, int4 packing."""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from jax.experimental import checkify

import jq

INT_FORMATS = ("int8", "uint8", "int16", "int4")
FP8 = {"float8_e4m3fn": ml_dtypes.float8_e4m3fn, "float8_e5m2": ml_dtypes.float8_e5m2}
CASTS = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
ALL_FORMATS = INT_FORMATS + tuple(FP8) + tuple(CASTS)


def _zp(q):
    return np.zeros(()) if q.zero_point is None else np.asarray(q.zero_point, np.float64)


def _np_quantize(x, scale, zp, qmin, qmax):
    """Reference: clip(round_half_even(x / S) + Z), in float64."""
    x = np.asarray(x, np.float64)
    return np.clip(np.round(x / np.float64(scale)) + zp, qmin, qmax)


# ---------------------------------------------------------------------------------------
# hand-computed cases
# ---------------------------------------------------------------------------------------
class TestHandComputed:
    @pytest.mark.parametrize(
        "fmt,scheme,s,z,x,expected",
        [
            # (format, scheme, S, Z, x, expected x_q); S are powers of 2, so x / S is exact
            # S = 1/64: x / S = [-128 -> clip, -64, 0, 32, 64, 127.36, 192 -> clip]
            pytest.param(
                "int8",
                "symmetric",
                1 / 64,
                None,
                [-2.0, -1.0, 0.0, 0.5, 1.0, 1.99, 3.0],
                [-127, -64, 0, 32, 64, 127, 127],
                id="int8_sym",
            ),
            # + Z = 128: [-134.4 -> clip, -128, -64, 0, 32, 64, 127.36, 160 -> clip] + 128
            pytest.param(
                "uint8",
                "symmetric",
                1 / 64,
                128,
                [-2.1, -2.0, -1.0, 0.0, 0.5, 1.0, 1.99, 2.5],
                [0, 0, 64, 128, 160, 192, 255, 255],
                id="uint8_sym",
            ),
            # S = 1/32, Z = 64: x / S = [-64, -96, 0, 16, 188.8, 192, 6.4] (+ 64, clip)
            pytest.param(
                "uint8",
                "affine",
                1 / 32,
                64,
                [-2.0, -3.0, 0.0, 0.5, 5.9, 6.0, 0.2],
                [0, 0, 64, 80, 253, 255, 70],
                id="uint8_aff",
            ),
            # S = 1/4, Z = -100: x / S = [-28, 0, 4.4, 224, 240] (- 100, clip)
            pytest.param(
                "int8",
                "affine",
                0.25,
                -100,
                [-7.0, 0.0, 1.1, 56.0, 60.0],
                [-128, -100, -96, 124, 127],
                id="int8_aff",
            ),
            # S = 1/2: x / S = [-2, -1, 0, 1.5, 2.5, 7, -8 -> -7 (narrow), 0.6]
            pytest.param(
                "int4",
                "symmetric",
                0.5,
                None,
                [-1.0, -0.5, 0.0, 0.75, 1.25, 3.5, -4.0, 0.3],
                [-2, -1, 0, 2, 2, 7, -7, 1],
                id="int4_sym",
            ),
            # S = 1/8, Z = 3: x / S = [-88, -8, 0, 4, 40] (+ 3, clip to [-8, 7])
            pytest.param(
                "int4",
                "affine",
                0.125,
                3,
                [-11.0, -1.0, 0.0, 0.5, 5.0],
                [-8, -5, 3, 7, 7],
                id="int4_aff",
            ),
            # S = 2^-13: x / S = [-32768 -> -32767, -8192, 0, 16384, 32767.9 -> clip]
            pytest.param(
                "int16",
                "symmetric",
                2.0**-13,
                None,
                [-4.0, -1.0, 0.0, 2.0, 3.99999],
                [-32767, -8192, 0, 16384, 32767],
                id="int16_sym",
            ),
        ],
    )
    def test_values(self, variant, fmt, scheme, s, z, x, expected):
        spec = jq.QuantSpec(fmt, scheme=scheme)
        qp = jq.QParams(jnp.float32(s), None if z is None else jnp.int32(z))
        x = jnp.array(x, jnp.float32)
        q = variant(lambda x: jq.quantize(x, qp, spec))(x)
        np.testing.assert_array_equal(q.int_value(), expected)
        assert q.int_value().dtype == jq.get_format(fmt).dtype
        deq = variant(jq.dequantize)(q)
        np.testing.assert_array_equal(deq, s * (np.array(expected) - (z or 0)))

    @pytest.mark.parametrize(
        "fmt,scheme,x,expected",
        [
            # min-max parameters from the data itself (qp=None), hand-computed
            # amax 2: S = 2/127, x / S = [-127, -63.5 -> -64 (half to even), 0, 31.75]
            pytest.param(
                "int8", "symmetric", [-2.0, -1.0, 0.0, 0.5], [-127, -64, 0, 32], id="int8_sym"
            ),
            # lo -1, hi 3: S = 4/255, Z = 64; x / S = [-63.75, 0, 31.875, 191.25]
            pytest.param(
                "uint8", "affine", [-1.0, 0.0, 0.5, 3.0], [0, 64, 96, 255], id="uint8_aff"
            ),
        ],
    )
    def test_values_from_data(self, variant, fmt, scheme, x, expected):
        spec = jq.QuantSpec(fmt, scheme=scheme)
        q = variant(lambda x: jq.quantize(x, None, spec))(jnp.array(x))
        np.testing.assert_array_equal(q.int_value(), expected)

    @pytest.mark.parametrize(
        "s", [pytest.param(2.0, id="S2"), pytest.param(0.25, id="S1/4"), pytest.param(8.0, id="S8")]
    )
    def test_round_half_to_even(self, variant, s):
        x = jnp.array([0.5, 1.5, 2.5, 3.5, -0.5, -1.5, -2.5, 0.49, 0.51], jnp.float32) * s
        spec = jq.QuantSpec("int8")
        q = variant(lambda x: jq.quantize(x, jq.QParams(jnp.float32(s)), spec))(x)
        np.testing.assert_array_equal(q.value, [0, 2, 2, 4, 0, -2, -2, 0, 1])
        # fake_quant rounds the same way
        y = variant(lambda x: jq.fake_quant(x, jq.QParams(jnp.float32(s)), spec))(x)
        np.testing.assert_array_equal(y, np.array([0, 2, 2, 4, 0, -2, -2, 0, 1]) * s)

    def test_round_half_to_even_with_zero_point(self):
        # ties are rounded before Z is added: 2.5 -> 2, then + 7
        spec = jq.QuantSpec("uint8", scheme="affine")
        qp = jq.QParams(jnp.float32(1.0), jnp.int32(7))
        q = jq.quantize(jnp.array([2.5, 3.5, -2.5]), qp, spec)
        np.testing.assert_array_equal(q.value, [9, 11, 5])

    def test_per_channel_hand(self):
        x = jnp.array([[1.0, -4.0], [-2.0, 2.0], [0.5, 1.0]])
        q = jq.quantize(x, None, jq.QuantSpec("int8", axis=-1))
        np.testing.assert_allclose(q.scale, [[2.0 / 127, 4.0 / 127]])
        np.testing.assert_array_equal(q.value, [[64, -127], [-127, 64], [32, 32]])
        q = jq.quantize(x, None, jq.QuantSpec("int8", axis=0))
        np.testing.assert_allclose(q.scale, [[4.0 / 127], [2.0 / 127], [1.0 / 127]])
        np.testing.assert_array_equal(q.value, [[32, -127], [-127, 127], [64, 127]])

    def test_per_block_hand(self):
        # blocks of 2: amax 2, 8, 0 -> S = 2/7, 8/7, 1 (zero block); x / S = 5.25, -7, 7, 4.375
        x = jnp.array([1.5, -2.0, 8.0, 5.0, 0.0, 0.0])
        q = jq.quantize(x, None, jq.QuantSpec("int4", block_axis=0, block_size=2))
        np.testing.assert_allclose(q.scale, [2.0 / 7, 8.0 / 7, 1.0])
        np.testing.assert_array_equal(q.int_value(), [5, -7, 7, 4, 0, 0])


# ---------------------------------------------------------------------------------------
# every format
# ---------------------------------------------------------------------------------------
class TestFormats:
    @pytest.mark.parametrize(
        "fmt", [pytest.param("float8_e4m3fn", id="e4m3"), pytest.param("float8_e5m2", id="e5m2")]
    )
    def test_fp8_matches_a_cast_and_saturates(self, variant, fmt):
        dtype, fmax = FP8[fmt], float(ml_dtypes.finfo(FP8[fmt]).max)
        x = jax.random.normal(jax.random.key(0), (64,)) * 3.0
        qp = jq.QParams(jnp.float32(0.01))
        q = variant(lambda x: jq.quantize(x, qp, jq.QuantSpec(fmt)))(x)
        assert q.value.dtype == dtype
        ref = np.clip(np.asarray(x) / np.float32(0.01), -fmax, fmax).astype(dtype)
        np.testing.assert_array_equal(
            np.asarray(q.value).astype(np.float32), ref.astype(np.float32)
        )
        # far outside: saturates to +-max, never inf or NaN
        big = jnp.array([1e6, -1e6, jnp.inf, -jnp.inf], jnp.float32)
        q = variant(lambda x: jq.quantize(x, jq.QParams(jnp.float32(1.0)), jq.QuantSpec(fmt)))(big)
        np.testing.assert_array_equal(np.asarray(q.value, np.float32), [fmax, -fmax, fmax, -fmax])

    def test_fp8_per_tensor_scale_fills_range(self, variant):
        x = jnp.array([-3.0, 0.5, 1.5], jnp.float32)
        q = variant(lambda x: jq.quantize(x, None, jq.QuantSpec("e4m3")))(x)
        np.testing.assert_allclose(q.scale, 3.0 / 448)
        assert float(q.value[0].astype(jnp.float32)) == -448.0
        np.testing.assert_allclose(jq.dequantize(q), x, rtol=2.0**-4)

    @pytest.mark.parametrize(
        "fmt", [pytest.param("float16", id="fp16"), pytest.param("bfloat16", id="bf16")]
    )
    def test_saturating_casts(self, variant, fmt):
        dtype = CASTS[fmt]
        fmax = float(ml_dtypes.finfo(dtype).max)
        x = jnp.array([1.0, -2.5, 1e-3, 3.0e38, -3.0e38, jnp.inf, -jnp.inf, 70000.0], jnp.float32)
        q = variant(lambda x: jq.quantize(x, None, jq.QuantSpec(fmt)))(x)
        assert q.value.dtype == dtype
        np.testing.assert_array_equal(q.scale, 1.0)
        got = np.asarray(q.value).astype(np.float32)
        ref = np.clip(np.asarray(x), -fmax, fmax).astype(dtype).astype(np.float32)
        np.testing.assert_array_equal(got, ref)
        assert np.all(np.isfinite(got))
        assert got[5] == fmax
        assert got[6] == -fmax

    def test_int16(self):
        x = jnp.linspace(-1.0, 1.0, 1001)
        q = jq.quantize(x, None, jq.QuantSpec("int16"))
        assert q.value.dtype == jnp.int16
        np.testing.assert_allclose(jq.dequantize(q), x, atol=0.5 / 32767 + 1e-7)


class TestInt4Packing:
    def test_nibble_layout(self):
        # element 2i -> low nibble, 2i + 1 -> high nibble, two's complement
        packed = jq.pack_int4(jnp.array([1, -1, -8, 7, 0, 3], jnp.int8))
        np.testing.assert_array_equal(packed, [0xF1, 0x78, 0x30])
        assert packed.dtype == jnp.uint8

    @pytest.mark.parametrize("n", [1, 2, 5, 8, 13])
    def test_round_trip_all_values(self, n):
        rng = np.random.default_rng(n)
        v = rng.integers(-8, 8, size=(3, n)).astype(np.int8)
        v[0, 0] = -8
        packed = jq.pack_int4(v)
        assert packed.shape == (3, (n + 1) // 2)
        np.testing.assert_array_equal(jq.unpack_int4(packed, n), v)

    @pytest.mark.parametrize("axis", [0, 1, -2])
    def test_round_trip_other_axes(self, axis):
        v = np.random.default_rng(0).integers(-8, 8, size=(5, 3, 7)).astype(np.int32)
        packed = jq.pack_int4(v, axis=axis)
        np.testing.assert_array_equal(jq.unpack_int4(packed, v.shape[axis], axis=axis), v)

    def test_qarray_takes_half_the_bytes(self):
        x = jax.random.normal(jax.random.key(1), (16, 32))
        q8 = jq.quantize(x, None, jq.QuantSpec("int8"))
        q4 = jq.quantize(x, None, jq.QuantSpec("int4"))
        assert q4.value.nbytes * 2 == q8.value.nbytes
        assert q4.value.dtype == jnp.uint8
        assert q4.value.shape == (16, 16)
        assert q4.shape == (16, 32)
        assert q4.nbytes < q8.nbytes

    def test_odd_length_qarray(self, variant):
        x = jnp.array([[-1.0, 0.3, 1.0], [0.5, -0.25, 0.0]])
        spec = jq.QuantSpec("int4", axis=0)
        q = variant(lambda x: jq.quantize(x, None, spec))(x)
        assert q.value.shape == (2, 2)
        ref = _np_quantize(x, np.asarray(q.scale), 0, -7, 7)
        np.testing.assert_array_equal(q.int_value(), ref)
        np.testing.assert_allclose(jq.dequantize(q), ref * np.asarray(q.scale), rtol=1e-6)

    def test_out_of_range_raises(self):
        for bad in ([0, 8], [-9, 0]):
            with pytest.raises(ValueError, match=r"pack_int4: `values` must lie in the int4 range"):
                jq.pack_int4(jnp.array(bad, jnp.int8))

    def test_out_of_range_under_jit_via_checkify(self):
        with jq.value_checks():
            f = checkify.checkify(jax.jit(jq.pack_int4), errors=checkify.user_checks)
            err, _ = f(jnp.array([0, 9], jnp.int8))
            assert "outside the int4 range" in err.get()
            err, _ = f(jnp.array([0, 7], jnp.int8))
            assert err.get() is None

    def test_non_integer_raises(self):
        with pytest.raises(TypeError, match="pack_int4: `values` must be an integer array"):
            jq.pack_int4(jnp.array([0.5]))
        with pytest.raises(TypeError, match="unpack_int4: `packed` must be uint8"):
            jq.unpack_int4(jnp.array([1], jnp.int8), 2)


# ---------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------
class TestBadInput:
    def test_non_float_input(self):
        for fn in (jq.quantize, jq.fake_quant):
            with pytest.raises(
                TypeError, match=r"`x` must be a floating-point array, got dtype int32"
            ):
                fn(jnp.arange(4), None, jq.QuantSpec("int8"))
        with pytest.raises(TypeError, match="lsq_fake_quant: `x` must be a floating-point"):
            jq.lsq_fake_quant(jnp.arange(4), jq.QParams(jnp.float32(1.0)), jq.QuantSpec("int8"))

    def test_axis_out_of_range(self):
        with pytest.raises(
            ValueError, match=r"QuantSpec.axis=-3 is out of range for `x` of rank 2"
        ):
            jq.quantize(jnp.ones((2, 3)), None, jq.QuantSpec("int8", axis=-3))

    def test_block_does_not_divide(self):
        with pytest.raises(ValueError, match="block_size=4 does not divide"):
            jq.fake_quant(jnp.ones((6,)), None, jq.QuantSpec("int8", block_axis=0, block_size=4))

    def test_dequantize_needs_qarray(self):
        with pytest.raises(TypeError, match="dequantize: expected a QArray"):
            jq.dequantize(jnp.ones(3))

    def test_lsq_needs_integer_format(self):
        with pytest.raises(ValueError, match="lsq_fake_quant: needs an integer format"):
            jq.lsq_fake_quant(jnp.ones(3), jq.QParams(jnp.float32(1.0)), jq.QuantSpec("e4m3"))

    def test_bad_range_through_quantize(self):
        with pytest.raises(ValueError, match="lo/hi must be finite"):
            jq.quantize(jnp.array([1.0, jnp.nan]), None, jq.QuantSpec("int8"))

    def test_nan_with_given_qparams_raises(self):
        """NaN has no integer code: with given QParams it would silently become 0."""
        spec = jq.QuantSpec("int8")
        qp = jq.qparams_from_range(-1.0, 1.0, spec)
        with pytest.raises(ValueError, match="1 NaN value.*no integer code"):
            jq.quantize(jnp.array([0.5, jnp.nan, 0.25]), qp, spec)
        # +-inf saturates to the ends of the grid (as ONNX QuantizeLinear does)
        q = jq.quantize(jnp.array([jnp.inf, -jnp.inf]), qp, spec)
        np.testing.assert_array_equal(np.asarray(q.int_value()), [127, -127])

    def test_empty_dynamic_dot(self):
        """An empty batch through a dynamic dot gives an empty result, not a reduction error."""
        w = jq.quantize(jnp.ones((4, 3)), None, jq.QuantSpec("int8", axis=-1))
        dn = (((1,), (0,)), ((), ()))
        for spec in (jq.QuantSpec("int8"), jq.QuantSpec("uint8", scheme="affine")):
            out = jq.ops.dot_general(jnp.zeros((0, 4)), w, dn, lhs_spec=spec)
            assert out.shape == (0, 3)


# ---------------------------------------------------------------------------------------
# fake quant and LSQ
# ---------------------------------------------------------------------------------------
class TestFakeQuant:
    @pytest.mark.parametrize("fmt", ALL_FORMATS)
    def test_forward_equals_quantize_dequantize(self, variant, fmt):
        x = jax.random.normal(jax.random.key(2), (4, 6)) * 2.0
        for axis in (None, -1):
            spec = jq.QuantSpec(fmt, axis=axis)
            qp = jq.qparams_from_array(x * 0.7, spec)  # some values get clipped
            y = variant(lambda x, qp=qp, spec=spec: jq.fake_quant(x, qp, spec))(x)
            np.testing.assert_array_equal(y, jq.dequantize(jq.quantize(x, qp, spec)))

    def test_forward_keeps_dtype(self):
        x = jnp.linspace(-1, 1, 9, dtype=jnp.bfloat16)
        assert jq.fake_quant(x, None, jq.QuantSpec("int8")).dtype == jnp.bfloat16

    def test_ste_gradient(self, variant):
        # S = 0.1, int8 symmetric grid [-127, 127] -> clipping range [-12.7, 12.7] (+- S/2
        # before rounding): round(x / S) in [-127, 127] gives 1, else 0.
        spec = jq.QuantSpec("int8")
        qp = jq.QParams(jnp.float32(0.1))
        x = jnp.array([0.0, 1.23, -5.0, 12.7, 12.74, 12.76, -12.74, -12.76, 100.0, -100.0])
        expected = [1, 1, 1, 1, 1, 0, 1, 0, 0, 0]
        g = variant(jax.grad(lambda x: jq.fake_quant(x, qp, spec).sum()))(x)
        np.testing.assert_array_equal(g, expected)
        # upstream cotangent passes straight through inside
        ct = jnp.arange(10.0)
        _, vjp = jax.vjp(lambda x: jq.fake_quant(x, qp, spec), x)
        np.testing.assert_array_equal(vjp(ct)[0], ct * np.array(expected))

    def test_ste_gradient_affine_and_fp8(self):
        spec = jq.QuantSpec("uint8", scheme="affine")
        qp = jq.QParams(jnp.float32(1.0), jnp.int32(10))
        x = jnp.array([-10.0, -10.6, 245.0, 245.6, 0.0])  # grid covers [-10, 245]
        g = jax.grad(lambda x: jq.fake_quant(x, qp, spec).sum())(x)
        np.testing.assert_array_equal(g, [1, 0, 1, 0, 1])
        spec = jq.QuantSpec("e4m3")
        qp = jq.QParams(jnp.float32(0.5))
        x = jnp.array([224.0, -224.0, 224.5, -300.0, 3.0])  # |x / S| <= 448 inside
        g = jax.grad(lambda x: jq.fake_quant(x, qp, spec).sum())(x)
        np.testing.assert_array_equal(g, [1, 1, 0, 0, 1])

    def test_no_gradient_to_qparams(self):
        spec = jq.QuantSpec("uint8", scheme="affine")
        x = jnp.linspace(-1, 3, 7)

        def f(scale):
            return jq.fake_quant(x, jq.QParams(scale, jnp.int32(64)), spec).sum()

        assert float(jax.grad(f)(jnp.float32(4 / 255))) == 0.0

    def test_dynamic_range_gradient_is_one(self):
        # qp=None: min-max of x itself, so nothing is clipped and the gradient is 1
        x = jax.random.normal(jax.random.key(3), (5, 4))
        g = jax.grad(lambda x: jq.fake_quant(x, None, jq.QuantSpec("int8", axis=0)).sum())(x)
        np.testing.assert_array_equal(g, 1.0)


class TestLsq:
    def _reference(self, x, s, z, qmin, qmax, g):
        """LSQ / LSQ+ gradients from the formulas in lsq_fake_quant's docstring (float64)."""
        x = np.asarray(x, np.float64)
        zr = np.round(z)
        v = x / s + zr
        rv = np.round(v)
        inside = (rv >= qmin) & (rv <= qmax)
        qc = np.clip(rv, qmin, qmax)
        y = (qc - zr) * s
        dx = inside.astype(np.float64)
        ds = np.where(inside, rv - v, qc - zr).sum() * g
        dz = np.where(inside, 0.0, -s).sum() * g
        return y, dx, ds, dz

    @pytest.mark.parametrize(
        "fmt,scheme,s,z",
        [
            pytest.param("int8", "symmetric", 0.05, None, id="int8_sym"),
            pytest.param("uint8", "affine", 0.03, 100.0, id="uint8_aff"),
            pytest.param("int4", "affine", 0.4, -2.0, id="int4_aff"),
            pytest.param("int4", "symmetric", 0.3, None, id="int4_sym"),
        ],
    )
    def test_gradients_match_formulas(self, variant, fmt, scheme, s, z):
        spec = jq.QuantSpec(fmt, scheme=scheme)
        x = jax.random.normal(jax.random.key(4), (8, 16)) * 2.0
        x = x.at[0, :4].set(jnp.array([s * spec.qmax, s * (spec.qmin - (z or 0)), 1e3, -1e3]))

        def loss(x, scale, zp):
            qp = jq.QParams(scale, zp)
            return jq.lsq_fake_quant(x, qp, spec).sum()

        zp = None if z is None else jnp.float32(z)
        argnums = (0, 1) if z is None else (0, 1, 2)
        y = variant(lambda x: jq.lsq_fake_quant(x, jq.QParams(jnp.float32(s), zp), spec))(x)
        grads = variant(jax.grad(loss, argnums=argnums))(x, jnp.float32(s), zp)
        g = 1.0 / math.sqrt(x.size * spec.qmax)
        y_ref, dx, ds, dz = self._reference(x, s, 0.0 if z is None else z, spec.qmin, spec.qmax, g)
        np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(grads[0], dx)
        np.testing.assert_allclose(grads[1], ds, rtol=1e-4, atol=1e-6)
        if z is not None:
            np.testing.assert_allclose(grads[2], dz, rtol=1e-5)
        # the forward pass is the plain fake quant
        zq = None if z is None else jnp.int32(round(z))
        np.testing.assert_allclose(
            y, jq.fake_quant(x, jq.QParams(jnp.float32(s), zq), spec), atol=1e-6
        )

    def test_grad_scale_override_and_per_channel(self):
        spec = jq.QuantSpec("int8", axis=-1)
        x = jax.random.normal(jax.random.key(5), (6, 3))
        s = jnp.array([0.01, 0.02, 0.05])
        ds = jax.grad(lambda s: jq.lsq_fake_quant(x, jq.QParams(s), spec, grad_scale=1.0).sum())(s)
        ds_ref = [self._reference(x[:, c], float(s[c]), 0.0, -127, 127, 1.0)[2] for c in range(3)]
        np.testing.assert_allclose(ds, ds_ref, rtol=1e-4, atol=1e-6)
        # the default scale is 1 / sqrt(numel * qmax) with numel of the whole tensor
        ds_default = jax.grad(lambda s: jq.lsq_fake_quant(x, jq.QParams(s), spec).sum())(s)
        np.testing.assert_allclose(ds_default, ds * (1 / math.sqrt(18 * 127)), rtol=1e-6)

    def test_top_of_grid_gets_full_gradient(self):
        # values that round to qmax are inside: gradient 1, not clip's tie value 1/2
        spec = jq.QuantSpec("int8")
        x = jnp.array([1.0, 127.4 / 127, -1.0])
        g = jax.grad(lambda x: jq.lsq_fake_quant(x, jq.QParams(jnp.float32(1 / 127)), spec).sum())(
            x
        )
        np.testing.assert_array_equal(g, [1.0, 1.0, 1.0])


# ---------------------------------------------------------------------------------------
# transformations and pytrees
# ---------------------------------------------------------------------------------------
class TestTransform:
    @pytest.mark.parametrize("fmt", ALL_FORMATS)
    def test_jit_equals_eager(self, fmt):
        x = jax.random.normal(jax.random.key(6), (4, 9))
        spec = jq.QuantSpec(fmt, axis=0)
        eager = jq.quantize(x, None, spec)
        jitted = jax.jit(lambda x: jq.quantize(x, None, spec))(x)
        chex.assert_trees_all_equal(eager, jitted)
        np.testing.assert_array_equal(jax.jit(jq.dequantize)(eager), jq.dequantize(eager))

    @pytest.mark.parametrize(
        "fmt",
        [
            pytest.param("int8", id="int8"),
            pytest.param("int4", id="int4"),
            pytest.param("uint8", id="uint8"),
        ],
    )
    def test_vmap(self, fmt):
        # jitted: one compile per function instead of one per primitive (fast tests);
        # the eager paths are covered by the without_jit variants above
        xs = jax.random.normal(jax.random.key(7), (3, 4, 5))
        spec = jq.QuantSpec(fmt, scheme="affine", axis=-1)
        qdq = jax.jit(lambda x: jq.dequantize(jq.quantize(x, None, spec)))
        ref = jnp.stack([qdq(x) for x in xs])
        # inside vmap
        np.testing.assert_array_equal(jax.jit(jax.vmap(qdq))(xs), ref)
        # a QArray made under vmap dequantizes outside it (static shape is per example)
        q = jax.jit(jax.vmap(lambda x: jq.quantize(x, None, spec)))(xs)
        np.testing.assert_array_equal(jax.jit(jq.dequantize)(q), ref)
        # and a stacked QArray sliced by vmap dequantizes inside it
        np.testing.assert_array_equal(jax.jit(jax.vmap(jq.dequantize))(q), ref)
        f = jax.jit(jax.vmap(lambda x: jq.fake_quant(x, None, spec)))
        np.testing.assert_allclose(f(xs), ref, rtol=1e-6)

    def test_grad_through_quantize_dequantize(self):
        # quantize is piecewise constant: its gradient is 0 (jnp.round has a zero derivative)
        spec = jq.QuantSpec("int8")
        qp = jq.QParams(jnp.float32(0.1))
        g = jax.grad(lambda x: jq.dequantize(jq.quantize(x, qp, spec)).sum())(jnp.ones(3))
        np.testing.assert_array_equal(g, 0.0)
        # dequantize is linear in the scale: d/dS sum(S (q - Z)) = sum(q - Z)
        q = jq.quantize(jnp.array([1.0, -0.5, 0.3]), qp, spec)
        gs = jax.grad(
            lambda s: jq.dequantize(q.__class__(q.value, s, None, q.format, q.shape)).sum()
        )(jnp.float32(0.1))
        np.testing.assert_allclose(gs, float(np.asarray(q.value, np.float64).sum()))

    @pytest.mark.parametrize(
        "fmt",
        [
            pytest.param("int8", id="int8"),
            pytest.param("int4", id="int4"),
            pytest.param("uint8", id="uint8"),
        ],
    )
    def test_qarray_pytree(self, fmt):
        x = jax.random.normal(jax.random.key(8), (4, 6))
        q = jq.quantize(x, None, jq.QuantSpec(fmt, scheme="affine", axis=0))
        leaves, tree = jax.tree_util.tree_flatten(q)
        assert len(leaves) == 3
        back = jax.tree_util.tree_unflatten(tree, leaves)
        assert isinstance(back, jq.QArray)
        chex.assert_trees_all_equal(back, q)
        assert (back.format, back.shape, back.pack_axis) == (q.format, q.shape, q.pack_axis)
        # through jit as an argument and a result
        out = jax.jit(lambda q: q)(q)
        chex.assert_trees_all_equal(out, q)
        np.testing.assert_array_equal(jax.jit(jq.dequantize)(q), jq.dequantize(q))

    def test_bit_identical_eager_jit_constant_and_argument(self):
        # x / S is computed as x * (1 / S), so a scale that is a jit constant, a jit
        # argument or an eager array gives the same codes, even next to ties
        s = 0.1
        k = jnp.arange(-60, 60, dtype=jnp.float32)
        x = jnp.concatenate([(k + 0.5) * s, jnp.nextafter((k + 0.5) * s, 0.0)])
        qp = jq.QParams(jnp.float32(s))
        for spec in (jq.QuantSpec("int8"), jq.QuantSpec("int8", axis=0)):
            qpc = jq.QParams(jnp.full((x.shape[0],), s)) if spec.axis else qp
            eager = jq.quantize(x, qpc, spec).value
            const = jax.jit(lambda x, qpc=qpc, spec=spec: jq.quantize(x, qpc, spec).value)(x)
            arg = jax.jit(lambda x, q, spec=spec: jq.quantize(x, q, spec).value)(x, qpc)
            np.testing.assert_array_equal(eager, const)
            np.testing.assert_array_equal(eager, arg)
            # and the reference: round_half_even(x * float32(1 / S))
            ref = np.round(np.asarray(x) * (np.float32(1) / np.float32(s)))
            np.testing.assert_array_equal(eager, ref)

    def test_qparams_bit_identical_eager_and_jit(self):
        lo = jnp.array([-0.3, -1.7, 0.0, -5e-3])
        hi = jnp.array([0.9, 0.2, 3.3, 7e-3])
        for fmt, scheme in (("int8", "symmetric"), ("uint8", "symmetric"), ("uint8", "affine")):
            spec = jq.QuantSpec(fmt, scheme=scheme)
            eager = jq.qparams_from_range(lo, hi, spec)
            jitted = jax.jit(lambda lo, hi, spec=spec: jq.qparams_from_range(lo, hi, spec))(lo, hi)
            chex.assert_trees_all_equal(eager, jitted)
            # per channel == per tensor, bit for bit
            for i in range(4):
                one = jq.qparams_from_range(lo[i], hi[i], spec)
                assert float(one.scale) == float(eager.scale[i])

    def test_no_retrace_for_new_values(self):
        spec = jq.QuantSpec("int8", axis=-1)

        @jax.jit
        @chex.assert_max_traces(n=1)
        def f(x):
            return jq.dequantize(jq.quantize(x, None, spec))

        for i in range(3):
            f(jax.random.normal(jax.random.key(i), (2, 3)))


# ---------------------------------------------------------------------------------------
# properties
# ---------------------------------------------------------------------------------------
_EPS = float(np.finfo(np.float32).eps)


@st.composite
def _range_and_values(draw, fmt_choices=INT_FORMATS):
    fmt = draw(st.sampled_from(fmt_choices))
    scheme = draw(st.sampled_from(("symmetric", "affine")))
    a = draw(st.floats(-1e3, 1e3, width=32))
    b = draw(st.floats(-1e3, 1e3, width=32))
    lo, hi = min(a, b), max(a, b)
    # one fixed length: every example reuses the same compiled kernels
    u = draw(hnp.arrays(np.float32, 8, elements=st.floats(0, 1, width=32)))
    return fmt, scheme, lo, hi, u


@given(_range_and_values())
def test_round_trip_error_at_most_half_step(case):
    fmt, scheme, lo, hi, u = case
    spec = jq.QuantSpec(fmt, scheme=scheme)
    qp = jq.qparams_from_range(lo, hi, spec)
    lo0, hi0 = min(lo, 0.0), max(hi, 0.0)
    x = np.clip(np.float32(lo0) + u * np.float32(hi0 - lo0), lo0, hi0).astype(np.float32)
    y = np.asarray(jq.dequantize(jq.quantize(jnp.asarray(x), qp, spec)), np.float64)
    s = float(qp.scale)
    bound = 0.5 * s + 8 * _EPS * (np.abs(x) + max(-lo0, hi0))
    assert np.all(np.abs(y - x) <= bound), (np.abs(y - x).max(), s)


@given(_range_and_values(INT_FORMATS + tuple(FP8)), st.floats(1.0, 10.0))
def test_idempotence(case, stretch):
    fmt, scheme, lo, hi, u = case
    if fmt in FP8:
        scheme = "symmetric"
    spec = jq.QuantSpec(fmt, scheme=scheme)
    qp = jq.qparams_from_range(lo, hi, spec)
    lo0, hi0 = min(lo, 0.0), max(hi, 0.0)
    x = (lo0 + u * (hi0 - lo0)) * stretch - (stretch - 1) * lo0  # some beyond the range
    q = jq.quantize(jnp.asarray(x, jnp.float32), qp, spec)
    q2 = jq.quantize(jq.dequantize(q), qp, spec)
    np.testing.assert_array_equal(np.asarray(q2.value), np.asarray(q.value))
    np.testing.assert_array_equal(jq.dequantize(q2), jq.dequantize(q))


@given(_range_and_values(), st.floats(0.51, 1e4))
def test_clipping_outside_range(case, beyond):
    fmt, scheme, lo, hi, u = case
    spec = jq.QuantSpec(fmt, scheme=scheme)
    qp = jq.qparams_from_range(lo, hi, spec)
    s, z = float(qp.scale), float(0 if qp.zero_point is None else qp.zero_point)
    # the representable range is [S (qmin - Z), S (qmax - Z)]; beyond its edge by more
    # than S/2, values clip to the grid's ends
    top = s * (spec.qmax - z + beyond + u)
    bottom = s * (spec.qmin - z - beyond - u)
    q_top = jq.quantize(jnp.asarray(top, jnp.float32), qp, spec)
    q_bot = jq.quantize(jnp.asarray(bottom, jnp.float32), qp, spec)
    np.testing.assert_array_equal(q_top.int_value(), spec.qmax)
    np.testing.assert_array_equal(q_bot.int_value(), spec.qmin)
    np.testing.assert_allclose(jq.dequantize(q_top), s * (spec.qmax - z), rtol=1e-6)


@given(
    hnp.arrays(np.float32, 8, elements=st.floats(-1e4, 1e4, width=32)),
    st.floats(1e-3, 1e3),
    st.sampled_from(["int8", "int4", "int16"]),
)
def test_symmetric_never_uses_most_negative_code(x, s, fmt):
    spec = jq.QuantSpec(fmt)
    for qp in (None, jq.QParams(jnp.float32(s))):
        v = np.asarray(jq.quantize(jnp.asarray(x), qp, spec).int_value())
        assert v.min() >= -jq.get_format(fmt).qmax, v.min()


@functools.partial(jax.jit, static_argnames="spec")
def _qdq(x, spec):
    """Min-max quantize `x` (jitted: one compile per shape and spec keeps tests fast)."""
    q = jq.quantize(x, None, spec)
    return q.int_value(), jq.dequantize(q), q.scale


def _per_tensor_each(pieces, spec):
    """Per-tensor `_qdq` of each `pieces[i]` (vmap: one compile for all the pieces)."""
    return jax.vmap(functools.partial(_qdq, spec=spec))(jnp.asarray(pieces))


@st.composite
def _tensor_and_axis(draw):
    # a few shapes of rank 1 to 3 (size-1 axes included); few shapes keep compiles few
    shape = draw(st.sampled_from([(5,), (3, 4), (2, 1, 3)]))
    ndim = len(shape)
    axis = draw(st.integers(-ndim, ndim - 1))
    x = draw(hnp.arrays(np.float32, shape, elements=st.floats(-100, 100, width=32)))
    fmt = draw(st.sampled_from(INT_FORMATS + ("e4m3",)))
    scheme = "symmetric" if fmt == "e4m3" else draw(st.sampled_from(("symmetric", "affine")))
    return x, axis, fmt, scheme


@settings(max_examples=12)  # two compiles per example
@given(_tensor_and_axis())
def test_per_channel_equals_per_tensor_by_channel(case):
    x, axis, fmt, scheme = case
    v, y, s = _qdq(jnp.asarray(x), spec=jq.QuantSpec(fmt, scheme=scheme, axis=axis))
    # channel i of the result == per-tensor quantization of x[..., i, ...]
    vt, yt, st_ = _per_tensor_each(np.moveaxis(x, axis, 0), jq.QuantSpec(fmt, scheme=scheme))
    np.testing.assert_array_equal(np.moveaxis(np.asarray(v), axis, 0), vt)
    np.testing.assert_array_equal(np.moveaxis(np.asarray(y), axis, 0), yt)
    np.testing.assert_array_equal(np.asarray(s).ravel(), np.asarray(st_).ravel())


@st.composite
def _tensor_and_block(draw):
    bs = draw(st.sampled_from([1, 2, 3, 6]))  # the divisors of 6
    baxis = draw(st.sampled_from([0, 1, -1, -2]))
    shape = (6, 3) if baxis % 2 == 0 else (3, 6)
    x = draw(hnp.arrays(np.float32, shape, elements=st.floats(-100, 100, width=32)))
    fmt = draw(st.sampled_from(INT_FORMATS + ("e5m2",)))
    scheme = "symmetric" if fmt == "e5m2" else draw(st.sampled_from(("symmetric", "affine")))
    channel = draw(st.booleans())
    return x, baxis, bs, fmt, scheme, channel


def _blocks(a, b, bs, channel):
    """Pieces of a (6, 3) / (3, 6) array: blocks along axis b, or blocks x channels."""
    a = np.moveaxis(np.asarray(a), b, 0).reshape(6 // bs, bs, 3)
    if channel:  # one block of one channel per piece
        return a.transpose(0, 2, 1).reshape(-1, bs)
    return a


@settings(max_examples=12)  # two compiles per example
@given(_tensor_and_block())
def test_per_block_equals_per_tensor_by_block(case):
    x, baxis, bs, fmt, scheme, channel = case
    b = baxis % 2
    caxis = 1 - b if channel else None
    spec = jq.QuantSpec(fmt, scheme=scheme, axis=caxis, block_axis=baxis, block_size=bs)
    v, y, _ = _qdq(jnp.asarray(x), spec=spec)
    vt, yt, _ = _per_tensor_each(_blocks(x, b, bs, channel), jq.QuantSpec(fmt, scheme=scheme))
    np.testing.assert_array_equal(_blocks(v, b, bs, channel), vt)
    np.testing.assert_array_equal(_blocks(y, b, bs, channel), yt)


@given(
    hnp.arrays(np.int8, st.sampled_from([(2, 5), (3, 4), (1, 1)]), elements=st.integers(-8, 7)),
    st.sampled_from([0, 1, -1, -2]),
)
def test_pack_unpack_round_trip(v, axis):
    packed = jq.pack_int4(v, axis=axis)
    assert packed.shape[axis] == (v.shape[axis] + 1) // 2
    np.testing.assert_array_equal(jq.unpack_int4(packed, v.shape[axis], axis=axis), v)


@given(_range_and_values())
def test_quantize_matches_numpy_reference(case):
    fmt, scheme, lo, hi, u = case
    assume(hi - lo > 1e-3)
    spec = jq.QuantSpec(fmt, scheme=scheme)
    qp = jq.qparams_from_range(lo, hi, spec)
    x = (np.float32(lo) + u * np.float32(hi - lo)) * np.float32(1.5)
    q = jq.quantize(jnp.asarray(x), qp, spec)
    inv = np.float32(1) / np.float32(qp.scale)
    # the reference multiplies by the float32 reciprocal too (quantize's docstring),
    # so ties and near-ties agree exactly
    ref = np.clip(np.round(x * inv) + _zp(q), spec.qmin, spec.qmax)
    np.testing.assert_array_equal(np.asarray(q.int_value(), np.float64), ref)
