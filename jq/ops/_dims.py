"""Dimension numbers of a dot, and operand parameters mapped onto its output.

A dot's output layout is ``(batch..., lhs free..., rhs free...)``, as in
`jax.lax.dot_general`. A keepdims parameter of one operand (a scale, a zero
point, a row mask) has size 1 on every contracting axis; `to_output_layout`
transposes and reshapes it so that it broadcasts against that output.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

DimensionNumbers = tuple[tuple[Sequence[int], Sequence[int]], tuple[Sequence[int], Sequence[int]]]


def canonical_dn(dn, lhs_shape, rhs_shape) -> tuple:
    """Validates `dimension_numbers`; returns them as tuples of non-negative ints."""
    try:
        (lc, rc), (lb, rb) = dn
        lc, rc, lb, rb = (tuple(int(a) for a in x) for x in (lc, rc, lb, rb))
    except (TypeError, ValueError) as e:
        raise ValueError(
            "dimension_numbers must be ((lhs_contracting, rhs_contracting), "
            f"(lhs_batch, rhs_batch)), got {dn!r}"
        ) from e
    ln, rn = len(lhs_shape), len(rhs_shape)

    def norm(axes, n, what):
        out = []
        for a in axes:
            if not -n <= a < n:
                raise ValueError(f"dimension_numbers: {what} axis {a} is out of range for rank {n}")
            out.append(a % n)
        return tuple(out)

    lc, lb = norm(lc, ln, "lhs contracting"), norm(lb, ln, "lhs batch")
    rc, rb = norm(rc, rn, "rhs contracting"), norm(rb, rn, "rhs batch")
    if len(lc) != len(rc):
        raise ValueError(
            f"dimension_numbers: {len(lc)} lhs contracting axes but {len(rc)} rhs contracting axes"
        )
    if len(lb) != len(rb):
        raise ValueError(
            f"dimension_numbers: {len(lb)} lhs batch axes but {len(rb)} rhs batch axes"
        )
    if len(set(lc + lb)) != len(lc + lb) or len(set(rc + rb)) != len(rc + rb):
        raise ValueError(f"dimension_numbers {dn!r} repeat an axis")
    for a, b in zip(lc, rc, strict=True):
        if lhs_shape[a] != rhs_shape[b]:
            raise ValueError(
                f"contracting dimensions do not match: lhs axis {a} has size {lhs_shape[a]} but "
                f"rhs axis {b} has size {rhs_shape[b]} (lhs shape {tuple(lhs_shape)}, "
                f"rhs shape {tuple(rhs_shape)})"
            )
    for a, b in zip(lb, rb, strict=True):
        if lhs_shape[a] != rhs_shape[b]:
            raise ValueError(
                f"batch dimensions do not match: lhs axis {a} has size {lhs_shape[a]} but "
                f"rhs axis {b} has size {rhs_shape[b]} (lhs shape {tuple(lhs_shape)}, "
                f"rhs shape {tuple(rhs_shape)})"
            )
    return (lc, rc), (lb, rb)


def free_axes(n, contract, batch) -> tuple[int, ...]:
    """The axes of a rank-`n` operand that are neither contracted nor batch axes."""
    return tuple(a for a in range(n) if a not in contract and a not in batch)


def to_output_layout(p, side: str, dn, lshape, rshape) -> jax.Array:
    """Maps a keepdims parameter of one operand onto the output layout of the dot.

    `p` has size 1 on every contracting axis. The result broadcasts against the
    output ``(batch..., lhs free..., rhs free...)``.
    """
    (lc, rc), (lb, rb) = dn
    lfree, rfree = free_axes(len(lshape), lc, lb), free_axes(len(rshape), rc, rb)
    if side == "lhs":
        batch, free, contract = lb, lfree, lc
        shape = [p.shape[a] for a in lb + lfree] + [1] * len(rfree)
    else:
        batch, free, contract = rb, rfree, rc
        shape = [p.shape[a] for a in rb] + [1] * len(lfree) + [p.shape[a] for a in rfree]
    p = jnp.transpose(p, batch + free + contract)
    return p.reshape(shape)
