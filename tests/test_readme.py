"""The README's quickstart is code users paste: it must run as written."""

import os
import re

import jax.numpy as jnp

import jq

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _quickstart() -> str:
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    section = text.split("## Quickstart", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_quickstart_runs_and_quantizes():
    ns: dict = {}
    exec(compile(_quickstart(), "README.md:quickstart", "exec"), ns)  # noqa: S102
    qvars, y, x, model, variables = ns["qvars"], ns["y"], ns["x"], ns["model"], ns["variables"]
    assert isinstance(qvars, jq.QuantizedVariables)
    assert all(
        isinstance(qvars.variables[p], jq.QArray)
        for p in ("params/Dense_0/kernel", "params/Dense_1/kernel")
    )
    yf = model.apply(variables, x)
    assert float(jnp.linalg.norm(y - yf) / jnp.linalg.norm(yf)) < 0.05
    assert set(ns["qv"]) == {"params", "quant", "state"}


def test_readme_commands_match_ci():
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        ci = f.read()
    assert "bash scripts/test.sh" in text and "bash scripts/demo.sh" in text
    assert "bash scripts/test.sh" in ci
