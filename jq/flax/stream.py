"""Streams batches through a traced model, one jitted step per batch, and keeps observers.

`calibrate`, `cast` (overflow calibration), `gptq` (Hessians) and `smoothquant`
(channel maxima, then smoothed ranges) all run the float model over a stream
of batches and fold something from every batch into a pytree of state. They
share one loop, `Stream`: the model is re-traced inside a jitted step whose
arguments are the variables, the state and the batch's arrays, so the step
compiles once per batch signature. `site_body` makes the common step, which
evaluates the traced model with `Interpreter` and calls a function at every
selected site.

Static activation sites observe their operands with the rule's observer:
`init_observers` makes one observer state per static operand (stacked over
the scans around the site), `observe_site` updates them, `calibration_stats`
collects them (`jq.flax.qvars.observed_range` reads a range back).
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jq.flax._graph import Interpreter, Site, SiteFinder, bind_eqn, keyed_by_act_key
from jq.flax.adapter import ModelAdapter, Traced, is_dynamic, trace
from jq.flax.qvars import CalibrationStats
from jq.flax.rules import Rule, check_rules
from jq.flax.select import Choice, activation_spec, choose, scan_lengths, stack_tree

__all__ = [
    "Stream",
    "abstract",
    "calibration_stats",
    "check_batches",
    "check_forwarded",
    "first_call",
    "init_observers",
    "is_array",
    "is_rules",
    "join_call",
    "model_call",
    "model_kwargs_arg",
    "num_batches",
    "observe_site",
    "peek",
    "prepare",
    "rules_then_batches",
    "shape_dtype",
    "site_body",
    "split_call",
    "split_batch",
]


# ---------------------------------------------------------------------------------------
# batches and their array leaves
# ---------------------------------------------------------------------------------------
def split_batch(batch) -> tuple:
    """A batch as the model's positional arguments: a tuple stays, anything else is one argument."""
    if isinstance(batch, tuple):
        return batch
    return (batch,)


def model_call(batch, inputs: Callable | None = None, model_kwargs: dict | None = None):
    """``(args, kwargs)`` for one model call on `batch`: the one place batches become calls.

    ``inputs(batch)`` (or the batch itself when `inputs` is None) is read as
    the model's positional arguments: a tuple is the argument list, a pair
    ``(args, kwargs)`` whose second item is a dict adds keyword arguments, and
    anything else (an array, a dict, a pytree) is the only argument.
    `model_kwargs` is merged under the batch's own keyword arguments, so
    ``model_call(b, lambda b: b[0], {"train": False})`` calls
    ``model(b[0], train=False)``.
    """
    a = batch if inputs is None else inputs(batch)
    kw = {}
    if inputs is not None and isinstance(a, tuple) and len(a) == 2 and isinstance(a[1], dict):
        a, kw = a
    return split_batch(a), {**(model_kwargs or {}), **kw}


_LABEL_KEYS = {"label", "labels", "y", "target", "targets"}


@contextlib.contextmanager
def first_call(batch, inputs: Callable | None, name: str):
    """Context of the first model call on `batch`: a failure that looks like a missing
    ``inputs=`` is re-raised as a TypeError that says so and names the fix.

    Without ``inputs=`` a dict batch is the model's only argument and a tuple
    batch is its argument list, so a ``{"image": ..., "label": ...}`` batch
    reaches the model as one dict (an IndexError or KeyError deep in Flax) and
    an ``(x, y)`` batch as two arguments ("takes 2 positional arguments but 3
    were given"). Other failures, and every failure with ``inputs=``, pass
    unchanged.
    """
    try:
        yield
    except (TypeError, IndexError, KeyError, AttributeError) as e:
        if inputs is not None or not isinstance(batch, (dict, tuple)):
            raise
        if isinstance(batch, dict):
            keys = [k for k in batch if isinstance(k, str)]
            key = next((k for k in keys if k.lower() not in _LABEL_KEYS), keys[0] if keys else None)
            what = f"a dict (keys {sorted(map(str, batch))[:6]}), passed whole as its only argument"
            fix = f'inputs=lambda b: b["{key}"]' if key is not None else "inputs=lambda b: ..."
        else:
            what = f"a tuple of {len(batch)} items, passed as {len(batch)} positional arguments"
            fix = "inputs=lambda b: b[0]"
        raise TypeError(
            f"jq.{name}: the model failed on the first batch, {what} because inputs= was not "
            f"given ({type(e).__name__}: {e}). If the model reads only part of each batch (an "
            f"(inputs, labels) pair, a dict of features and labels), say which: {fix}"
        ) from e


