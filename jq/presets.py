"""Presets: the usual quantization recipes as plain lists of `jq.Rule`, to read and edit.

Each function returns a ``list[jq.Rule]`` for `jq.quantize_model`,
`jq.calibrate` / `jq.convert` and every other verb that takes rules. Two
options are common to all of them:

* ``skip=("head", "blocks/0")``: module paths (regular expressions, matched
  with `re.fullmatch` against the whole path or one of its ``/``-prefixes)
  whose sites stay float (``Rule.skip``). A pattern that matches no module of
  the model is reported with a warning.
* ``keep_first_last=True``: the model's first and last dot / conv site stay
  float (``Rule.skip_positions=("first", "last")``), the usual choice for a
  CNN's stem and classifier, together with the sites that read the same
  activation (the key and value projections next to the first query) or a
  model input directly. Which sites those are is decided when the rules meet
  the model (`jq.flax.select.choose`), so the list stays model-independent.

Weights are quantized per output channel of their dot (``axis="out"``: every
stored axis the dot does not contract, whatever the model's layout, e.g. the
rows of HF GPT-2's ``(out, in)`` Conv1D kernels and the heads of an einsum
``(D, H, Dh)`` query) unless a preset says otherwise; symmetric int8 uses
``[-127, 127]``.
"""

from __future__ import annotations

from collections.abc import Sequence

from jq import calibration as _calibration
from jq.flax.rules import Rule
from jq.qparams import QuantSpec

__all__ = [
    "fp8",
    "w4_weight_only",
    "w8_weight_only",
    "w8a8_dynamic",
    "w8a8_static",
]

_OBSERVERS = {
    "minmax": lambda: _calibration.MinMax(),
    "percentile": lambda: _calibration.Histogram(method="percentile", percentile=99.99),
    "entropy": lambda: _calibration.Histogram(method="entropy"),
    "mse": lambda: _calibration.Histogram(method="mse"),
}


def _rule(skip: Sequence[str], keep_first_last: bool, **fields) -> list[Rule]:
    pos = ("first", "last") if keep_first_last else ()
    return [Rule(".*", skip_positions=pos, skip=skip, **fields)]


def w8a8_static(
    calibration="minmax", *, skip: Sequence[str] = (), keep_first_last: bool = False
) -> list[Rule]:
    """int8 weights (per channel) and int8 activations with calibrated (static) ranges.

    Args:
      calibration: the activation observer: ``"minmax"`` (`jq.calibration.MinMax`),
        ``"percentile"`` (99.99th, `Histogram`), ``"entropy"``, ``"mse"``, or an
        observer object.
      skip, keep_first_last: sites kept in float (see the module docstring).
    """
    obs = calibration
    if isinstance(calibration, str):
        if calibration not in _OBSERVERS:
            raise ValueError(
                f"jq.presets.w8a8_static: calibration={calibration!r}; expected one of "
                f"{sorted(_OBSERVERS)} or an observer such as jq.calibration.MinMax()"
            )
        obs = _OBSERVERS[calibration]()
    return _rule(
        skip,
        keep_first_last,
        weight=QuantSpec("int8", axis="out"),
        activation=QuantSpec("int8", calibration=obs),
    )


def w8a8_dynamic(
    *, per_token: bool = False, skip: Sequence[str] = (), keep_first_last: bool = False
) -> list[Rule]:
    """int8 weights (per channel) and int8 activations quantized with each call's own range.

    Args:
      per_token: one activation scale per token instead of one per tensor:
        per position of every axis but the one the dot contracts (the
        features), on inputs of any rank (``(tokens, features)``,
        ``(batch, tokens, features)``, ...; ``QuantSpec("int8", axis="rows")``).
        Applies to ``"dot"`` sites only (convolutions and embeddings are left
        float by this rule).
      skip, keep_first_last: sites kept in float (see the module docstring).
    """
    act = QuantSpec("int8", axis="rows") if per_token else QuantSpec("int8")
    ops = ("dot",) if per_token else ("dot", "conv", "embed")
    return _rule(
        skip, keep_first_last, ops=ops, weight=QuantSpec("int8", axis="out"), activation=act
    )


ACTIVATIONS = ("int8", "float")


