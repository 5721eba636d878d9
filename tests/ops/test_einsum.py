"""Tests for `jq.ops.einsum`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from opsref import SPECS, dequantize_f64, normal, quantize_jit

import jq
from jq import ops


# ---------------------------------------------------------------------------------------
# einsum
# ---------------------------------------------------------------------------------------
class TestEinsum:
    @pytest.mark.parametrize(
        "subscripts,lshape,rshape",
        [
            pytest.param("ij,jk->ik", (3, 8), (8, 4), id="matmul"),
            pytest.param("ij,kj", (3, 8), (5, 8), id="implicit"),
            pytest.param("bij,bjk->bik", (2, 3, 8), (2, 8, 4), id="batched"),
            pytest.param("...d,df->...f", (2, 3, 8), (8, 4), id="ellipsis"),
            pytest.param("bqhd,bkhd->bhqk", (2, 3, 2, 8), (2, 5, 2, 8), id="attention_qk"),
            pytest.param("ik,jk->ji", (3, 8), (4, 8), id="outer_order"),
        ],
    )
    def test_matches_float_einsum_on_dequantized(self, subscripts, lshape, rshape):
        ql = quantize_jit(normal(20, lshape), None, jq.QuantSpec("int8"))
        qr = quantize_jit(normal(21, rshape), None, jq.QuantSpec("uint8", scheme="affine"))
        y = jax.jit(ops.einsum, static_argnums=0)(subscripts, ql, qr)
        ref = np.einsum(subscripts, dequantize_f64(ql), dequantize_f64(qr))
        assert y.shape == ref.shape
        np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-4)

    def test_attention_scales_on_batch_axes(self):
        """Per-head scales (on batch axes) and per-query rows: both allowed."""
        q = normal(22, (2, 2, 3, 8)) * jnp.asarray([1.0, 50.0])[None, :, None, None]
        k = normal(23, (2, 2, 5, 8)) * jnp.asarray([3.0, 0.1])[None, :, None, None]
        y = ops.einsum(
            "bhqd,bhkd->bhqk",
            q,
            k,
            lhs_spec=jq.QuantSpec("int8", axis=(0, 1, 2)),
            rhs_spec=jq.QuantSpec("int8", axis=(0, 1)),
        )
        ql = quantize_jit(q, None, jq.QuantSpec("int8", axis=(0, 1, 2)))
        qk = quantize_jit(k, None, jq.QuantSpec("int8", axis=(0, 1)))
        ref = np.einsum("bhqd,bhkd->bhqk", dequantize_f64(ql), dequantize_f64(qk))
        np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-4)
        fref = np.einsum("bhqd,bhkd->bhqk", np.asarray(q, np.float64), np.asarray(k, np.float64))
        rel = np.abs(np.asarray(y) - fref).max(axis=(0, 2, 3)) / np.abs(fref).max(axis=(0, 2, 3))
        assert rel.max() < 0.05

    @pytest.mark.parametrize(
        "subscripts",
        [
            pytest.param("ij->ji", id="one_operand"),
            pytest.param("ij,jk->k", id="summed_in_one"),
            pytest.param("ii,ij->j", id="trace"),
            pytest.param("ij,jk->iz", id="unknown_out"),
        ],
    )
    def test_bad_subscripts(self, subscripts):
        with pytest.raises(ValueError):
            ops.einsum(subscripts, jnp.ones((3, 3)), jnp.ones((3, 3)), rhs_spec=SPECS["i8"])
