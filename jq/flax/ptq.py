"""Calibration-based weight post-processing for Flax models: GPTQ and SmoothQuant.

`gptq` collects the layer-input Hessian ``H = 2 X X^T / n`` of every matched
Dense / DenseGeneral / Einsum weight with the same traced-model interpreter
that `jq.calibrate` uses, runs `jq.gptq_core.gptq_quantize` on it, and returns
ordinary `QuantizedVariables` that `jq.apply` runs unchanged.

`smoothquant` moves per-channel activation outliers into the weights
(Xiao et al., 2022), folds the ``1 / s`` into a preceding LayerNorm-style
affine where it finds one, and returns `QuantizedVariables` that carry the
remaining per-site smoothing vectors.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterable, Sequence

import jax
import jax.extend.core as jcore
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jq.flax._graph import Site, StateKey, inner_jaxpr, scan_counts
from jq.flax.adapter import ModelAdapter, trace
from jq.flax.calibrate import calibrate
from jq.flax.convert import convert
from jq.flax.qvars import CalibrationStats, QuantizedVariables
from jq.flax.rules import Rule, check_rules
from jq.flax.select import choose, leaf_specs, scan_lengths, stack_tree
from jq.flax.stream import (
    Stream,
    abstract,
    calibration_stats,
    init_observers,
    observe_site,
    site_body,
    split_batch,
)
from jq.gptq_core import gptq_quantize, gptq_with_params
from jq.qparams import QParams, QuantSpec, qparams_from_array
from jq.quantize import _expand_blocks, quantize
from jq.smoothing import smoothing_factors

__all__ = ["gptq", "smoothquant"]

_PASSTHROUGH = {"convert_element_type", "copy", "copy_p"}


# ---------------------------------------------------------------------------------------
# site geometry
# ---------------------------------------------------------------------------------------
def _dot_geometry(site: Site):
    """``(weight contracting dims, activation contracting dims)`` of a parameter dot, or a reason."""
    if site.kind != "dot":
        return f"{site.kind} site"
    if any(op not in _PASSTHROUGH for op in site.chain):
        return f"weight reaches the dot through {site.chain}"
    (lc, rc), (lb, rb) = site.eqn.params["dimension_numbers"]
    if lb or rb:
        return "dot with batch dimensions on the weight"
    wc, ac = (tuple(rc), tuple(lc)) if site.operand == 1 else (tuple(lc), tuple(rc))
    if wc != tuple(range(len(wc))):
        return f"weight contracting dims {wc} are not its leading axes"
    return wc, ac


def _x_matrix(x, ac, k):
    """The activation as ``(rows, K)``, K flattened in the order of the weight's leading axes."""
    nd = x.ndim
    x = jnp.moveaxis(x, ac, tuple(range(nd - len(ac), nd)))
    return x.reshape(-1, k).astype(jnp.float32)


def _site_deps(jaxpr, finder) -> dict[str, frozenset]:
    """For each site, the sites whose outputs reach its activation operand(s) (over-approximated)."""
    deps: dict[str, frozenset] = {}
    empty = frozenset()

    def walk(j, env):
        for eqn in j.eqns:
            ins = [env.get(v, empty) if isinstance(v, jcore.Var) else empty for v in eqn.invars]
            union = empty.union(*ins)
            site = finder.by_eqn.get(id(eqn))
            if site is not None:
                up = (
                    empty.union(*(ins[i] for i in site.act_operands))
                    if site.act_operands
                    else empty
                )
                deps[site.name] = deps.get(site.name, empty) | up
                outs = [union | {site.name}] * len(eqn.outvars)
            elif inner_jaxpr(eqn) is not None:
                inner, _ = inner_jaxpr(eqn)
                sub = {iv: d for iv, d in zip(inner.invars, ins)}
                walk(inner, sub)
                outs = [
                    sub.get(v, empty) if isinstance(v, jcore.Var) else empty for v in inner.outvars
                ]
            elif eqn.primitive.name == "scan":
                body = eqn.params["jaxpr"].jaxpr
                nc, nk = scan_counts(eqn.params)
                carry = list(ins[nc : nc + nk])
                for _ in range(4):  # the carry's dependencies grow to a fixpoint
                    sub = {iv: d for iv, d in zip(body.invars, ins[:nc] + carry + ins[nc + nk :])}
                    walk(body, sub)
                    res = [
                        sub.get(v, empty) if isinstance(v, jcore.Var) else empty
                        for v in body.outvars
                    ]
                    new = [c | r for c, r in zip(carry, res[:nk])]
                    if new == carry:
                        break
                    carry = new
                outs = carry + res[nk:]
            else:
                outs = [union] * len(eqn.outvars)
            for v, o in zip(eqn.outvars, outs):
                env[v] = o

    walk(jaxpr, {})
    return deps


