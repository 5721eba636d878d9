"""`einsum`: a two-operand einsum lowered to the quantized `dot_general`.

Indices in both operands and in the output are batch axes, indices in both
operands but not in the output are contracted, the others are free; the
result of the dot is transposed into the order the subscripts give.
"""

from __future__ import annotations

import functools
import string

import jax
import jax.numpy as jnp

from jq.ops._dot import dot_general
from jq.qparams import QParams, QuantSpec
from jq.quantize import QArray


@functools.lru_cache(maxsize=256)
def parse_einsum(subscripts: str, lndim: int, rndim: int):
    """Parses a two-operand einsum into (dimension_numbers, output permutation)."""
    s = subscripts.replace(" ", "")
    if "->" in s:
        ins, out = s.split("->")
        explicit = True
    else:
        ins, out, explicit = s, None, False
    parts = ins.split(",")
    if len(parts) != 2:
        raise ValueError(f"einsum: expected two operands in {subscripts!r}, got {len(parts)}")
    letters = [c for c in string.ascii_letters if c not in s]
    n_ells = []
    for p, nd in zip(parts, (lndim, rndim), strict=True):
        n_ells.append(nd - (len(p) - 3) if "..." in p else 0)
        if n_ells[-1] < 0:
            raise ValueError(f"einsum: {p!r} has more axes than the operand's rank {nd}")
    ell = "".join(letters[: max(n_ells)])  # ellipsis axes align on the right
    terms = []
    for p, nd, n_ell in zip(parts, (lndim, rndim), n_ells, strict=True):
        if "..." in p:
            p = p.replace("...", ell[len(ell) - n_ell :])
        if len(p) != nd:
            raise ValueError(f"einsum: subscripts {p!r} do not match an operand of rank {nd}")
        if len(set(p)) != len(p):
            raise ValueError(f"einsum: repeated index in {p!r} (traces are not supported)")
        terms.append(p)
    lt, rt = terms
    if explicit:
        out = out.replace("...", ell)
    else:
        counts = {c: (lt + rt).count(c) for c in set(lt + rt)}
        out = ell + "".join(sorted(c for c, n in counts.items() if n == 1 and c not in ell))
    for c in out:
        if c not in lt and c not in rt:
            raise ValueError(f"einsum: output index {c!r} appears in no operand of {subscripts!r}")
    for c in lt + rt:
        if c not in out and not (c in lt and c in rt):
            raise ValueError(
                f"einsum: index {c!r} in {subscripts!r} is summed over in one operand only; "
                "reduce that operand first"
            )
    batch = [c for c in lt if c in rt and c in out]
    contract = [c for c in lt if c in rt and c not in out]
    dn = (
        (tuple(lt.index(c) for c in contract), tuple(rt.index(c) for c in contract)),
        (tuple(lt.index(c) for c in batch), tuple(rt.index(c) for c in batch)),
    )
    got = batch + [c for c in lt if c not in rt] + [c for c in rt if c not in lt]
    perm = tuple(got.index(c) for c in out)
    return dn, perm


def einsum(
    subscripts: str,
    lhs,
    rhs,
    *,
    precision=None,
    preferred_element_type=None,
    lhs_spec: QuantSpec | None = None,
    lhs_qparams: QParams | None = None,
    rhs_spec: QuantSpec | None = None,
    rhs_qparams: QParams | None = None,
    check_finite: bool = False,
) -> jax.Array:
    """Quantized two-operand einsum, lowered to `dot_general` (see there for modes).

    Indices in both operands and in the output are batch axes (scales on them
    are allowed, e.g. per-head scales in attention); indices in both operands
    but not in the output are contracted; the others are free.

    Args:
      subscripts: e.g. ``"bqhd,bkhd->bhqk"``; ``...`` is supported.
      lhs, rhs: float arrays or `QArray`s.
      precision, preferred_element_type, lhs_spec, lhs_qparams, rhs_spec,
        rhs_qparams, check_finite: as in `dot_general` (the signature matches
        what ``flax.nnx.Einsum`` passes).

    Returns:
      The result in the order the subscripts give.

    Raises:
      ValueError: malformed subscripts, an index summed in one operand only, or
        any error of `dot_general`.
    """
    if not isinstance(subscripts, str):
        raise TypeError(f"einsum: subscripts must be a string, got {type(subscripts).__name__}")
    lnd = lhs.ndim if isinstance(lhs, QArray) else jnp.ndim(lhs)
    rnd = rhs.ndim if isinstance(rhs, QArray) else jnp.ndim(rhs)
    dn, perm = parse_einsum(subscripts, lnd, rnd)
    out = dot_general(
        lhs,
        rhs,
        dn,
        precision,
        preferred_element_type,
        lhs_spec=lhs_spec,
        lhs_qparams=lhs_qparams,
        rhs_spec=rhs_spec,
        rhs_qparams=rhs_qparams,
        check_finite=check_finite,
    )
    if perm != tuple(range(len(perm))):
        out = jnp.transpose(out, perm)
    return out
