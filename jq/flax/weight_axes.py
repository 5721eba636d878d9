"""Weight axes in the dot's terms: what each stored axis of a parameter is to the op it feeds.

A model stores a kernel however its author chose: Flax's Dense ``(K, N)``,
Hugging Face's GPT-2 ``Conv1D`` ``(N, K)`` read through ``kernel.T``, an
einsum query ``(D, H, Dh)``, an output projection ``(H, Dh, D)``, a stacked
key/value ``(2, D, KV, Dh)`` read through ``w[0]`` / ``w[1]``. The site finder
(`jq.flax._graph.SiteFinder`) follows the parameter through those layout ops
and records, for each axis of the operand the op reads, the stored axes it
comes from (`Site.axes`). From that, each stored axis gets a role:

* ``"contracting"``: summed over by the dot (the conv's input features and
  window; an axis split between contracted and kept parts is ``"mixed"``);
* ``"output"``: a free axis of the dot, kept in its output (the conv's output
  features; the rows of a gathered table);
* ``"batch"``: a batch axis of the dot (a per-head weight in ``bhd,hdk->bhk``);
* ``"select"``: an axis the model indexes before the op (``w[0]`` of a stacked
  weight): each slice is its own weight;
* ``"layer"``: a scan-stacked axis (one slice per layer of ``nn.scan``).

A weight spec with ``axis="out"`` then means: one scale per element of every
axis that is not contracted (output, batch, select, layer), and with
``group_size=g`` blocks of ``g`` along the largest contracting axis (the
largest divisor of its size not above ``g``; per channel when that divisor is
below ``g / 4``). An integer spec keeps its meaning (axes as stored) and is
checked: a per-channel scale on a contracting axis is an error that names
the site, the parameter, what each axis is to the dot, and the spec that fits.
"""

from __future__ import annotations

from jq.qparams import QuantSpec

__all__ = ["axis_roles", "describe_axes", "resolve_weight_spec"]

_CHANNEL_ROLES = ("output", "batch", "select", "layer")


def _operand_roles(site) -> list[str] | None:
    """The role of each axis of the parameter operand, or None if the site has no such view."""
    eqn = site.eqn
    nd = len(site.in_avals[site.operand].shape)
    if site.kind == "dot":
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        contract, batch = (rc, rb) if site.operand == 1 else (lc, lb)
        return [
            "contracting" if a in contract else "batch" if a in batch else "output"
            for a in range(nd)
        ]
    if site.kind == "conv":
        out_dim = eqn.params["dimension_numbers"].rhs_spec[0]
        return ["output" if a == out_dim else "contracting" for a in range(nd)]
    if site.kind == "embed":
        rows = set(eqn.params["dimension_numbers"].start_index_map)
        return ["output" if a in rows else "feature" for a in range(nd)]
    return None


def axis_roles(site) -> tuple[str, ...] | None:
    """What each stored axis of the site's parameter (scan-stacked axes included) is to its op.

    Returns None for a site without a parameter, or whose parameter the finder
    could not follow.
    """
    if site.leaf is None or site.axes is None:
        return None
    op_roles = _operand_roles(site)
    if op_roles is None:
        return None
    depth = len(site.stack)
    out = []
    for a in range(len(site.leaf.shape)):
        got = {r for r, src in zip(op_roles, site.axes) if a in src}
        if not got:
            out.append("layer" if a < depth else "select")
        elif len(got) == 1:
            out.append(got.pop())
        else:
            out.append("mixed")
    return tuple(out)


def describe_axes(site, roles=None) -> str:
    """``"(0: output 2304, 1: contracting 768)"``: each stored axis of the parameter, its role and size."""
    roles = axis_roles(site) if roles is None else roles
    shape = site.leaf.shape
    return "(" + ", ".join(f"{a}: {r} {n}" for a, (r, n) in enumerate(zip(roles, shape))) + ")"


def _fitting_axes(roles, depth) -> tuple[int, ...]:
    return tuple(a - depth for a, r in enumerate(roles) if a >= depth and r in _CHANNEL_ROLES)