def _new_variables(adapter: ModelAdapter, leaves: list):
    """The model's variables (linen) or a new module (nnx) with `leaves`."""
    tree = jax.tree_util.tree_unflatten(adapter.treedef, leaves)
    if adapter.kind == "linen":
        return adapter.model, tree
    from flax import nnx

    return nnx.merge(adapter.graphdef, tree), None


def _prepare(model, variables, batches, rules, method, kwargs, name):
    rules = check_rules(rules)
    kwargs = dict(kwargs or {})
    batches = list(batches)
    if not batches:
        raise ValueError(
            f"jq.{name}: `batches` is empty; {name} needs at least one calibration batch"
        )
    adapter = ModelAdapter(model, variables, method)
    args = split_batch(batches[0])
    t = trace(adapter, adapter.values, args, kwargs)
    chosen = choose(t.finder, rules)
    return rules, kwargs, batches, adapter, args, t, chosen


# ---------------------------------------------------------------------------------------
# GPTQ
# ---------------------------------------------------------------------------------------
def _matrix_spec(spec: QuantSpec, shape: tuple[int, ...], c: int) -> QuantSpec | None:
    """The spec of the ``(K, N)`` view of a per-layer weight, or None if its scales are tied otherwise."""
    r = len(shape)
    axes = spec.channel_axes(r)
    ba = spec.canonical_block_axis(r)
    if ba is not None and (c != 1 or ba != 0):
        return None
    if axes == tuple(range(c, r)):
        col = (1,)
    elif axes == ():
        col = None
    else:
        return None
    return spec.replace(axis=col, block_axis=0 if ba is not None else None)


def _gptq_layer(w, h, spec, c, opts):
    """GPTQ of one per-layer weight `w` (leaf layout). Returns (dequantized weight, QParams in leaf layout)."""
    shape = tuple(w.shape)
    k = int(np.prod(shape[:c]))
    wm = jnp.asarray(w, jnp.float32).reshape(k, -1)
    mspec = _matrix_spec(spec, shape, c)
    pshape = spec.param_shape(shape)
    if mspec is not None:
        res = gptq_quantize(wm, h, mspec, **opts)
        zp = None if res.qparams.zero_point is None else res.qparams.zero_point.reshape(pshape)
        return res.weight.reshape(shape), QParams(res.qparams.scale.reshape(pshape), zp)
    # scales tied across axes the (K, N) view cannot express: fixed min-max parameters
    qp = qparams_from_array(jnp.asarray(w, jnp.float32), spec)
    scale = jnp.broadcast_to(_expand_blocks(qp.scale, shape), shape).reshape(k, -1)
    zp = (
        jnp.zeros_like(scale)
        if qp.zero_point is None
        else jnp.broadcast_to(_expand_blocks(qp.zero_point, shape), shape)
        .reshape(k, -1)
        .astype(jnp.float32)
    )
    opts = {key: v for key, v in opts.items() if key != "static_groups"}
    weight, _ = gptq_with_params(wm, h, scale, zp, spec, **opts)
    return weight.reshape(shape), qp


