"""The data of the Flax workflow: what `calibrate` gathers and what `convert` makes.

* `CalibrationStats`: one observer state per static activation site (stacked
  over the scans around it), the observers, and the traced input signature.
* `QuantizedVariables`: a converted model's variables (parameters as `QArray`),
  static activation `QParams`, SmoothQuant factors, and the static `Plan` of
  its sites (`SitePlan`) that `apply` runs and checks against.

All site keys are `Site.act_key` strings: the site name (``"Dense_0/kernel"``),
or ``"<name>:lhs"`` / ``"<name>:rhs"`` for the two operands of a dot between
activations.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jq.qparams import QuantSpec
from jq.quantize import QArray

__all__ = [
    "CalibrationStats",
    "ParamsTree",
    "Plan",
    "QuantizedVariables",
    "SitePlan",
    "observed_range",
    "inverse_perm",
    "method_name",
    "record_kwargs",
    "permute_qarray",
    "warn_zero_width",
]


class CalibrationStats:
    """Activation statistics gathered by `calibrate`: one observer state per static site.

    Attributes:
      states: dict from site key to observer state (a pytree).
      observers: dict from site key to the observer that produced it.
      num_batches: number of batches seen.
      example: the traced input signature (shapes), reused by `convert`.
      scan_lengths: dict from site key to the lengths of the scans (``nn.scan``,
        ``nnx.scan``) around the site, outermost first; ``()`` outside any scan.
        A scanned site's state is stacked over those leading axes, one
        observer state per layer.
    """

    def __init__(self, states, observers, num_batches, example, site_names, scan_lengths=None):
        self.states = states
        self.observers = observers
        self.num_batches = num_batches
        self.example = example
        self.site_names = site_names
        self.scan_lengths = dict(scan_lengths or {})

    def ranges(self) -> dict[str, tuple[jax.Array, jax.Array]]:
        """``{site key: (lo, hi)}``; raises if a site saw non-finite values or no data.

        A site inside a scan gets ranges stacked over its scan axes: ``lo`` has
        shape ``scan_lengths[key] + range shape`` (one range per layer).
        """
        return {
            k: observed_range(self.observers[k], st, self._lengths(k), k)
            for k, st in self.states.items()
        }

    def _lengths(self, key) -> tuple[int, ...]:
        if key in self.scan_lengths:
            return tuple(self.scan_lengths[key])
        # stats built elsewhere (merged shards, smoothquant): every observer state counts its
        # batches in a scalar `count`, so its shape is the stack of scan lengths
        return tuple(np.shape(getattr(self.states[key], "count", ())))

    def __repr__(self):
        return f"CalibrationStats({len(self.states)} sites, {self.num_batches} batches)"


@dataclasses.dataclass(frozen=True)
class SitePlan:
    """Static description of one quantized site (kept inside `QuantizedVariables`)."""

    name: str
    kind: str
    leaf: str | None  # parameter path
    mode: str  # static | dynamic | weight_only
    activation: QuantSpec | None  # calibration stripped
    rule_index: int
    # the site's kernel is stored transposed by this permutation: its free axes, then its
    # contracting axes ((K, N) -> (N, K)), the operand layout of GPU / TPU integer and fp8
    # GEMMs (`convert(target=)`); None: as the model stores it
    weight_perm: tuple[int, ...] | None = None
    # the key in `QuantizedVariables.variables` of this site's own quantized copy of its
    # parameter (``"<leaf>@<site>"``), for a parameter whose uses are quantized differently
    # (a tied embedding: its gather and its head); None: the parameter's own entry
    weight_key: str | None = None
    # how the rule's semantic weight spec was adapted to this site (a group size that does
    # not divide the contraction), shown by `summary`; None: as written
    note: str | None = None


@dataclasses.dataclass(frozen=True)
class ParamsTree:
    """The `jax.tree_util` structure of a function model's parameter pytree, comparable with
    anything (a bare ``PyTreeDef == None`` raises)."""

    treedef: Any


@dataclasses.dataclass(frozen=True)
class Plan:
    """Static part of `QuantizedVariables`: the model kind, its variables' signature and its sites."""

    model_kind: str
    signature: tuple  # ((path, shape), ...) of the float model's variables
    sites: tuple[SitePlan, ...]
    float_leaves: tuple  # ((path, shape, dtype name), ...) of the quantized parameters
    # ((name, value), ...), sorted: the plain keyword arguments (``train=False``) the model was
    # converted with; `jq.apply` passes them by default when called with the same `method`
    model_kwargs: tuple = ()
    method: str | None = None  # `method_name` of the converted method; None: ``__call__``
    # a function model ("fn"): the structure of its parameter pytree (leaves in `signature`
    # order); not saved in checkpoints (`jq.load_model(..., params_like=)`)
    params_tree: ParamsTree | None = None

    def call_kwargs(self, method=None) -> dict:
        """The recorded `model_kwargs` when `method` is the converted one, else ``{}``."""
        return dict(self.model_kwargs) if method_name(method) == self.method else {}


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["variables", "activations", "smooth"],
    meta_fields=["plan"],
)
@dataclasses.dataclass(frozen=True)
class QuantizedVariables:
    """A converted model's variables: a pytree, safe to pass through jit and to checkpoint.

    Attributes:
      variables: ``{path: leaf}`` for every variable of the model, with each
        quantized parameter replaced by a `QArray` (int8 values, or int4 packed
        two per byte, plus scales). No float copy of a quantized weight remains.
      activations: ``{site key: QParams}`` for static activation quantization.
      plan: static site table (modes, activation specs) and the float model's
        signature, used by `apply` to run and to check that the variables belong
        to the model.
      smooth: ``{site name: s}``, SmoothQuant factors (`jq.smoothquant`, `jq.smoothing`): `apply`
        multiplies the site's activation operand by ``1 / s`` before quantizing
        it (the weight already holds ``diag(s) W``). `s` has the activation's
        rank, size 1 on every axis but the contracting ones (plus leading
        scan-stacking axes). Empty unless made by ``jq.smoothquant``.
    """

    variables: dict
    activations: dict
    plan: Plan
    smooth: dict = dataclasses.field(default_factory=dict)

    def nbytes(self) -> dict:
        """``{"float": bytes of the float32 originals of the quantized parameters,
        "quantized": bytes of their QArrays (values + scales + zero points),
        "total_before", "total_after", "ratio"}``."""
        fl = sum(int(np.prod(s)) * np.dtype(d).itemsize for _, s, d in self.plan.float_leaves)
        # a per-use copy (`SitePlan.weight_key`) counts its float source among the quantized
        # weights' originals, once, and not again among the other variables
        dup = 0
        for src in {s.leaf for s in self.plan.sites if s.weight_key is not None}:
            v = self.variables.get(src)
            if not isinstance(v, QArray) and hasattr(v, "dtype"):
                dup += int(np.size(v)) * np.dtype(v.dtype).itemsize
        fl += dup
        q = sum(v.nbytes for v in self.variables.values() if isinstance(v, QArray))
        other = sum(
            int(np.size(v)) * np.dtype(v.dtype).itemsize
            for v in self.variables.values()
            if not isinstance(v, QArray)
            and hasattr(v, "dtype")
            and not jax.dtypes.issubdtype(v.dtype, jax.dtypes.prng_key)
        )
        acts = sum(
            int(x.size) * x.dtype.itemsize
            for x in jax.tree_util.tree_leaves((self.activations, self.smooth))
        )
        return {
            "float": fl,
            "quantized": q,
            "ratio": q / fl if fl else 1.0,
            "total_before": fl + other - dup,
            "total_after": q + other + acts,
        }

    def weight(self, path: str) -> QArray:
        """The quantized parameter `path` in the model's own orientation.

        `jq.convert` may store a kernel transposed, in the layout its target's fast
        dot reads (`SitePlan.weight_perm`, `jq.lowering.weight_layout`); this undoes
        that permutation, so ``jq.dequantize(qv.weight(p))`` has the float
        parameter's shape and axes. Raises ``KeyError`` for a path that is not a
        quantized parameter.
        """
        q = self.variables.get(path)
        if not isinstance(q, QArray):
            raise KeyError(f"QuantizedVariables.weight: {path!r} is not a quantized parameter")
        perms = {s.weight_perm for s in self.plan.sites if s.leaf == path and s.weight_key is None}
        perms.discard(None)
        if not perms:
            return q
        (perm,) = perms
        return permute_qarray(q, inverse_perm(perm))

    def summary(self) -> str:
        b = self.nbytes()
        modes = {}
        for s in self.plan.sites:
            modes[s.mode] = modes.get(s.mode, 0) + 1
        ms = ", ".join(f"{v} {k}" for k, v in sorted(modes.items()))
        notes = "".join(f"\n  {s.name}: {s.note}" for s in self.plan.sites if s.note)
        return (
            f"{len(self.plan.sites)} quantized sites ({ms}); quantized weights "
            f"{b['float']:,} -> {b['quantized']:,} bytes ({b['ratio']:.3f}x); "
            f"model {b['total_before']:,} -> {b['total_after']:,} bytes" + notes
        )