def _group(spec: QuantSpec, roles, shape, depth) -> tuple[dict, str | None]:
    """Block fields for ``group_size`` along the largest contracting axis, and a note if adjusted."""
    g = spec.group_size
    contract = [a for a, r in enumerate(roles) if a >= depth and r == "contracting"]
    if not contract:
        return {}, f"group_size={g}: no contracting axis; one scale per output channel"
    axis = max(contract, key=lambda a: (shape[a], a))
    n = shape[axis]
    if n % g == 0:
        return {"block_axis": axis - depth, "block_size": g}, None
    d = max(k for k in range(1, min(g, n) + 1) if n % k == 0)
    if d == n:
        return {}, (
            f"group_size={g}: the contraction (axis {axis}, size {n}) is one group; "
            "one scale per output channel"
        )
    if 4 * d < g:
        return {}, (
            f"group_size={g}: no divisor of the contraction (axis {axis}, size {n}) from {g // 4} "
            f"to {g}; one scale per output channel"
        )
    return {"block_axis": axis - depth, "block_size": d}, (
        f"group_size={g} -> {d}: {g} does not divide the contraction (axis {axis}, size {n})"
    )


def resolve_weight_spec(
    site, spec: QuantSpec, rule_index: int, check: bool = True
) -> tuple[QuantSpec, str | None]:
    """The rule's weight spec in the parameter's per-layer stored axes, and a note on it.

    ``axis="out"`` becomes the stored axes that the op does not contract (for
    a gathered table: its rows) and ``group_size`` a block along the largest
    contracting axis (see the module docstring). An integer spec is returned
    unchanged after checking (with `check`) that no per-channel scale lies on an
    axis the op contracts.

    Raises:
      ValueError: an integer spec puts a channel scale on a contracting axis;
        the message names the site, the parameter, its axes' roles and the
        spec that fits.
    """
    roles = axis_roles(site)
    if roles is None:
        if spec.semantic:
            raise ValueError(
                f"jq: rules[{rule_index}] at site {site.name!r}: axis='out' needs the parameter's "
                "path to its op, which jq could not follow here; give integer axes"
            )
        return spec, None
    depth = len(site.stack)
    shape = tuple(site.leaf.shape)
    if not spec.semantic:
        if check:
            _check_explicit(site, spec, roles, depth, rule_index)
        return spec, None
    channel = _fitting_axes(roles, depth)
    kw = {"axis": channel or None, "group_size": None}
    note = None
    if spec.group_size is not None:
        if site.kind in ("dot",):
            blocks, note = _group(spec, roles, shape, depth)
            kw.update(blocks)
        else:
            note = f"group_size={spec.group_size}: a {site.kind} site takes one scale per channel"
    return spec.replace(**kw), note


def _check_explicit(site, spec: QuantSpec, roles, depth, rule_index) -> None:
    if site.kind not in ("dot", "conv"):
        return
    per = roles[depth:]
    shape = tuple(site.leaf.shape[depth:])
    try:
        axes = spec.channel_axes(len(per), site.name)
    except ValueError:
        return  # out of range: reported with the site by `select.check_weight_fit`
    bad = [a for a in axes if per[a] in ("contracting", "mixed") and shape[a] > 1]
    if not bad:
        return
    fit = _fitting_axes(roles, depth)
    wrote = spec.axis[0] if len(spec.axis) == 1 else spec.axis
    a = bad[0]
    raise ValueError(
        f"jq: rules[{rule_index}] puts a per-channel weight scale on an axis that site "
        f"{site.name!r} contracts: QuantSpec.axis={wrote} is axis {a + depth} of parameter "
        f"{site.leaf.path!r} with shape {tuple(site.leaf.shape)}, whose axes are, to its "
        f"{site.kind}: {describe_axes(site, roles)}. Use QuantSpec({spec.format!r}, axis='out') "
        f"(per output channel, whatever the layout)"
        + (f", or axis={fit[0] if len(fit) == 1 else fit}" if fit else "")
        + "; for scales that vary along the contraction use group_size= with axis='out'"
    )
