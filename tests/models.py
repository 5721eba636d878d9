"""The shared model zoo of the tests (one definition each; variants by attributes)."""

from collections.abc import Callable

import flax.linen as nn
from flax import nnx


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