def method_name(method) -> str | None:
    """A model method as recorded in a `Plan`: None for ``__call__``, else its name."""
    if method is None:
        return None
    name = method if isinstance(method, str) else getattr(method, "__name__", repr(method))
    return None if name == "__call__" else name


_PLAIN = (bool, int, float, str, type(None))


def record_kwargs(kwargs: dict) -> tuple:
    """The keyword arguments a `Plan` keeps: plain values (``train=False``, ``deterministic=True``),
    sorted; arrays (they belong to a batch) and ``mutable`` / ``rngs`` (they steer one call) are
    left out."""
    return tuple(
        (k, v)
        for k, v in sorted((kwargs or {}).items())
        if k not in ("mutable", "rngs") and isinstance(v, _PLAIN)
    )


def permute_qarray(q: QArray, perm: tuple[int, ...]) -> QArray:
    """An unpacked `QArray` transposed by `perm`: values, scale and zero point alike."""
    t = lambda a: None if a is None else jnp.transpose(a, perm)  # noqa: E731
    shape = tuple(q.shape[p] for p in perm)
    return QArray(t(q.value), t(q.scale), t(q.zero_point), q.format, shape, None)


def inverse_perm(perm: tuple[int, ...]) -> tuple[int, ...]:
    """The permutation that undoes `perm`."""
    return tuple(int(i) for i in np.argsort(perm))


