"""`QuantizedModel`: a converted model bound to its quantized variables, and the one-liner.

``qm = jq.quantize_model(model, variables, batches, jq.presets.w8a8_static())``
runs `calibrate` (when a rule is static) and `convert`, and returns a
`QuantizedModel`: ``qm.apply(x)`` is ``jq.apply(model, qm.variables, x)``
compiled once per input signature, and the object is a pytree whose leaves
are the quantized variables (the model, its method and the compiled function
are static), so ``jax.jit(lambda qm, x: qm.apply(x))`` takes it too.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable, Sequence

import jax

from jq.flax.adapter import ModelAdapter, hf_function, model_kind
from jq.flax.apply import apply
from jq.flax.calibrate import calibrate
from jq.flax.checkpoint import restore, restore_safetensors, save, save_safetensors
from jq.flax.convert import convert
from jq.flax.export import export
from jq.flax.qvars import ParamsTree, QuantizedVariables
from jq.flax.report import format_table, report
from jq.flax.rules import Rule, check_rules
from jq.flax.stream import (
    check_batches,
    check_forwarded,
    first_call,
    is_rules,
    join_call,
    model_call,
    model_kwargs_arg,
    peek,
    split_call,
)
from jq.quantize import QArray

__all__ = [
    "QuantizedModel",
    "load_model",
    "plot_report",
    "quantize_model",
]


class _Bound:
    """The static half of a `QuantizedModel`: model, method, default keyword arguments, the
    float variables (for `report`) and the jitted apply. Compared by identity, so every
    copy of one `QuantizedModel` (``tree_unflatten``, ``jax.device_put``) shares its cache."""

    def __init__(self, model, method, model_kwargs: dict, float_variables):
        self.model, self.method = model, method
        self.model_kwargs = dict(model_kwargs)
        self.float_variables = float_variables

        def run(qvars, static, dyn):
            args, kwargs = join_call(static, dyn)
            return apply(self.model, qvars, *args, method=self.method, **kwargs)

        self.jitted = jax.jit(run, static_argnums=(1,))


@jax.tree_util.register_pytree_node_class
class QuantizedModel:
    """A model and its `QuantizedVariables`, with the workflow's verbs as methods.

    Attributes:
      model: the linen / nnx model (never mutated).
      variables: the `QuantizedVariables` (``jq.apply(model, qm.variables, x)``).
      method: the model method `apply` runs (None: ``__call__``).

    The model's keyword arguments default to ``model_kwargs``, over the ones the
    variables were converted with (``variables.plan.model_kwargs``: saved and
    restored by `save` / `load_model`); a call's own keyword arguments win.
    """

    def __init__(
        self,
        model,
        variables: QuantizedVariables,
        *,
        method=None,
        model_kwargs: dict | None = None,
        float_variables=None,
    ):
        if not isinstance(variables, QuantizedVariables):
            raise TypeError(
                "jq.QuantizedModel: `variables` must be QuantizedVariables from jq.convert, got "
                f"{type(variables).__name__}"
            )
        self.variables = variables
        # the keyword arguments the variables were converted with, under the caller's
        kw = {**variables.plan.call_kwargs(method), **(model_kwargs or {})}
        self._bound = _Bound(model, method, kw, float_variables)

    @property
    def model(self):
        return self._bound.model

    @property
    def method(self):
        return self._bound.method

    # -- pytree ---------------------------------------------------------------------------
    def tree_flatten(self):
        return (self.variables,), self._bound

    @classmethod
    def tree_unflatten(cls, bound, children):
        qm = object.__new__(cls)
        qm.variables, qm._bound = children[0], bound
        return qm

    # -- verbs ----------------------------------------------------------------------------
    def apply(self, *args, **kwargs):
        """``jq.apply(model, variables, *args, **kwargs)``, jitted; compiled once per input
        signature and cached on the model. Keyword arguments are forwarded to the model as
        by Flax's ``Module.apply``, over the ``model_kwargs`` given to `quantize_model`;
        array arguments are traced, all others (``train=False``) are static."""
        check_forwarded("QuantizedModel.apply", kwargs)
        static, dyn = split_call((args, {**self._bound.model_kwargs, **kwargs}))
        return self._bound.jitted(self.variables, static, dyn)

    __call__ = apply

    def summary(self) -> str:
        """Sizes (`QuantizedVariables.summary`) and one table row per quantized site."""
        rows = []
        for s in self.variables.plan.sites:
            w = self.variables.variables.get(s.weight_key or s.leaf) if s.leaf else None
            rows.append(
                {
                    "site": s.name,
                    "kind": s.kind,
                    "mode": s.mode,
                    "weight": w.format if isinstance(w, QArray) else None,
                    "activation": None if s.activation is None else s.activation.format,
                }
            )
        return f"QuantizedModel({_model_name(self.model)}): {self.variables.summary()}\n{format_table(rows)}"

    def report(self, *args, plot=None, float_variables=None, **kwargs):
        """`jq.report` on one batch: per-site weight / activation SQNR (dB) and clipping.

        Args:
          *args, **kwargs: the model's inputs (forwarded as by `apply`).
          plot: a file path: also save a bar chart of SQNR and clipping per site
            there (matplotlib, an optional dependency); True: return
            ``(rows, figure)`` instead of the rows.
          float_variables: the float variables of a linen model, when this
            model was loaded from a checkpoint (`quantize_model` keeps them).

        Returns:
          The rows (a list of dicts; ``format_table(rows)`` prints them).
        """
        check_forwarded("QuantizedModel.report", kwargs)
        fv = self._bound.float_variables if float_variables is None else float_variables
        if fv is None and _needs_variables(self.model):
            raise ValueError(
                "QuantizedModel.report compares with the float model: pass float_variables= "
                "(the linen variables, or the function's params, this model was converted from)"
            )
        kw = {**self._bound.model_kwargs, **kwargs}
        rows = report(self.model, fv, self.variables, *args, method=self.method, **kw)
        if plot is None or plot is False:
            return rows
        fig = plot_report(rows, None if plot is True else plot)
        return (rows, fig) if plot is True else rows

    def save(self, path: str | os.PathLike, format: str = "orbax") -> None:
        """Saves the quantized variables: ``"orbax"`` (a directory, `jq.flax.checkpoint.save`)
        or ``"safetensors"`` (one file, readable without jq: `save_safetensors`)."""
        if format == "orbax":
            save(path, self.variables)
        elif format == "safetensors":
            save_safetensors(path, self.variables)
        else:
            raise ValueError(
                f"QuantizedModel.save: format must be 'orbax' or 'safetensors', got {format!r}"
            )

    def export(self, example_inputs, **kw) -> bytes:
        """`jq.export` of this model (``model_kwargs`` default to `quantize_model`'s)."""
        kw.setdefault("model_kwargs", dict(self._bound.model_kwargs))
        return export(self.model, self.variables, example_inputs, method=self.method, **kw)

    def __repr__(self):
        return f"QuantizedModel({_model_name(self.model)}, {self.variables.summary()})"


def _model_name(model) -> str:
    """The class name of a model; a plain function's own name."""
    if type(model).__name__ == "function":
        return getattr(model, "__qualname__", "function")
    return type(model).__name__


def _needs_variables(model) -> bool:
    """A linen model or a function: its float variables live outside it (not a Hugging Face
    model, which carries its params, nor an nnx module)."""
    kind = model_kind(model, "jq.QuantizedModel")
    return kind == "linen" or (kind == "fn" and hf_function(model) is None)


def plot_report(rows: list[dict], path: str | os.PathLike | None = None):
    """A matplotlib figure of `jq.report` rows: SQNR (dB) of weights and activations, and
    the activation clipping fraction, per site; saved to `path` when given."""
    try:
        import matplotlib

        if path is not None:
            matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("report(plot=...) needs matplotlib: pip install matplotlib") from e
    names = [r["site"] for r in rows]
    x = range(len(rows))
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(max(6, 0.5 * len(rows)), 6), sharex=True)
    for k, (key, label) in enumerate([("weight_sqnr_db", "weight"), ("act_sqnr_db", "activation")]):
        vals = [r[key] if r[key] is not None else float("nan") for r in rows]
        a1.bar([i + 0.4 * k - 0.2 for i in x], vals, width=0.4, label=label)
    a1.set_ylabel("SQNR (dB)")
    a1.legend()
    a2.bar(list(x), [r["act_clip_frac"] or 0.0 for r in rows])
    a2.set_ylabel("activation clipping")
    a2.set_xticks(list(x), names, rotation=60, ha="right", fontsize=7)
    fig.tight_layout()
    if path is not None:
        fig.savefig(os.fspath(path), dpi=100)
        plt.close(fig)
    return fig


