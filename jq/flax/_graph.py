"""Finds quantizable sites in a traced model and re-evaluates it with jq ops.

jq never edits the user's model. It traces the model's forward pass to a jaxpr
with the variables as explicit inputs, finds the *sites* (dot_general,
convolution and gather equations fed by a parameter, possibly through casts,
transposes or reshapes, and dot_generals between two activations), and then
evaluates that jaxpr with a small interpreter that swaps each selected site for
its quantized (or fake-quantized, or observed) version. This one mechanism
covers linen and nnx modules alike, parameters used through ``x @ w`` or
``jnp.einsum`` in custom modules, nested jit / remat / custom_jvp calls, and
layers stacked with ``nn.scan`` / ``nnx.scan`` (whose stacked weights get one
scale per layer).

For linen, ``nn.intercept_methods`` labels every module call with a named scope
so that activation-only sites (attention's qk and av einsums) carry their
module path.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.extend.core as jcore
import jax.numpy as jnp
import numpy as np

from jq.quantize import QArray, dequantize

_SCOPE_PREFIX = "jq="
# primitives that only change a parameter's layout or dtype on its way to a dot
_LAYOUT_OPS = {"convert_element_type", "transpose", "reshape", "squeeze", "expand_dims", "copy", "copy_p"}
# call-like primitives whose body is evaluated inline
_CALL_PARAM = {
    "jit": "jaxpr",
    "pjit": "jaxpr",
    "closed_call": "call_jaxpr",
    "core_call": "call_jaxpr",
    "remat2": "jaxpr",
    "checkpoint": "jaxpr",
    "custom_jvp_call": "call_jaxpr",
    "custom_vjp_call": "call_jaxpr",
    "custom_vjp_call_jaxpr": "fun_jaxpr",
}


@dataclasses.dataclass(frozen=True)
class LeafInfo:
    """One leaf of the model's variables."""

    index: int
    path: str  # "params/Dense_0/kernel" (linen) or "l/kernel" (nnx)
    module_path: str  # "Dense_0"
    name: str  # "kernel"
    is_param: bool
    shape: tuple[int, ...]
    dtype: Any


@dataclasses.dataclass
class Site:
    """A quantizable equation of the traced model."""

    name: str
    kind: str  # dot | conv | embed | act_dot
    module_path: str
    eqn: Any
    leaf: LeafInfo | None  # the parameter operand (None for act_dot)
    operand: int | None  # which operand is the parameter
    chain: tuple[str, ...]  # layout ops between the parameter and the operand
    scans: tuple[int, ...]  # ids of the enclosing scan equations (outermost first)
    stack: tuple[int, ...]  # scan lengths the parameter is stacked over
    in_avals: tuple[Any, ...]

    @property
    def act_operands(self) -> tuple[int, ...]:
        if self.kind == "embed":
            return ()
        if self.kind == "act_dot":
            return (0, 1)
        return (1 - self.operand,)

    def act_key(self, operand: int) -> str:
        return self.name if self.kind != "act_dot" else f"{self.name}:{'lhs' if operand == 0 else 'rhs'}"


def scan_counts(params) -> tuple[int, int]:
    """``(num_consts, num_carry)`` of a `scan` equation, on every supported JAX.

    Up to jax 0.10 they are the ``num_consts`` / ``num_carry`` parameters; jax
    0.11 replaced them with ``ft_in``, a flat tree of the three input groups
    ``(consts, carry, xs)`` whose ``unpack()`` gives the groups.
    """
    if "num_consts" in params:
        return params["num_consts"], params["num_carry"]
    if "ft_in" in params:
        consts, carry, _ = (len(g) for g in params["ft_in"].unpack())
        return consts, carry
    raise KeyError(
        f"jq: unrecognised scan parameters {sorted(params)} (this JAX is newer than jq's "
        "tested versions; see jq._mixed_dot.TESTED_JAX_VERSIONS)"
    )


def inner_jaxpr(eqn):
    name = eqn.primitive.name
    key = _CALL_PARAM.get(name)
    if key is None or key not in eqn.params:
        return None
    j = eqn.params[key]
    if isinstance(j, jcore.ClosedJaxpr):
        return j.jaxpr, j.consts
    return j, ()


