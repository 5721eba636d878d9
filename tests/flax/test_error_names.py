"""Every error names the public function the user called, not the helper that found the problem."""

import jax
import jax.numpy as jnp
import pytest
from models import MLP

import jq
import jq.deploy


def test_export_errors_name_the_function_called():
    x = jnp.ones((2, 8))
    with pytest.raises(ValueError, match=r"^jq\.deploy\.export_function: `platforms` is empty"):
        jq.deploy.export_function(lambda x: 2 * x, [x], platforms=())
    with pytest.raises(ValueError, match=r"^jq\.deploy\.export_function: input 0 is a scalar"):
        jq.deploy.export_function(lambda x: 2 * x, [jnp.float32(1)])
    m = MLP()
    v = m.init(jax.random.key(0), x)
    qv = jq.convert(m, v, [jq.Rule(".*", weight=jq.QuantSpec("int8", axis=-1))], args=(x,))
    with pytest.raises(ValueError, match=r"^jq\.export: unknown platforms \['gpu'\]"):
        jq.export(m, qv, x, platforms=("gpu",))


@pytest.mark.parametrize(
    "fn,name",
    [(jq.deploy.read_artifact, "jq.deploy.read_artifact"), (jq.load_exported, "jq.load_exported")],
)
def test_load_errors_name_the_function_called(fn, name):
    with pytest.raises(ValueError, match="^" + name.replace(".", r"\.") + ": not a jq export"):
        fn(b"not an artifact at all")
    with pytest.raises(TypeError, match="^" + name.replace(".", r"\.") + ": `path_or_bytes`"):
        fn(3)
