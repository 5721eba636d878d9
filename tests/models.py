"""The shared model zoo of the tests (one definition each; variants by attributes), and the
rules and measures several test files use."""

from collections.abc import Callable

import flax.linen as nn
import jax.numpy as jnp
from flax import nnx

import jq
from jq import calibration as cal


class MLP(nn.Module):
    """Dense(hidden) -> relu -> Dense(out): parameters ``Dense_0`` and ``Dense_1``."""

    hidden: int = 32
    out: int = 10
    bias_init: Callable = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(self.hidden, bias_init=self.bias_init)(x))  # Dense_0
        return nn.Dense(self.out, bias_init=self.bias_init)(h)  # Dense_1


class NnxMLP(nnx.Module):
    """nnx.Linear(din, hidden) -> relu -> nnx.Linear(hidden, out): attributes ``l1``, ``l2``."""

    def __init__(self, rngs, din: int = 8, hidden: int = 32, out: int = 10):
        self.l1 = nnx.Linear(din, hidden, rngs=rngs)
        self.l2 = nnx.Linear(hidden, out, rngs=rngs)

    def __call__(self, x):
        return self.l2(nnx.relu(self.l1(x)))


class Block(nn.Module):
    @nn.compact
    def __call__(self, x, mask=None):
        h = nn.LayerNorm()(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=16)(h, mask=mask)
        h = nn.LayerNorm()(x)
        return x + nn.Dense(16)(nn.gelu(nn.Dense(32)(h)))


class ScanBlk(nn.Module):
    @nn.compact
    def __call__(self, c, _):
        return c + nn.Dense(16)(nn.relu(nn.Dense(16)(c))), None


class ScanMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(16)(x)
        h, _ = nn.scan(
            ScanBlk, variable_axes={"params": 0}, split_rngs={"params": True}, length=3
        )()(h, None)
        return nn.Dense(10)(h)


class Outlier(nn.Module):
    """`fragile` has an outlier weight row (on an input that is always 0): quantization zeroes the rest."""

    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(32, name="fragile")(x))
        h = nn.relu(nn.Dense(32, name="mid")(h))
        return nn.Dense(10, name="head")(h)


def static_rules(fmt="int8", ops=("dot", "conv", "embed")):
    return [
        jq.Rule(
            ".*",
            ops=ops,
            weight=jq.QuantSpec(fmt, axis=-1),
            activation=jq.QuantSpec("int8", calibration=cal.MinMax()),
        )
    ]


def rel_err(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def agreement(out, batch):
    return jnp.mean(jnp.argmax(out, -1) == batch[1])


def first(b):
    return b[0]
