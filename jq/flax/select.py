"""Rule matching and the specs it implies: which sites a rule list selects, and how.

Every verb (`calibrate`, `convert`, `apply`, `qat`, `report`, `cast`,
`sensitivity`, `auto_quantize`, `gptq`, `smoothquant`) decides the same way:

* `choose` matches each site of the traced model against the rules (first
  match wins) and keeps the sites whose rule quantizes something there, with
  the rule's weight spec resolved for the site (``axis="out"`` becomes the
  stored axes the dot does not contract; integer axes are checked:
  `jq.flax.weight_axes`);
* `leaf_specs` gives every quantized parameter leaf one weight spec, in the
  stored layout (scan-stacked axes added by `weight_spec`), and checks that
  all sites reading the leaf agree;
* `weight_storage` decides how `convert` stores them: one `QArray` in place of
  the parameter when every use of it is selected with one spec, else one
  quantized copy per selected use (a tied embedding whose gather and head are
  quantized differently, or one of them not at all);
* `activation_spec` checks a rule's activation spec against the operand it
  quantizes;
* `scan_lengths` / `stack_tree` stack per-site state over the scans around a
  site (one slice per layer of an ``nn.scan`` / ``nnx.scan``);
* `dot_geometry` / `activation_matrix` give the ``(K, N)`` view of a
  parameter dot that GPTQ and SmoothQuant work on.
"""

from __future__ import annotations

import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from jq.flax._graph import _LAYOUT_OPS, Site, SiteFinder
from jq.flax.rules import Rule, match_rule, skip_matches
from jq.flax.weight_axes import resolve_weight_spec
from jq.qparams import QuantSpec

__all__ = [
    "Choice",
    "activation_matrix",
    "activation_spec",
    "check_weight_fit",
    "choose",
    "direct_weight_sites",
    "movable_weight_sites",
    "operand_perm",
    "dot_geometry",
    "gathered_leaves",
    "from_view",
    "spec_to_view",
    "to_view",
    "leaf_specs",
    "scan_lengths",
    "site_positions",
    "stack_tree",
    "weight_spec",
    "weight_storage",
]


@dataclasses.dataclass(frozen=True)
class Choice:
    """A site together with the rule that selects it (and that rule's index in the list)."""

    site: Site
    rule_index: int
    rule: Rule  # its weight spec resolved for this site (`weight_axes.resolve_weight_spec`)
    note: str | None = None  # how a semantic weight spec was adapted here (a group size)

    @property
    def mode(self) -> str:
        """``static`` / ``dynamic`` / ``weight_only`` (an embedding is always weight-only)."""
        if self.site.kind == "embed":
            return "weight_only"
        return self.rule.mode


def choose(finder: SiteFinder, rules: tuple[Rule, ...], warn: bool = True) -> dict[str, Choice]:
    """``{site name: Choice}`` for every site a rule selects, in evaluation order.

    A site is selected when the first rule matching its module path and kind
    quantizes something there: the activations of an ``act_dot``, the weight of
    any other site. With `warn`, a rule that selects no site is reported.
    """
    chosen: dict[str, Choice] = {}
    used = set()
    positions = site_positions(finder)
    gathered = {s.leaf.index for s in finder.sites if s.kind == "embed"}
    for s in finder.sites:
        # a site of the root module (module path '') is matched by its own name, e.g. "w"
        path = s.module_path or s.name
        i = match_rule(rules, path, s.kind, positions.get(s.name, ()))
        if i is None:
            continue
        r = rules[i]
        if s.kind == "act_dot" and r.activation is None:
            continue
        if s.kind != "act_dot" and r.weight is None:
            continue
        note = None
        if s.kind != "act_dot" and s.leaf is not None:
            # a table that is also gathered from keeps one scale per row (`weight_spec`)
            spec, note = resolve_weight_spec(s, r.weight, i, check=s.leaf.index not in gathered)
            if spec != r.weight:
                r = dataclasses.replace(r, weight=spec)
        chosen[s.name] = Choice(s, i, r, note)
        used.add(i)
    if warn:
        paths = {s.module_path or s.name for s in finder.sites}
        for i, r in enumerate(rules):
            for p in r.skip:
                if not any(skip_matches((p,), q) for q in paths):
                    warnings.warn(
                        f"jq: rules[{i}] skip pattern {p!r} matches no module of the model (a "
                        "pattern must match a whole path or a prefix ending before '/'; module "
                        f"paths with sites: {sorted(paths)[:6]})",
                        stacklevel=3,
                    )
        # a rule list that splits one pattern by op kind (a preset's dot rule and its conv /
        # embed rule) warns only when no rule of that pattern selects anything
        used_patterns = {rules[i].path_regex for i in used}
        for i, r in enumerate(rules):
            unused = i not in used and r.path_regex not in used_patterns
            if unused and set(r.ops) != {"kv_cache"}:  # caches are not sites
                warnings.warn(
                    f"jq: rules[{i}] (path_regex={r.path_regex!r}, ops={r.ops}) matches no site of the model",
                    stacklevel=3,
                )
    return chosen


