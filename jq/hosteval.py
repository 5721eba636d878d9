"""Evaluates a small traced JAX function with numpy on the host, bit for bit as XLA:CPU would.

A one-off computation (quantizing every weight of a model once, in `jq.convert`)
costs more to compile than to run: XLA:CPU needs 0.1-0.3 s of LLVM time per
fused kernel, against microseconds of arithmetic. `host_eval` traces the
function to a jaxpr (no compilation) and evaluates it with numpy instead.

That is exact only for operations whose float32 results IEEE 754 fixes
(``+ - * /``, min / max, comparisons, round-half-even, conversions of
integral values) and with XLA:CPU's floating-point environment reproduced:
XLA:CPU flushes denormals to zero, on inputs and on results (``x > 0`` is
False for ``x = 1e-40`` inside jit), so every float32 value here is flushed
too. Anything else (sums, whose order XLA chooses; transcendental functions;
float16 / bfloat16 / fp8 arithmetic; a backend other than the CPU; arrays
spread over several devices) makes `host_eval` return None, and the caller
compiles the function with `jax.jit` instead.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.extend
import numpy as np

__all__ = [
    "host_eval",
]

_F32_TINY = np.finfo(np.float32).tiny
_DTYPES = {np.dtype(t) for t in ("float32", "int8", "uint8", "int16", "int32", "uint32", "bool")}

_BINARY = {
    "add": np.add,
    "sub": np.subtract,
    "mul": np.multiply,
    "div": None,  # integer division truncates in XLA: handled below
    "max": np.maximum,
    "min": np.minimum,
    "and": np.bitwise_and,
    "or": np.bitwise_or,
    "gt": np.greater,
    "ge": np.greater_equal,
    "lt": np.less,
    "le": np.less_equal,
    "eq": np.equal,
    "ne": np.not_equal,
    "shift_left": np.left_shift,
}
_UNARY = {"neg": np.negative, "abs": np.abs, "is_finite": np.isfinite, "floor": np.floor}


class _Unsupported(Exception):
    pass


def _ftz(a: np.ndarray) -> np.ndarray:
    """XLA:CPU's flush-to-zero: float32 denormals become zeros of the same sign."""
    if a.dtype == np.float32:
        return np.where(np.abs(a) < _F32_TINY, np.copysign(np.float32(0), a), a)
    return a


def _broadcast_in_dim(x, shape, broadcast_dimensions, **_):
    expanded = [1] * len(shape)
    for i, d in enumerate(broadcast_dimensions):
        expanded[d] = x.shape[i]
    return np.broadcast_to(x.reshape(expanded), shape)


def _eqn(prim: str, invals: list, params: dict):
    if prim in _BINARY:
        a, b = invals
        if prim == "div":
            if a.dtype.kind in "iu":
                raise _Unsupported(prim)
            return np.divide(a, b)
        return _BINARY[prim](a, b)
    if prim in _UNARY:
        return _UNARY[prim](invals[0])
    x = invals[0]
    if prim == "round":
        if int(params["rounding_method"]) != 1:  # 1: to nearest even
            raise _Unsupported("round away from zero")
        return np.rint(x)
    if prim == "convert_element_type":
        return x.astype(params["new_dtype"])
    if prim == "broadcast_in_dim":
        return _broadcast_in_dim(x, **params)
    if prim == "reshape":
        return x.reshape(params["new_sizes"])
    if prim in ("reduce_max", "reduce_min", "reduce_and", "reduce_or"):
        fn = {"reduce_max": np.max, "reduce_min": np.min, "reduce_and": np.all}.get(prim, np.any)
        return fn(x, axis=tuple(params["axes"]))
    if prim == "select_n":
        return np.choose(x.astype(np.int32), invals[1:])
    if prim == "slice":
        strides = params["strides"] or (1,) * x.ndim
        return x[tuple(map(slice, params["start_indices"], params["limit_indices"], strides))]
    if prim in ("stack", "concatenate"):
        axis = params["axis"] if prim == "stack" else params["dimension"]
        return (np.stack if prim == "stack" else np.concatenate)(invals, axis=axis)
    if prim == "squeeze":
        return np.squeeze(x, axis=tuple(params["dimensions"]))
    if prim == "transpose":
        return np.transpose(x, params["permutation"])
    if prim == "clamp":
        return np.minimum(np.maximum(invals[1], invals[0]), invals[2])
    raise _Unsupported(prim)


def _run(jaxpr, consts, args) -> list:
    env = {}

    def read(v):
        if isinstance(v, jax.extend.core.Literal):
            return _ftz(np.asarray(v.val, dtype=v.aval.dtype))
        return env[v]

    for v, x in zip(jaxpr.constvars, consts):
        env[v] = _ftz(np.asarray(x))
    for v, x in zip(jaxpr.invars, args):
        env[v] = x
    for eqn in jaxpr.eqns:
        if any(np.dtype(o.aval.dtype) not in _DTYPES for o in eqn.outvars):
            raise _Unsupported(f"dtype of {eqn.primitive.name}")
        invals = [read(v) for v in eqn.invars]
        name = eqn.primitive.name
        if name in ("jit", "pjit"):
            inner = eqn.params["jaxpr"]
            outs = _run(inner.jaxpr, inner.consts, invals)
        else:
            outs = _eqn(name, invals, eqn.params)
            outs = outs if eqn.primitive.multiple_results else [outs]
        for v, o in zip(eqn.outvars, outs):
            env[v] = _ftz(np.asarray(o, dtype=v.aval.dtype))
    return [read(v) for v in jaxpr.outvars]


def _host_array(x) -> np.ndarray | None:
    """`x` as a float32 / integer numpy array, or None when it must stay where it is."""
    if isinstance(x, jax.Array):
        if isinstance(x, jax.core.Tracer) or len(x.sharding.device_set) != 1:
            return None
        if next(iter(x.sharding.device_set)).platform != "cpu":
            return None
    a = np.asarray(x)
    return _ftz(a) if a.dtype in _DTYPES else None


def host_eval(fn: Callable, *args):
    """``fn(*args)`` computed with numpy on the host, bit-identical to ``jax.jit(fn)(*args)`` on
    the CPU; None when that cannot be guaranteed (see the module docstring).

    `args` are pytrees of arrays (None leaves allowed); the result has
    ``fn``'s output structure, with numpy arrays as leaves.
    """
    if jax.default_backend() != "cpu":
        return None
    leaves, tree = jax.tree_util.tree_flatten(args)
    host = [_host_array(x) for x in leaves]
    if any(h is None for h in host):
        return None
    closed, out_shape = jax.make_jaxpr(
        lambda *xs: fn(*jax.tree_util.tree_unflatten(tree, xs)), return_shape=True
    )(*host)
    try:
        with np.errstate(all="ignore"):
            outs = _run(closed.jaxpr, closed.consts, host)
    except _Unsupported:
        return None
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), outs)
