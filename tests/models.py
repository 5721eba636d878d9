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


class BNCNN(nn.Module):
    """Conv(8, 3x3) -> BatchNorm -> relu -> Conv(8, 3x3, stride 2) -> relu -> Dense(out) on
    (B, 8, 8, 1) images: parameters ``Conv_0``, ``BatchNorm_0``, ``Conv_1``, ``Dense_0``."""

    out: int = 10

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(8, (3, 3))(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
        x = nn.relu(nn.Conv(8, (3, 3), strides=(2, 2))(x))
        return nn.Dense(self.out)(x.reshape(x.shape[0], -1))


class NnxBlock(nnx.Module):
    """A pre-norm transformer block and a head: LayerNorm -> 2-head self-attention ->
    residual -> Linear + relu -> residual -> Linear(out), on (B, T, d) inputs."""

    def __init__(self, rngs, d: int = 16, out: int = 5):
        self.ln = nnx.LayerNorm(d, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(num_heads=2, in_features=d, decode=False, rngs=rngs)
        self.mlp = nnx.Linear(d, d, rngs=rngs)
        self.head = nnx.Linear(d, out, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(self.ln(x))
        return self.head(x + nnx.relu(self.mlp(x)))
