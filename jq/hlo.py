"""Checks on lowered StableHLO: is the quantized path really integer, on every platform?

`jax.export` lowers for ``cpu``, ``cuda`` and ``tpu`` without the hardware. A
multi-platform export is one module in which platform-dependent code sits in
the branches of a ``stablehlo.case`` on the platform index; `case_branches`
splits those out so each branch can be checked on its own.

Example::

    exp = jax.export.export(jax.jit(f), platforms=("cpu", "cuda", "tpu"))(x)
    report = jq.hlo.integer_ops_by_platform(f, x)   # {"cpu": [...], "cuda": [...], "tpu": [...]}
"""

from __future__ import annotations

import re

import jax

__all__ = [
    "case_branches",
    "float_ops",
    "integer_ops",
    "integer_ops_by_platform",
]

_OP = re.compile(
    r"stablehlo\.(dot_general|convolution)\b.*?:\s*\((tensor<[^>]*>),\s*(tensor<[^>]*>)\)\s*->\s*(tensor<[^>]*>)"
)


def _elem(t: str) -> str:
    return t[len("tensor<") : -1].split("x")[-1]


def _ops(text: str):
    for line in text.splitlines():
        m = _OP.search(line)
        if m:
            yield m.group(1), _elem(m.group(2)), _elem(m.group(3)), _elem(m.group(4)), line.strip()


def integer_ops(text: str) -> list[str]:
    """dot_general / convolution lines with 8-bit (or 4-bit) integer operands producing i32."""
    return [
        ln
        for _, a, b, out, ln in _ops(text)
        if a in ("i8", "ui8", "i4", "ui4") and b in ("i8", "ui8", "i4", "ui4") and out == "i32"
    ]


def float_ops(text: str) -> list[str]:
    """dot_general / convolution lines with a floating-point operand."""
    return [
        ln
        for _, a, b, _, ln in _ops(text)
        if a.startswith(("f", "bf")) or b.startswith(("f", "bf"))
    ]


def case_branches(text: str) -> list[list[str]]:
    """The branch regions of every ``stablehlo.case`` in `text` (one list of branch texts per case)."""
    out = []
    for m in re.finditer(r'"stablehlo\.case"\([^)]*\)\s*\(\{', text):
        i = m.end()
        depth, start, branches = 1, i, []
        while i < len(text) and depth:
            c = text[i]
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0:
                    branches.append(text[start:i])
                    rest = text[i + 1 :].lstrip()
                    if rest.startswith(", {"):
                        i = text.index("{", i + 1)
                        depth, start = 1, i + 1
            i += 1
        out.append(branches)
    return out


def integer_ops_by_platform(fn, *args, platforms=("cpu", "cuda", "tpu")) -> dict[str, list[str]]:
    """Exports `fn` once per platform and returns the integer dot / conv lines of each module."""
    res = {}
    for p in platforms:
        exp = jax.export.export(jax.jit(fn), platforms=(p,))(*args)
        res[p] = integer_ops(exp.mlir_module())
    return res
