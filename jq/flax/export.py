"""`export`: a quantized Flax model as a portable, serialized StableHLO artifact.

The artifact holds ``jax.export`` of ``x -> jq.apply(model, qvars, x)`` (integer
dots included) and loads with `jq.deploy.load_exported` in a process that has
neither the model class nor the rules, nor Flax.

Example::

    blob = jq.export(model, qvars, x[:1], platforms=("cpu", "cuda", "tpu"), path="model.jqx")
    # elsewhere: only jax and jq
    f = jq.load_exported("model.jqx")
    y = f(x)  # bit-identical to jax.jit(lambda x: jq.apply(model, qvars, x))(x), any batch size
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax
import numpy as np

from jq.deploy import build_artifact
from jq.flax.apply import apply
from jq.flax.qvars import QuantizedVariables
from jq.flax.rules import Rule
from jq.flax.stream import model_kwargs_arg

__all__ = ["export"]


def _is_plain(leaf) -> bool:
    """Arrays that can travel as raw bytes (not PRNG keys or other extended dtypes)."""
    dt = getattr(leaf, "dtype", None)
    if dt is None or jax.dtypes.issubdtype(dt, jax.dtypes.extended):
        return False
    try:
        np.dtype(dt)
    except TypeError:
        return False
    return True


def _write(path, data: bytes) -> None:
    path = os.fspath(path)
    tmp = f"{path}.{os.getpid()}.tmp"  # plain open(): the file gets the umask's permissions
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def export(
    model,
    qvars: QuantizedVariables,
    example_inputs,
    rules: Sequence[Rule] | None = None,
    platforms: Sequence[str] | None = None,
    batch_polymorphic: bool = True,
    weights: str = "embedded",
    path: str | os.PathLike | None = None,
    *,
    method=None,
    model_kwargs: dict | None = None,
    kwargs: dict | None = None,
) -> bytes:
    """Exports ``x -> jq.apply(model, qvars, x)`` as a serialized, checked artifact.

    The function is lowered with `jax.export` (StableHLO, integer dots kept) for
    every platform in `platforms`, so an export for ``("cpu", "cuda", "tpu")``
    works on a CPU-only machine. The artifact (see `jq.deploy`) carries a magic
    header, a format version and a SHA-256 of its payload.

    Args:
      model: the model `qvars` was converted from (linen, nnx, a function or a Hugging
        Face model). Its outputs may be any pytree; in the artifact, dataclasses and
        namedtuples (HF's ``ModelOutput``) become dicts of their fields (`jq.deploy.plain_tree`),
        so that `jq.load_exported` needs no output class.
      qvars: `QuantizedVariables` from `jq.convert`.
      example_inputs: the model's positional input (an array) or a tuple of
        inputs; only shapes and dtypes matter.
      rules: optional; checked against `qvars` as in `jq.apply`.
      platforms: lowering targets among ``cpu``, ``cuda``, ``rocm``, ``tpu``; default: the
        platform of JAX's default backend (`jq.deploy.default_platform`).
      batch_polymorphic: make the leading axis of every input one symbolic
        dimension ``b``, so one artifact serves any batch size.
      weights: ``"embedded"``: the quantized weights are constants of the
        module (one self-contained blob). ``"separate"``: they are arguments of
        the exported function, stored as raw arrays in the artifact beside a
        weight-free module, and replaceable at load time.
      path: if given, the artifact is also written there (atomically).
      method: the model method (default ``__call__``).
      model_kwargs: static keyword arguments of the model (e.g. ``{"train":
        False}``), fixed in the artifact.
      kwargs: deprecated name of `model_kwargs`.

    Returns:
      The artifact bytes; `jq.load_exported` turns them (or the file) into a
      callable whose outputs are bit-identical, on the same backend and jax
      version, to ``jax.jit(lambda x: jq.apply(model, qvars, x))`` for embedded
      weights (constants in both), and to ``jax.jit(lambda q, x:
      jq.apply(model, q, x))(qvars, x)`` for separate weights (arguments in
      both). The two jitted forms themselves may differ in the last bit: XLA
      folds and reassociates constant scales.

    Checks: jq's value checks under jit (`checkify` debug checks) are dropped
    from the artifact, as they are no-ops under a plain `jax.jit`.

    Raises:
      TypeError: `qvars` is not `QuantizedVariables`.
      ValueError: unknown `weights` mode or platform; `qvars` does not belong to
        `model`; an input has no batch axis while `batch_polymorphic` is True.
    """
    if not isinstance(qvars, QuantizedVariables):
        raise TypeError(
            f"jq.export: `qvars` must be QuantizedVariables from jq.convert, got {type(qvars).__name__}"
        )
    if weights not in ("embedded", "separate"):
        raise ValueError(f"jq.export: `weights` must be 'embedded' or 'separate', got {weights!r}")
    inputs = (
        tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    )
    for i, x in enumerate(inputs):
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise TypeError(f"jq.export: example input {i} is a {type(x).__name__}, not an array")
    kwargs = model_kwargs_arg("export", model_kwargs, kwargs)

    def run(qv, xs):
        return apply(model, qv, *xs, rules=rules, method=method, **kwargs)

    info = {
        "model": type(model).__name__,
        "quantized_sites": len(qvars.plan.sites),
        "summary": qvars.summary(),
    }
    if weights == "embedded":
        blob = build_artifact(
            lambda *xs: run(qvars, xs),
            inputs,
            weights=(),
            weight_names=None,
            platforms=platforms,
            batch_polymorphic=batch_polymorphic,
            info=info,
            caller="jq.export",
        )
    else:
        flat, treedef = jax.tree_util.tree_flatten_with_path(qvars)
        is_arg = [_is_plain(v) for _, v in flat]
        args = [v for (_, v), a in zip(flat, is_arg) if a]
        names = [jax.tree_util.keystr(p) for (p, _), a in zip(flat, is_arg) if a]
        consts = [v for (_, v), a in zip(flat, is_arg) if not a]
        n = len(args)

        def fn(*a):
            it_w, it_c = iter(a[:n]), iter(consts)
            leaves = [next(it_w) if arg else next(it_c) for arg in is_arg]
            return run(jax.tree_util.tree_unflatten(treedef, leaves), a[n:])

        blob = build_artifact(
            fn,
            inputs,
            weights=args,
            weight_names=names,
            platforms=platforms,
            batch_polymorphic=batch_polymorphic,
            info=info,
            caller="jq.export",
        )
    if path is not None:
        _write(path, blob)
    return blob