def site_positions(finder: SiteFinder) -> dict[str, tuple[str, ...]]:
    """``{site name: ("first",) / ("last",) / both}``: what `Rule.skip_positions` names.

    Among the dot and conv sites with a weight, in evaluation order, "first" is
    the first one, every one that reads the same activation (attention's
    query, key and value projections of one input) and every one that reads a
    model input directly; "last" is the last one and every one that reads the
    same activation as it (several heads on one feature vector). An activation
    is followed back through layout ops (reshape, transpose, dtype casts).
    """
    weighted = [s for s in finder.sites if s.kind in ("dot", "conv") and s.leaf is not None]
    if not weighted:
        return {}
    src = _activation_sources(finder, weighted)
    view = finder.view
    inputs = set() if view is None else set(view.input_refs[len(finder.leaves) :])
    out: dict[str, tuple[str, ...]] = {}
    for s in weighted:
        pos = ()
        if s is weighted[0] or (src[s.name] is not None and (
            src[s.name] == src[weighted[0].name] or src[s.name] in inputs
        )):  # fmt: skip
            pos += ("first",)
        if s is weighted[-1] or (src[s.name] is not None and src[s.name] == src[weighted[-1].name]):
            pos += ("last",)
        if pos:
            out[s.name] = pos
    return out


def _activation_sources(finder: SiteFinder, sites) -> dict:
    """``{site name: reference}`` of each site's activation operand, followed back through
    layout ops to the value they reshape (None where the view does not show it)."""
    view = finder.view
    node_of = {} if view is None else {id(n.eqn): n for n in view.nodes}
    out = {}
    for s in sites:
        n = node_of.get(id(s.eqn))
        r = None if n is None else n.ins[s.act_operands[0]]
        while r is not None and r in view.producer and view.producer[r].prim in _LAYOUT_OPS:
            r = view.producer[r].ins[0]
        out[s.name] = r if r is not None and r[0] == "v" else None
    return out


def weight_spec(choice: Choice, leaf_ndim: int, row_wise: bool = False) -> QuantSpec:
    """The rule's weight spec in the stored parameter's layout (stacked axes added).

    A table that is also gathered from (an Embed, possibly tied as the output
    head through ``attend`` or ``table.T``) keeps one scale per row, so that
    each gathered row carries its own scale and the tied dot keeps its scale on
    a free axis (the head's output channels are the table's rows); blocks of a
    2-D table run along its rows (the head's contraction).
    """
    spec = choice.rule.weight
    s = choice.site
    if row_wise and spec.axis is not None and not s.stack:
        kw = {"axis": (0,)}
        if spec.block_axis is not None and len(s.leaf.shape) == 2:
            kw["block_axis"] = 1
        spec = spec.replace(**kw)
    depth = len(s.stack)
    if depth == 0:
        return spec
    base = leaf_ndim - depth

    def shift(a):
        if not -base <= a < base:
            raise ValueError(
                f"jq: weight spec axis {a} does not fit the per-layer shape of site {s.name!r} (rank {base})"
            )
        return a % base + depth

    axes = tuple(range(depth)) + tuple(shift(a) for a in (spec.axis or ()))
    kw = {"axis": axes}
    if spec.block_axis is not None:
        kw["block_axis"] = shift(spec.block_axis)
    return spec.replace(**kw)


