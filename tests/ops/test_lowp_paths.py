"""Accelerator-shaped low-precision paths, checked on CPU.

* a static int8 chain (weights stored (N, K), bias, ReLU, next layer's static
  activation spec) keeps int8 between layers: no float32 activation in the
  compiled CPU program's entry computation, only int8 dots in the cuda export,
  and NaN rows still reach exactly their output rows;
* fp8 e4m3 W8A8: the dot takes fp8 operands with float32 accumulation (cuda
  export) and equals a float64 numpy dot of the same fp8-rounded operands;
* the QAT ops with an fp8 forward keep fake quantization's STE gradients.
"""

import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jq
from jq import ops

NK = (((1,), (1,)), ((), ()))  # x (M, K) . w (N, K)
M, H = 8, 64
SPEC = jq.QuantSpec("int8")  # symmetric, narrow grid [-127, 127]


def _normal(seed, shape, scale=1.0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape) * scale, jnp.float32)


def _chain_params(fmt="int8", widths=(32, H, H, 16)):
    wspec = jq.QuantSpec(fmt, axis=0)  # per output channel of an (N, K) weight
    ws, bs, qps = [], [], []
    for i, (k, n) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        ws.append(jq.quantize(_normal(i, (n, k), k**-0.5), None, wspec))
        bs.append(_normal(10 + i, (n,), 0.1))
        qps.append(jq.qparams_from_range(-4.0, 4.0, jq.QuantSpec(fmt)))
    return ws, bs, qps


def _chain(x, ws, bs, qps, spec=SPEC, static=True):
    for i, (w, b, qp) in enumerate(zip(ws, bs, qps, strict=True)):
        x = ops.dot_general(x, w, NK, lhs_spec=spec, lhs_qparams=qp if static else None) + b
        if i < len(ws) - 1:
            x = jax.nn.relu(x)
    return x


def _entry(hlo: str) -> str:
    """The ENTRY computation of a compiled HLO module (what is materialized in memory)."""
    start = hlo.index("\nENTRY")
    return hlo[start : hlo.index("\n}", start)]


@pytest.mark.cpu_only("reads XLA:CPU's compiled HLO")
def test_static_int8_chain_has_no_float_activation_in_memory():
    ws, bs, qps = _chain_params()
    x = jax.ShapeDtypeStruct((M, 32), jnp.float32)

    def entry(static):
        f = jax.jit(lambda x, ws: _chain(x, ws, bs, qps, static=static))
        return _entry(f.lower(x, ws).compile().as_text())

    hidden_f32 = re.compile(rf"= f32\[{M},{H}\]")
    hidden_int8 = re.compile(rf"= [su]8\[{M}(\+1)?,{H}\]|= [su]8\[{M + 1},{H}\]")
    static = entry(True)
    assert not hidden_f32.search(static), static
    assert hidden_int8.search(static), static  # the activations between layers are 8-bit
    # the check can fail: a dynamic range is a reduction over the float activation
    assert hidden_f32.search(entry(False))


def test_static_int8_chain_nan_rows_reach_their_output_rows_only():
    ws, bs, qps = _chain_params()
    x = np.array(_normal(5, (M, 32)))
    f = jax.jit(lambda x: _chain(x, ws, bs, qps))
    clean = np.asarray(f(jnp.asarray(x)))
    x[2, 7], x[5, 0] = np.nan, np.inf
    got = np.asarray(f(jnp.asarray(x)))
    bad = np.zeros(M, bool)
    bad[[2, 5]] = True
    assert np.isnan(got[bad]).all()
    np.testing.assert_array_equal(got[~bad], clean[~bad])
    assert np.isfinite(clean).all()


def _dots(module: str):
    return re.findall(
        r"stablehlo\.dot_general[^\n]*contracting_dims = \[(\d+)\] x \[(\d+)\][^\n]*:\s*"
        r"\(tensor<([\dx]+)x(\w+)>, tensor<([\dx]+)x(\w+)>\) -> tensor<[\dx]+x(\w+)>",
        module,
    )


def test_cuda_export_of_the_chain_takes_int8_nk_weights():
    ws, bs, qps = _chain_params()
    exp = jax.export.export(jax.jit(lambda x, ws: _chain(x, ws, bs, qps)), platforms=("cuda",))(
        jax.ShapeDtypeStruct((32, 32), jnp.float32), ws
    )
    dots = _dots(exp.mlir_module())
    assert len(dots) == 3
    for (lc, rc, _, lt, wshape, wt, out), w in zip(dots, ws, strict=True):
        assert (lt, wt, out) == ("i8", "i8", "i32")
        assert (lc, rc) == ("1", "1")  # the weight's contraction is its last, contiguous axis
        assert [int(d) for d in wshape.split("x")][0] >= w.shape[0]  # (N', K'): N first