def gptq(
    model,
    variables,
    batches: Iterable,
    rules: Sequence[Rule],
    *,
    percdamp: float = 0.01,
    act_order: bool = False,
    block_size: int = 128,
    static_groups: bool | None = None,
    bits: int | None = None,
    sequential: bool = True,
    rtn: bool = False,
    stats: CalibrationStats | None = None,
    method=None,
    kwargs: dict | None = None,
    progress: bool = True,
    return_info: bool = False,
):
    """Quantizes the weights of an unmodified Flax model with GPTQ.

    Every parameter whose site a rule selects (a ``"dot"`` site: Dense,
    DenseGeneral, Einsum, ``x @ w``) is quantized with its rule's weight spec
    by `jq.gptq_core.gptq_quantize`, from the Hessian ``H = 2 X X^T / n`` of the
    site's inputs over all `batches`, accumulated in float32 inside one jitted
    step per batch. Group scales are the spec's blocks along the input rows:
    ``jq.QuantSpec("int4", axis=-1, block_axis=0, block_size=128)`` on a
    ``(K, N)`` kernel.

    Sequential processing (the paper's setting): sites are processed in stages
    of the model's dataflow. A site's Hessian is collected with every GPTQ'd
    site upstream of it already replaced by its quantized weight, so it sees
    the inputs the quantized model will give it. Sites that do not depend on
    each other (e.g. query, key and value projections) share a stage. Weights
    stacked by ``nn.scan`` are one site: each layer gets its own Hessian and
    GPTQ, but the layers of one scan see each other's float weights. Other
    quantized sites (RTN fallbacks, activation quantization) stay float while
    Hessians are collected.

    Sites GPTQ cannot handle fall back to `jq.convert`'s round-to-nearest, with
    a warning: embeddings and convolutions, weights shared by several sites,
    weights reaching the dot through a reshape or transpose, dots with batch
    dimensions on the weight, or contracting axes that are not the weight's
    leading axes (e.g. a tied ``Embed.attend`` head). Scales tied in ways the
    ``(K, N)`` view cannot express (a DenseGeneral kernel with scales on one of
    its output axes only) keep min-max parameters from the float weights;
    GPTQ still compensates the rounding error.

    Args:
      model, variables: a linen Module and its variables, or an nnx Module and None.
      batches: calibration inputs (each one positional argument or a tuple of
        them); they are run once per stage, so a list is kept.
      rules: the `jq.Rule` list (weight specs must be integer formats).
      percdamp, act_order, block_size, static_groups, bits: GPTQ options (see
        `jq.gptq_core.gptq_quantize`); ``bits=3`` with ``"int4"`` gives 3-bit codes
        stored as int4.
      sequential: False collects every Hessian from the float model in one stage.
      rtn: round-to-nearest instead (``H = I``: no error feedback, no Hessian
        pass): the baseline on the same grid and group scales, also for `bits`
        grids that `jq.convert` cannot make.
      stats: `CalibrationStats` for static activation rules; if None and a rule
        is static, `jq.calibrate` runs on the GPTQ'd model with `batches`.
      method, kwargs: the model method and keyword arguments for every call.
      progress: tqdm progress bars.
      return_info: also return one dict per weight (site, shape, method,
        seconds, reason for a fallback).

    Returns:
      `QuantizedVariables` (and the info list with `return_info`).

    Raises:
      ValueError: no calibration batches, a non-integer weight format, a group
        size that does not divide the input features, or a Hessian that is
        singular with ``percdamp=0``.
    """
    rules, kwargs, batches, adapter, args, t, chosen = _prepare(
        model, variables, batches, rules, method, kwargs, "gptq"
    )
    opts = dict(
        percdamp=percdamp,
        act_order=act_order,
        block_size=block_size,
        static_groups=static_groups,
        bits=bits,
    )
    specs = leaf_specs(chosen)
    uses: dict[int, list[Site]] = {}
    for s in t.finder.sites:
        if s.leaf is not None:
            uses.setdefault(s.leaf.index, []).append(s)
    targets: dict[str, tuple] = {}  # site name -> (leaf index, spec (per layer), contracting dims)
    info = []
    for idx, (spec, c) in specs.items():
        s = c.site
        reason = None
        if not spec.fmt.is_integer:
            raise ValueError(
                f"jq.gptq: rules[{c.rule_index}] weight format {spec.format!r} is not an integer "
                f"format (site {s.name!r})"
            )
        if len(uses[idx]) != 1:
            reason = f"parameter used by {len(uses[idx])} sites"
        else:
            geo = _dot_geometry(s)
            if isinstance(geo, str):
                reason = geo
            elif s.stack and scan_lengths(s, t.finder) != s.stack:
                reason = "stacked weight outside a matching scan"
            else:
                wc, ac = geo
                per_layer = s.leaf.shape[len(s.stack) :]
                lspec = c.rule.weight
                try:
                    lspec.param_shape(per_layer, s.name)
                except ValueError as e:
                    raise ValueError(
                        f"jq.gptq: rules[{c.rule_index}] does not fit site {s.name!r}: {e}"
                    ) from e
                targets[s.name] = (idx, lspec, wc, ac, per_layer)
        if reason is not None:
            warnings.warn(
                f"jq.gptq: site {s.name!r} is quantized by round-to-nearest ({reason})",
                stacklevel=2,
            )
            info.append(
                {
                    "site": s.name,
                    "shape": s.leaf.shape,
                    "method": "rtn",
                    "seconds": 0.0,
                    "reason": reason,
                }
            )

    # stages of the dataflow
    deps = _site_deps(t.jaxpr, t.finder)
    level: dict[str, int] = {}
    for s in t.finder.sites:
        if s.name in targets:
            up = [level[d] for d in deps.get(s.name, ()) if d in level and d != s.name]
            level[s.name] = (1 + max(up, default=-1)) if sequential else 0
    stages = [
        sorted((n for n, lv in level.items() if lv == i), key=list(level).index)
        for i in range(max(level.values(), default=-1) + 1)
    ]

    def site_fn(site, eqn, invals, sts, enabled):
        _, _, wc, ac, per_layer = targets[site.name]
        k = int(np.prod(per_layer[: len(wc)]))
        xm = _x_matrix(invals[1 - site.operand], ac, k)

        def add(st):
            xtx = jnp.matmul(xm.T, xm, precision=jax.lax.Precision.HIGHEST)
            return {"h": st["h"] + 2.0 * xtx, "n": st["n"] + jnp.float32(xm.shape[0])}

        # only the current stage's Hessians are accumulated (the step is compiled once)
        key = site.key("hessian")
        sts[key] = jax.lax.cond(enabled[site.name], add, lambda st: st, sts[key])

    init = {}
    for name in targets:
        _, _, wc, _, per_layer = targets[name]
        k = int(np.prod(per_layer[: len(wc)]))
        site = next(s for s in t.finder.sites if s.name == name)
        init[name] = stack_tree(
            {"h": jnp.zeros((k, k), jnp.float32), "n": jnp.zeros((), jnp.float32)},
            scan_lengths(site, t.finder),
        )
    stream = Stream(adapter, kwargs, site_body(set(targets), site_fn))
    leaves = list(adapter.values)
    bar = tqdm(total=len(targets), desc="gptq", unit="weight", disable=not progress)
    if rtn:
        stages = [sorted(targets, key=list(level).index)] if targets else []
        opts["act_order"] = False
    for stage in stages:
        if rtn:
            hs = jax.tree_util.tree_map(lambda a: a, init)
            for name in stage:
                k = init[name]["h"].shape[-1]
                hs[name] = {
                    "h": jnp.broadcast_to(jnp.eye(k, dtype=jnp.float32), init[name]["h"].shape),
                    "n": jnp.ones_like(init[name]["n"]),
                }
        else:
            enabled = {name: jnp.asarray(name in stage) for name in targets}
            out, _ = stream.run(batches, leaves, {StateKey(n, "hessian"): h for n, h in init.items()},
                                enabled, desc="hessians", progress=progress, leave=False)
            hs = {n: out[StateKey(n, "hessian")] for n in init}
        for name in stage:
            idx, lspec, wc, _, per_layer = targets[name]
            t0 = time.perf_counter()
            w = jnp.asarray(adapter.values[idx])
            stack = w.shape[: w.ndim - len(per_layer)]
            outs, scales, zps = [], [], []
            for li in np.ndindex(*stack):
                h = hs[name]["h"][li] / jnp.maximum(hs[name]["n"][li], 1.0)
                wq, qp = _gptq_layer(w[li], h, lspec, len(wc), opts)
                outs.append(wq)
                scales.append(qp.scale)
                zps.append(qp.zero_point)
            wq = jnp.stack(outs).reshape(w.shape)
            scale = jnp.stack(scales).reshape(stack + scales[0].shape)
            zp = None if zps[0] is None else jnp.stack(zps).reshape(stack + zps[0].shape)
            jax.block_until_ready(wq)
            leaves[idx] = wq.astype(w.dtype)
            targets[name] = targets[name] + ((wq, QParams(scale, zp)),)
            info.append(
                {
                    "site": name,
                    "shape": tuple(w.shape),
                    "method": "rtn" if rtn else "gptq",
                    "seconds": time.perf_counter() - t0,
                    "reason": None,
                }
            )
            bar.update(1)
    bar.close()

    # ordinary conversion of the GPTQ'd float weights, then the exact GPTQ QArrays
    new_model, new_vars = _new_variables(adapter, leaves)
    if stats is None and any(c.mode == "static" for c in chosen.values()):
        stats = calibrate(
            new_model, new_vars, batches, rules, method=method, kwargs=kwargs, progress=progress
        )
    qvars = convert(new_model, new_vars, rules, stats, args=args, kwargs=kwargs, method=method)
    variables_q = dict(qvars.variables)
    for entry in targets.values():
        idx, wq, qp = entry[0], entry[5][0], entry[5][1]
        spec = specs[idx][0]
        q = quantize(wq, qp, spec)
        variables_q[adapter.leaves[idx].path] = q
    qvars = QuantizedVariables(variables_q, qvars.activations, qvars.plan)
    return (qvars, info) if return_info else qvars