def check_weight_fit(choice: Choice, spec: QuantSpec, shape) -> None:
    """Raises a `ValueError` naming the rule and site if `spec` cannot quantize a weight of `shape`."""
    try:
        spec.param_shape(tuple(shape), choice.site.name)
    except ValueError as e:
        raise ValueError(
            f"jq: rules[{choice.rule_index}] does not fit site {choice.site.name!r}: {e}"
        ) from e


def activation_spec(choice: Choice, operand: int) -> QuantSpec:
    """The rule's activation spec, checked against the site's activation `operand`.

    Raises:
      ValueError: the spec does not fit the operand's shape, or its observer
        and its `axis` name different axes.
    """
    spec = choice.rule.activation
    aval = choice.site.in_avals[operand]
    if spec.per_row:  # fits any operand: the op keeps every axis it does not contract
        return spec
    try:
        spec.param_shape(tuple(aval.shape), f"{choice.site.name} activation")
    except ValueError as e:
        raise ValueError(
            f"jq: rules[{choice.rule_index}] does not fit site {choice.site.name!r}: {e}"
        ) from e
    o_axis = getattr(spec.calibration, "axis", None)
    if o_axis is not None and spec.axis is not None:
        nd = len(aval.shape)
        if not -nd <= o_axis < nd or o_axis % nd != spec.axis[0] % nd:
            raise ValueError(
                f"jq: rules[{choice.rule_index}] at site {choice.site.name!r}: the observer "
                f"{type(spec.calibration).__name__}(axis={o_axis}) and QuantSpec.axis={spec.axis[0]} name "
                f"different axes of the activation (shape {tuple(aval.shape)}); leave the observer's axis "
                "unset to follow the spec"
            )
    return spec


def stack_tree(tree, lengths: tuple[int, ...]):
    """`tree` broadcast over leading axes `lengths` (one copy per scan iteration)."""
    return jax.tree_util.tree_map(lambda a: jnp.broadcast_to(a, lengths + jnp.shape(a)), tree)


def scan_lengths(site: Site, finder: SiteFinder) -> tuple[int, ...]:
    """The lengths of the scans around `site`, outermost first (``()`` outside any scan)."""
    return tuple(finder.scan_length[s] for s in site.scans)


def gathered_leaves(finder: SiteFinder) -> set[int]:
    """Indices of the parameter leaves some gather reads (embedding tables, tied or not)."""
    return {s.leaf.index for s in finder.sites if s.kind == "embed"}


def _row_wise_leaves(chosen: dict[str, Choice]) -> set[int]:
    return {c.site.leaf.index for c in chosen.values() if c.site.kind == "embed"}


def site_weight_spec(c: Choice, rows: set[int]) -> QuantSpec:
    """The weight spec of one chosen site in its parameter's stored layout, checked to fit."""
    s = c.site
    spec = weight_spec(c, len(s.leaf.shape), s.leaf.index in rows)
    check_weight_fit(c, spec, s.leaf.shape)
    return spec