def scope_path(eqn, default: str) -> str:
    ns = str(eqn.source_info.name_stack)
    found = [seg for seg in ns.split("/") if seg.startswith(_SCOPE_PREFIX)]
    if not found:
        return default
    return found[-1][len(_SCOPE_PREFIX) :].replace(":", "/")


@dataclasses.dataclass
class _Origin:
    leaf: LeafInfo
    chain: tuple[str, ...]
    stack: tuple[int, ...]


class SiteFinder:
    """Walks a jaxpr and lists its sites in evaluation order."""

    def __init__(self, leaves: list[LeafInfo]):
        self.leaves = leaves
        self.sites: list[Site] = []
        self.by_eqn: dict[int, Site] = {}
        self._counts: dict[str, int] = {}
        self.scan_sites: dict[int, list[Site]] = {}  # scan eqn id -> sites inside it
        self.float_uses: dict[int, set[str]] = {}  # leaf index -> primitives using it as float
        self.scan_length: dict[int, int] = {}  # scan eqn id -> its length

    def _name(self, base: str) -> str:
        k = self._counts.get(base, 0)
        self._counts[base] = k + 1
        return base if k == 0 else f"{base}[{k}]"

    def run(self, jaxpr, n_leaves: int):
        origins = {v: _Origin(self.leaves[i], (), ()) for i, v in enumerate(jaxpr.invars[:n_leaves])}
        self._walk(jaxpr, origins, (), "")

    def _add(self, site: Site):
        self.sites.append(site)
        self.by_eqn[id(site.eqn)] = site
        for s in site.scans:
            self.scan_sites.setdefault(s, []).append(site)

    def _walk(self, jaxpr, origins: dict, scans: tuple[int, ...], scope: str):
        for eqn in jaxpr.eqns:
            prim = eqn.primitive.name
            ins = [origins.get(v) if isinstance(v, jcore.Var) else None for v in eqn.invars]
            here = scope_path(eqn, scope)
            avals = tuple(v.aval for v in eqn.invars)
            if prim in _LAYOUT_OPS and ins and ins[0] is not None and len(eqn.outvars) == 1:
                o = ins[0]
                origins[eqn.outvars[0]] = _Origin(o.leaf, o.chain + (prim,), o.stack)
                continue
            if prim in ("dot_general", "conv_general_dilated", "gather"):
                kind = {"dot_general": "dot", "conv_general_dilated": "conv", "gather": "embed"}[prim]
                pos = [i for i in range(2) if ins[i] is not None and ins[i].leaf.is_param]
                if kind == "embed":
                    pos = [0] if 0 in pos else []
                elif kind == "conv":
                    pos = [1] if 1 in pos else []
                if len(pos) == 1:
                    o = ins[pos[0]]
                    mp = o.leaf.module_path
                    base = (mp + "/" if mp else "") + o.leaf.name
                    self._add(Site(self._name(base), kind, mp, eqn, o.leaf, pos[0], o.chain, scans, o.stack, avals))
                    continue
                if kind == "dot" and not pos and all(i is None for i in ins[:2]):
                    base = (here + "/" if here else "") + "act_dot"
                    self._add(Site(self._name(base), "act_dot", here, eqn, None, None, (), scans, (), avals))
                    continue
            inner = inner_jaxpr(eqn)
            if inner is not None:
                j, _ = inner
                sub = {iv: o for iv, o in zip(j.invars, ins) if o is not None}
                self._walk(j, sub, scans, here)
                continue
            if prim == "scan":
                j = eqn.params["jaxpr"].jaxpr
                nc, nk = scan_counts(eqn.params)
                length = eqn.params["length"]
                self.scan_length[id(eqn)] = length
                sub = {}
                for i, (iv, o) in enumerate(zip(j.invars, ins)):
                    if o is None:
                        continue
                    if i < nc:
                        sub[iv] = o
                    elif i >= nc + nk:
                        sub[iv] = _Origin(o.leaf, o.chain, o.stack + (length,))
                self._walk(j, sub, scans + (id(eqn),), here)
                continue
            for o in ins:
                if o is not None:
                    self.float_uses.setdefault(o.leaf.index, set()).add(prim)


# ---------------------------------------------------------------------------------------
# QArray layout ops (applied when a quantized parameter flows to its site)
# ---------------------------------------------------------------------------------------
def _unpacked(q: QArray) -> QArray:
    if q.pack_axis is None:
        return q
    return QArray(q.int_value(), q.scale, q.zero_point, q.format, q.shape, None)


