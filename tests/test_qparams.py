"""Tests for `jq.qparams`: QuantSpec, qparams_from_range / _from_array, broadcasting."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jax.experimental import checkify

import jq
from jq.qparams import broadcast_qparams, reduce_range

INT_FORMATS = ("int8", "uint8", "int16", "int4")
SCHEMES = ("symmetric", "affine")


def _zp(qp):
    return 0 if qp.zero_point is None else np.asarray(qp.zero_point)


class TestQuantSpec:
    @pytest.mark.parametrize(
        "fmt,scheme,narrow,qmin,qmax",
        [
            ("int8", "symmetric", True, -127, 127),
            ("int8", "affine", False, -128, 127),
            ("uint8", "symmetric", False, 0, 255),
            ("uint8", "affine", False, 0, 255),
            ("int16", "symmetric", True, -32767, 32767),
            ("int4", "symmetric", True, -7, 7),
            ("int4", "affine", False, -8, 7),
        ],
    )
    def test_default_grid(self, fmt, scheme, narrow, qmin, qmax):
        spec = jq.QuantSpec(fmt, scheme=scheme)
        assert spec.narrow_range == narrow
        assert (spec.qmin, spec.qmax) == (qmin, qmax)

    def test_frozen_and_hashable(self):
        a = jq.QuantSpec("e4m3", axis=-1)
        b = jq.QuantSpec("float8_e4m3fn", axis=(-1,))
        assert a == b
        assert hash(a) == hash(b)
        assert a.format == "float8_e4m3fn"
        with pytest.raises(dataclasses.FrozenInstanceError):
            a.format = "int8"

    def test_bad_scheme(self):
        with pytest.raises(ValueError, match="scheme"):
            jq.QuantSpec("int8", scheme="asymmetric")

    def test_affine_float_rejected(self):
        with pytest.raises(ValueError, match="affine.*integer format"):
            jq.QuantSpec("e4m3", scheme="affine")

    def test_block_size_needs_block_axis(self):
        with pytest.raises(ValueError, match="block_size and block_axis"):
            jq.QuantSpec("int8", block_size=4)

    def test_block_size_positive(self):
        with pytest.raises(ValueError, match="block_size must be a positive int"):
            jq.QuantSpec("int8", block_size=0, block_axis=0)

    def test_block_axis_type(self):
        with pytest.raises(TypeError, match="QuantSpec.block_axis must be an int"):
            jq.QuantSpec("int8", block_axis="0", block_size=2)

    def test_axis_type(self):
        with pytest.raises(TypeError, match="QuantSpec.axis"):
            jq.QuantSpec("int8", axis=1.0)

    def test_param_shape(self):
        assert jq.QuantSpec("int8").param_shape((3, 4)) == (1, 1)
        assert jq.QuantSpec("int8", axis=-1).param_shape((3, 4)) == (1, 4)
        assert jq.QuantSpec("int8", axis=(0, 2)).param_shape((3, 4, 5)) == (3, 1, 5)
        spec = jq.QuantSpec("int4", axis=-1, block_axis=0, block_size=4)
        assert spec.param_shape((12, 5)) == (3, 5)


class TestBadInput:
    def test_axis_out_of_range(self):
        x = jnp.ones((3, 4))
        for axis in (2, -3):
            with pytest.raises(ValueError, match=rf"QuantSpec.axis={axis} is out of range"):
                jq.qparams_from_array(x, jq.QuantSpec("int8", axis=axis))

    def test_block_axis_out_of_range(self):
        with pytest.raises(ValueError, match="QuantSpec.block_axis=5 is out of range"):
            jq.qparams_from_array(
                jnp.ones((4, 4)), jq.QuantSpec("int8", block_axis=5, block_size=2)
            )

    def test_block_size_does_not_divide(self):
        spec = jq.QuantSpec("int8", block_axis=0, block_size=3)
        with pytest.raises(
            ValueError, match=r"block_size=3 does not divide dimension 0 \(size 4\)"
        ):
            jq.qparams_from_array(jnp.ones((4, 2)), spec)

    def test_lo_greater_than_hi(self):
        with pytest.raises(ValueError, match="lo > hi"):
            jq.qparams_from_range(1.0, -1.0, jq.QuantSpec("int8"))
        with pytest.raises(ValueError, match="lo > hi"):
            jq.qparams_from_range(
                jnp.array([0.0, 2.0]), jnp.array([1.0, 1.0]), jq.QuantSpec("int8")
            )

    @pytest.mark.parametrize(
        "lo,hi", [(np.nan, 1.0), (-1.0, np.nan), (-np.inf, 1.0), (0.0, np.inf)]
    )
    def test_nan_or_inf_in_range(self, lo, hi):
        with pytest.raises(ValueError, match="lo/hi must be finite"):
            jq.qparams_from_range(lo, hi, jq.QuantSpec("uint8", scheme="affine"))

    def test_lo_hi_shape_mismatch(self):
        with pytest.raises(ValueError, match="lo has shape"):
            jq.qparams_from_range(jnp.zeros(3), jnp.ones(4), jq.QuantSpec("int8"))

    def test_unknown_format(self):
        with pytest.raises(ValueError, match="unknown format 'int7'"):
            jq.QuantSpec("int7")

    def test_qparams_of_wrong_shape(self):
        spec = jq.QuantSpec("int8", axis=-1)
        with pytest.raises(ValueError, match=r"QParams with shape \(3,\) do not fit"):
            broadcast_qparams(jq.QParams(jnp.ones(3)), (2, 4), spec)

    def test_transposed_qparams_rejected(self):
        # (N, blocks) has the right size but not the layout (blocks, N): no silent reshape
        spec = jq.QuantSpec("int8", axis=-1, block_axis=0, block_size=2)
        with pytest.raises(ValueError, match=r"expected \(2, 3\)"):
            broadcast_qparams(jq.QParams(jnp.ones((3, 2))), (4, 3), spec)


class TestCheckify:
    """Under jit and `jq.value_checks`, bad ranges are `checkify` user checks."""

    def _run(self, lo, hi, checks=True):
        spec = jq.QuantSpec("int8")
        with jq.value_checks(checks):
            f = checkify.checkify(
                jax.jit(lambda lo, hi: jq.qparams_from_range(lo, hi, spec).scale),
                errors=checkify.user_checks,
            )
            err, _ = f(jnp.float32(lo), jnp.float32(hi))
        return err.get()

    def test_off_by_default_so_jit_keeps_fast_dispatch(self):
        """Without the switch no check is staged (a staged one costs ~50 us a call)."""
        assert self._run(1.0, -1.0, checks=False) is None
        spec = jq.QuantSpec("int8")
        jaxpr = jax.make_jaxpr(lambda lo, hi: jq.qparams_from_range(lo, hi, spec).scale)(
            jnp.float32(0), jnp.float32(1)
        )
        assert "check" not in [e.primitive.name for e in jaxpr.jaxpr.eqns]

    def test_lo_greater_than_hi(self):
        assert "lo > hi" in self._run(1.0, -1.0)

    def test_nan(self):
        assert "must be finite" in self._run(np.nan, 1.0)

    def test_good_range_passes(self):
        assert self._run(-1.0, 1.0) is None


class TestHandComputed:
    @pytest.mark.parametrize(
        "fmt,scheme,lo,hi,scale,zp",
        [
            # (format, scheme, lo, hi, expected scale, expected zero point or None)
            pytest.param("int8", "symmetric", -2.0, 1.0, 2.0 / 127, None, id="int8_sym"),
            pytest.param("uint8", "symmetric", -2.0, 1.0, 4.0 / 255, 128, id="uint8_sym"),
            # uint8 affine: S = 4/255, Z = round(0 - (-1) / S) = round(63.75) = 64
            pytest.param("uint8", "affine", -1.0, 3.0, 4.0 / 255, 64, id="uint8_aff"),
            # ranges 255 wide give S = 1 exactly, so Z = round(qmin - lo) is an exact tie,
            # rounded half to even: round(2.5) = 2, round(3.5) = 4, round(-127.5) = -128
            pytest.param("uint8", "affine", -2.5, 252.5, 1.0, 2, id="uint8_aff_tie_down"),
            pytest.param("uint8", "affine", -3.5, 251.5, 1.0, 4, id="uint8_aff_tie_up"),
            pytest.param("int8", "affine", -0.5, 254.5, 1.0, -128, id="int8_aff_tie"),
            pytest.param("int8", "affine", -1.0, 3.0, 4.0 / 255, -64, id="int8_aff"),
            pytest.param("int4", "symmetric", -1.0, 3.5, 0.5, None, id="int4_sym"),
            # int4 affine on [-1, 2]: S = 3/15 = 0.2, Z = round(-8 + 5) = -3
            pytest.param("int4", "affine", -1.0, 2.0, 0.2, -3, id="int4_aff"),
            pytest.param("int16", "symmetric", -3.0, 0.5, 3.0 / 32767, None, id="int16_sym"),
            # range widened to include 0: [1, 3] -> [0, 3], Z = 0
            pytest.param("uint8", "affine", 1.0, 3.0, 3.0 / 255, 0, id="uint8_aff_pos"),
            # [-3, -1] -> [-3, 0], Z = 255
            pytest.param("uint8", "affine", -3.0, -1.0, 3.0 / 255, 255, id="uint8_aff_neg"),
            pytest.param("e4m3", "symmetric", -896.0, 1.0, 2.0, None, id="e4m3"),
            pytest.param("e5m2", "symmetric", 0.0, 57344.0 * 4, 4.0, None, id="e5m2"),
            pytest.param("float16", "symmetric", -1e6, 1e6, 1.0, None, id="fp16"),
            pytest.param("bfloat16", "symmetric", -5.0, 5.0, 1.0, None, id="bf16"),
        ],
    )
    def test_scale_and_zero_point(self, variant, fmt, scheme, lo, hi, scale, zp):
        spec = jq.QuantSpec(fmt, scheme=scheme)
        qp = variant(lambda lo, hi: jq.qparams_from_range(lo, hi, spec))(lo, hi)
        np.testing.assert_allclose(qp.scale, scale, rtol=1e-6)
        assert qp.scale.dtype == jnp.float32
        if zp is None:
            assert qp.zero_point is None
        else:
            assert int(qp.zero_point) == zp
            assert qp.zero_point.dtype == jnp.int32

    @pytest.mark.parametrize(
        "fmt,scheme",
        [
            *[(f, s) for f in INT_FORMATS for s in SCHEMES],
            ("e4m3", "symmetric"),
            ("e5m2", "symmetric"),
        ],
    )
    def test_zero_range_gives_unit_scale_and_exact_zeros(self, variant, fmt, scheme):
        spec = jq.QuantSpec(fmt, scheme=scheme)
        x = jnp.zeros((2, 4))

        @variant
        def f(x):
            qp = jq.qparams_from_array(x, spec)
            return qp, jq.dequantize(jq.quantize(x, qp, spec))

        qp, y = f(x)
        np.testing.assert_array_equal(qp.scale, 1.0)  # documented: S = 1
        np.testing.assert_array_equal(y, 0.0)
        assert np.all(np.signbit(y) == False)  # noqa: E712

    @pytest.mark.parametrize("fmt", ["int8", "uint8"])
    def test_tiny_and_huge_ranges_give_finite_scales(self, fmt):
        for scheme in SCHEMES:
            spec = jq.QuantSpec(fmt, scheme=scheme)
            for lo, hi in [(-1e-45, 1e-45), (0.0, 1e-40), (-1e38, 1e38), (-1e38, 0.0)]:
                qp = jq.qparams_from_range(lo, hi, spec)
                assert np.isfinite(qp.scale) and qp.scale > 0, (fmt, scheme, lo, hi)
                y = jq.dequantize(jq.quantize(jnp.array([lo, 0.0, hi]), qp, spec))
                assert np.all(np.isfinite(y)), (fmt, scheme, lo, hi, y)
                assert float(y[1]) == 0.0

    def test_scale_when_width_overflows_float32(self):
        # hi - lo = 6e38 is inf in float32; the scale is still (hi - lo) / 255
        for fmt, scheme in (("uint8", "affine"), ("uint8", "symmetric"), ("int8", "affine")):
            qp = jq.qparams_from_range(-3e38, 3e38, jq.QuantSpec(fmt, scheme=scheme))
            np.testing.assert_allclose(qp.scale, 6e38 / 255, rtol=1e-6)

    def test_reduce_range_per_block(self):
        x = jnp.arange(24.0).reshape(6, 4)
        lo, hi = reduce_range(x, jq.QuantSpec("int8", block_axis=0, block_size=2))
        np.testing.assert_array_equal(lo[:, 0], [0.0, 8.0, 16.0])
        np.testing.assert_array_equal(hi[:, 0], [7.0, 15.0, 23.0])
        lo, hi = reduce_range(x, jq.QuantSpec("int8", axis=1, block_axis=0, block_size=3))
        np.testing.assert_array_equal(lo, [[0, 1, 2, 3], [12, 13, 14, 15]])
        np.testing.assert_array_equal(hi, [[8, 9, 10, 11], [20, 21, 22, 23]])

    def test_broadcast_accepts_channel_and_keepdims_shapes(self):
        spec = jq.QuantSpec("int8", axis=-1, block_axis=0, block_size=2)
        s = jnp.arange(6.0).reshape(2, 3)
        for p in (s, s.reshape(1, 2, 3), s.reshape(2, 1, 3)):
            out = broadcast_qparams(jq.QParams(p), (4, 3), spec)
            np.testing.assert_array_equal(out.scale, s)
        out = broadcast_qparams(jq.QParams(jnp.float32(2.0)), (4, 3), jq.QuantSpec("int8"))
        assert out.scale.shape == (1, 1)


class TestQParamsPytree:
    def test_flatten_unflatten(self):
        qp = jq.QParams(jnp.array([0.5, 0.25]), jnp.array([3, -1], jnp.int32))
        leaves, tree = jax.tree_util.tree_flatten(qp)
        assert len(leaves) == 2
        back = jax.tree_util.tree_unflatten(tree, leaves)
        chex.assert_trees_all_equal(back, qp)

    def test_through_jit(self):
        qp = jq.QParams(jnp.array([0.5, 0.25]), None)
        out = jax.jit(lambda q: q.replace(scale=q.scale * 2))(qp)
        assert isinstance(out, jq.QParams)
        np.testing.assert_array_equal(out.scale, [1.0, 0.5])
        assert out.zero_point is None


# ---------------------------------------------------------------------------------------
# properties
# ---------------------------------------------------------------------------------------
_finite = st.floats(-1e4, 1e4, allow_nan=False, width=32)


@given(fmt=st.sampled_from(INT_FORMATS), scheme=st.sampled_from(SCHEMES), a=_finite, b=_finite)
def test_zero_is_exact(fmt, scheme, a, b):
    lo, hi = min(a, b), max(a, b)
    spec = jq.QuantSpec(fmt, scheme=scheme)
    qp = jq.qparams_from_range(lo, hi, spec)
    assert np.isfinite(qp.scale) and qp.scale > 0
    q = jq.quantize(jnp.zeros((3,), jnp.float32), qp, spec)
    # zero lands exactly on the zero point, which lies on the grid
    np.testing.assert_array_equal(q.int_value(), _zp(qp))
    assert spec.qmin <= _zp(qp) <= spec.qmax
    np.testing.assert_array_equal(jq.dequantize(q), 0.0)


@given(fmt=st.sampled_from(INT_FORMATS), scheme=st.sampled_from(SCHEMES), a=_finite, b=_finite)
def test_range_is_covered(fmt, scheme, a, b):
    # the grid [S (qmin - Z), S (qmax - Z)] covers [min(lo, 0), max(hi, 0)] up to S/2
    lo, hi = min(a, b), max(a, b)
    spec = jq.QuantSpec(fmt, scheme=scheme)
    qp = jq.qparams_from_range(lo, hi, spec)
    s, z = float(qp.scale), float(_zp(qp))
    slack = 0.5 * s * (1 + 1e-5)
    assert s * (spec.qmin - z) <= min(lo, 0.0) + slack
    assert s * (spec.qmax - z) >= max(hi, 0.0) - slack
