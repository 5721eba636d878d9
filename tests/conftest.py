"""Shared test configuration: a small, deterministic hypothesis profile."""

import hypothesis

# Few examples, no deadline (the first call of a jax function compiles), and no
# randomness across runs, so that the suite is fast and reproducible on 2 cores.
hypothesis.settings.register_profile(
    "jq", max_examples=25, deadline=None, derandomize=True, print_blob=True
)
hypothesis.settings.load_profile("jq")