def _reshape_groups(old, new):
    """Pairs groups of old dims with groups of new dims that have equal products."""
    groups, i, j = [], 0, 0
    while i < len(old) or j < len(new):
        gi, gj = [i] if i < len(old) else [], [j] if j < len(new) else []
        po = old[i] if i < len(old) else 1
        pn = new[j] if j < len(new) else 1
        i, j = i + bool(gi), j + bool(gj)
        while po != pn:
            if po < pn and i < len(old):
                po *= old[i]
                gi.append(i)
                i += 1
            elif j < len(new):
                pn *= new[j]
                gj.append(j)
                j += 1
            else:
                return None
        groups.append((gi, gj))
    return groups


def qarray_layout_op(prim: str, q: QArray, eqn) -> QArray | None:
    """Applies a layout primitive to a QArray, or returns None if it cannot."""
    if prim in ("convert_element_type", "copy", "copy_p"):
        return q
    q = _unpacked(q)
    zp = q.zero_point
    if prim == "transpose":
        perm = eqn.params["permutation"]
        t = lambda a: None if a is None else jnp.transpose(a, perm)  # noqa: E731
        return QArray(t(q.value), t(q.scale), t(zp), q.format, tuple(q.shape[p] for p in perm), None)
    if prim in ("reshape", "squeeze", "expand_dims"):
        new = tuple(eqn.outvars[0].aval.shape)
        groups = _reshape_groups(q.shape, new)
        if groups is None:
            return None
        pshape = [1] * len(new)
        for gi, gj in groups:
            nontrivial = [d for d in gi if q.scale.shape[d] != 1]
            if not nontrivial:
                continue
            if len(gi) != 1 or len(gj) != 1 or q.scale.shape[gi[0]] != q.shape[gi[0]]:
                return None  # a channel axis would be split or merged
            pshape[gj[0]] = new[gj[0]]
        r = lambda a: None if a is None else a.reshape(pshape)  # noqa: E731
        return QArray(q.value.reshape(new), r(q.scale), r(zp), q.format, new, None)
    return None