def check_batches(batches, name: str):
    """`batches` unchanged, once it is known to be an iterable of batches (not one bare batch).

    Raises:
      TypeError: `batches` is an array or a dict (one batch, which iteration
        would split into rows or keys); the message names ``jq.<name>``.
    """
    if is_array(batches) or isinstance(batches, (dict, jax.ShapeDtypeStruct)):
        what = (
            f"an array of shape {np.shape(batches)}"
            if not isinstance(batches, dict)
            else f"a dict (keys {sorted(map(str, batches))[:4]})"
        )
        raise TypeError(
            f"jq.{name}: `batches` is {what}, i.e. one batch; iterating it would feed the model "
            "one row (or key) at a time. Pass an iterable of batches: wrap it in a list, "
            f"jq.{name}(..., [x], ...), or pass a data loader"
        )
    if batches is None or not hasattr(batches, "__iter__"):
        raise TypeError(
            f"jq.{name}: `batches` must be an iterable of batches (a list, a generator or a data "
            f"loader), got {type(batches).__name__}"
        )
    return batches


def model_kwargs_arg(name: str, model_kwargs: dict | None, kwargs: dict | None) -> dict:
    """The model's fixed keyword arguments from ``model_kwargs=`` (or the deprecated ``kwargs=``)."""
    if kwargs is not None:
        if model_kwargs is not None:
            raise TypeError(
                f"jq.{name}: pass the model's keyword arguments once, as model_kwargs= (kwargs= "
                "is its deprecated old name)"
            )
        warnings.warn(
            f"jq.{name}: kwargs= is deprecated; pass model_kwargs={{...}} instead (same meaning: "
            "keyword arguments passed to the model on every call)",
            DeprecationWarning,
            stacklevel=3,
        )
        model_kwargs = kwargs
    if model_kwargs is not None and not isinstance(model_kwargs, dict):
        raise TypeError(
            f"jq.{name}: model_kwargs must be a dict of the model's keyword arguments, got "
            f"{type(model_kwargs).__name__}"
        )
    return dict(model_kwargs or {})


def check_forwarded(name: str, kwargs: dict) -> dict:
    """`kwargs` forwarded to the model, once it holds no ``kwargs=`` / ``model_kwargs=`` mix-up.

    Verbs that take the model's own arguments (`jq.apply`, `jq.sites`,
    `jq.report`, `QAT.init` / `QAT.apply`, `QuantizedModel.apply`) forward
    ``**kwargs`` as Flax's ``Module.apply`` does; a dict passed as ``kwargs=``
    would reach the model as one keyword argument named ``kwargs``.
    """
    for bad in ("kwargs", "model_kwargs"):
        if bad in kwargs:
            raise TypeError(
                f"jq.{name} forwards keyword arguments to the model as they are (like Flax's "
                f"Module.apply), so {bad}={{...}} would reach the model as one argument named "
                f"{bad!r}; pass them directly, e.g. jq.{name}(..., x, train=False)"
            )
    return kwargs


def is_rules(x) -> bool:
    """A `jq.Rule` or a non-empty list / tuple of them (a preset)."""
    if isinstance(x, Rule):
        return True
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(isinstance(r, Rule) for r in x)


def rules_then_batches(name: str, rules, batches):
    """``(rules, batches)`` from a call ``(model, variables, rules, batches)``.

    The old order ``(model, variables, batches, rules)`` is recognised by the
    types (rules are `jq.Rule`s), accepted for one release with a
    `DeprecationWarning` that spells out the new call.
    """
    if not is_rules(rules) and is_rules(batches):
        warnings.warn(
            f"jq.{name}(model, variables, batches, rules) is deprecated; the order is now "
            f"jq.{name}(model, variables, rules, batches, ...), as for every jq verb that takes "
            "rules and batches",
            DeprecationWarning,
            stacklevel=3,
        )
        rules, batches = batches, rules
    return rules, check_batches(batches, name)


def is_array(x) -> bool:
    """An array leaf of a batch (traced as an input of the step, as `adapter.trace` does):
    jax / numpy arrays and numpy scalars; Python numbers and strings stay static."""
    return is_dynamic(x) and not isinstance(x, jax.ShapeDtypeStruct)


