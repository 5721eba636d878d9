"""GPTQ for Flax models: Hessians from calibration batches, then `jq.gptq_core` per weight.

`gptq` collects the layer-input Hessian ``H = 2 X X^T / n`` of every matched
Dense / DenseGeneral / Einsum weight with the same traced-model interpreter
that `jq.calibrate` uses (`jq.flax.stream.Stream`), runs
`jq.gptq_core.gptq_quantize` on it, and returns ordinary `QuantizedVariables`
that `jq.apply` runs unchanged. The math is in `jq.gptq_core`; this module
finds the weights, orders them by the model's dataflow and streams the batches.

References:
  Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative
  Pre-trained Transformers", ICLR 2023.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jq.flax._graph import Site, SiteFinder, StateKey
from jq.flax.calibrate import calibrate
from jq.flax.convert import convert
from jq.flax.qvars import CalibrationStats, QuantizedVariables, permute_qarray
from jq.flax.rules import Rule
from jq.flax.select import (
    activation_matrix,
    dot_geometry,
    from_view,
    leaf_specs,
    scan_lengths,
    spec_to_view,
    stack_tree,
    to_view,
)
from jq.flax.stream import Stream, model_kwargs_arg, prepare, rules_then_batches, site_body
from jq.gptq_core import gptq_quantize, gptq_with_params
from jq.qparams import QParams, QuantSpec, qparams_from_array
from jq.quantize import expand_blocks, quantize

__all__ = ["gptq"]


class _Target(NamedTuple):
    """A weight GPTQ processes: its leaf, the rule's per-layer spec and the dot's geometry."""

    leaf: int  # index of the parameter leaf
    spec: QuantSpec  # the rule's weight spec for one layer, on the dot's view
    w_contract: tuple[int, ...]  # the view's contracting dims: its leading axes
    x_contract: tuple[int, ...]  # the activation's contracting dims
    per_layer: tuple[int, ...]  # the view's shape (one layer: no scan-stacked axes)
    perm: tuple[int, ...]  # per-layer stored axes -> view (`select.to_view`)

    @property
    def k(self) -> int:
        """Rows of the weight's ``(K, N)`` view: the contraction size."""
        return int(np.prod(self.per_layer[: len(self.w_contract)]))


class _Result(NamedTuple):
    """A processed weight: float32, on its grid (stacked layers included), and its parameters."""

    weight: jax.Array  # shape=leaf shape, dtype=float32
    qparams: QParams  # in the leaf's layout


def _site_deps(finder: SiteFinder) -> dict[str, frozenset]:
    """For each site, the sites whose outputs reach its activation operand(s) (over-approximated).

    Site sets flow forward along the references of the model's `JaxprView`: an
    equation's outputs depend on the union of its inputs (and a site's on the
    site itself). A scan's carry feeds its body's outputs back into the body,
    so the flow is repeated until nothing grows (a least fixpoint).
    """
    view = finder.view
    empty = frozenset()
    env: dict = {}
    deps: dict[str, frozenset] = {}

    def get(r):
        return env.get(r, empty) if r[0] == "v" else empty

    def put(r, d) -> bool:
        if d <= env.get(r, empty):
            return False
        env[r] = env.get(r, empty) | d
        return True

    def enter(body) -> bool:  # a scan body's carry and xs from the scan's inputs (and carry out)
        nc, nk = body.num_consts, body.num_carry
        grew = False
        for i in range(nc, len(body.body_in)):
            d = get(body.node.ins[i])
            if i < nc + nk:
                d = d | get(body.body_out[i - nc])
            grew |= put(body.body_in[i], d)
        return grew

    for _ in range(64):
        grew = False
        entered: set[int] = set()
        for node in view.nodes:
            for s in node.scans:
                if s not in entered:
                    entered.add(s)
                    grew |= enter(view.scans[s])
            ins = [get(r) for r in node.ins]
            union = empty.union(*ins)
            site = finder.by_eqn.get(id(node.eqn))
            if site is not None:
                up = empty.union(*(ins[i] for i in site.act_operands))
                if not up <= deps.get(site.name, empty):
                    deps[site.name] = deps.get(site.name, empty) | up
                    grew = True
                outs = [union | {site.name}] * len(node.outs)
            elif node.prim == "scan":
                body = view.scans[id(node.eqn)]
                grew |= enter(body)
                nc, nk = body.num_consts, body.num_carry
                outs = [get(r) for r in body.body_in[nc : nc + nk]]
                outs += [get(r) for r in body.body_out[nk:]]
            else:
                outs = [union] * len(node.outs)
            for r, d in zip(node.outs, outs):
                grew |= put(r, d)
        if not grew:
            break
    return deps


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
    scale = jnp.broadcast_to(expand_blocks(qp.scale, shape), shape).reshape(k, -1)
    zp = (
        jnp.zeros_like(scale)
        if qp.zero_point is None
        else jnp.broadcast_to(expand_blocks(qp.zero_point, shape), shape)
        .reshape(k, -1)
        .astype(jnp.float32)
    )
    opts = {key: v for key, v in opts.items() if key != "static_groups"}
    weight, _ = gptq_with_params(wm, h, scale, zp, spec, **opts)
    return weight.reshape(shape), qp


