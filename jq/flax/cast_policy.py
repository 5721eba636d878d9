"""The float16 / bfloat16 policy of `jq.cast`: which equations of a traced model stay float32, and why.

It reads the model through `jq.flax.dataflow.JaxprView` (calls and scan
bodies inlined, with producers and consumers); `keep_reasons` matches the patterns that lose
precision or range in a 16-bit float (norm statistics, softmax, reductions,
losses, transcendentals, literals the format cannot hold, calibrated
overflow) and gives each kept equation its category (`KEEP_CATEGORIES`) and a
reason.
"""

from __future__ import annotations

import math
import re

import jax.numpy as jnp
import numpy as np

from jq import numerics
from jq.flax.dataflow import JaxprView, Node

__all__ = [
    "KEEP_CATEGORIES",
    "LOW_DTYPES",
    "castable",
    "is_float",
    "keep_reasons",
]

#: Reasons `cast` may keep an equation in float32; pass a subset as ``keep=``.
#:  * ``"norm"``: ``1/sqrt(var + eps)`` of a norm (and its epsilon, and the
#:    multiply / divide by it).
#:  * ``"softmax"``: ``exp`` feeding a sum, the sum, and the division by it.
#:  * ``"reduction"``: sums, products, max / min, cumulative ops, and squares
#:    that feed a sum (``x**2`` overflows float16 for ``|x| > 256``).
#:  * ``"loss"``: ``log`` / ``log1p`` (log-softmax, cross-entropy).
#:  * ``"transcendental"``: other ``exp``, ``expm1``, ``exp2``, ``pow``.
#:  * ``"literal"``: an equation with a literal the format cannot hold as a
#:    normal number (``1e-12`` underflows float16; ``-1e9`` overflows it).
#:  * ``"overflow"``: calibration saw ``max |x|`` above the format's max at the
#:    equation's output or input.
KEEP_CATEGORIES = ("norm", "softmax", "reduction", "loss", "transcendental", "literal", "overflow")

LOW_DTYPES = {"float16": jnp.float16, "bfloat16": jnp.bfloat16}
_SUM_REDUCTIONS = {"reduce_sum", "cumsum", "reduce_prod", "cumprod", "cumlogsumexp"}
_REDUCTIONS = _SUM_REDUCTIONS | {"reduce_max", "reduce_min", "cummax", "cummin"}
_TRANSPARENT = {
    "convert_element_type",
    "broadcast_in_dim",
    "reshape",
    "squeeze",
    "expand_dims",
    "copy",
    "copy_p",
    "transpose",
    "stop_gradient",
    "reduce_precision",
}
_CONTROL = {"while", "cond"}
# primitives that need their original float dtype (bit-level or dtype-typed)
_DTYPE_BOUND = {"bitcast_convert_type", "reduce_precision", "nextafter"}


def is_float(dtype) -> bool:
    return jnp.issubdtype(dtype, jnp.floating)


def castable(dtype) -> bool:
    """Float types at least as wide as float32: the ones the policy lowers."""
    return is_float(dtype) and jnp.dtype(dtype).itemsize >= 4


# ---------------------------------------------------------------------------------------
# pattern matching on the jaxpr view (jq.flax.dataflow), through layout ops and casts
# ---------------------------------------------------------------------------------------
def src(g: JaxprView, r, depth: int = 8) -> Node | None:
    """The producer of `r`, looking through layout ops and casts."""
    for _ in range(depth):
        n = g.producer.get(r) if r[0] == "v" else None
        if n is None or n.prim not in _TRANSPARENT:
            return n
        r = n.ins[0]
    return None


def users(g: JaxprView, r, depth: int = 8) -> list[Node]:
    """Consumers of `r`, looking through layout ops and casts."""
    out, todo = [], [(r, 0)]
    while todo:
        x, d = todo.pop()
        for n in g.consumers.get(x, ()):
            if n.prim in _TRANSPARENT and d < depth:
                todo.append((n.outs[0], d + 1))
            else:
                out.append(n)
    return out


def literal(g: JaxprView, r, depth: int = 8):
    """A scalar literal behind `r` (possibly broadcast or cast), or None."""
    for _ in range(depth):
        if r[0] == "lit":
            return r[1]
        n = g.producer.get(r)
        if n is None or n.prim not in _TRANSPARENT:
            return None
        r = n.ins[0]
    return None


def _is_square(g: JaxprView, n: Node) -> bool:
    if n.prim == "square":
        return True
    if n.prim == "integer_pow":
        return n.eqn.params.get("y", 0) % 2 == 0
    return n.prim == "mul" and n.ins[0] == n.ins[1]


def _reduction_behind(g: JaxprView, r, depth: int = 6) -> bool:
    """Whether a sum-like reduction feeds `r` through a few elementwise ops (a statistic)."""
    todo = [(r, 0)]
    seen = set()
    while todo:
        x, d = todo.pop()
        if x[0] != "v" or x in seen or d > depth:
            continue
        seen.add(x)
        n = g.producer.get(x)
        if n is None:
            continue
        if n.prim in _SUM_REDUCTIONS:
            return True
        if len(n.outs) == 1:
            todo.extend((i, d + 1) for i in n.ins)
    return False