# ---------------------------------------------------------------------------------------
# SmoothQuant folding: find the LayerNorm-style affine that produces a site's activation
# ---------------------------------------------------------------------------------------
_CAST_OPS = {"convert_element_type", "copy", "copy_p"}
# ops a per-channel norm parameter may go through on its way to the affine
_PARAM_OPS = _CAST_OPS | {"reshape", "expand_dims", "squeeze", "broadcast_in_dim"}


class _Dataflow:
    """Producers and consumers of every variable of a traced model, seen through calls.

    Call-like equations (jit, remat, custom_jvp, ...) are transparent: a variable of
    the inner jaxpr is identified with the outer variable it is bound to. Every other
    equation, scans included, is an opaque consumer; the model's outputs count as a
    consumer too.
    """

    _OUT = "output"

    def __init__(self, jaxpr, n_leaves: int):
        self.strict = True  # False: ignore other uses (to tell the user why a norm is not folded)
        self.alias: dict = {}
        self.producer: dict = {}
        self.consumers: dict = {}
        self.leaf_of = {v: i for i, v in enumerate(jaxpr.invars[:n_leaves])}
        self._walk(jaxpr)
        for v in jaxpr.outvars:
            if isinstance(v, jcore.Var):
                self.consumers.setdefault(self.canon(v), []).append(self._OUT)

    def canon(self, v):
        while v in self.alias:
            v = self.alias[v]
        return v

    def _walk(self, jaxpr):
        for eqn in jaxpr.eqns:
            inner = inner_jaxpr(eqn)
            if inner is not None:
                j, _ = inner
                for iv, ov in zip(j.invars, eqn.invars):
                    if isinstance(ov, jcore.Var):
                        self.alias[iv] = self.canon(ov)
                self._walk(j)
                for ov, iv in zip(eqn.outvars, j.outvars):
                    if isinstance(iv, jcore.Var) and not isinstance(ov, jcore.DropVar):
                        self.alias[ov] = self.canon(iv)
                continue
            for v in eqn.invars:
                if isinstance(v, jcore.Var):
                    self.consumers.setdefault(self.canon(v), []).append(eqn)
            for v in eqn.outvars:
                if not isinstance(v, jcore.DropVar):
                    self.producer[v] = eqn

    def n_uses(self, v) -> int:
        return len(self.consumers.get(self.canon(v), ())) if self.strict else 1

    def param_leaf(self, v, k: int):
        """The leaf index if `v` is a 1-D ``(K,)`` leaf broadcast along the last axis, else None.

        Every variable on the way must have `v`'s chain as its only use.
        """
        v = self.canon(v)
        while v not in self.leaf_of:
            eqn = self.producer.get(v)
            if eqn is None or eqn.primitive.name not in _PARAM_OPS or self.n_uses(v) != 1:
                return None
            shape = eqn.outvars[0].aval.shape
            if not shape or shape[-1] != k or int(np.prod(shape[:-1])) != 1 and (
                eqn.primitive.name != "broadcast_in_dim"
            ):
                return None
            if eqn.primitive.name == "broadcast_in_dim":
                src = eqn.invars[0].aval.shape
                dims = eqn.params["broadcast_dimensions"]
                if not src or src[-1] != k or int(np.prod(src[:-1])) != 1 or dims[-1] != len(shape) - 1:
                    return None
            v = self.canon(eqn.invars[0])
        return self.leaf_of[v] if self.n_uses(v) == 1 else None

    def scale_leaf(self, v, k: int, depth: int = 0):
        """The leaf ``g`` if `v` is a product linear in a per-channel ``(K,)`` leaf ``g``."""
        v = self.canon(v)
        eqn = self.producer.get(v)
        if depth > 8 or eqn is None or eqn.primitive.name != "mul" or self.n_uses(v) != 1 and depth:
            return None
        found = []
        for a in eqn.invars:
            if not isinstance(a, jcore.Var):
                continue
            leaf = self.param_leaf(a, k)
            if leaf is None:
                leaf = self.scale_leaf(a, k, depth + 1)
            if leaf is not None:
                found.append(leaf)
        return found[0] if len(found) == 1 else None

    def norm_affine(self, x, k: int):
        """``(norm output var, scale leaf, bias leaf or None)`` if `x` is ``y * g (+ b)``, else None.

        `x` may reach the site through dtype casts.
        """
        v = self.canon(x)
        while True:
            eqn = self.producer.get(v)
            if eqn is None:
                return None
            if eqn.primitive.name in _CAST_OPS:
                v = self.canon(eqn.invars[0])
                continue
            break
        prim = eqn.primitive.name
        if eqn.outvars[0].aval.shape[-1:] != (k,):
            return None
        if prim == "mul":
            g = self.scale_leaf(v, k)
            return None if g is None else (v, g, None)
        if prim == "add":
            a, b = eqn.invars
            for bias_v, prod_v in ((a, b), (b, a)):
                if not isinstance(bias_v, jcore.Var) or not isinstance(prod_v, jcore.Var):
                    continue
                bias = self.param_leaf(bias_v, k)
                if bias is None:
                    continue
                g = self.scale_leaf(prod_v, k, depth=1)
                if g is not None and g != bias:
                    return v, g, bias
        return None

    def final_uses(self, v) -> list:
        """The equations that use `v`, looking through dtype casts with a single use."""
        out = []
        for c in self.consumers.get(self.canon(v), ()):
            if c != self._OUT and c.primitive.name in _CAST_OPS:
                out.extend(self.final_uses(c.outvars[0]))
            else:
                out.append(c)
        return out