def gptq(
    model,
    variables,
    rules: Sequence[Rule],
    batches: Iterable,
    *,
    inputs: Callable | None = None,
    model_kwargs: dict | None = None,
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
    step per batch. Group scales are the spec's blocks along the contraction:
    ``jq.QuantSpec("int4", axis="out", group_size=128)`` in any layout (on a
    Dense ``(K, N)`` kernel the same as ``axis=-1, block_axis=0,
    block_size=128``).

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
      model, variables: a linen Module and its variables, an nnx Module and None, a
        function ``fn(params, *args, **kwargs)`` and its params, or a Hugging Face Flax
        model and None (its own params) (`jq.flax.adapter`).
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
      inputs: ``inputs(batch)`` gives the model's positional arguments (a tuple,
        one array, or a pair ``(args, kwargs_dict)``), e.g. ``lambda b: b[0]``
        for ``(x, y)`` batches; default: the batch itself (see `jq.calibrate`).
      model_kwargs: keyword arguments passed to the model on every call.
      method: the model method (default ``__call__``).
      progress: tqdm progress bars.
      kwargs: deprecated name of `model_kwargs`. The old order
        ``gptq(model, variables, batches, rules)`` works for one release, with
        a `DeprecationWarning`.
      return_info: also return one dict per weight (site, shape, method,
        seconds, reason for a fallback).

    Returns:
      `QuantizedVariables` (and the info list with `return_info`).

    Raises:
      ValueError: no calibration batches, a non-integer weight format, a group
        size that does not divide the input features, or a Hessian that is
        singular with ``percdamp=0``.
    """
    rules, batches = rules_then_batches("gptq", rules, batches)
    kwargs = model_kwargs_arg("gptq", model_kwargs, kwargs)
    rules, kwargs, batches, adapter, args, t, chosen = prepare(
        model, variables, batches, rules, method, kwargs, "gptq", inputs
    )
    opts = dict(
        percdamp=percdamp,
        act_order=act_order,
        block_size=block_size,
        static_groups=static_groups,
        bits=bits,
    )
    specs = leaf_specs(chosen, t.finder)
    uses: dict[int, list[Site]] = {}
    for s in t.finder.sites:
        if s.leaf is not None:
            uses.setdefault(s.leaf.index, []).append(s)
    targets: dict[str, _Target] = {}  # site name -> the weight GPTQ processes
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
            geo = dot_geometry(s)
            if isinstance(geo, str):
                reason = geo
            elif s.stack and scan_lengths(s, t.finder) != s.stack:
                reason = "stacked weight outside a matching scan"
            else:
                perm, wc, ac = geo
                per_layer = s.leaf.shape[len(s.stack) :]
                lspec = c.rule.weight
                try:
                    lspec.param_shape(per_layer, s.name)
                except ValueError as e:
                    raise ValueError(
                        f"jq.gptq: rules[{c.rule_index}] does not fit site {s.name!r}: {e}"
                    ) from e
                view = tuple(per_layer[p] for p in perm)
                targets[s.name] = _Target(idx, spec_to_view(lspec, perm), wc, ac, view, perm)
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
    deps = _site_deps(t.finder)
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
        tg = targets[site.name]
        xm = activation_matrix(invals[1 - site.operand], tg.x_contract, tg.k)

        def add(st):
            xtx = jnp.matmul(xm.T, xm, precision=jax.lax.Precision.HIGHEST)
            return {"h": st["h"] + 2.0 * xtx, "n": st["n"] + jnp.float32(xm.shape[0])}

        # only the current stage's Hessians are accumulated (the step is compiled once)
        key = site.key("hessian")
        sts[key] = jax.lax.cond(enabled[site.name], add, lambda st: st, sts[key])

    init = {}
    for name, tg in targets.items():
        init[name] = stack_tree(
            {"h": jnp.zeros((tg.k, tg.k), jnp.float32), "n": jnp.zeros((), jnp.float32)},
            scan_lengths(t.finder.by_name[name], t.finder),
        )
    stream = Stream(adapter, kwargs, site_body(set(targets), site_fn), inputs)
    leaves = list(adapter.values)
    bar = tqdm(total=len(targets), desc="gptq", unit="weight", disable=not progress)
    if rtn:
        stages = [sorted(targets, key=list(level).index)] if targets else []
        opts["act_order"] = False
    results: dict[str, _Result] = {}
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
            out, _ = stream.run(
                batches,
                leaves,
                {StateKey(n, "hessian"): h for n, h in init.items()},
                enabled,
                desc="hessians",
                progress=progress,
                leave=False,
            )
            hs = {n: out[StateKey(n, "hessian")] for n in init}
        for name in stage:
            tg = targets[name]
            t0 = time.perf_counter()
            w = jnp.asarray(adapter.values[tg.leaf])
            stack = w.shape[: w.ndim - len(tg.per_layer)]
            wv = to_view(w, tg.perm)  # GPTQ runs on the dot's (K, N) view, mapped back below
            outs, scales, zps = [], [], []
            for li in np.ndindex(*stack):
                h = hs[name]["h"][li] / jnp.maximum(hs[name]["n"][li], 1.0)
                wq, qp = _gptq_layer(wv[li], h, tg.spec, len(tg.w_contract), opts)
                outs.append(wq)
                scales.append(qp.scale)
                zps.append(qp.zero_point)
            wq = from_view(jnp.stack(outs).reshape(wv.shape), tg.perm)
            scale = from_view(jnp.stack(scales).reshape(stack + scales[0].shape), tg.perm)
            zp = (
                None
                if zps[0] is None
                else from_view(jnp.stack(zps).reshape(stack + zps[0].shape), tg.perm)
            )
            jax.block_until_ready(wq)
            leaves[tg.leaf] = wq.astype(w.dtype)
            results[name] = _Result(wq, QParams(scale, zp))
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
    new_model, new_vars = adapter.rebuilt(leaves)
    if stats is None and any(c.mode == "static" for c in chosen.values()):
        stats = calibrate(
            new_model,
            new_vars,
            rules,
            batches,
            inputs=inputs,
            model_kwargs=kwargs,
            method=method,
            progress=progress,
        )
    qvars = convert(
        new_model, new_vars, rules, stats, args=args, model_kwargs=kwargs, method=method
    )
    variables_q = dict(qvars.variables)
    # convert may store a kernel in its dot's layout (`SitePlan.weight_perm`): GPTQ's codes follow
    perms = {sp.leaf: sp.weight_perm for sp in qvars.plan.sites if sp.weight_perm is not None}
    for name, res in results.items():
        path = adapter.leaves[targets[name].leaf].path
        q = quantize(res.weight, res.qparams, specs[targets[name].leaf][0])
        if path in perms:
            q = permute_qarray(q, perms[path])
        variables_q[path] = q
    qvars = QuantizedVariables(variables_q, qvars.activations, qvars.plan)
    return (qvars, info) if return_info else qvars