def _epsilon_behind(g: JaxprView, r, depth: int = 4):
    """The literal added on the way to `r` (``var + eps``), or None."""
    for _ in range(depth):
        n = src(g, r)
        if n is None:
            return None
        if n.prim == "add":
            for i in n.ins:
                v = literal(g, i)
                if v is not None:
                    return float(np.asarray(v)), n
        if n.prim in ("max", "add", "sub", "div", "mul"):
            r = n.ins[0]
            continue
        return None
    return None


def keep_reasons(
    g: JaxprView, fmt: str, keep: frozenset, keep_modules: tuple, overflow: dict
) -> dict:
    """{path: (category, reason)} of the equations to keep in float32."""
    info = numerics.format_info(fmt)
    reasons: dict = {}
    order = (
        "user",
        "overflow",
        "control_flow",
        "norm",
        "softmax",
        "loss",
        "reduction",
        "transcendental",
        "literal",
    )

    def add(n, cat, why):
        if cat not in ("user", "control_flow") and cat not in keep:
            return
        old = reasons.get(n.path)
        if old is None or order.index(cat) < order.index(old[0]):
            reasons[n.path] = (cat, why)

    for n in g.nodes:
        p = n.prim
        if keep_modules and any(re.fullmatch(rx, n.module) for rx in keep_modules):
            add(n, "user", "module matches keep_modules")
        if p in _CONTROL:
            add(n, "control_flow", f"{p}: control flow is evaluated in float32")
        if p in _DTYPE_BOUND:
            add(n, "control_flow", f"{p} depends on the exact float32 bits")
        for r in n.ins:
            if r[0] == "v" and r in overflow and "overflow" in keep:
                add(
                    n,
                    "overflow",
                    f"model input max |x| = {overflow[r]:.4g} overflows {fmt} (max {info.max:.6g})",
                )
        if n.path in overflow:
            m = overflow[n.path]
            add(n, "overflow", f"max |x| = {m:.4g} overflows {fmt} (max {info.max:.6g})")
            for r in n.outs:
                for u in users(g, r):
                    add(
                        u,
                        "overflow",
                        f"input max |x| = {m:.4g} overflows {fmt} (max {info.max:.6g})",
                    )
        if p in _REDUCTIONS:
            s = src(g, n.ins[0])
            if s is not None and s.prim == "exp" and p in _SUM_REDUCTIONS:
                add(n, "softmax", "softmax: sum of exp")
            elif s is not None and _is_square(g, s):
                add(n, "reduction", f"{p} of squares (variance / mean square statistics)")
            else:
                add(n, "reduction", f"{p}: reduction in float32")
        elif _is_square(g, n) and any(u.prim in _SUM_REDUCTIONS for u in users(g, n.outs[0])):
            add(
                n,
                "reduction",
                f"square feeding a sum (x**2 overflows {fmt} above |x| = "
                f"{math.sqrt(info.max):.4g})",
            )
        elif p == "exp":
            if any(u.prim in _SUM_REDUCTIONS for u in users(g, n.outs[0])):
                add(n, "softmax", "softmax: exp")
            else:
                add(n, "transcendental", f"exp overflows {fmt} above x = {math.log(info.max):.4g}")
        elif p in ("expm1", "exp2", "pow"):
            add(n, "transcendental", f"{p}: range exceeds {fmt}")
        elif p in ("log", "log1p"):
            s = src(g, n.ins[0])
            if s is not None and s.prim in _SUM_REDUCTIONS:
                add(n, "loss", "log-sum-exp (log_softmax / cross-entropy)")
            else:
                add(n, "loss", f"{p} (losses, log-probabilities)")
        elif p == "div":
            s = src(g, n.ins[1])
            if (
                s is not None
                and s.prim in _SUM_REDUCTIONS
                and (e := src(g, s.ins[0])) is not None
                and e.prim == "exp"
            ):
                add(n, "softmax", "softmax: division by the sum of exp")
        if p in ("rsqrt", "sqrt") and _reduction_behind(g, n.ins[0]):
            found = _epsilon_behind(g, n.ins[0])
            if found is not None:
                eps, add_node = found
                verdict = info.check(eps)
                add(n, "norm", f"norm: {p}(var + eps), eps={eps:.3g} {verdict}")
                add(add_node, "norm", f"norm epsilon {eps:.3g}: {verdict}")
            else:
                add(n, "norm", f"norm: {p} of a statistic")
            for u in users(g, n.outs[0]):
                if u.prim in ("mul", "div"):
                    add(u, "norm", f"norm: scaling by the {p} statistic")
        for r in n.ins:
            if r[0] != "lit":
                continue
            v = np.asarray(r[1])
            if (
                v.ndim == 0
                and is_float(v.dtype)
                and np.isfinite(v)
                and not info.representable(float(v))
            ):
                add(n, "literal", f"literal {float(v):.3g} {info.check(float(v))}")
    return reasons
