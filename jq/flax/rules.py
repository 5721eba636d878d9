"""Rules: which ops to quantize, and how, as data."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

from jq.qparams import QuantSpec

__all__ = ["OP_KINDS", "POSITIONS", "Rule", "match_rule", "skip_matches"]

#: Kinds of sites a rule can select.
#:  * ``"dot"``: a dot_general with a parameter operand (Dense, DenseGeneral,
#:    Einsum, attention projections, ``x @ w``, ``jnp.einsum`` with a weight,
#:    ``Embed.attend``).
#:  * ``"conv"``: a convolution with a parameter kernel (Conv, grouped Conv).
#:  * ``"embed"``: a row gather from a parameter table (Embed); weight-only.
#:  * ``"act_dot"``: a dot_general between two activations (attention's qk and
#:    av einsums); both operands use the activation spec.
#:  * ``"kv_cache"``: the ``cached_key`` / ``cached_value`` of an attention module
#:    in decode mode (`jq.kv_cache`); the activation spec is the cache format.
OP_KINDS = ("dot", "conv", "embed", "act_dot", "kv_cache")

#: Positions `Rule.skip_positions` can name: the model's first and last dot / conv site.
POSITIONS = ("first", "last")


@dataclasses.dataclass(frozen=True)
class Rule:
    """One quantization rule. The first rule that matches a site wins; unmatched sites stay float.

    Attributes:
      path_regex: regular expression, matched with `re.fullmatch` against the
        module path of a site, e.g. ``"Dense_0"``,
        ``"MultiHeadDotProductAttention_0/query"`` (linen) or ``"layers/0"``
        (nnx). ``".*"`` matches every module. A site of the root module
        (a parameter created by the model's own ``self.param``, module path
        ``''``) is matched by its site name instead, e.g. ``"w"``.
      ops: site kinds the rule applies to (see `OP_KINDS`).
      weight: spec for the parameter operand. ``QuantSpec("int8", axis="out")``
        (the default) is one scale per output channel of the weight's dot, and
        ``QuantSpec("int4", axis="out", group_size=128)`` adds groups of 128
        along its contraction, whatever the model's layout: jq follows each
        parameter to its dot (`jq.flax.weight_axes`). An integer ``axis`` is
        an axis of the parameter as stored, checked against the site (a scale
        on an axis the dot contracts is an error naming the site). None leaves
        weights in float (only meaningful for ``"act_dot"``).
      activation: spec for the activation operand. One that names a
        ``calibration`` observer is *static*; one without is *dynamic*; None is
        *weight-only*.
      skip_positions: ``"first"`` and / or ``"last"``: the rule does not match
        the model's first / last ``"dot"`` or ``"conv"`` site (in evaluation
        order), which then falls to the next matching rule, or stays float.
        Resolved when the rules meet the model (`jq.flax.select.choose`);
        ``jq.presets.*(keep_first_last=True)`` sets it. "first" also covers
        every site that reads the same activation as the first one (query, key
        and value of one attention) or a model input directly; "last" every
        site that reads the same activation as the last one.
      skip: module paths (regular expressions) the rule does not match, each
        matched with `re.fullmatch` against the whole path or a prefix of it
        that ends before a ``/`` (``"blocks/0"`` skips ``blocks/0/mlp``). A
        pattern that matches no module of the model is reported with a warning,
        like a rule that selects no site. ``jq.presets.*(skip=...)`` sets it.
    """

    path_regex: str = ".*"
    ops: tuple[str, ...] = ("dot", "conv", "embed")
    weight: QuantSpec | None = QuantSpec("int8", axis="out")
    activation: QuantSpec | None = None
    skip_positions: tuple[str, ...] = ()
    skip: tuple[str, ...] = ()

    def __post_init__(self):
        try:
            re.compile(self.path_regex)
        except re.error as e:
            raise ValueError(
                f"Rule.path_regex={self.path_regex!r} is not a valid regex: {e}"
            ) from e
        ops = (self.ops,) if isinstance(self.ops, str) else tuple(self.ops)
        bad = [o for o in ops if o not in OP_KINDS]
        if bad:
            raise ValueError(f"Rule.ops has unknown kinds {bad}; known kinds: {OP_KINDS}")
        object.__setattr__(self, "ops", ops)
        pos = (
            (self.skip_positions,) if isinstance(self.skip_positions, str) else self.skip_positions
        )
        pos = tuple(pos)
        if any(p not in POSITIONS for p in pos):
            raise ValueError(f"Rule.skip_positions={pos!r}: each entry must be one of {POSITIONS}")
        object.__setattr__(self, "skip_positions", pos)
        skip = (self.skip,) if isinstance(self.skip, str) else tuple(self.skip)
        for p in skip:
            try:
                re.compile(p)
            except (re.error, TypeError) as e:
                raise ValueError(f"Rule.skip: {p!r} is not a valid regex: {e}") from e
        object.__setattr__(self, "skip", skip)
        for name in ("weight", "activation"):
            spec = getattr(self, name)
            if spec is not None and not isinstance(spec, QuantSpec):
                raise TypeError(
                    f"Rule.{name} must be a jq.QuantSpec or None, got {type(spec).__name__}"
                )
        if self.weight is not None and self.weight.per_row:
            raise ValueError(
                "Rule.weight: axis='rows' is for activations; give a weight its channel axes "
                "(axis=-1: the output features of Dense and Conv kernels)"
            )
        if self.weight is not None and self.weight.calibration is not None:
            raise ValueError(
                "Rule.weight: weights are quantized from their own values; drop `calibration`"
            )
        if self.activation is not None and self.activation.semantic:
            raise ValueError(
                "Rule.activation: axis='out' names a weight's output channels; an activation "
                "spec takes None (per tensor) or integer axes (axis=0: per token / row)"
            )
        if self.weight is None and self.activation is None:
            raise ValueError(
                "Rule: weight and activation are both None; such a rule quantizes nothing"
            )
        if self.activation is not None and self.activation.calibration is not None:
            object.__setattr__(
                self, "activation", observer_for_spec(self.activation, "Rule.activation")
            )

    @property
    def mode(self) -> str:
        """``"weight_only"``, ``"dynamic"`` or ``"static"``."""
        if self.activation is None:
            return "weight_only"
        return "static" if self.activation.is_static else "dynamic"

    def matches(self, module_path: str, kind: str, positions: tuple[str, ...] = ()) -> bool:
        """Whether the rule selects a site at `module_path` of `kind`, whose `positions` (a
        subset of `POSITIONS`) say whether it is the model's first / last dot or conv site."""
        if any(p in self.skip_positions for p in positions):
            return False
        if self.skip and skip_matches(self.skip, module_path):
            return False
        return kind in self.ops and re.fullmatch(self.path_regex, module_path) is not None