def _per_token_int8() -> QuantSpec:
    """int8, symmetric, one dynamic scale per token: every axis but the features, any rank."""
    return QuantSpec("int8", axis="rows")


def _weight_only_rules(fn, weight, activations, skip, keep_first_last, ops) -> list[Rule]:
    if activations not in ACTIVATIONS:
        raise ValueError(
            f"jq.presets.{fn}: activations={activations!r}; expected 'int8' (fast on CPU: "
            "the activation is quantized per token at run time, integer dots) or 'float' "
            "(exact float activations: slower, the weights are converted to float in every call)"
        )
    if activations == "float":
        return _rule(skip, keep_first_last, ops=ops, weight=weight)
    rules = _rule(skip, keep_first_last, ops=("dot",), weight=weight, activation=_per_token_int8())
    rest = tuple(o for o in ops if o != "dot")
    if rest:  # convolutions and embeddings stay weight-only with float activations
        rules += _rule(skip, keep_first_last, ops=rest, weight=weight)
    return rules


def w8_weight_only(
    *, activations: str = "int8", skip: Sequence[str] = (), keep_first_last: bool = False
) -> list[Rule]:
    """int8 weights (per output channel); activations quantized per token at run time, or float.

    Args:
      activations: how a dot site runs. ``"int8"`` (default): each call quantizes
        its activation to int8, per token (one symmetric scale per row, from the
        row's own max |x|), and runs the integer dot with int32 accumulation, then
        both scales: what llama.cpp and ONNX Runtime do for weight-only models on
        CPU. The weights are never turned back into float. Measured for LLM
        decoding in ``experiments/results/decode.md``; on the char-LM, held-out
        bits per character +0.02% over ``"float"`` for int8 and for int4 weights
        (``experiments/results/charlm_weight_only.md``).
        ``"float"``: float activations exactly, ``x @ (S * W_q)``. XLA:CPU then
        converts every weight to float in every call: about 0.1x float32's speed
        for decoding on CPU (it saves memory, not time); on GPU it is the
        usual W8A16.
        Convolutions and embeddings are weight-only with float activations either way.
      skip, keep_first_last: sites kept in float (see the module docstring).
    """
    return _weight_only_rules(
        "w8_weight_only",
        QuantSpec("int8", axis="out"),
        activations,
        skip,
        keep_first_last,
        ("dot", "conv", "embed"),
    )


def w4_weight_only(
    group_size: int | None = 128,
    *,
    activations: str = "int8",
    skip: Sequence[str] = (),
    keep_first_last: bool = False,
) -> list[Rule]:
    """int4 weights in groups of `group_size` along the contraction (packed two per byte);
    activations quantized per token at run time, or float.

    Applies to ``"dot"`` sites: ``QuantSpec("int4", axis="out", group_size=128)``,
    one scale per output channel and per `group_size` elements of the dot's
    contraction, in any layout (Dense ``(K, N)``, Conv1D ``(N, K)``, einsum
    ``(D, H, Dh)``). Where `group_size` does not divide the contraction, the
    largest divisor not above it is used, or one scale per output channel;
    `QuantizedModel.summary` names those sites. ``group_size=None`` gives one
    scale per output channel.
    ``activations``: ``"int8"`` (default; per-token int8 activations, an int32
    dot per group, the group scales applied to the partial sums) or ``"float"``
    (exact float activations, the weights dequantized in every call), as in
    `w8_weight_only`.
    """
    spec = (
        QuantSpec("int4", axis="out")
        if group_size is None
        else QuantSpec("int4", axis="out", group_size=int(group_size))
    )
    return _weight_only_rules("w4_weight_only", spec, activations, skip, keep_first_last, ("dot",))


def fp8(
    *, activations: bool = True, skip: Sequence[str] = (), keep_first_last: bool = False
) -> list[Rule]:
    """float8 e4m3 (``float8_e4m3fn``, max 448) weights per channel, and activations
    scaled by each call's own range (dynamic) unless ``activations=False``."""
    act = QuantSpec("float8_e4m3fn") if activations else None
    return _rule(
        skip,
        keep_first_last,
        ops=("dot", "conv"),
        weight=QuantSpec("float8_e4m3fn", axis="out"),
        activation=act,
    )