def bind_eqn(eqn, invals, **overrides) -> list:
    """Binds `eqn`'s primitive on `invals` (QArrays dequantized), as `jax.core.eval_jaxpr` does."""
    invals = [materialize(v).astype(iv.aval.dtype) if isinstance(v, QArray) else v
              for v, iv in zip(invals, eqn.invars)]
    params = dict(eqn.primitive.get_bind_params(eqn.params))
    params.update(overrides)
    with eqn.ctx.manager:
        out = eqn.primitive.bind(*invals, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


def materialize(v):
    return dequantize(v) if isinstance(v, QArray) else v


# ---------------------------------------------------------------------------------------
# the interpreter
# ---------------------------------------------------------------------------------------
SiteHandler = Callable[[Site, Any, list, dict], list]


class Interpreter:
    """Evaluates a jaxpr, sending each selected site to `handler`.

    `states` is a dict of per-site pytrees (observer states, activation QParams,
    EMA ranges, metrics). Sites inside a scan have their entries stacked along a
    leading axis, one slice per iteration; the interpreter slices them into the
    scan body and stacks the updated slices back.
    """

    def __init__(self, finder: SiteFinder, selected: set[str], handler: SiteHandler):
        self.finder = finder
        self.selected = selected
        self.handler = handler

    def _site(self, eqn):
        s = self.finder.by_eqn.get(id(eqn))
        return s if (s is not None and s.name in self.selected) else None

    def _has_selected(self, jaxpr) -> bool:
        for eqn in jaxpr.eqns:
            if self._site(eqn) is not None:
                return True
            inner = inner_jaxpr(eqn)
            if inner is not None and self._has_selected(inner[0]):
                return True
            if eqn.primitive.name == "scan" and self._has_selected(eqn.params["jaxpr"].jaxpr):
                return True
        return False

    def run(self, jaxpr, consts, args, states: dict) -> list:
        env: dict = {}

        def read(v):
            return v.val if isinstance(v, jcore.Literal) else env[v]

        for v, x in zip(jaxpr.constvars, consts):
            env[v] = x
        for v, x in zip(jaxpr.invars, args):
            env[v] = x
        for eqn in jaxpr.eqns:
            invals = [read(v) for v in eqn.invars]
            outs = self._eval(eqn, invals, states)
            for v, o in zip(eqn.outvars, outs):
                if not isinstance(v, jcore.DropVar):
                    env[v] = o
        return [read(v) for v in jaxpr.outvars]

    def _eval(self, eqn, invals, states):
        prim = eqn.primitive.name
        site = self._site(eqn)
        if site is not None:
            return self.handler(site, eqn, invals, states)
        has_q = any(isinstance(v, QArray) for v in invals)
        inner = inner_jaxpr(eqn)
        if inner is not None and (has_q or self._has_selected(inner[0])):
            j, consts = inner
            return self.run(j, consts, invals, states)
        if prim == "scan" and (has_q or self._has_selected(eqn.params["jaxpr"].jaxpr)):
            return self._scan(eqn, invals, states)
        if has_q:
            if prim in _LAYOUT_OPS and len(invals) == 1:
                r = qarray_layout_op(prim, invals[0], eqn)
                if r is not None:
                    return [r]
        return bind_eqn(eqn, invals)

    def _scan(self, eqn, invals, states):
        p = eqn.params
        closed = p["jaxpr"]
        nc, nk = scan_counts(p)
        consts, carry, xs = invals[:nc], invals[nc : nc + nk], invals[nc + nk :]
        inner_keys = sorted(
            k for k in states if any(k == s.name or k.startswith(s.name + ":")
                                     for s in self.finder.scan_sites.get(id(eqn), ()))
        )
        # a stacked QArray's static shape would be wrong after slicing: pass its leaves
        xs_packed = []
        for x in xs:
            if isinstance(x, QArray):
                pa = None if x.pack_axis is None else x.pack_axis - 1
                xs_packed.append(("q", (x.value, x.scale, x.zero_point), (x.format, x.shape[1:], pa)))
            else:
                xs_packed.append(("a", x, None))
        dyn_xs = [x[1] for x in xs_packed]
        st_xs = {k: states[k] for k in inner_keys}

        def body(c, sl):
            x_sl, st_sl = sl
            rebuilt = []
            for (tag, _, meta), v in zip(xs_packed, x_sl):
                if tag == "q":
                    fmt, shape, pa = meta
                    rebuilt.append(QArray(v[0], v[1], v[2], fmt, shape, pa))
                else:
                    rebuilt.append(v)
            inner_states = dict(st_sl)
            outs = self.run(closed.jaxpr, closed.consts, list(consts) + list(c) + rebuilt, inner_states)
            return list(outs[:nk]), (list(outs[nk:]), {k: inner_states[k] for k in inner_keys})

        new_carry, (ys, st_ys) = jax.lax.scan(
            body, list(carry), (dyn_xs, st_xs), length=p["length"], reverse=p["reverse"], unroll=p["unroll"]
        )
        states.update(st_ys)
        return list(new_carry) + list(ys)


# ---------------------------------------------------------------------------------------
# model adapters: linen and nnx behind one functional signature
# ---------------------------------------------------------------------------------------
def _key_name(k) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


class ModelAdapter:
    """A linen or nnx model as ``fn(leaves, *args, **kwargs)`` with named leaves."""

    def __init__(self, model, variables, method=None):
        import flax.linen as nn
        from flax import nnx

        self.model = model
        self.method = method
        if isinstance(model, nn.Module):
            self.kind = "linen"
            if variables is None:
                raise ValueError("jq: a linen model needs its `variables` (the dict from model.init)")
            variables = nn.meta.unbox(_unfreeze(variables))  # drop nn.Partitioned boxes
            flat, self.treedef = jax.tree_util.tree_flatten_with_path(variables)
            infos = []
            for i, (path, leaf) in enumerate(flat):
                keys = [_key_name(k) for k in path]
                infos.append(
                    LeafInfo(i, "/".join(keys), "/".join(keys[1:-1]), keys[-1], keys[0] == "params",
                             tuple(np.shape(leaf)), jnp.result_type(leaf))
                )
            self.values = [leaf for _, leaf in flat]
        elif isinstance(model, nnx.Module):
            self.kind = "nnx"
            if variables is not None:
                raise ValueError(
                    "jq: an nnx model carries its own state; pass variables=None "
                    f"(got {type(variables).__name__})"
                )
            self.graphdef, state = nnx.split(model)
            types = {tuple(str(p) for p in path): type(v) for path, v in state.flat_state()}
            flat, self.treedef = jax.tree_util.tree_flatten_with_path(state)
            infos = []
            for i, (path, leaf) in enumerate(flat):
                keys = [_key_name(k) for k in path]
                if keys and keys[-1] == "value":
                    keys = keys[:-1]
                vt = types.get(tuple(keys))
                is_param = vt is not None and issubclass(vt, nnx.Param)
                infos.append(
                    LeafInfo(i, "/".join(keys), "/".join(keys[:-1]), keys[-1], is_param,
                             tuple(np.shape(leaf)), jnp.result_type(leaf) if hasattr(leaf, "dtype") else None)
                )
            self.values = [leaf for _, leaf in flat]
        else:
            raise TypeError(
                f"jq: model must be a flax.linen.Module or a flax.nnx.Module, got {type(model).__name__}"
            )
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

    def signature(self) -> tuple:
        return tuple((li.path, li.shape) for li in self.leaves)

    def fn(self, leaves, *args, **kwargs):
        if self.kind == "linen":
            import flax.linen as nn

            variables = jax.tree_util.tree_unflatten(self.treedef, leaves)

            def label(next_fun, a, kw, context):
                path = ":".join(context.module.path)
                with jax.named_scope(_SCOPE_PREFIX + path):
                    return next_fun(*a, **kw)

            with nn.intercept_methods(label):
                return self.model.apply(variables, *args, method=self.method, **kwargs)
        from flax import nnx

        state = jax.tree_util.tree_unflatten(self.treedef, leaves)
        module = nnx.merge(self.graphdef, state)
        f = module if self.method is None else (
            getattr(module, self.method) if isinstance(self.method, str) else
            (lambda *a, **k: self.method(module, *a, **k)))
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


def _unfreeze(v):
    try:
        from flax.core import unfreeze

        return unfreeze(v)
    except Exception:  # pragma: no cover - plain dicts
        return v


def is_dynamic(x) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct)) or hasattr(x, "aval")


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

    dyn_avals = [d if isinstance(d, jax.ShapeDtypeStruct) else jax.ShapeDtypeStruct(np.shape(d), jnp.result_type(d))
                 for d in dyn_args]
    closed, out_shape = jax.make_jaxpr(f, return_shape=True)(leaf_avals, dyn_avals)
    finder = SiteFinder(adapter.leaves)
    finder.run(closed.jaxpr, len(leaf_avals))
    return Traced(closed.jaxpr, list(closed.consts), finder, jax.tree_util.tree_structure(out_shape),
                  dyn_args, len(leaf_avals))


