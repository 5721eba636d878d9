"""The sharded tests need 8 (simulated) devices, so they run in their own pytest process.

``XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m pytest tests/sharded``
(what ``scripts/test.sh`` runs); the main suite runs with ``--ignore=tests/sharded``
and keeps one device. The flag is not set here: a conftest imported during a
whole-suite collection would give every other test 8 devices too.
"""

import jax
import pytest

_FLAG = "--xla_force_host_platform_device_count"


@pytest.fixture(autouse=True, scope="session")
def _eight_devices():
    n = jax.device_count()
    if n != 8:
        pytest.fail(
            f"tests/sharded needs 8 devices but JAX has {n}: run it in its own process, "
            f"XLA_FLAGS={_FLAG}=8 python -m pytest tests/sharded (as scripts/test.sh does; the "
            "main suite runs with --ignore=tests/sharded)",
            pytrace=False,
        )
