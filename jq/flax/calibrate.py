"""`calibrate`: run the float model over batches and observe the activations of static sites."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence

from jq.flax.adapter import ModelAdapter, fmt_paths, state_changes, trace
from jq.flax.qvars import CalibrationStats
from jq.flax.rules import Rule, check_rules
from jq.flax.select import choose
from jq.flax.stream import (
    Stream,
    abstract,
    calibration_stats,
    first_call,
    init_observers,
    model_call,
    model_kwargs_arg,
    num_batches,
    observe_site,
    peek,
    rules_then_batches,
    site_body,
)

__all__ = [
    "calibrate",
]


def calibrate(
    model,
    variables,
    rules: Sequence[Rule],
    batches: Iterable,
    *,
    inputs: Callable | None = None,
    model_kwargs: dict | None = None,
    method=None,
    progress: bool = True,
    kwargs: dict | None = None,
) -> CalibrationStats:
    """Runs the float model over `batches` and observes activations at static sites.

    The model code is untouched: jq traces it, and every site whose rule has a
    static activation spec (one with ``calibration=observer``) feeds its
    activation operand to ``observer.update`` inside one jitted step, compiled
    once per batch signature (and, for linen models, kept for later calls with
    an equal model and rules).

    Args:
      model, variables: a linen Module and its variables, an nnx Module and None, a
        function ``fn(params, *args, **kwargs)`` and its params, or a Hugging Face Flax
        model and None (its own params) (`jq.flax.adapter`).
      rules: the `jq.Rule` list (or a `jq.presets` list).
      batches: an iterable of batches (a list, a generator, a data loader); a
        bare array is rejected (wrap it in a list: ``[x]``).
      inputs: ``inputs(batch)`` gives the model's positional arguments: a
        tuple, one array, or a pair ``(args, kwargs_dict)``; e.g.
        ``inputs=lambda b: b[0]`` for ``(x, y)`` batches or
        ``lambda b: b["image"]`` for dict batches. Default: a tuple batch is
        the argument list, anything else the only argument.
      model_kwargs: keyword arguments passed on every call (e.g. ``{"train": False}``).
      method: the model method to run (default ``__call__``).
      progress: show a tqdm progress bar (with a total when ``len(batches)`` is known).
      kwargs: deprecated name of `model_kwargs`.

    The old order ``calibrate(model, variables, batches, rules)`` still works
    for one release, with a `DeprecationWarning`.

    Returns:
      `CalibrationStats` for `convert`.

    Raises:
      ValueError: `batches` is empty.
      TypeError: `batches` is one array or dict rather than an iterable of batches.
    """
    rules, batches = rules_then_batches("calibrate", rules, batches)
    rules = check_rules(rules)
    model_kwargs = model_kwargs_arg("calibrate", model_kwargs, kwargs)
    adapter = ModelAdapter(model, variables, method)
    total = num_batches(batches)
    first, batches = peek(
        batches, "jq.calibrate: `batches` is empty; calibration needs at least one batch"
    )
    args, kw = model_call(first, inputs, model_kwargs)
    adapter.with_state = adapter.kind == "nnx"
    with first_call(first, inputs, "calibrate"):
        t = trace(adapter, adapter.values, args, kw)
    if adapter.kind == "nnx" and state_changes(t, adapter):
        warnings.warn(
            f"jq.calibrate: the nnx model updates its state when run ({fmt_paths(state_changes(t, adapter))}): "
            "dropout is active or BatchNorm uses batch statistics, so the observed activations are "
            "not the ones inference sees (and one dropout mask repeats for every batch). Call "
            "model.eval() before calibrating",
            RuntimeWarning,
            stacklevel=2,
        )
    chosen = choose(t.finder, rules)
    observers, states, lengths = init_observers(chosen, t.finder)
    selected = {n for n, c in chosen.items() if c.mode == "static"}

    def observe(site, eqn, invals, sts, extra):
        observe_site(site, invals, sts, observers)

    # one compiled step per model, rules and batch signature, shared by later calls
    stream = Stream(
        adapter, model_kwargs, site_body(selected, observe), inputs, ("calibrate", rules)
    )
    states, n = stream.run(
        batches, adapter.values, states, desc="calibrate", progress=progress, total=total
    )
    return calibration_stats(
        t.finder, observers, states, lengths, n, (abstract(args), kw), tuple(chosen)
    )