def quantize_model(
    model,
    variables,
    batches: Iterable,
    preset_or_rules: Sequence[Rule],
    *,
    inputs: Callable | None = None,
    model_kwargs: dict | None = None,
    method=None,
    progress: bool = True,
    target: str | None = None,
) -> QuantizedModel:
    """The one-liner: calibrate (when a rule is static), convert, and bind.

    ``jq.quantize_model(model, variables, batches, jq.presets.w8a8_static())``
    is ``jq.calibrate(model, variables, rules, batches)`` followed by
    ``jq.convert(model, variables, rules, stats)`` (weight-only and dynamic
    rules skip calibration and trace the model on the first batch), returned
    as a `QuantizedModel`. The batches come before the rules here, as in the
    sentence "quantize this model on these batches with this preset"; the
    other order is accepted too (rules are recognised by their type).

    Args:
      model, variables: a linen Module and its variables, an nnx Module and None, a
        function ``fn(params, *args, **kwargs)`` and its params, or a Hugging Face Flax
        model and None (its own params) (`jq.flax.adapter`).
      batches: calibration batches (an iterable; a bare array is rejected).
      preset_or_rules: a `jq.presets` list or any `jq.Rule` list.
      inputs, model_kwargs, method, progress: as in `jq.calibrate`;
        `model_kwargs` are also the defaults of ``qm.apply``.
      target: as in `jq.convert`: ``"gpu"`` / ``"tpu"`` store dot kernels (N, K).

    Returns:
      A `QuantizedModel`.
    """
    if is_rules(batches) and not is_rules(preset_or_rules):
        batches, preset_or_rules = preset_or_rules, batches
    rules = check_rules(preset_or_rules)
    model_kwargs = model_kwargs_arg("quantize_model", model_kwargs, None)
    batches = check_batches(batches, "quantize_model")
    if any(r.mode == "static" for r in rules):
        stats = calibrate(
            model,
            variables,
            rules,
            batches,
            inputs=inputs,
            model_kwargs=model_kwargs,
            method=method,
            progress=progress,
        )
        qv = convert(model, variables, rules, stats, method=method, target=target)
    else:
        first, _ = peek(batches, "jq.quantize_model: `batches` is empty")
        args, kw = model_call(first, inputs, model_kwargs)
        with first_call(first, inputs, "quantize_model"):
            qv = convert(
                model, variables, rules, args=args, model_kwargs=kw, method=method, target=target
            )
    return QuantizedModel(
        model, qv, method=method, model_kwargs=model_kwargs, float_variables=variables
    )


