"""Tests for `jq.ops.conv_general_dilated`."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from opsref import (
    SPECS,
    dequantize_f64,
    normal,
    quantize_jit,
)

import jq
from jq import ops


# ---------------------------------------------------------------------------------------
# convolution
# ---------------------------------------------------------------------------------------
class TestConv:
    @pytest.mark.parametrize(
        "cdn,padding,strides,ld,rd,groups",
        [
            pytest.param(("NHWC", "HWIO", "NHWC"), "SAME", (1, 1), None, None, 1, id="nhwc_same"),
            pytest.param(
                ("NCHW", "OIHW", "NCHW"),
                ((2, 1), (0, 2)),
                (2, 1),
                None,
                None,
                1,
                id="nchw_pad_stride",
            ),
            pytest.param(
                ("NHWC", "HWIO", "NHWC"),
                ((1, 1), (1, 1)),
                (1, 1),
                (2, 2),
                None,
                1,
                id="lhs_dilation",
            ),
            pytest.param(
                ("NHWC", "HWIO", "NHWC"), "SAME", (1, 1), None, (2, 1), 2, id="rhs_dilation_groups"
            ),
            pytest.param(
                ("NHWC", "HWIO", "NHWC"),
                ((1, 2), (0, 1)),
                (2, 2),
                None,
                (2, 1),
                1,
                id="rhs_dilation_stride",
            ),
            pytest.param(("NCH", "OIH", "NCH"), "VALID", (1,), None, None, 1, id="valid_ncw_1d"),
        ],
    )
    def test_matches_float_conv_on_dequantized(self, cdn, padding, strides, ld, rd, groups):
        x = normal(30, (2, 7, 7, 4))
        w = normal(31, (3, 3, 4 // groups, 6))
        if cdn[0] == "NCHW":
            x, w = jnp.transpose(x, (0, 3, 1, 2)), jnp.transpose(w, (3, 2, 0, 1))
        if cdn[0] == "NCH":
            x, w = jnp.transpose(x[:, 0], (0, 2, 1)), jnp.transpose(w[0], (2, 1, 0))
        o_axis = cdn[1].index("O")
        for lspec, rspec in [
            (SPECS["i8"], jq.QuantSpec("int8", axis=o_axis)),
            (SPECS["u8_aff"], jq.QuantSpec("int8", scheme="affine", axis=o_axis)),
        ]:
            ql, qr = quantize_jit(x, None, lspec), quantize_jit(w, None, rspec)
            kw = dict(
                lhs_dilation=ld, rhs_dilation=rd, dimension_numbers=cdn, feature_group_count=groups
            )
            conv = functools.partial(ops.conv_general_dilated, **kw)
            y = jax.jit(conv, static_argnums=(2, 3))(ql, qr, strides, padding)
            ref = jax.lax.conv_general_dilated(
                jnp.asarray(dequantize_f64(ql), jnp.float32),
                jnp.asarray(dequantize_f64(qr), jnp.float32),
                strides,
                padding,
                precision="highest",
                **kw,
            )
            np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-4)

    def test_float_operands_with_specs_and_weight_only(self):
        x, w = normal(32, (1, 6, 6, 3)), normal(33, (3, 3, 3, 5))
        cdn = ("NHWC", "HWIO", "NHWC")
        ref = jax.lax.conv_general_dilated(
            x, w, (1, 1), "SAME", dimension_numbers=cdn, precision="highest"
        )
        qp = jq.qparams_from_range(-4.0, 4.0, SPECS["i8"])
        y = jax.jit(
            lambda x, w: ops.conv_general_dilated(
                x,
                w,
                (1, 1),
                "SAME",
                dimension_numbers=cdn,
                lhs_spec=SPECS["i8"],
                lhs_qparams=qp,
                rhs_spec=SPECS["i8_col"],
            )
        )(x, w)
        assert float(jnp.abs(y - ref).max()) < 0.05 * float(jnp.abs(ref).max())
        qr = quantize_jit(w, None, SPECS["i8_col"])
        y = ops.conv_general_dilated(x, qr, (1, 1), "SAME", dimension_numbers=cdn)
        ref = jax.lax.conv_general_dilated(
            x,
            jnp.asarray(dequantize_f64(qr), jnp.float32),
            (1, 1),
            "SAME",
            dimension_numbers=cdn,
            precision="highest",
        )
        np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-4)

    def test_scale_on_input_features_is_rejected(self):
        qr = quantize_jit(normal(34, (3, 3, 4, 5)), None, jq.QuantSpec("int8", axis=2))
        with pytest.raises(ValueError, match="axis 2"):
            ops.conv_general_dilated(
                normal(35, (1, 5, 5, 4)),
                qr,
                (1, 1),
                "SAME",
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
                lhs_spec=SPECS["i8"],
            )
