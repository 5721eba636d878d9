"""Quantized KV caches for unmodified linen / nnx attention in decode mode.

linen ``nn.MultiHeadDotProductAttention(decode=True)`` keeps ``cached_key``,
``cached_value`` ``(batch, length, heads, head_dim)`` and ``cache_index`` in its
``cache`` collection; nnx ``nnx.MultiHeadAttention`` keeps the same three as
``nnx.Cache`` variables after ``init_cache``. `kv_cache` replaces the key and
value leaves of the modules a rule selects by `QArray` caches (`jq.kv_quant`:
int8 / int4 / fp8 codes, one bfloat16 scale per token and head). `jq.apply`
then runs the model unchanged: the traced decode step writes the new token
with ``lax.dynamic_update_slice``, and the interpreter turns that write into a
quantized write (`jq.kv_quant.update_slice`: only the new vectors are
quantized); the attention reads the cache dequantized (codes times scales,
an elementwise product XLA fuses into the read). When a rule also selects the
attention's ``"act_dot"`` sites, the dequantized cache is quantized again by
that rule's spec for the integer ``q k^T`` and ``p v`` dots: the stored codes
are not fed to the dots as they are, since ``p v`` contracts over tokens, the
axis that carries the cache's scales.

Why the interpreter and not an interceptor or a method override: the cache
writes happen inside ``MultiHeadDotProductAttention.__call__`` (linen) and
``MultiHeadAttention.__call__`` (nnx), which create and assign the cache
variables in the float dtype of the keys; no Flax hook sees them, and
overriding the method means re-implementing attention for each API. In the
traced jaxpr the write is one ``dynamic_update_slice`` whose operand is the
cache leaf, the same for linen and nnx, and jq already evaluates that jaxpr
with its own values for quantized leaves.

Example::

    rules = [jq.Rule(".*", ops=("dot",), weight=jq.QuantSpec("int8", axis="out")),
             jq.Rule(".*", ops=("kv_cache",), weight=None, activation=jq.QuantSpec("int8"))]
    qvars = jq.convert(model, variables, rules, args=(tok,), model_kwargs={"mutable": ["cache"]})
    qvars = jq.kv_cache(model, qvars, rules)           # cached_key / cached_value -> int8
    logits, upd = jq.apply(model, qvars, tok, mutable=["cache"])   # linen
    qvars = jq.with_cache(qvars, upd)           # the next step's variables
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jq.flax.qvars import QuantizedVariables
from jq.flax.rules import Rule, check_rules, match_rule
from jq.kv_quant import cache_nbytes, check_kv_spec, quantize_kv
from jq.qparams import QuantSpec
from jq.quantize import QArray, dequantize

__all__ = ["kv_cache", "kv_cache_bytes", "kv_cache_rule", "with_cache"]

_CACHE_LEAVES = ("cached_key", "cached_value")


def kv_cache_rule(fmt: str = "int8", path_regex: str = ".*") -> Rule:
    """``Rule(path_regex, ops=("kv_cache",), weight=None, activation=QuantSpec(fmt))``: a cache preset."""
    spec = check_kv_spec(QuantSpec(fmt), "jq.kv_cache_rule")
    return Rule(path_regex, ops=("kv_cache",), weight=None, activation=spec)


def _cache_module(path: str, kind: str) -> str | None:
    """The module path of a cache key / value leaf, or None if `path` is not one."""
    parts = path.split("/")
    if parts[-1] not in _CACHE_LEAVES:
        return None
    if kind == "linen":
        return "/".join(parts[1:-1]) if parts[0] == "cache" else None
    return "/".join(parts[:-1])


def _check_fresh(variables: Mapping, path: str, mod: str, fn: str) -> None:
    """Raises if the cache at `path` has been advanced (its module's ``cache_index`` is not 0).

    Quantizing a cache that already holds tokens, before the decode loop that
    wrote them has finished, leaves the caller's loop and the quantized cache
    out of step (a prefilled cache is quantized token by token as it is written).
    """
    head, _, _ = path.rpartition("/")
    idx = variables.get(f"{head}/cache_index" if head else "cache_index")
    if idx is None or isinstance(idx, jax.core.Tracer):
        return
    idx = np.asarray(idx)
    if np.any(idx != 0):
        raise ValueError(
            f"{fn}: the cache of {mod!r} has already been advanced (cache_index = "
            f"{idx.tolist()}); quantize a fresh cache, before the first decode step (linen: "
            "the 'cache' collection from model.init; nnx: right after init_cache), and let "
            "jq.apply write every token into the quantized cache"
        )


def kv_cache(model, qvars: QuantizedVariables, rules: Sequence[Rule]) -> QuantizedVariables:
    """Stores the KV caches the rules select quantized (``ops=("kv_cache",)`` rules).

    Each ``cached_key`` / ``cached_value`` leaf whose module path the first
    matching ``"kv_cache"`` rule selects becomes a `QArray` with the rule's
    activation format (int8, int4, fp8 e4m3 / e5m2; symmetric, one bfloat16
    scale per token and head); its current contents are quantized (zeros for a fresh
    cache). Other leaves are unchanged.

    Args:
      model: the linen or nnx model (decode mode; nnx after ``init_cache``).
      qvars: its `QuantizedVariables` (`jq.convert`; for float weights, convert
        with the ``"kv_cache"`` rules alone).
      rules: the rule list; rules without ``"kv_cache"`` in their ops are ignored.

    Returns:
      `QuantizedVariables` with quantized caches.

    Raises:
      TypeError: `qvars` is not `QuantizedVariables`.
      ValueError: no cache leaf is selected (the model is not in decode mode, or
        nnx ``init_cache`` was not called), a selected cache has already been
        advanced (``cache_index`` is not 0), or a rule's format cannot hold a cache.
    """
    fn = "jq.kv_cache"
    if not isinstance(qvars, QuantizedVariables):
        raise TypeError(
            f"{fn}: expected QuantizedVariables from jq.convert, got {type(qvars).__name__}"
        )
    rules = check_rules(rules)
    kind = qvars.plan.model_kind
    new = dict(qvars.variables)
    dtypes = {leaf[0]: leaf for leaf in qvars.plan.float_leaves}
    selected = []
    for path, v in qvars.variables.items():
        mod = _cache_module(path, kind)
        if mod is None:
            continue
        i = match_rule(rules, mod, "kv_cache")
        if i is None or rules[i].activation is None:
            continue
        spec = check_kv_spec(rules[i].activation, fn)
        _check_fresh(qvars.variables, path, mod, fn)
        if isinstance(v, QArray):
            v = dequantize(v, np.float32)
        else:  # the cache's float dtype: `apply` traces the model with it (a bf16 model's cache)
            dtypes[path] = (path, tuple(v.shape), jnp.dtype(v.dtype).name)
        new[path] = quantize_kv(jnp.asarray(v, jnp.float32), spec)  # zeros: unit scales
        selected.append(path)
    if not selected:
        raise ValueError(
            f"{fn}: no cached_key / cached_value leaf is selected by a 'kv_cache' rule; the model "
            "must be in decode mode (linen: decode=True and variables from init; nnx: call "
            "init_cache before jq.convert)"
        )
    plan = dataclasses.replace(qvars.plan, float_leaves=tuple(dtypes.values()))
    return dataclasses.replace(qvars, variables=new, plan=plan)


def with_cache(qvars: QuantizedVariables, updates: Mapping) -> QuantizedVariables:
    """`qvars` with the variables of a linen ``mutable=["cache"]`` call (nested dicts) put in.

    Quantized caches come back from `jq.apply` as `QArray` leaves and are stored
    as they are. A ``cache`` leaf that `qvars` lacks is added (with its shape in
    the signature): weights quantized on the full-sequence model (`jq.convert`,
    `jq.gptq`, `jq.awq`) take the decode model's fresh cache this way, e.g.
    ``jq.with_cache(qvars, {"cache": decode_model.init(key, x)["cache"]})``.

    Raises:
      ValueError: a leaf outside the ``cache`` collection that `qvars` does not hold.
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(
        dict(updates), is_leaf=lambda x: isinstance(x, QArray)
    )
    new = dict(qvars.variables)
    sig = dict(qvars.plan.signature)
    for path, leaf in flat:
        key = "/".join(str(getattr(k, "key", k)) for k in path)
        if key not in new and not key.startswith("cache/"):
            raise ValueError(f"jq.with_cache: {key!r} is not a variable of qvars nor a cache leaf")
        new[key] = leaf
        sig[key] = tuple(np.shape(leaf) if not isinstance(leaf, QArray) else leaf.shape)
    plan = qvars.plan
    if tuple(sig.items()) != tuple(plan.signature):
        plan = dataclasses.replace(plan, signature=tuple(sig.items()))
    return dataclasses.replace(qvars, variables=new, plan=plan)


def kv_cache_bytes(qvars: QuantizedVariables) -> int:
    """Bytes of every ``cached_key`` / ``cached_value`` leaf (codes and scales)."""
    kind = qvars.plan.model_kind
    return sum(
        cache_nbytes(v) for p, v in qvars.variables.items() if _cache_module(p, kind) is not None
    )