def _e4m3(v32):
    """float32 -> e4m3fn (round to nearest even, saturating as jq's clip does), as float64."""
    v = np.clip(np.asarray(v32, np.float32), -448.0, 448.0)
    return v.astype(ml_dtypes.float8_e4m3fn).astype(np.float64)


@pytest.mark.parametrize("static", [True, False])
def test_fp8_w8a8_equals_float64_dot_of_the_rounded_operands(static):
    w = _normal(0, (24, 48), 0.2)  # (N, K)
    qw = jq.quantize(w, None, jq.QuantSpec("e4m3", axis=0))
    x = _normal(1, (6, 48), 2.0)
    spec = jq.QuantSpec("e4m3")
    qp = jq.qparams_from_range(-3.0, 3.0, spec) if static else None
    got = jax.jit(lambda x: ops.dot_general(x, qw, NK, lhs_spec=spec, lhs_qparams=qp))(x)

    xn = np.asarray(x, np.float32)
    sx = np.float32(3.0 / 448.0) if static else np.float32(np.abs(xn).max() / np.float32(448.0))
    xq = _e4m3(xn * (np.float32(1.0) / sx))
    wn = np.asarray(w, np.float32)
    sw = (np.abs(wn).max(axis=1, keepdims=True) / np.float32(448.0)).astype(np.float32)
    wq = _e4m3(wn * (np.float32(1.0) / sw))
    np.testing.assert_array_equal(np.asarray(qw.value, np.float64), wq)  # same weight codes
    ref = (xq @ wq.T) * np.float64(sx) * sw.reshape(1, -1).astype(np.float64)
    # products of e4m3 values are exact in float32; only the float32 sum of 48 terms rounds
    bound = (np.abs(xq) @ np.abs(wq).T) * np.float64(sx) * sw.reshape(1, -1) * 48 * 2.0**-24
    assert np.all(np.abs(np.asarray(got, np.float64) - ref) <= bound + 1e-30)


def test_cuda_export_fp8_dot_has_e4m3_operands_and_f32_accumulation():
    qw = jq.quantize(_normal(0, (32, 64)), None, jq.QuantSpec("e4m3", axis=0))
    spec = jq.QuantSpec("e4m3")
    qp = jq.qparams_from_range(-3.0, 3.0, spec)
    for lqp in (qp, None):  # static and dynamic activations
        exp = jax.export.export(
            jax.jit(
                lambda x, w, lqp=lqp: ops.dot_general(x, w, NK, lhs_spec=spec, lhs_qparams=lqp)
            ),
            platforms=("cuda",),
        )(jax.ShapeDtypeStruct((8, 64), jnp.float32), qw)
        ((lc, rc, xs, xt, wshape, wt, out),) = _dots(exp.mlir_module())
        assert (xt, wt, out) == ("f8E4M3FN", "f8E4M3FN", "f32")
        assert (xs, wshape, lc, rc) == ("8x64", "32x64", "1", "1")


@pytest.mark.parametrize("fmt", ["int8", "e4m3"])
def test_qat_low_precision_forward_keeps_the_fake_quant_gradients(fmt):
    x = _normal(2, (5, 16), 1.5)
    w = _normal(3, (16, 12), 0.3)  # (K, N), as a Flax kernel
    lspec = jq.QuantSpec(fmt)
    wspec = jq.QuantSpec(fmt, axis=1)
    lqp = jq.qparams_from_range(-2.0, 2.0, lspec)  # clips some of x: the mask matters
    g = _normal(4, (5, 12))
    dn = (((1,), (0,)), ((), ()))

    def real(x, w):
        y = ops.qat_dot_general(
            x, w, dn, lhs_spec=lspec, lhs_qparams=lqp, rhs_spec=wspec, int_forward=True
        )
        return jnp.sum(y * g), y

    def fake(x, w):  # the independent formula: a float dot of jq.fake_quant operands
        y = jnp.dot(jq.fake_quant(x, lqp, lspec), jq.fake_quant(w, None, wspec))
        return jnp.sum(y * g), y

    # jitted: an eager grad compiles each primitive on its own (~30 s on 2 cores)
    (_, y), grads = jax.jit(jax.value_and_grad(real, argnums=(0, 1), has_aux=True))(x, w)
    (_, y_ref), grads_ref = jax.jit(jax.value_and_grad(fake, argnums=(0, 1), has_aux=True))(x, w)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, grads_ref, strict=True):  # equal on CPU; a GPU may sum in another order
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert float(jnp.sum(grads[0] == 0)) > 0  # some activations were clipped