def _weight_rowmax(w, target) -> jax.Array:
    """``max |W_j|`` over each input row of an unstacked weight, float32 ``(K,)``."""
    k = int(target[3][0])
    return jnp.max(jnp.abs(jnp.asarray(w).reshape(k, -1).astype(jnp.float32)), axis=-1)


def _fold_groups(t, targets: dict) -> list[tuple[list[str], int, int | None]]:
    """Groups of smoothed sites fed by one LayerNorm-style affine, as ``(sites, scale leaf, bias leaf)``.

    A group is folded only when the norm's output goes to those sites alone and its
    parameters to the norm alone; other norm-fed sites are warned about (once) and keep
    the runtime multiply. Sites inside scans, or whose contracting axis is not the
    activation's last axis, are not considered.
    """
    flow = _Dataflow(t.jaxpr, t.n_leaves)
    by_norm: dict = {}
    blocked: list[str] = []
    for name, (_, wc, ac, per_layer, site) in targets.items():
        x = site.eqn.invars[1 - site.operand]
        x_ndim = len(site.in_avals[1 - site.operand].shape)
        if site.scans or len(wc) != 1 or tuple(ac) != (x_ndim - 1,) or not isinstance(x, jcore.Var):
            continue
        found = flow.norm_affine(x, int(per_layer[0]))
        if found is None:
            flow.strict = False
            loose = flow.norm_affine(x, int(per_layer[0]))
            flow.strict = True
            if loose is not None:
                blocked.append(name)
            continue
        by_norm.setdefault(found, []).append(name)
    groups = []
    for (var, g, b), names in by_norm.items():
        eqns = {id(targets[n][4].eqn) for n in names}
        if all(u != _Dataflow._OUT and id(u) in eqns for u in flow.final_uses(var)):
            groups.append((names, g, b))
        else:
            blocked.extend(names)
    if blocked:
        warnings.warn(
            f"jq.smoothquant: sites {sorted(blocked)} are fed by a norm whose parameters or output "
            "are also used elsewhere; their smoothing is not folded and stays a runtime multiply",
            stacklevel=3,
        )
    return groups


