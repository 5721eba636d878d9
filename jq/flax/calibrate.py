"""`calibrate`: run the float model over batches and observe the activations of static sites."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence

from jq.flax.adapter import ModelAdapter, fmt_paths, state_changes, trace
from jq.flax.qvars import CalibrationStats
from jq.flax.rules import Rule, check_rules
from jq.flax.select import choose
from jq.flax.stream import (
    Stream,
    abstract,
    calibration_stats,
    init_observers,
    observe_site,
    peek,
    site_body,
    split_batch,
)

__all__ = [
    "calibrate",
]


def calibrate(
    model,
    variables,
    batches: Iterable,
    rules: Sequence[Rule],
    *,
    method=None,
    kwargs: dict | None = None,
    progress: bool = True,
) -> CalibrationStats:
    """Runs the float model over `batches` and observes activations at static sites.

    The model code is untouched: jq traces it, and every site whose rule has a
    static activation spec (one with ``calibration=observer``) feeds its
    activation operand to ``observer.update`` inside one jitted step per batch.

    Args:
      model, variables: a linen Module and its variables, or an nnx Module and None.
      batches: an iterable of inputs; each item is one positional argument, or a
        tuple of positional arguments.
      rules: the `jq.Rule` list.
      method: the model method to run (default ``__call__``).
      kwargs: keyword arguments passed on every call (e.g. ``{"train": False}``).
      progress: show a tqdm progress bar.

    Returns:
      `CalibrationStats` for `convert`.

    Raises:
      ValueError: `batches` is empty.
    """
    rules = check_rules(rules)
    kwargs = dict(kwargs or {})
    adapter = ModelAdapter(model, variables, method)
    first, batches = peek(
        batches, "jq.calibrate: `batches` is empty; calibration needs at least one batch"
    )
    args = split_batch(first)
    adapter.with_state = adapter.kind == "nnx"
    t = trace(adapter, adapter.values, args, kwargs)
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

    stream = Stream(adapter, kwargs, site_body(selected, observe))
    states, n = stream.run(batches, adapter.values, states, desc="calibrate", progress=progress)
    return calibration_stats(
        t.finder, observers, states, lengths, n, (abstract(args), kwargs), tuple(chosen)
    )
