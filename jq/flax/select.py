"""Rule matching and the specs it implies: which sites a rule list selects, and how.

Every verb (`calibrate`, `convert`, `apply`, `qat`, `report`, `cast`,
`sensitivity`, `auto_quantize`, `gptq`, `smoothquant`) decides the same way:

* `choose` matches each site of the traced model against the rules (first
  match wins) and keeps the sites whose rule quantizes something there;
* `leaf_specs` gives every quantized parameter leaf one weight spec, in the
  stored layout (scan-stacked axes added by `weight_spec`), and checks that
  all sites reading the leaf agree;
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

from jq.flax._graph import Site, SiteFinder
from jq.flax.rules import Rule, match_rule
from jq.qparams import QuantSpec

__all__ = [
    "Choice",
    "activation_matrix",
    "activation_spec",
    "check_weight_fit",
    "choose",
    "direct_weight_sites",
    "dot_geometry",
    "leaf_specs",
    "scan_lengths",
    "site_positions",
    "stack_tree",
    "weight_spec",
]


@dataclasses.dataclass(frozen=True)
class Choice:
    """A site together with the rule that selects it (and that rule's index in the list)."""

    site: Site
    rule_index: int
    rule: Rule

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
        chosen[s.name] = Choice(s, i, r)
        used.add(i)
    if warn:
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
    """``{site name: ("first",) / ("last",) / both}`` for the first and last dot or conv site
    with a weight, in evaluation order (what `Rule.skip_positions` names)."""
    weighted = [s.name for s in finder.sites if s.kind in ("dot", "conv") and s.leaf is not None]
    out: dict[str, tuple[str, ...]] = {}
    if weighted:
        out[weighted[0]] = ("first",)
        out[weighted[-1]] = out.get(weighted[-1], ()) + ("last",)
    return out


def weight_spec(choice: Choice, leaf_ndim: int, row_wise: bool = False) -> QuantSpec:
    """The rule's weight spec in the stored parameter's layout (stacked axes added).

    A table that is also gathered from (an Embed, possibly tied as the output
    head through ``attend``) keeps one scale per row, so that each gathered row
    carries its own scale and the tied dot keeps its scale on a free axis.
    """
    spec = choice.rule.weight
    s = choice.site
    if row_wise and spec.axis is not None:
        spec = spec.replace(axis=(0,))
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


def _row_wise_leaves(chosen: dict[str, Choice]) -> set[int]:
    return {c.site.leaf.index for c in chosen.values() if c.site.kind == "embed"}


def leaf_specs(chosen: dict[str, Choice]) -> dict[int, tuple[QuantSpec, Choice]]:
    """One weight spec per quantized parameter leaf; all its sites must agree."""
    rows = _row_wise_leaves(chosen)
    out: dict[int, tuple[QuantSpec, Choice]] = {}
    for c in chosen.values():
        s = c.site
        if s.leaf is None:
            continue
        spec = weight_spec(c, len(s.leaf.shape), s.leaf.index in rows)
        check_weight_fit(c, spec, s.leaf.shape)
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
    reads: dict[int, int] = {}
    for s in finder.sites:
        if s.leaf is not None:
            reads[s.leaf.index] = reads.get(s.leaf.index, 0) + 1
    out = {}
    for name, c in chosen.items():
        s = c.site
        if s.kind not in kinds or s.leaf is None or s.operand != 1:
            continue
        if s.chain or s.scans or s.stack:
            continue
        if reads[s.leaf.index] == 1 and not finder.float_uses.get(s.leaf.index):
            out[s.leaf.index] = name
    return out


# ---------------------------------------------------------------------------------------
# the (K, N) view of a parameter dot (GPTQ, SmoothQuant)
# ---------------------------------------------------------------------------------------
# primitives a weight may pass through on its way to a dot and keep its (K, N) view
_PASSTHROUGH = {"convert_element_type", "copy", "copy_p"}


def dot_geometry(site: Site):
    """``(weight contracting dims, activation contracting dims)`` of a parameter dot, or a reason."""
    if site.kind != "dot":
        return f"{site.kind} site"
    if any(op not in _PASSTHROUGH for op in site.chain):
        return f"weight reaches the dot through {site.chain}"
    (lc, rc), (lb, rb) = site.eqn.params["dimension_numbers"]
    if lb or rb:
        return "dot with batch dimensions on the weight"
    wc, ac = (tuple(rc), tuple(lc)) if site.operand == 1 else (tuple(lc), tuple(rc))
    if wc != tuple(range(len(wc))):
        return f"weight contracting dims {wc} are not its leading axes"
    return wc, ac


def activation_matrix(x, ac, k):
    """The activation as ``(rows, K)``, K flattened in the order of the weight's leading axes."""
    nd = x.ndim
    x = jnp.moveaxis(x, ac, tuple(range(nd - len(ac), nd)))
    return x.reshape(-1, k).astype(jnp.float32)