# ---------------------------------------------------------------------------------------
# calibrated ranges
# ---------------------------------------------------------------------------------------
def observed_range(obs, state, lengths: tuple[int, ...], key: str | None = None):
    """`obs.range` for a state stacked over scan iterations: one call per layer, on the host.

    With `key`, an observer's error (no data, non-finite values) names the site.
    """
    if key is not None:
        try:
            return observed_range(obs, state, lengths)
        except ValueError as e:
            raise ValueError(f"jq: static site {key!r}: {e}") from e
    if not lengths:
        return obs.range(state)
    los, his = [], []
    for idx in np.ndindex(*lengths):
        lo, hi = obs.range(jax.tree_util.tree_map(lambda a, idx=idx: a[idx], state))
        los.append(jnp.asarray(lo))
        his.append(jnp.asarray(hi))
    shape = lengths + los[0].shape
    return jnp.stack(los).reshape(shape), jnp.stack(his).reshape(shape)


def warn_zero_width(key: str, lo, hi) -> None:
    """Warns, naming the site, when a calibrated range has zero width (constant activations).

    Such a range is exact for the constant itself (0.0 at an all-zero site), but
    `qparams_from_range` can only make a placeholder grid from it: scale 1 for
    all-zero data, ``[0, c]`` for a constant ``c``. Any other value the site
    sees at inference is then clipped or rounded to whole units, silently; this
    is what a degenerate calibration batch (all zeros, one repeated sample)
    does to a converted model.
    """
    if isinstance(lo, jax.core.Tracer) or isinstance(hi, jax.core.Tracer):
        return
    lo_np, hi_np = np.asarray(lo, np.float64).reshape(-1), np.asarray(hi, np.float64).reshape(-1)
    flat = lo_np == hi_np
    if not flat.any():
        return
    vals = np.unique(lo_np[flat])
    shown = ", ".join(f"{v:.4g}" for v in vals[:3]) + (", ..." if vals.size > 3 else "")
    where = "" if flat.size == 1 else f" in {int(flat.sum())} of {flat.size} channels / layers"
    warnings.warn(
        f"jq.convert: static site {key!r} was calibrated on constant activations{where} (every value "
        f"{shown}): a zero-width range, whose grid holds only 0 and that value (all zeros: a placeholder "
        "scale of 1). Other values at inference will be clipped or rounded to whole units. Calibrate on "
        "representative batches, or make this site dynamic (drop `calibration` from its rule)",
        RuntimeWarning,
        stacklevel=3,
    )
