"""A model as one function of its variables, and its trace to a jaxpr.

`ModelAdapter` puts three kinds of model behind one signature,
``fn(leaves, *args, **kwargs)``, with every variable leaf named (`LeafInfo`):

* ``"linen"``: ``model.apply(variables, ...)``;
* ``"nnx"``: the module's split state;
* ``"fn"``: any JAX function ``fn(params, *args, **kwargs)`` of a parameter
  pytree (hand-written JAX, Haiku's ``apply``, an Equinox model partitioned
  into params and static, a Hugging Face Flax model through its own wrapper).
  Leaves are named by their key paths in `params` (``"h/0/attn/kernel"``,
  ``"layers/1/weight"``; the last key is the parameter's name, the rest its
  module path), and every floating-point leaf is a parameter. A Hugging Face
  ``FlaxPreTrainedModel`` passed as the model is recognised by duck typing
  (`hf_function`: a linen ``module``, ``params``, ``config`` and ``__call__``;
  jq never imports transformers) and run as ``model(*args, params=p,
  **kwargs)``, so that the model's wrapper builds its masks and positions.

`trace` turns that function into a jaxpr whose inputs are the leaves and the
array arguments, and finds its sites (`SiteFinder`).
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jq.flax._graph import LeafInfo, SiteFinder
from jq.flax.dataflow import SCOPE_PREFIX
from jq.quantize import QArray

__all__ = [
    "ModelAdapter",
    "model_kind",
    "Traced",
    "fmt_paths",
    "hf_function",
    "is_dynamic",
    "leaf_aval",
    "state_changes",
    "trace",
]


def _key_name(k) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def model_kind(model, caller: str = "jq") -> str:
    """``"linen"`` for a `flax.linen.Module`, ``"nnx"`` for a `flax.nnx.Module`, ``"fn"`` for a
    Hugging Face Flax model (`hf_function`) or any other callable ``fn(params, *args, **kwargs)``.

    The one place jq tells the kinds apart; anything else raises a TypeError
    naming `caller`, the public function the user called.
    """
    import flax.linen as nn
    from flax import nnx

    if isinstance(model, nn.Module):
        return "linen"
    if isinstance(model, nnx.Module):
        return "nnx"
    if callable(model):
        return "fn"
    raise TypeError(
        f"{caller}: model must be a flax.linen.Module, a flax.nnx.Module, a Hugging Face Flax "
        "model, or a function fn(params, *args, **kwargs) of a parameter pytree; got "
        f"{type(model).__name__}"
    )


def hf_function(model):
    """``(fn, default params)`` for a Hugging Face ``FlaxPreTrainedModel``, or None for anything else.

    Recognised by duck typing (no transformers import): a linen ``module``, a
    ``params`` pytree, a ``config`` and a ``__call__`` taking ``params=``. The
    function is the model's own wrapper, ``model(*args, params=p, **kwargs)``,
    which builds the attention mask and position ids from ``input_ids`` as a
    plain call does.
    """
    import flax.linen as nn

    if not (
        isinstance(getattr(model, "module", None), nn.Module)
        and hasattr(model, "config")
        and hasattr(type(model), "params")  # (the property raises for `_do_init=False`)
        and callable(model)
    ):
        return None

    def fn(params, *args, **kwargs):
        return model(*args, params=params, **kwargs)

    try:
        params = model.params
    except ValueError:  # made with `_do_init=False`: the user keeps the params
        params = None
    return fn, params


def _is_param_leaf(leaf) -> bool:
    dt = getattr(leaf, "dtype", None)
    if dt is None:
        return False
    try:
        return bool(jnp.issubdtype(dt, jnp.floating))
    except TypeError:  # extended dtypes (PRNG keys)
        return False


class ModelAdapter:
    """A linen, nnx or function model as ``fn(leaves, *args, **kwargs)`` with named leaves."""

    def __init__(self, model, variables, method=None):
        import flax.linen as nn
        from flax import nnx

        self.model = model
        self.method = method
        self.kind = model_kind(model)
        if self.kind == "fn":
            self.func, variables = _function_and_params(model, variables, method)
            flat, self.treedef = jax.tree_util.tree_flatten_with_path(variables)
            infos = []
            for i, (path, leaf) in enumerate(flat):
                keys = [_key_name(k) for k in path] or ["params"]
                infos.append(
                    LeafInfo(
                        i,
                        "/".join(keys),
                        "/".join(keys[:-1]),
                        keys[-1],
                        _is_param_leaf(leaf),
                        tuple(np.shape(leaf)),
                        jnp.result_type(leaf) if hasattr(leaf, "dtype") else None,
                    )
                )
            self.values = [leaf for _, leaf in flat]
            paths = [li.path for li in infos]
            if len(set(paths)) != len(paths):
                dup = sorted({p for p in paths if paths.count(p) > 1})
                raise ValueError(
                    f"jq: the parameter pytree names two leaves alike ({fmt_paths(dup)}): jq names "
                    "a function's parameters by their key paths joined with '/'; use keys "
                    "without '/'"
                )
        elif self.kind == "linen":
            if variables is None:
                raise ValueError(
                    "jq: a linen model needs its `variables` (the dict from model.init)"
                )
            variables = nn.meta.unbox(_unfreeze(variables))  # drop nn.Partitioned boxes
            flat, self.treedef = jax.tree_util.tree_flatten_with_path(variables)
            infos = []
            for i, (path, leaf) in enumerate(flat):
                keys = [_key_name(k) for k in path]
                infos.append(
                    LeafInfo(
                        i,
                        "/".join(keys),
                        "/".join(keys[1:-1]),
                        keys[-1],
                        keys[0] == "params",
                        tuple(np.shape(leaf)),
                        jnp.result_type(leaf),
                    )
                )
            self.values = [leaf for _, leaf in flat]
        else:
            if variables is not None:
                raise ValueError(
                    "jq: an nnx model carries its own state; pass variables=None "
                    f"(got {type(variables).__name__})"
                )
            self.graphdef, state = nnx.split(model)
            types = {tuple(str(p) for p in path): type(v) for path, v in nnx.to_flat_state(state)}
            flat, self.treedef = jax.tree_util.tree_flatten_with_path(state)
            infos = []
            for i, (path, leaf) in enumerate(flat):
                keys = [_key_name(k) for k in path]
                if keys and keys[-1] == "value":
                    keys = keys[:-1]
                vt = types.get(tuple(keys))
                is_param = vt is not None and issubclass(vt, nnx.Param)
                infos.append(
                    LeafInfo(
                        i,
                        "/".join(keys),
                        "/".join(keys[:-1]),
                        keys[-1],
                        is_param,
                        tuple(np.shape(leaf)),
                        jnp.result_type(leaf) if hasattr(leaf, "dtype") else None,
                    )
                )
            self.values = [leaf for _, leaf in flat]
        self.leaves = infos
        self.by_path = {li.path: li for li in infos}
        # nnx: when True, `fn` returns ``(out, new_leaves)``, the module's state after the
        # call (RNG counts, BatchNorm statistics), so that jq can hand it back instead of
        # dropping it (which would freeze one dropout mask for every call)
        self.with_state = False

    def override(self, values: dict) -> ModelAdapter:
        """Replaces leaf values by path (nnx: trained parameters kept outside the module)."""
        self.values = [values.get(li.path, v) for li, v in zip(self.leaves, self.values)]
        return self

    def rebuilt(self, leaves: list):
        """``(model, variables)`` with `leaves`: linen's variables, or a new nnx module (and None)."""
        tree = jax.tree_util.tree_unflatten(self.treedef, leaves)
        if self.kind in ("linen", "fn"):
            return self.model, tree
        from flax import nnx

        return nnx.merge(self.graphdef, tree), None

    def signature(self) -> tuple:
        return tuple((li.path, li.shape) for li in self.leaves)

    def fn(self, leaves, *args, **kwargs):
        if self.kind == "fn":
            import flax.linen as nn

            params = jax.tree_util.tree_unflatten(self.treedef, leaves)
            # linen modules called inside the function (a Hugging Face model's) label their
            # operations with their module path, as for a linen model
            with nn.intercept_methods(_label):
                return self.func(params, *args, **kwargs)
        if self.kind == "linen":
            import flax.linen as nn

            variables = jax.tree_util.tree_unflatten(self.treedef, leaves)

            def label(next_fun, a, kw, context):
                path = ":".join(context.module.path)
                with jax.named_scope(SCOPE_PREFIX + path):
                    return next_fun(*a, **kw)

            with nn.intercept_methods(label):
                return self.model.apply(variables, *args, method=self.method, **kwargs)
        from flax import nnx

        state = jax.tree_util.tree_unflatten(self.treedef, leaves)
        module = nnx.merge(self.graphdef, state)
        f = (
            module
            if self.method is None
            else (
                getattr(module, self.method)
                if isinstance(self.method, str)
                else (lambda *a, **k: self.method(module, *a, **k))
            )
        )
        out = f(*args, **kwargs)
        if not self.with_state:
            return out
        new_leaves, new_tree = jax.tree_util.tree_flatten(nnx.split(module)[1])
        if new_tree != self.treedef:
            raise ValueError(
                "jq: the nnx model added or removed variables while running; jq needs a module "
                "whose state keeps its structure from call to call (create variables in __init__)"
            )
        return out, new_leaves


