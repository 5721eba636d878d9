"""`jq.flax.checkpoint`: save and restore QuantizedVariables."""

import os

import chex
import jax
import numpy as np
import pytest
from flax import nnx
from models import NnxMLP, static_rules

import jq
import jq.hlo
from jq.flax import checkpoint

KEY = jax.random.key(0)


# ----------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_checkpoint_round_trip_is_exact(tmp_path, mlp, fmt):
    pytest.importorskip("orbax.checkpoint", reason="jq checkpoints need orbax-checkpoint")
    m, v, x = mlp
    rules = static_rules(fmt)
    qv = jq.convert(m, v, rules, jq.calibrate(m, v, rules, [x], progress=False))
    checkpoint.save(tmp_path / "q", qv)
    names = set(os.listdir(tmp_path / "q"))
    assert names == {"jq_meta.json", "arrays"}
    r = checkpoint.restore(tmp_path / "q")
    assert jax.tree_util.tree_structure(r) == jax.tree_util.tree_structure(qv)
    chex.assert_trees_all_equal(r, qv)
    np.testing.assert_array_equal(jq.apply(m, r, x), jq.apply(m, qv, x))
    with pytest.raises(ValueError, match="not a jq checkpoint"):
        checkpoint.restore(tmp_path)


def test_checkpoint_nnx_with_rng_state(tmp_path):
    pytest.importorskip("orbax.checkpoint", reason="jq checkpoints need orbax-checkpoint")

    class WithDropout(NnxMLP):
        def __init__(self, rngs):
            super().__init__(rngs)
            self.drop = nnx.Dropout(0.5, deterministic=True, rngs=rngs)

        def __call__(self, x):
            return self.drop(super().__call__(x))

    m = WithDropout(nnx.Rngs(0))
    x = jax.random.normal(KEY, (4, 8))
    qv = jq.convert(m, None, [jq.Rule(".*", weight=jq.QuantSpec("int4", axis=-1))], args=(x,))
    checkpoint.save(tmp_path / "n", qv)
    np.testing.assert_array_equal(
        jq.apply(m, checkpoint.restore(tmp_path / "n"), x), jq.apply(m, qv, x)
    )
