"""Value checks under `jax.jit`: opt-in, because a staged check costs fast dispatch.

jq checks values it can see (concrete arrays) always, and raises a
`ValueError` that names the problem. Under `jax.jit` the values are tracers;
a check there can only be a `checkify` check, reported when the caller wraps
the function in ``checkify.checkify(f, errors=checkify.user_checks)``. Such a
check puts an effect in the jaxpr, and JAX then leaves its C++ fast dispatch
path: measured on a 2-core x86 CPU (jax 0.10.2), a trivial jitted function went
from 4.8 to 61 us per call, which at batch 1 is more than a quantized MLP's
whole forward pass. A plain `jit` would skip the check anyway.

So traced checks are staged only inside ``with jq.value_checks():`` (or with
``JQ_VALUE_CHECKS=1`` in the environment), for use together with `checkify`::

    with jq.value_checks():
        err, y = checkify.checkify(jax.jit(f), errors=checkify.user_checks)(x)
    err.throw()

The switch applies to functions traced inside the block. The ops' explicit
``check_finite=True`` (non-finite float inputs) stages its check regardless.
"""

from __future__ import annotations

import contextlib
import contextvars
import os

from jax.experimental import checkify

__all__ = ["debug_check", "enabled", "value_checks"]

ENV_VAR = "JQ_VALUE_CHECKS"

_on: contextvars.ContextVar = contextvars.ContextVar("jq_value_checks", default=None)


def enabled() -> bool:
    """Whether traced value checks are staged now (context, then ``JQ_VALUE_CHECKS``)."""
    v = _on.get()
    if v is not None:
        return v
    return os.environ.get(ENV_VAR, "").strip().lower() in ("1", "true", "yes", "on")


@contextlib.contextmanager
def value_checks(enabled: bool = True):
    """Stages jq's value checks in functions traced inside the block (see the module doc)."""
    token = _on.set(bool(enabled))
    try:
        yield
    finally:
        _on.reset(token)


def debug_check(pred, msg: str, *fmt_args, **fmt_kwargs) -> None:
    """`checkify.debug_check` when `enabled()`, else nothing (a traced check costs dispatch)."""
    if enabled():
        checkify.debug_check(pred, msg, *fmt_args, **fmt_kwargs)
