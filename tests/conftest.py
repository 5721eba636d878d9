"""Shared test configuration: a small, deterministic hypothesis profile, and the backend.

The suite runs on any backend (``JAX_PLATFORMS=cpu`` here, ``JAX_PLATFORMS=cuda`` on
a GPU machine). Two things make that hold:

* float32 dots and convolutions computed by JAX run at full float32 precision. On
  CPU that is what XLA does anyway; on GPU, XLA's default precision may use TF32
  (10-bit mantissa) for float32 matmuls and convolutions, which would break every
  test that compares a float result (a float reference, a fake-quant forward, a
  calibration statistic computed by the float model) with a tight tolerance.
  Float references inside tests also pass ``precision="highest"`` explicitly.
* tests about XLA:CPU itself (its compiled HLO, its kernels) carry the
  ``cpu_only`` marker and are skipped, with the reason, on any other backend.
  Under ``JAX_PLATFORMS=cuda`` no CPU backend exists to pin them to.
"""

import os

import hypothesis
import jax
import pytest

# Few examples, no deadline (the first call of a jax function compiles), and no
# randomness across runs, so that the suite is fast and reproducible on 2 cores. Most
# examples draw a new shape, and a new shape is a new XLA compilation (about 0.1-0.5 s of
# CPU each): 10 examples per property, a test asks for more with @settings where its
# search space needs them.
hypothesis.settings.register_profile(
    "jq", max_examples=10, deadline=None, derandomize=True, print_blob=True
)
hypothesis.settings.load_profile("jq")

# A compilation cache shared by the pytest-xdist workers of one run (scripts/test.sh sets
# JQ_TEST_XLA_CACHE to a fresh directory): many tests compile the same computation under
# another Python function, and XLA's cache is keyed by the computation itself. Unset (a
# plain `pytest`), nothing is cached across processes.
if os.environ.get("JQ_TEST_XLA_CACHE"):
    jax.config.update("jax_compilation_cache_dir", os.environ["JQ_TEST_XLA_CACHE"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

# Full float32 precision for float dots / convs on every backend (GPU default: TF32).
# Setting a config value does not initialise a backend (tests/sharded still sets
# its device count first).
jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(params=["jit", "eager"])
def variant(request):
    """A function transform: `jax.jit`, or the identity (the function runs op by op).

    A test that takes `variant` runs twice and checks both that jit traces the function
    and that the eager path (no tracers) agrees.
    """
    return jax.jit if request.param == "jit" else (lambda f: f)


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "cpu_only(reason=None): the test checks XLA:CPU itself (compiled CPU HLO, CPU "
        "kernels); skipped, with the reason, when JAX's default backend is not cpu",
    )


def pytest_runtest_setup(item):
    mark = item.get_closest_marker("cpu_only")
    if mark is None:
        return
    backend = jax.default_backend()
    if backend != "cpu":
        what = mark.kwargs.get("reason") or (mark.args[0] if mark.args else "compiled XLA:CPU HLO")
        pytest.skip(f"{what}; not meaningful on {backend}")