def shape_dtype(x) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(jnp.shape(x), x.dtype)


def abstract(tree):
    """`tree` with every array replaced by its shape and dtype (the input signature)."""
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x)) if is_array(x) else x,
        tree,
    )


class _Dyn:
    def __repr__(self):
        return "<array>"


_DYN = _Dyn()  # an array leaf's place in a `split_call` key


def split_call(call) -> tuple[tuple, list]:
    """``(static, arrays)``: a call's ``(args, kwargs)`` split into a hashable key (the tree
    and its non-array leaves: ``train=False``, strings) and its array leaves (`is_array`),
    so that a jitted function can take the first as a static argument."""
    leaves, tree = jax.tree_util.tree_flatten(call)
    return (tree, tuple(_DYN if is_array(x) else x for x in leaves)), [
        x for x in leaves if is_array(x)
    ]


def join_call(static: tuple, arrays) -> Any:
    """`split_call`'s inverse: the call with `arrays` (e.g. tracers) in the array places."""
    tree, consts = static
    it = iter(arrays)
    return jax.tree_util.tree_unflatten(tree, [next(it) if c is _DYN else c for c in consts])


def peek(batches: Iterable, empty_error: str) -> tuple[Any, Iterator]:
    """``(first batch, iterator over all batches)``; raises ``ValueError(empty_error)`` when empty."""
    it = iter(batches)
    try:
        first = next(it)
    except StopIteration:
        raise ValueError(empty_error) from None
    return first, itertools.chain([first], it)


def prepare(
    model, variables, batches: Iterable, rules, method, kwargs: dict | None, name: str, inputs=None
):
    """What a verb over a list of calibration batches starts with (`gptq`, `smoothquant`).

    Returns ``(rules, kwargs, batches, adapter, args, traced, chosen)``: the
    checked rules, the batches as a list, the model traced on the first one and
    the sites the rules select (`kwargs` holds the first call's keyword arguments).

    Raises:
      ValueError: `batches` is empty (the message names ``jq.<name>``).
    """
    rules = check_rules(rules)
    kwargs = dict(kwargs or {})
    batches = list(check_batches(batches, name))
    if not batches:
        raise ValueError(
            f"jq.{name}: `batches` is empty; {name} needs at least one calibration batch"
        )
    adapter = ModelAdapter(model, variables, method)
    args, kw = model_call(batches[0], inputs, kwargs)
    with first_call(batches[0], inputs, name):
        t = trace(adapter, adapter.values, args, kw)
    chosen = choose(t.finder, rules)
    return rules, kw, batches, adapter, args, t, chosen


def num_batches(batches) -> int | None:
    """``len(batches)`` when the iterable knows it (a list, a sized loader), else None."""
    try:
        return len(batches)
    except TypeError:
        return None


# ---------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------
#: ``body(traced, leaves, dyn, states, extra) -> states``, traced inside the jitted step.
StepBody = Callable[[Traced, list, list, Any, Any], Any]


class Stream:
    """Runs a model over batches, one jitted step per batch, folding each batch into `states`.

    The step traces the model on the batch's signature and calls ``body(traced,
    leaves, dyn, states, extra)``, where `leaves` are the model's variables,
    `dyn` the batch's arrays (the traced model's inputs after the leaves), and
    `extra` any pytree the caller passes to `run` (e.g. per-site flags). The
    leaves and `extra` are arguments, not constants, so the step compiles once
    per batch signature however often `run` is called with new values.
    """

    def __init__(
        self, adapter: ModelAdapter, kwargs: dict, body: StepBody, inputs=None, cache_key=None
    ):
        self.adapter = adapter
        self.kwargs = kwargs
        self.inputs = inputs

        def step(leaves, states, dyn, extra, static):
            a, kw = join_call(static, [shape_dtype(x) for x in dyn])
            t = trace(adapter, [shape_dtype(x) for x in leaves], a, kw)
            return body(t, list(leaves), list(dyn), states, extra)

        self._step = _cached_step(cache_key, adapter, step)

    def run(
        self,
        batches: Iterable,
        leaves,
        states,
        extra=None,
        *,
        desc: str = "calibrate",
        progress: bool = False,
        leave: bool = True,
        total: int | None = None,
    ) -> tuple[Any, int]:
        """``(states after every batch, number of batches)``; `total` (default
        ``len(batches)`` when known) sizes the progress bar."""
        n = 0
        total = num_batches(batches) if total is None else total
        bar = tqdm(batches, desc=desc, unit="batch", disable=not progress, leave=leave, total=total)
        for batch in bar:
            static, dyn = split_call(model_call(batch, self.inputs, self.kwargs))
            states = self._step(list(leaves), states, dyn, extra, static)
            n += 1
        return states, n