def load_model(path: str | os.PathLike, model, *, method=None, params_like=None) -> QuantizedModel:
    """A `QuantizedModel` from a checkpoint written by `QuantizedModel.save` (an orbax
    directory or a ``.safetensors`` file) and the model it was converted from.

    The checkpoint is verified before use (`jq.flax.checkpoint.restore`): the SHA-256 of
    its metadata and of every tensor, and each tensor's dtype and shape against its
    description. The keyword arguments the model was converted with come back as the
    defaults of ``qm.apply`` / ``qm.export``.

    A function cannot be saved: pass it again as `model` (a Hugging Face model:
    the model object). A checkpoint stores a function's parameters by key path
    and `apply` rebuilds them as nested dicts, the form of Hugging Face, Haiku
    and most hand-written parameters; for any other pytree (lists, tuples,
    dataclasses, an Equinox model's params) pass `params_like`: the float
    params, or any pytree of the same structure (``jax.eval_shape`` of the
    init), whose structure is used.

    Raises:
      ValueError: a damaged, edited or mixed-up checkpoint, naming the tensor (or the
        metadata) that does not match; `params_like` naming other parameters or shapes
        than the checkpoint.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        qv = restore(path, caller="jq.load_model")
    else:
        qv = restore_safetensors(path, caller="jq.load_model")
    if params_like is not None:
        qv = _with_structure(qv, model, params_like, method)
    return QuantizedModel(model, qv, method=method)


def _with_structure(qv: QuantizedVariables, model, params_like, method) -> QuantizedVariables:
    """`qv` whose plan rebuilds a function's params in the structure of `params_like`."""
    if model_kind(model, "jq.load_model") != "fn" or qv.plan.model_kind != "fn":
        raise ValueError(
            "jq.load_model: params_like= is for function models; a linen or nnx model rebuilds "
            "its own variables"
        )
    ad = ModelAdapter(model, params_like, method)
    want = dict(qv.plan.signature)
    got = {li.path: li.shape for li in ad.leaves}
    if want != got:
        diff = sorted(set(want) ^ set(got)) or [p for p in want if tuple(want[p]) != got[p]]
        raise ValueError(
            f"jq.load_model: params_like does not match the checkpoint's parameters (names or "
            f"shapes differ at {diff[:4]})"
        )
    plan = dataclasses.replace(
        qv.plan,
        signature=tuple((li.path, tuple(want[li.path])) for li in ad.leaves),
        params_tree=ParamsTree(ad.treedef),
    )
    return dataclasses.replace(qv, plan=plan)
