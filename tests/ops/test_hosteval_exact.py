"""`jq.hosteval`: numpy on the host gives XLA:CPU's bits exactly (or declines)."""

import functools

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings

import jq
from jq.flax.convert import quantize_leaves_jit
from jq.hosteval import host_eval

pytestmark = pytest.mark.cpu_only(reason="host_eval reproduces XLA:CPU's arithmetic")

SPECS = [
    jq.QuantSpec("int8", axis=-1),
    jq.QuantSpec("int8"),
    jq.QuantSpec("uint8", scheme="affine", axis=-1),
    jq.QuantSpec("uint8"),
    jq.QuantSpec("int16", axis=-1),
    jq.QuantSpec("int4", axis=-1, block_axis=0, block_size=4),
    jq.QuantSpec("int4", axis=-1),
]
ACT_SPECS = (jq.QuantSpec("int8"), jq.QuantSpec("uint8", scheme="affine"))


def _weights(seed: int, scale: float) -> list[np.ndarray]:
    """Weights with the cases that break a careless host path: exact .5 ties after scaling,
    denormals (XLA:CPU flushes them), all-zero and all-denormal channels, +-0."""
    r = np.random.RandomState(seed)
    w = (r.standard_normal((8, 6)) * scale).astype(np.float32)
    w[:, 0] = 0.0
    w[:, 1] = r.choice([1e-40, -3e-39, 0.0], 8).astype(np.float32)  # denormal channel
    w[0, 2], w[1, 2] = 1e-41, -0.0
    w[:, 3] = np.arange(8, dtype=np.float32) - 3.5  # ties at x / S = k + 0.5 for some S
    return [w.copy() for _ in SPECS]


def _assert_same_bits(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes(), (x, y)


@settings(max_examples=6)
@given(st.integers(0, 2**16), st.sampled_from([1e-3, 1.0, 300.0]))
def test_convert_arithmetic_on_host_is_bit_identical_to_jit(seed, scale):
    ws = _weights(seed, scale)
    ranges = [(np.float32(-1e-40), np.float32(2.5)), (np.float32(0.0), np.float32(0.0))]
    args = (ws, [None] * len(ws), ranges)
    fn = functools.partial(quantize_leaves_jit.__wrapped__, tuple(SPECS), ACT_SPECS)
    host = host_eval(fn, *args)
    assert host is not None  # every op here has an exact numpy form
    _assert_same_bits(host, quantize_leaves_jit(tuple(SPECS), ACT_SPECS, *args))
    # and the same as jq.quantize one weight at a time (eager), the path convert used to take
    for w, s, q in zip(ws, SPECS, host[0]):
        _assert_same_bits(q, jq.quantize(jnp.asarray(w), None, s))


def test_denormals_are_flushed_as_xla_cpu_does():
    x = np.array([1e-40, -2e-39, 1.0], np.float32)
    out = host_eval(lambda v: (v * 2.0, v > 0), x)
    assert np.asarray(out[0]).tolist() == [0.0, 0.0, 2.0]  # numpy alone keeps 2e-40
    assert np.asarray(out[1]).tolist() == [False, False, True]
    _assert_same_bits(out, jax.jit(lambda v: (v * 2.0, v > 0))(x))


@pytest.mark.parametrize(
    "fn, x",
    [
        (lambda v: jnp.sum(v), np.ones(4, np.float32)),  # order of a sum is XLA's choice
        (lambda v: jnp.exp(v), np.ones(4, np.float32)),  # libm differs
        (lambda v: v * 2, np.ones(4, ml_dtypes.bfloat16)),  # bf16 arithmetic
    ],
)
def test_declines_what_it_cannot_reproduce(fn, x):
    assert host_eval(fn, x) is None


def test_convert_gives_the_same_bits_on_the_host_and_jitted(monkeypatch):
    import sys

    from models import MLP

    conv = sys.modules["jq.flax.convert"]
    m = MLP(hidden=16, out=4)
    xs = [np.random.RandomState(3).randn(4, 8).astype(np.float32)]
    v = m.init(jax.random.key(0), xs[0])
    rules = jq.presets.w8a8_static()
    stats = jq.calibrate(m, v, rules, xs, progress=False)
    host = jq.convert(m, v, rules, stats)
    monkeypatch.setattr(conv, "HOST_MAX_ELEMENTS", -1)  # every weight through the jit
    _assert_same_bits(host, jq.convert(m, v, rules, stats))