def weight_storage(
    chosen: dict[str, Choice], finder: SiteFinder
) -> tuple[dict[int, tuple[QuantSpec, Choice]], dict[str, tuple[QuantSpec, Choice]]]:
    """``(shared, per_use)``: how `convert` stores the quantized weights.

    A parameter every one of whose sites is selected is replaced by one
    `QArray` with its first site's spec (``shared[leaf index]``); a site whose
    spec differs from that one (a tied table whose gather is int8 and whose
    head is int4) gets its own quantized copy (``per_use[site name]``). A
    parameter some site does not select (a tied table whose head a rule
    quantizes but whose gather it leaves float) stays float, and each selected
    site reading it gets a copy. Every use is thus quantized exactly as its
    rule says, and a use no rule selects reads the float table.

    Raises:
      ValueError: a spec does not fit its site; a per-use copy is needed inside a
        scan (give the parameter's sites one rule).
    """
    rows = gathered_leaves(finder)
    readers: dict[int, list[Site]] = {}
    for s in finder.sites:
        if s.leaf is not None:
            readers.setdefault(s.leaf.index, []).append(s)
    specs: dict[int, list[tuple[QuantSpec, Choice]]] = {}
    for c in chosen.values():
        if c.site.leaf is not None:
            specs.setdefault(c.site.leaf.index, []).append((site_weight_spec(c, rows), c))
    shared, per_use = {}, {}
    for idx, got in specs.items():
        if len(got) == len(readers[idx]):  # every use selected: the first use's spec in place
            shared[idx] = got[0]
            got = [(sp, c) for sp, c in got if sp != got[0][0]]
        for sp, c in got:
            if c.site.scans or c.site.stack:
                raise ValueError(
                    f"jq: parameter {c.site.leaf.path!r} is read by several sites that the rules "
                    f"quantize differently (or not at all), and site {c.site.name!r} lies in a "
                    "scan, where jq keeps one quantization per parameter; give all its sites "
                    "one rule"
                )
            per_use[c.site.name] = (sp, c)
    return shared, per_use


def leaf_specs(
    chosen: dict[str, Choice], finder: SiteFinder | None = None
) -> dict[int, tuple[QuantSpec, Choice]]:
    """One weight spec per quantized parameter leaf; all its sites must agree.

    With `finder`, a table gathered by any site (selected or not) is quantized
    per row at its dot sites too (`weight_spec`'s ``row_wise``).
    """
    rows = _row_wise_leaves(chosen) if finder is None else gathered_leaves(finder)
    out: dict[int, tuple[QuantSpec, Choice]] = {}
    for c in chosen.values():
        s = c.site
        if s.leaf is None:
            continue
        spec = site_weight_spec(c, rows)
        prev = out.get(s.leaf.index)
        if prev is not None and prev[0] != spec:
            raise ValueError(
                f"jq: parameter {s.leaf.path!r} feeds sites {prev[1].site.name!r} and {s.name!r} "
                f"with different weight specs ({prev[0]} vs {spec})"
            )
        out.setdefault(s.leaf.index, (spec, c))
    return out


def direct_weight_sites(finder, chosen: dict[str, Choice], kinds) -> dict[int, str]:
    """``{leaf index: site name}``: parameters that one chosen site reads directly.

    The site is of one of `kinds`, reads the parameter as its rhs with no
    layout op in between, outside any scan; no other site reads the parameter
    and nothing uses it as a float. Such a weight can be stored in another
    layout (`convert(target=)`) or handed to a real low-precision op
    (``jq.qat(forward=)``) without affecting anything else.
    """
    return _sole_rhs_sites(finder, chosen, kinds, lambda s: not s.chain)


#: layout ops that only permute a weight's axes (or change its dtype) on the way to its dot
PERMUTING_OPS = frozenset({"transpose", "convert_element_type", "copy", "copy_p"})


def operand_perm(site: Site) -> tuple[int, ...] | None:
    """``p`` with ``operand = transpose(stored parameter, p)``, when the parameter reaches the
    site through transposes and casts only (None otherwise)."""
    if site.axes is None or any(op not in PERMUTING_OPS for op in site.chain):
        return None
    n = len(site.leaf.shape)  # (a size-1 axis maps to no stored axis: not followed here)
    if len(site.axes) != n or any(len(a) != 1 for a in site.axes):
        return None
    p = tuple(a[0] for a in site.axes)
    return p if sorted(p) == list(range(n)) else None


def movable_weight_sites(finder, chosen: dict[str, Choice], kinds) -> dict[int, str]:
    """``{leaf index: site name}``: parameters one chosen site reads, directly or through
    transposes, as its only use (`direct_weight_sites` with transposes allowed): `convert`
    may store them in the layout of the target's fast dot (`jq.lowering.weight_layout`)."""
    return _sole_rhs_sites(finder, chosen, kinds, lambda s: operand_perm(s) is not None)