#: Compiled steps of recent `Stream`s, by cache key (least recently used dropped first).
_STEPS: collections.OrderedDict = collections.OrderedDict()
_STEPS_MAX = 16


def _cached_step(cache_key, adapter: ModelAdapter, step):
    """``jax.jit(step)``, shared by every `Stream` with an equal `cache_key` and model.

    The caller's key names what `step` computes besides the model (e.g. the
    verb and its rules); the model's part is the linen module itself (hashed
    by its fields), its method and its variables' paths, shapes and dtypes.
    Without a key, for nnx modules (mutable objects) or for anything
    unhashable, the step is not shared.
    """
    jitted = jax.jit(step, static_argnums=(4,))
    if cache_key is None or adapter.kind != "linen":
        return jitted
    dtypes = tuple(str(jnp.result_type(v)) for v in adapter.values)
    key = (cache_key, adapter.model, adapter.method, adapter.signature(), dtypes)
    try:
        hit = _STEPS.get(key)
    except TypeError:  # an unhashable module field or rule
        return jitted
    if hit is not None:
        _STEPS.move_to_end(key)
        return hit
    _STEPS[key] = jitted
    if len(_STEPS) > _STEPS_MAX:
        _STEPS.popitem(last=False)
    return jitted


#: ``site_fn(site, eqn, invals, states, extra) -> replacement operands or None``.
SiteFn = Callable[[Site, Any, list, dict, Any], Any]


def site_body(selected: set[str], site_fn: SiteFn) -> StepBody:
    """A `Stream` step that evaluates the float model and calls `site_fn` at the `selected` sites.

    `states` is the interpreter's state dict (see `Interpreter`); `site_fn`
    updates it in place and may return new operands for the site's float
    equation (e.g. a smoothed activation), so that later sites see them.
    """

    def body(t: Traced, leaves, dyn, states, extra):
        states = dict(states)

        def handler(site, eqn, invals, sts):
            new = site_fn(site, eqn, invals, sts, extra)
            return bind_eqn(eqn, invals if new is None else new)

        Interpreter(t.finder, set(selected), handler).run(t.jaxpr, t.consts, leaves + dyn, states)
        return states

    return body


# ---------------------------------------------------------------------------------------
# observers of static activation sites
# ---------------------------------------------------------------------------------------
def init_observers(chosen: dict[str, Choice], finder: SiteFinder) -> tuple[dict, dict, dict]:
    """``(observers, states, lengths)`` for every static activation operand, keyed by
    ``site.key("observer", operand)`` (`StateKey`).

    Each state is the rule's observer initialised for the operand's shape and
    stacked over the scans around the site (`lengths`, outermost first).
    `calibration_stats` turns the three into `CalibrationStats`.
    """
    observers, states, lengths = {}, {}, {}
    for c in chosen.values():
        if c.mode != "static":
            continue
        for op in c.site.act_operands:
            activation_spec(c, op)
            aval = c.site.in_avals[op]
            obs = c.rule.activation.calibration
            key = c.site.key("observer", op)
            observers[key] = obs
            lengths[key] = scan_lengths(c.site, finder)
            states[key] = stack_tree(obs.init(jnp.zeros(aval.shape, aval.dtype)), lengths[key])
    return observers, states, lengths


def observe_site(site: Site, vals: list, states: dict, observers: dict) -> None:
    """Feeds the site's activation operands to their observers (the ones in `states`)."""
    for op in site.act_operands:
        key = site.key("observer", op)
        if key in states:
            states[key] = observers[key].update(states[key], vals[op])


def calibration_stats(
    finder: SiteFinder,
    observers: dict,
    states: dict,
    lengths: dict,
    num_batches: int,
    example,
    site_names,
) -> CalibrationStats:
    """`CalibrationStats` from the typed-key results of `init_observers` and a `Stream` run."""
    return CalibrationStats(
        keyed_by_act_key(finder, states, "observer"),
        keyed_by_act_key(finder, observers, "observer"),
        num_batches,
        example,
        site_names,
        keyed_by_act_key(finder, lengths, "observer"),
    )
