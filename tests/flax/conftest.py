"""Fixtures shared by the Flax-layer tests: a small MLP and the outlier model."""

import jax
import jax.numpy as jnp
import pytest
from models import MLP, Outlier

KEY = jax.random.key(0)


@pytest.fixture(scope="module")
def mlp():
    m = MLP()
    x = jax.random.normal(KEY, (16, 8))
    return m, m.init(KEY, x), x


@pytest.fixture(scope="module")
def outlier():
    m = Outlier()
    xs = [jax.random.normal(jax.random.key(10 + i), (64, 16)).at[:, 0].set(0.0) for i in range(3)]
    v = jax.jit(m.init)(KEY, xs[0])
    v = {"params": dict(v["params"])}
    frag = dict(v["params"]["fragile"])
    frag["kernel"] = frag["kernel"].at[0, :].set(100.0)
    v["params"]["fragile"] = frag
    f = jax.jit(m.apply)
    batches = [(x, jnp.argmax(f(v, x), -1)) for x in xs]
    return m, v, batches


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "hf: Hugging Face Flax models (the `hf` extra, transformers<5); select with -m hf",
    )