def _sole_rhs_sites(finder, chosen: dict[str, Choice], kinds, reach) -> dict[int, str]:
    """``{leaf index: site name}``: chosen sites of `kinds` that read a parameter as their
    rhs, outside any scan, as its only use (no other site, no float use), and whose path
    from the parameter `reach(site)` accepts."""
    reads: dict[int, int] = {}
    for s in finder.sites:
        if s.leaf is not None:
            reads[s.leaf.index] = reads.get(s.leaf.index, 0) + 1
    out = {}
    for name, c in chosen.items():
        s = c.site
        if s.kind not in kinds or s.leaf is None or s.operand != 1:
            continue
        if s.scans or s.stack or not reach(s):
            continue
        if reads[s.leaf.index] == 1 and not finder.float_uses.get(s.leaf.index):
            out[s.leaf.index] = name
    return out


# ---------------------------------------------------------------------------------------
# the (K, N) view of a parameter dot (GPTQ, SmoothQuant)
# ---------------------------------------------------------------------------------------
def dot_geometry(site: Site):
    """The dot's ``(K, N)`` view of a parameter, or a reason why there is none.

    Returns ``(perm, w_contract, x_contract)``: the weight's view is
    ``to_view(w, perm)`` (the per-layer stored axes transposed so that the
    dot's contracting axes come first, in the dot's order, then its free axes
    in the output's order), whose leading ``len(w_contract)`` axes are
    contracted with the activation's axes `x_contract`, pair by pair. The
    parameter may reach the dot through transposes and casts (HF GPT-2's
    ``dot_general(x, kernel.T)``); GPTQ, AWQ and SmoothQuant work on the view
    and map their results back with `from_view`.
    """
    if site.kind != "dot":
        return f"{site.kind} site"
    if site.axes is None or any(op not in PERMUTING_OPS for op in site.chain):
        return f"weight reaches the dot through {site.chain}"
    (lc, rc), (lb, rb) = site.eqn.params["dimension_numbers"]
    if lb or rb:
        return "dot with batch dimensions on the weight"
    wc, ac = (tuple(rc), tuple(lc)) if site.operand == 1 else (tuple(lc), tuple(rc))
    depth = len(site.stack)
    n = len(site.leaf.shape) - depth
    if len(site.axes) != n or any(len(a) != 1 for a in site.axes):
        return "weight axes the dot view cannot follow (a size-1 axis)"
    src = tuple(a[0] - depth for a in site.axes)  # operand axis i is per-layer axis src[i]
    if sorted(src) != list(range(n)):
        return "weight axes the dot view cannot follow"
    free = tuple(src[a] for a in range(n) if a not in wc)
    perm = tuple(src[a] for a in wc) + free
    return perm, tuple(range(len(wc))), ac


def to_view(w, perm: tuple[int, ...]):
    """`w` (per-layer stored axes last, scan-stacked axes first) in the dot's view (`dot_geometry`)."""
    depth = w.ndim - len(perm)
    return jnp.transpose(w, tuple(range(depth)) + tuple(depth + p for p in perm))


def from_view(wv, perm: tuple[int, ...]):
    """The inverse of `to_view`: the stored layout again."""
    depth = wv.ndim - len(perm)
    inv = tuple(int(i) for i in np.argsort(perm))
    return jnp.transpose(wv, tuple(range(depth)) + tuple(depth + p for p in inv))


def spec_to_view(spec: QuantSpec, perm: tuple[int, ...]) -> QuantSpec:
    """A per-layer weight spec (integer axes) on the dot's view of the weight."""
    n = len(perm)
    axes = spec.channel_axes(n)
    ba = spec.canonical_block_axis(n)
    return spec.replace(
        axis=tuple(perm.index(a) for a in axes) or None,
        block_axis=None if ba is None else perm.index(ba),
    )


def activation_matrix(x, ac, k):
    """The activation as ``(rows, K)``, K flattened in the order of the weight's leading axes."""
    nd = x.ndim
    x = jnp.moveaxis(x, ac, tuple(range(nd - len(ac), nd)))
    return x.reshape(-1, k).astype(jnp.float32)