# ---------------------------------------------------------------------------------------
# SmoothQuant
# ---------------------------------------------------------------------------------------
def _smooth_shape(
    x_ndim: int, ac: tuple[int, ...], kshape: tuple[int, ...]
) -> tuple[tuple[int, ...], tuple]:
    """Keepdims shape of `s` against the activation, and the transpose from the weight's K order."""
    shape = [1] * x_ndim
    for a, n in zip(ac, kshape):
        shape[a] = n
    return tuple(shape), tuple(np.argsort(ac))


def _act_smooth(s_flat, x_ndim, ac, kshape):
    """``(K,)`` factors (weight row order) -> keepdims factors for the activation."""
    shape, order = _smooth_shape(x_ndim, ac, kshape)
    return jnp.transpose(s_flat.reshape(kshape), order).reshape(shape)


def smoothquant(
    model,
    variables,
    batches: Iterable,
    rules: Sequence[Rule],
    *,
    alpha: float = 0.5,
    power_of_two: bool = False,
    fold: bool = True,
    method=None,
    kwargs: dict | None = None,
    progress: bool = True,
) -> QuantizedVariables:
    """SmoothQuant (W8A8): calibrates, smooths and converts an unmodified Flax model.

    For every selected ``"dot"`` site with a quantized activation (static or
    dynamic rule), the per-input-channel ``max |X_j|`` over `batches` and the
    weight rows' ``max |W_j|`` give ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)``
    (`jq.smoothquant.smoothing_factors`). The weight is stored as
    ``diag(s) W`` (then quantized by the rule), and the site's activation is
    multiplied by ``1 / s`` before it is quantized; static activation ranges
    are calibrated on the smoothed activations (a second pass over `batches`).

    Folding (``fold=True``): when a site's activation is the output of a
    LayerNorm-style affine, ``y * g + b`` or ``y * g`` with per-channel ``(K,)``
    parameter leaves ``g`` and ``b`` broadcast along the last (contracting)
    axis (linen / nnx ``LayerNorm``, ``RMSNorm``, or any such product found in
    the traced jaxpr), the ``1 / s`` is folded into those leaves::

        (y * g + b) / s = y * (g / s) + b / s

    so the returned variables hold ``g / s`` and ``b / s`` and the site has no
    ``smooth`` entry: inference pays nothing for the smoothing. All sites that
    read the same norm output (the q, k and v projections of attention) share
    one ``s``, computed jointly from the shared ``max |X_j|`` and the maximum of
    the concatenated weights' rows, ``max_n |W_jn|`` over every site's columns.
    A norm whose parameters or output are also used by anything else (a
    residual sum, another layer) cannot be folded: its sites keep the runtime
    multiply and one warning names them. Sites with no such producer (after a
    relu, inside a scan, contracting another axis) keep the runtime multiply
    silently: `jq.apply` multiplies the activation by the stored factors
    (`QuantizedVariables.smooth`), an elementwise product that XLA fuses into
    the activation's quantization. The folded float model equals the unfolded
    smoothed one up to float rounding.

    Args:
      model, variables: a linen Module and its variables, or an nnx Module and None.
      batches: calibration inputs (each one positional argument or a tuple).
      rules: the `jq.Rule` list; sites whose rule quantizes activations are smoothed.
      alpha: migration strength in [0, 1] (0.5 in the paper for most models).
      power_of_two: round the factors to powers of two (smoothing then exact in float).
      fold: fold the factors into a preceding LayerNorm-style affine where one is
        found (default); False keeps every site's runtime multiply.
      method, kwargs, progress: as in `jq.calibrate`.

    Returns:
      `QuantizedVariables` with the folded norm parameters and ``smooth`` set for
      the sites that were not folded.

    Raises:
      ValueError: no calibration batches, `alpha` outside [0, 1].
      TypeError: `fold` is not a bool.
    """
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"jq.smoothquant: alpha must lie in [0, 1], got {alpha!r}")
    if not isinstance(fold, bool):
        raise TypeError(f"jq.smoothquant: fold must be a bool, got {type(fold).__name__}")
    rules, kwargs, batches, adapter, args, t, chosen = _prepare(
        model, variables, batches, rules, method, kwargs, "smoothquant"
    )
    uses: dict[int, int] = {}
    for s in t.finder.sites:
        if s.leaf is not None:
            uses[s.leaf.index] = uses.get(s.leaf.index, 0) + 1
    targets = {}  # site name -> (leaf index, weight contracting dims, act contracting dims, per-layer shape)
    for name, c in chosen.items():
        s = c.site
        if c.mode == "weight_only" or s.leaf is None:
            continue
        geo = _dot_geometry(s)
        if (
            isinstance(geo, str)
            or uses[s.leaf.index] != 1
            or (s.stack and scan_lengths(s, t.finder) != s.stack)
        ):
            warnings.warn(
                f"jq.smoothquant: site {name!r} is not smoothed "
                f"({geo if isinstance(geo, str) else 'shared or stacked weight'})",
                stacklevel=2,
            )
            continue
        wc, ac = geo
        targets[name] = (s.leaf.index, wc, ac, s.leaf.shape[len(s.stack) :], s)

    # pass 1: per-channel max |X_j|
    def absmax_fn(site, eqn, invals, sts, enabled):
        _, wc, ac, per_layer, _ = targets[site.name]
        k = int(np.prod(per_layer[: len(wc)]))
        xm = _x_matrix(invals[1 - site.operand], ac, k)
        key = site.key("absmax")
        sts[key] = jnp.maximum(sts[key], jnp.max(jnp.abs(xm), axis=0))

    init = {
        StateKey(n, "absmax"): stack_tree(
            jnp.zeros((int(np.prod(v[3][: len(v[1])])),), jnp.float32),
            scan_lengths(v[4], t.finder),
        )
        for n, v in targets.items()
    }
    out, _ = Stream(adapter, kwargs, site_body(set(targets), absmax_fn)).run(
        batches, adapter.values, init, desc="smoothquant", progress=progress, leave=False
    )
    amax = {n: out[StateKey(n, "absmax")] for n in targets}

    leaves = list(adapter.values)
    groups = _fold_groups(t, targets) if fold else []
    group_s = {}  # site name -> the factors shared by its group (folded into the norm)
    for sites, g, b in groups:
        a_max = jnp.max(jnp.stack([amax[n] for n in sites]), axis=0)
        w_max = jnp.max(jnp.stack([_weight_rowmax(leaves[targets[n][0]], targets[n]) for n in sites]), axis=0)
        s = smoothing_factors(a_max, w_max, alpha, power_of_two=power_of_two)
        for leaf in (g, b):
            if leaf is not None:
                p = jnp.asarray(leaves[leaf])
                leaves[leaf] = (p.astype(jnp.float32) / s).astype(p.dtype)
        group_s.update((n, s) for n in sites)
    smooth = {}
    for name, (idx, wc, ac, per_layer, site) in targets.items():
        w = jnp.asarray(leaves[idx])
        stack = w.shape[: w.ndim - len(per_layer)]
        k = int(np.prod(per_layer[: len(wc)]))
        wm = w.reshape(stack + (k, -1)).astype(jnp.float32)
        if name in group_s:
            leaves[idx] = (wm * group_s[name][:, None]).reshape(w.shape).astype(w.dtype)
            continue
        s = smoothing_factors_stacked(
            amax[name], jnp.max(jnp.abs(wm), axis=-1), alpha, power_of_two
        )
        leaves[idx] = (wm * s[..., None]).reshape(w.shape).astype(w.dtype)
        x_ndim = len(site.in_avals[1 - site.operand].shape)
        kshape = per_layer[: len(wc)]
        flat_s = s.reshape((-1, k))
        per = [_act_smooth(flat_s[i], x_ndim, ac, kshape) for i in range(flat_s.shape[0])]
        smooth[name] = jnp.stack(per).reshape(stack + per[0].shape)

    # pass 2: static activation ranges of the smoothed activations
    observers, states, lengths = init_observers(chosen, t.finder)

    def observe_fn(site, eqn, invals, sts, enabled):
        vals = list(invals)
        if site.key("smooth") in sts:
            op = site.act_operands[0]
            vals[op] = vals[op] * (1.0 / sts[site.key("smooth")]).astype(vals[op].dtype)
        observe_site(site, vals, sts, observers)
        return vals

    sts0 = {**states, **{StateKey(name, "smooth"): sv for name, sv in smooth.items()}}
    # smoothed sites run as (x / s) @ (diag(s) W) so that later sites see the right inputs
    selected = {c.site.name for c in chosen.values() if c.mode == "static"} | set(smooth)
    sts, _ = Stream(adapter, kwargs, site_body(selected, observe_fn)).run(
        batches, leaves, sts0, desc="calibrate", progress=progress, leave=False
    )
    stats = calibration_stats(
        t.finder,
        observers,
        {k: sts[k] for k in states},
        lengths,
        len(batches),
        (abstract(args), kwargs),
        tuple(chosen),
    )
    new_model, new_vars = _new_variables(adapter, leaves)
    qvars = convert(new_model, new_vars, rules, stats, args=args, kwargs=kwargs, method=method)
    return QuantizedVariables(qvars.variables, qvars.activations, qvars.plan, smooth)


def smoothing_factors_stacked(act_absmax, weight_absmax, alpha, power_of_two):
    """`smoothing_factors` over leading (scan-stacked) axes."""
    if act_absmax.ndim == 1:
        return smoothing_factors(act_absmax, weight_absmax, alpha, power_of_two=power_of_two)
    flat_a = act_absmax.reshape((-1, act_absmax.shape[-1]))
    flat_w = weight_absmax.reshape(flat_a.shape)
    out = [
        smoothing_factors(a, w, alpha, power_of_two=power_of_two) for a, w in zip(flat_a, flat_w)
    ]
    return jnp.stack(out).reshape(act_absmax.shape)
