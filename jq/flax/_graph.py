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

Per-site state of the interpreter (observer states, QParams, ranges, ...) is
keyed by `StateKey` ``(site, kind, operand)``. The model itself reaches this
module as a jaxpr made by `jq.flax.adapter.trace`; for linen, the adapter's
``nn.intercept_methods`` labels every module call with a named scope
(`SCOPE_PREFIX`) so that activation-only sites (attention's qk and av einsums)
carry their module path.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.extend.core as jcore
import jax.numpy as jnp

from jq.flax.dataflow import JaxprView, inner_jaxpr, scan_counts
from jq.kv_quant import update_slice
from jq.quantize import QArray, dequantize

# primitives that only change a parameter's layout or dtype on its way to a dot
_LAYOUT_OPS = {
    "convert_element_type",
    "transpose",
    "reshape",
    "squeeze",
    "expand_dims",
    "copy",
    "copy_p",
    "slice",
    "broadcast_in_dim",
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


class StateKey(NamedTuple):
    """Key of one entry of the interpreter's state: the site it belongs to and what it holds.

    Entries of a site inside a scan are stacked over the scan's iterations, and
    `Interpreter` hands the scan body the entries whose `site` lies in it. One
    (site, kind) pair is either per operand or not, never both.
    """

    site: str  # `Site.name`
    kind: str  # "observer", "qparams", "smooth", "range", "lsq", "metrics", "hessian", "absmax"
    operand: int | None = None  # the activation operand (0: lhs, 1: rhs) of a per-operand entry


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
    chain_eqns: tuple[Any, ...] = ()  # the equations of `chain`, in order
    scope: str = ""  # the module the equation runs in (named scopes; '' outside linen)
    # for each axis of the parameter operand, the stored axes of the leaf it comes from
    # (through transposes, reshapes, slices, ...; () for an axis of size 1 or a new one)
    axes: tuple[tuple[int, ...], ...] | None = None

    @property
    def act_operands(self) -> tuple[int, ...]:
        if self.kind == "embed":
            return ()
        if self.kind == "act_dot":
            return (0, 1)
        return (1 - self.operand,)

    def act_key(self, operand: int) -> str:
        """The public key of an activation operand (`CalibrationStats`, `QuantizedVariables`, QAT ranges):
        the site name, or ``"<name>:lhs"`` / ``"<name>:rhs"`` for a dot between activations."""
        return (
            self.name
            if self.kind != "act_dot"
            else f"{self.name}:{'lhs' if operand == 0 else 'rhs'}"
        )

    def key(self, kind: str, operand: int | None = None) -> StateKey:
        """The interpreter-state key of this site's `kind` entry (of `operand`, if per operand)."""
        return StateKey(self.name, kind, operand)


@dataclasses.dataclass
class _Origin:
    leaf: LeafInfo
    chain: tuple[str, ...]
    stack: tuple[int, ...]
    axes: tuple[tuple[int, ...], ...]  # per axis of the value: the stored axes it comes from
    eqns: tuple[Any, ...] = ()  # the equations of `chain`, in order


def tied_module(table_module: str, table_name: str, scope: str) -> str:
    """The module path of a dot that reads an embedding table also gathered from (a tied head).

    The module the dot runs in, when that is not the table's own module or one
    of its ancestors (Hugging Face's ``lm_head``, which applies a Dense to
    ``wte.T``); otherwise ``"<table module>.attend"`` (linen's ``Embed.attend``,
    ``x @ table.T`` in a parent module or a plain function).
    """
    t = table_module
    if scope and t != scope and not t.startswith(scope + "/"):
        return scope
    return (t or table_name) + ".attend"


def _follow_axes(prim: str, axes, eqn) -> tuple[tuple[int, ...], ...]:
    """The stored axes behind each output axis of a layout op, from those of its input.

    An output axis of size 1 comes from no stored axis: a slice that keeps one
    element of a stacked weight (``w[0]``) selects along that axis, it does not
    make it part of the dot.
    """
    out_shape = tuple(eqn.outvars[0].aval.shape)
    in_shape = tuple(eqn.invars[0].aval.shape)
    if prim == "transpose":
        new = [axes[p] for p in eqn.params["permutation"]]
    elif prim in ("reshape", "squeeze", "expand_dims"):
        groups = _reshape_groups(in_shape, out_shape) or [
            (list(range(len(in_shape))), list(range(len(out_shape))))
        ]
        new = [()] * len(out_shape)
        for gi, gj in groups:
            src = tuple(sorted({a for i in gi for a in axes[i]}))
            for j in gj:
                new[j] = src
    elif prim == "broadcast_in_dim":
        new = [()] * len(out_shape)
        for i, j in enumerate(eqn.params["broadcast_dimensions"]):
            new[j] = axes[i]
    else:  # casts, copies and slices keep the axes
        new = list(axes)
    return tuple(() if d == 1 else a for a, d in zip(new, out_shape))


class SiteFinder:
    """Lists the sites of a jaxpr in evaluation order, reading its `JaxprView`.

    A parameter reaches a site through layout ops (`_LAYOUT_OPS`); its origin
    is visible in the call or scan body where it was derived and in the ones
    nested there, not after the call returns. A scan's per-iteration inputs
    carry their origin with one more stacked axis (one slice per layer).
    """

    def __init__(self, leaves: list[LeafInfo]):
        self.leaves = leaves
        self.sites: list[Site] = []
        self.by_eqn: dict[int, Site] = {}
        self.by_name: dict[str, Site] = {}
        self._counts: dict[str, int] = {}
        self.scan_sites: dict[int, list[Site]] = {}  # scan eqn id -> sites inside it
        self.float_uses: dict[int, set[str]] = {}  # leaf index -> primitives using it as float
        self.scan_length: dict[int, int] = {}  # scan eqn id -> its length
        self.view: JaxprView | None = None

    def _name(self, base: str) -> str:
        k = self._counts.get(base, 0)
        self._counts[base] = k + 1
        return base if k == 0 else f"{base}[{k}]"

    def _add(self, site: Site):
        # `site.name` holds its base name until `_finish` numbers repeated ones
        self.sites.append(site)
        self.by_eqn[id(site.eqn)] = site
        for s in site.scans:
            self.scan_sites.setdefault(s, []).append(site)

    def _finish(self):
        """Names the sites: a tied head by its own module (`tied_module`), repeats numbered."""
        tables = {s.leaf.index for s in self.sites if s.kind == "embed"}
        for s in self.sites:
            if s.kind == "dot" and s.leaf is not None and s.leaf.index in tables:
                s.module_path = tied_module(s.leaf.module_path, s.leaf.name, s.scope)
                s.name = s.module_path + "/" + s.leaf.name
        for s in self.sites:
            s.name = self._name(s.name)
            self.by_name[s.name] = s

    def run(self, jaxpr, n_leaves: int):
        view = self.view = JaxprView(jaxpr)
        # ref -> (origin, context where it is visible)
        origins = {
            r: (
                _Origin(
                    self.leaves[i],
                    (),
                    (),
                    tuple(() if d == 1 else (a,) for a, d in enumerate(self.leaves[i].shape)),
                ),
                (),
            )
            for i, r in enumerate(view.input_refs[:n_leaves])
        }

        def origin(r, ctx):
            got = origins.get(r) if r[0] == "v" else None
            if got is None or ctx[: len(got[1])] != got[1]:
                return None
            return got[0]

        entered: set[int] = set()
        for node in view.nodes:
            for s in node.scans:
                if s not in entered:  # entering a scan body: its xs carry a stacked origin
                    entered.add(s)
                    body = view.scans[s]
                    self.scan_length[s] = body.length
                    start = body.num_consts + body.num_carry
                    for r_out, r_in in zip(body.node.ins[start:], body.body_in[start:]):
                        o = origin(r_out, body.node.context)
                        if o is not None:
                            o = _Origin(
                                o.leaf, o.chain, o.stack + (body.length,), o.axes[1:], o.eqns
                            )
                            origins[r_in] = (o, body.node.path)
            self._visit(node, [origin(r, node.context) for r in node.ins], origins)
        self._finish()

    def _visit(self, node, ins: list, origins: dict):
        eqn, prim = node.eqn, node.prim
        if prim in _LAYOUT_OPS and ins and ins[0] is not None and len(node.outs) == 1:
            o = ins[0]
            axes = _follow_axes(prim, o.axes, eqn)
            origins[node.outs[0]] = (
                _Origin(o.leaf, o.chain + (prim,), o.stack, axes, o.eqns + (eqn,)),
                node.context,
            )
            return
        avals = tuple(v.aval for v in eqn.invars)
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
                self._add(
                    Site(
                        base,
                        kind,
                        mp,
                        eqn,
                        o.leaf,
                        pos[0],
                        o.chain,
                        node.scans,
                        o.stack,
                        avals,
                        o.eqns,
                        node.module,
                        o.axes,
                    )
                )
                return
            if kind == "dot" and not pos and all(i is None for i in ins[:2]):
                base = (node.module + "/" if node.module else "") + "act_dot"
                self._add(
                    Site(
                        base,
                        "act_dot",
                        node.module,
                        eqn,
                        None,
                        None,
                        (),
                        node.scans,
                        (),
                        avals,
                        (),
                        node.module,
                    )
                )
                return
        if prim == "scan":  # its body's nodes came first
            self.scan_length[id(eqn)] = eqn.params["length"]
            return
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
        return QArray(
            t(q.value), t(q.scale), t(zp), q.format, tuple(q.shape[p] for p in perm), None
        )
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
    if prim == "slice":  # a part of a fused or stacked weight: its scales come along
        p = eqn.params
        if p["strides"] is not None and any(st != 1 for st in p["strides"]):
            return None
        starts, limits = p["start_indices"], p["limit_indices"]
        pstart, plimit = [], []
        for a, (n, ps) in enumerate(zip(q.shape, q.scale.shape)):
            if ps == 1:
                pstart.append(0)
                plimit.append(1)
                continue
            bs = n // ps
            if starts[a] % bs or limits[a] % bs:
                return None  # the slice cuts a block of scales
            pstart.append(starts[a] // bs)
            plimit.append(limits[a] // bs)
        sl = lambda a: None if a is None else jax.lax.slice(a, pstart, plimit)  # noqa: E731
        val = jax.lax.slice(q.value, starts, limits)
        return QArray(val, sl(q.scale), sl(zp), q.format, tuple(val.shape), None)
    if prim == "broadcast_in_dim":
        p = eqn.params
        shape = tuple(p["shape"])
        bdims = p["broadcast_dimensions"]
        pshape = [1] * len(shape)
        for i, j in enumerate(bdims):
            if q.shape[i] == shape[j]:
                pshape[j] = q.scale.shape[i]
            elif q.scale.shape[i] != 1:
                return None

        b = lambda a: None if a is None else jax.lax.broadcast_in_dim(a, tuple(pshape), bdims)  # noqa: E731
        val = jax.lax.broadcast_in_dim(q.value, shape, bdims)
        return QArray(val, b(q.scale), b(zp), q.format, shape, None)
    return None


def through_chain(q: QArray, site: Site):
    """`q` (a quantized copy of the site's parameter) taken through the layout ops between the
    parameter and the site (`Site.chain_eqns`), as the interpreter takes the parameter."""
    for eqn in site.chain_eqns:
        r = qarray_layout_op(eqn.primitive.name, q, eqn) if isinstance(q, QArray) else None
        q = r if r is not None else bind_eqn(eqn, [q])[0]
    return q


def bind_eqn(eqn, invals, **overrides) -> list:
    """Binds `eqn`'s primitive on `invals` (QArrays dequantized), as `jax.core.eval_jaxpr` does."""
    invals = [
        dequantize(v, jnp.float32).astype(iv.aval.dtype) if isinstance(v, QArray) else v
        for v, iv in zip(invals, eqn.invars)
    ]
    params = dict(eqn.primitive.get_bind_params(eqn.params))
    params.update(overrides)
    with eqn.ctx.manager:
        out = eqn.primitive.bind(*invals, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


def materialize(v):
    return dequantize(v) if isinstance(v, QArray) else v


def keyed_by_site(
    finder: SiteFinder, by_act_key: Mapping[str, Any], kind: str
) -> dict[StateKey, Any]:
    """Interpreter state from a dict keyed by `Site.act_key`: the entries of the traced sites."""
    return {
        s.key(kind, op): by_act_key[s.act_key(op)]
        for s in finder.sites
        for op in s.act_operands
        if s.act_key(op) in by_act_key
    }


def keyed_by_act_key(
    finder: SiteFinder, states: Mapping[StateKey, Any], kind: str
) -> dict[str, Any]:
    """The per-operand `kind` entries of interpreter state, keyed by `Site.act_key` again."""
    return {
        finder.by_name[k.site].act_key(k.operand): v for k, v in states.items() if k.kind == kind
    }


# ---------------------------------------------------------------------------------------
# the interpreter
# ---------------------------------------------------------------------------------------
SiteHandler = Callable[[Site, Any, list, dict], list]
EqnHook = Callable[[Any, list, dict, tuple], list]
ScanHook = Callable[[Any, list, dict, tuple], None]


class EqnKey(NamedTuple):
    """Key of a per-equation entry of the interpreter's state (`jq.cast`'s ``max |x|``).

    Unlike a `StateKey`, an entry of an equation inside a scan is one value for
    all iterations: the scan carries it through its body.
    """

    path: tuple[int, ...]  # the equation's index path (`JaxprView` / `Node.path`)
    kind: str  # "absmax"


class Interpreter:
    """Evaluates a jaxpr, sending each selected site to `handler`.

    `states` is a dict of interpreter state. `StateKey` entries (observer
    states, activation QParams, EMA ranges, metrics) belong to sites: those of
    sites inside a scan are stacked along a leading axis, one slice per
    iteration; the interpreter slices them into the scan body and stacks the
    updated slices back. `EqnKey` entries belong to equations: those inside a
    scan are carried through it (one value for every iteration).

    Hooks: `on_eqn(eqn, invals, states, path)` evaluates every other primitive
    equation (default: bind it, QArrays dequantized) and `on_scan(eqn, outs,
    states, path)` sees each interpreted scan's outputs. With ``enter_all``
    every call and scan body is interpreted (the hooks see every equation);
    otherwise only those holding a selected site or receiving a QArray.
    """

    def __init__(
        self,
        finder: SiteFinder,
        selected: set[str],
        handler: SiteHandler,
        *,
        on_eqn: EqnHook | None = None,
        on_scan: ScanHook | None = None,
        enter_all: bool = False,
    ):
        self.finder = finder
        self.selected = selected
        self.handler = handler
        self.on_eqn = on_eqn
        self.on_scan = on_scan
        self.enter_all = enter_all

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

    def run(self, jaxpr, consts, args, states: dict, prefix: tuple[int, ...] = ()) -> list:
        env: dict = {}

        def read(v):
            return v.val if isinstance(v, jcore.Literal) else env[v]

        for v, x in zip(jaxpr.constvars, consts):
            env[v] = x
        for v, x in zip(jaxpr.invars, args):
            env[v] = x
        for i, eqn in enumerate(jaxpr.eqns):
            invals = [read(v) for v in eqn.invars]
            outs = self._eval(eqn, invals, states, prefix + (i,))
            for v, o in zip(eqn.outvars, outs):
                if not isinstance(v, jcore.DropVar):
                    env[v] = o
        return [read(v) for v in jaxpr.outvars]

    def _eval(self, eqn, invals, states, path):
        prim = eqn.primitive.name
        site = self._site(eqn)
        if site is not None:
            return self.handler(site, eqn, invals, states)
        has_q = any(isinstance(v, QArray) for v in invals)
        inner = inner_jaxpr(eqn)
        if inner is not None and (self.enter_all or has_q or self._has_selected(inner[0])):
            j, consts = inner
            return self.run(j, consts, invals, states, path)
        if prim == "scan" and (
            self.enter_all or has_q or self._has_selected(eqn.params["jaxpr"].jaxpr)
        ):
            outs = self._scan(eqn, invals, states, path)
            if self.on_scan is not None:
                self.on_scan(eqn, outs, states, path)
            return outs
        if has_q:
            if prim == "dynamic_update_slice" and isinstance(invals[0], QArray):
                # a quantized KV cache (jq.kv_cache): the written slice is quantized in place
                return [update_slice(invals[0], materialize(invals[1]), invals[2:])]
            if prim in _LAYOUT_OPS and len(invals) == 1:
                r = qarray_layout_op(prim, invals[0], eqn)
                if r is not None:
                    return [r]
        if self.on_eqn is not None:
            return self.on_eqn(eqn, invals, states, path)
        return bind_eqn(eqn, invals)

    def _scan(self, eqn, invals, states, path):
        p = eqn.params
        closed = p["jaxpr"]
        nc, nk = scan_counts(p)
        consts, carry, xs = invals[:nc], invals[nc : nc + nk], invals[nc + nk :]
        carry = [c if isinstance(c, QArray) else jnp.asarray(c) for c in carry]
        # the hooks may change dtypes inside the body (jq.cast); the carry keeps its own
        dts = [None if isinstance(c, QArray) else c.dtype for c in carry]
        inner = {s.name for s in self.finder.scan_sites.get(id(eqn), ())}
        stacked = [k for k in states if isinstance(k, StateKey) and k.site in inner]
        carried = [
            k
            for k in states
            if isinstance(k, EqnKey) and len(k.path) > len(path) and k.path[: len(path)] == path
        ]
        # a stacked QArray's static shape would be wrong after slicing: pass its leaves
        xs_packed = []
        for x in xs:
            if isinstance(x, QArray):
                pa = None if x.pack_axis is None else x.pack_axis - 1
                xs_packed.append(
                    ("q", (x.value, x.scale, x.zero_point), (x.format, x.shape[1:], pa))
                )
            else:
                xs_packed.append(("a", x, None))
        dyn_xs = [x[1] for x in xs_packed]
        st_xs = {k: states[k] for k in stacked}

        def body(c, sl):
            c_vals, c_states = c
            x_sl, st_sl = sl
            rebuilt = []
            for (tag, _, meta), v in zip(xs_packed, x_sl):
                if tag == "q":
                    fmt, shape, pa = meta
                    rebuilt.append(QArray(v[0], v[1], v[2], fmt, shape, pa))
                else:
                    rebuilt.append(v)
            inner_states = {**st_sl, **c_states}
            outs = self.run(
                closed.jaxpr,
                closed.consts,
                list(consts) + list(c_vals) + rebuilt,
                inner_states,
                path,
            )
            new_c = [o if d is None else o.astype(d) for o, d in zip(outs[:nk], dts)]
            new_states = {k: inner_states[k] for k in carried}
            return (new_c, new_states), (list(outs[nk:]), {k: inner_states[k] for k in stacked})

        (new_carry, new_carried), (ys, st_ys) = jax.lax.scan(
            body,
            (carry, {k: states[k] for k in carried}),
            (dyn_xs, st_xs),
            length=p["length"],
            reverse=p["reverse"],
            unroll=p["unroll"],
        )
        states.update(st_ys)
        states.update(new_carried)
        return list(new_carry) + list(ys)