def skip_matches(patterns: Sequence[str], module_path: str) -> bool:
    """Whether a pattern fullmatches `module_path` or one of its ``/``-prefixes."""
    parts = module_path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(re.fullmatch(p, c) for p in patterns for c in prefixes)


def _field_default(obs, name: str):
    for f in dataclasses.fields(obs):
        if f.name == name:
            return f.default
    return dataclasses.MISSING


def observer_for_spec(spec: QuantSpec, owner: str = "QuantSpec") -> QuantSpec:
    """`spec` with its calibration observer made to agree with it, or a ValueError.

    The spec says what the quantized tensor looks like; the observer only
    estimates its range. Fields the observer leaves at their defaults follow the
    spec (an observer without ``axis`` on a per-channel spec gets the spec's
    axis; a histogram searching the default int8 grid on a uint8 spec searches
    the uint8 grid). A field set explicitly to something the spec contradicts
    raises here, when the rule is built, instead of failing at `convert` or
    calibrating for the wrong grid. Axes of opposite signs (``-1`` vs ``1``)
    can only be compared once the rank is known; `jq.calibrate` checks them.

    Raises:
      ValueError: the observer's channel axis or target format contradicts the spec,
        or the spec is per block (observers give per-tensor or per-channel ranges).
    """
    obs = spec.calibration
    if obs is None or not dataclasses.is_dataclass(obs):
        return spec
    name = type(obs).__name__
    upd = {}
    if hasattr(obs, "axis"):
        if spec.block_size is not None:
            raise ValueError(
                f"{owner}: a calibrated (static) spec cannot be per block (block_size={spec.block_size}): "
                f"{name} gives per-tensor or per-channel ranges; drop `calibration` for dynamic blocks"
            )
        s_axis = spec.axis
        if s_axis is not None and len(s_axis) > 1:
            raise ValueError(
                f"{owner}: QuantSpec.axis={s_axis} keeps several channel axes, but {name} observes "
                "one channel axis; calibrate per tensor or along one axis"
            )
        o_axis = obs.axis
        if o_axis is None and s_axis is not None:
            upd["axis"] = s_axis[0]
        elif o_axis is not None and s_axis is None:
            raise ValueError(
                f"{owner}: {name}(axis={o_axis}) keeps per-channel ranges but the spec is per tensor "
                f"(QuantSpec.axis=None); set QuantSpec(axis={o_axis}) or leave the observer's axis unset"
            )
        elif o_axis is not None and (o_axis < 0) == (s_axis[0] < 0) and o_axis != s_axis[0]:
            raise ValueError(
                f"{owner}: {name}(axis={o_axis}) observes another channel axis than "
                f"QuantSpec.axis={s_axis[0]}; leave the observer's axis unset to follow the spec"
            )
    dtype = getattr(obs, "dtype", None)
    if isinstance(dtype, str) and getattr(obs, "method", None) in ("entropy", "mse"):
        fmt = spec.fmt
        if dtype != fmt.name:
            if not fmt.is_integer:
                raise ValueError(
                    f"{owner}: {name}(method={obs.method!r}) searches an integer grid ({dtype}), but the "
                    f"spec quantizes to {fmt.name}; use method='percentile' or a MinMax observer"
                )
            if dtype != _field_default(obs, "dtype"):
                raise ValueError(
                    f"{owner}: {name}(dtype={dtype!r}) searches the {dtype} grid but the spec quantizes "
                    f"to {fmt.name}; leave `dtype` unset to follow the spec, or make them agree"
                )
            upd["dtype"] = fmt.name
    if not upd:
        return spec
    return spec.replace(calibration=dataclasses.replace(obs, **upd))


def match_rule(
    rules: Sequence[Rule], module_path: str, kind: str, positions: tuple[str, ...] = ()
) -> int | None:
    """Index of the first rule that matches, or None."""
    for i, r in enumerate(rules):
        if r.matches(module_path, kind, positions):
            return i
    return None


def check_rules(rules) -> tuple[Rule, ...]:
    """`rules` as a tuple of `Rule` (one `Rule` alone is accepted).

    Raises:
      TypeError: `rules` is an array (an example input passed where the rules go) or
        holds something that is not a `Rule`.
    """
    if isinstance(rules, Rule):
        rules = (rules,)
    if hasattr(rules, "shape") and hasattr(rules, "dtype"):
        raise TypeError(
            f"rules must be a list of jq.Rule, got an array of shape {tuple(rules.shape)}: the "
            "rules come before the model's inputs, e.g. jq.sites(model, variables, rules, x)"
        )
    rules = tuple(rules)
    for i, r in enumerate(rules):
        if not isinstance(r, Rule):
            raise TypeError(f"rules[{i}] must be a jq.Rule, got {type(r).__name__}")
    return rules