_CALLS = threading.local()  # the module paths of the linen calls being traced, innermost last


def _label(next_fun, a, kw, context):
    m = context.module
    stack = _CALLS.__dict__.setdefault("paths", [])
    path = ":".join(m.path)
    if not m.path and isinstance(m.name, str):
        # a named submodule applied on its own (Hugging Face's ``self.lm_head.apply({"params":
        # {"kernel": wte.T}}, h)``) has an empty path: it is known by its name, under the
        # module that applies it
        path = f"{stack[-1]}:{m.name}" if stack and stack[-1] else m.name
    stack.append(path)
    try:
        with jax.named_scope(SCOPE_PREFIX + path):
            return next_fun(*a, **kw)
    finally:
        stack.pop()


def _function_and_params(model, variables, method):
    """``(fn(params, *args, **kwargs), params)`` of a function model or a Hugging Face model."""
    hf = hf_function(model)
    if hf is not None:
        fn, default = hf
        if method is not None:
            m = getattr(model, method) if isinstance(method, str) else None
            if m is None:
                raise ValueError(
                    "jq: for a Hugging Face model, method= names one of its methods "
                    f"(e.g. 'encode'), got {method!r}"
                )
            fn = lambda params, *a, **kw: m(*a, params=params, **kw)  # noqa: E731
        if variables is None and default is None:
            raise ValueError(
                f"jq: this {type(model).__name__} holds no params (made with _do_init=False): "
                "pass them as `variables`"
            )
        return fn, default if variables is None else _unfreeze(variables)
    if method is not None:
        raise ValueError(
            "jq: method= selects a method of a linen or nnx model; a function model is the "
            "function itself (pass another function instead)"
        )
    if variables is None:
        raise ValueError(
            f"jq: a function model needs its parameter pytree: pass it as `variables` "
            f"(fn(params, *args, **kwargs) is called with it), got None for {_fn_name(model)}"
        )
    return model, _unfreeze(variables)


