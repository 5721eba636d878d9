"""(N, K) weights from ``jq.convert(target="gpu")`` keep their logical axis names, swapped."""

import jax
import numpy as np
from jax.sharding import PartitionSpec as P
from test_sharding import MESH, LogicalMLP, X, ns, rules

import jq
from jq.flax import sharding as jfs


def test_nk_weights_carry_swapped_logical_names_and_shard():
    m = LogicalMLP()
    v = m.init(jax.random.key(0), X)
    stats = jq.calibrate(m, v, rules("int8"), [X], progress=False)
    qv = jq.convert(m, v, rules("int8"), stats, target="gpu")
    assert (
        qv.variables["params/Dense_0/kernel"].shape[::-1]
        == v["params"]["Dense_0"]["kernel"].value.shape
    )
    specs = jfs.logical_specs(qv, v)
    assert specs["params/Dense_0/kernel"].value == P("mlp", "embed")
    assert specs["params/Dense_0/kernel"].scale == P("mlp", None)
    qs = jfs.shard_logical(qv, v, MESH, (("mlp", "model"), ("embed", None)))
    assert qs.variables["params/Dense_0/kernel"].value.sharding.spec == P("model", None)
    f = jax.jit(lambda q, x: jq.apply(m, q, x))
    np.testing.assert_allclose(
        np.asarray(f(qs, jax.device_put(X, ns("data")))), np.asarray(f(qv, X)), rtol=1e-6, atol=1e-6
    )
