"""Rules: which ops to quantize, and how, as data."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

from jq.qparams import QuantSpec

__all__ = ["OP_KINDS", "Rule", "match_rule"]

#: Kinds of sites a rule can select.
#:  * ``"dot"``: a dot_general with a parameter operand (Dense, DenseGeneral,
#:    Einsum, attention projections, ``x @ w``, ``jnp.einsum`` with a weight,
#:    ``Embed.attend``).
#:  * ``"conv"``: a convolution with a parameter kernel (Conv, grouped Conv).
#:  * ``"embed"``: a row gather from a parameter table (Embed); weight-only.
#:  * ``"act_dot"``: a dot_general between two activations (attention's qk and
#:    av einsums); both operands use the activation spec.
OP_KINDS = ("dot", "conv", "embed", "act_dot")


@dataclasses.dataclass(frozen=True)
class Rule:
    """One quantization rule. The first rule that matches a site wins; unmatched sites stay float.

    Attributes:
      path_regex: regular expression, matched with `re.fullmatch` against the
        module path of a site, e.g. ``"Dense_0"``,
        ``"MultiHeadDotProductAttention_0/query"`` (linen) or ``"layers/0"``
        (nnx). ``".*"`` matches every module.
      ops: site kinds the rule applies to (see `OP_KINDS`).
      weight: spec for the parameter operand (its ``axis`` is an axis of the
        parameter as stored; ``-1`` is the output features of Dense and Conv
        kernels). None leaves weights in float (only meaningful for
        ``"act_dot"``).
      activation: spec for the activation operand. One that names a
        ``calibration`` observer is *static*; one without is *dynamic*; None is
        *weight-only*.
    """

    path_regex: str = ".*"
    ops: tuple[str, ...] = ("dot", "conv", "embed")
    weight: QuantSpec | None = QuantSpec("int8", axis=-1)
    activation: QuantSpec | None = None

    def __post_init__(self):
        try:
            re.compile(self.path_regex)
        except re.error as e:
            raise ValueError(f"Rule.path_regex={self.path_regex!r} is not a valid regex: {e}") from e
        ops = (self.ops,) if isinstance(self.ops, str) else tuple(self.ops)
        bad = [o for o in ops if o not in OP_KINDS]
        if bad:
            raise ValueError(f"Rule.ops has unknown kinds {bad}; known kinds: {OP_KINDS}")
        object.__setattr__(self, "ops", ops)
        for name in ("weight", "activation"):
            spec = getattr(self, name)
            if spec is not None and not isinstance(spec, QuantSpec):
                raise TypeError(f"Rule.{name} must be a jq.QuantSpec or None, got {type(spec).__name__}")
        if self.weight is not None and self.weight.calibration is not None:
            raise ValueError("Rule.weight: weights are quantized from their own values; drop `calibration`")
        if self.weight is None and self.activation is None:
            raise ValueError("Rule: weight and activation are both None; such a rule quantizes nothing")

    @property
    def mode(self) -> str:
        """``"weight_only"``, ``"dynamic"`` or ``"static"``."""
        if self.activation is None:
            return "weight_only"
        return "static" if self.activation.is_static else "dynamic"

    def matches(self, module_path: str, kind: str) -> bool:
        return kind in self.ops and re.fullmatch(self.path_regex, module_path) is not None


def match_rule(rules: Sequence[Rule], module_path: str, kind: str) -> int | None:
    """Index of the first rule that matches, or None."""
    for i, r in enumerate(rules):
        if r.matches(module_path, kind):
            return i
    return None


def check_rules(rules) -> tuple[Rule, ...]:
    if isinstance(rules, Rule):
        rules = (rules,)
    rules = tuple(rules)
    for i, r in enumerate(rules):
        if not isinstance(r, Rule):
            raise TypeError(f"rules[{i}] must be a jq.Rule, got {type(r).__name__}")
    return rules