def leaf_aval(li: LeafInfo, value) -> Any:
    if isinstance(value, QArray) or value is None:
        return jax.ShapeDtypeStruct(li.shape, li.dtype)
    return value


def sqnr_db(x, y) -> jax.Array:
    """Signal-to-quantization-noise ratio of approximation `y` of `x`, in dB."""
    x = x.astype(jnp.float32)
    noise = jnp.sum(jnp.square(x - y.astype(jnp.float32)))
    sig = jnp.sum(jnp.square(x))
    return 10.0 * jnp.log10(jnp.maximum(sig, 1e-30) / jnp.maximum(noise, 1e-30))


def state_changes(t: Traced, adapter: ModelAdapter) -> list[str]:
    """Paths of the nnx variables the traced call updates (traced with ``with_state``).

    The model's state after the call is the last ``len(adapter.leaves)`` outputs
    of the jaxpr; a variable the call leaves alone comes out as its own input.
    """
    n = len(adapter.leaves)
    outs, ins = t.jaxpr.outvars[len(t.jaxpr.outvars) - n:], t.jaxpr.invars[:n]
    return [li.path for li, o, i in zip(adapter.leaves, outs, ins) if o is not i]


def fmt_paths(paths, k: int = 4) -> str:
    """The first `k` paths, quoted, and how many more."""
    more = f" and {len(paths) - k} more" if len(paths) > k else ""
    return ", ".join(repr(p) for p in paths[:k]) + more