def _fn_name(f) -> str:
    return getattr(f, "__qualname__", None) or type(f).__name__


def _unfreeze(v):
    try:
        from flax.core import unfreeze

        return unfreeze(v)
    except Exception:  # pragma: no cover - plain dicts
        return v


def is_dynamic(x) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct)) or hasattr(
        x, "aval"
    )


@dataclasses.dataclass
class Traced:
    jaxpr: Any
    consts: list
    finder: SiteFinder
    out_tree: Any
    dyn_args: list
    n_leaves: int


def trace(adapter: ModelAdapter, leaf_avals: list, args: tuple, kwargs: dict) -> Traced:
    """Traces the model with the variables and array arguments as jaxpr inputs."""
    flat, in_tree = jax.tree_util.tree_flatten((args, kwargs))
    dyn_idx = [i for i, x in enumerate(flat) if is_dynamic(x)]
    dyn_args = [flat[i] for i in dyn_idx]

    def f(leaves, dyn):
        full = list(flat)
        for i, d in zip(dyn_idx, dyn):
            full[i] = d
        a, kw = jax.tree_util.tree_unflatten(in_tree, full)
        return adapter.fn(leaves, *a, **kw)

    dyn_avals = [
        d
        if isinstance(d, jax.ShapeDtypeStruct)
        else jax.ShapeDtypeStruct(np.shape(d), jnp.result_type(d))
        for d in dyn_args
    ]
    closed, out_shape = jax.make_jaxpr(f, return_shape=True)(leaf_avals, dyn_avals)
    finder = SiteFinder(adapter.leaves)
    finder.run(closed.jaxpr, len(leaf_avals))
    return Traced(
        closed.jaxpr,
        list(closed.consts),
        finder,
        jax.tree_util.tree_structure(out_shape),
        dyn_args,
        len(leaf_avals),
    )


def leaf_aval(li: LeafInfo, value) -> Any:
    if isinstance(value, QArray) or value is None:
        return jax.ShapeDtypeStruct(li.shape, li.dtype)
    return value


def state_changes(t: Traced, adapter: ModelAdapter) -> list[str]:
    """Paths of the nnx variables the traced call updates (traced with ``with_state``).

    The model's state after the call is the last ``len(adapter.leaves)`` outputs
    of the jaxpr; a variable the call leaves alone comes out as its own input.
    """
    n = len(adapter.leaves)
    outs, ins = t.jaxpr.outvars[len(t.jaxpr.outvars) - n :], t.jaxpr.invars[:n]
    return [li.path for li, o, i in zip(adapter.leaves, outs, ins) if o is not i]


def fmt_paths(paths, k: int = 4) -> str:
    """The first `k` paths, quoted, and how many more."""
    more = f" and {len(paths) - k} more" if len(paths) > k else ""
    return ", ".join(repr(p) for p in paths[:k]) + more
