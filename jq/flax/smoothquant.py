"""SmoothQuant for Flax models: per-channel activation outliers moved into the weights.

`smoothquant` measures ``max |X_j|`` per input channel of every smoothed site
over calibration batches (`jq.flax.stream.Stream`), computes the factors with
`jq.smoothing.smoothing_factors`, folds ``1 / s`` into a preceding
LayerNorm-style affine where it finds one (`_Dataflow`), and returns
`QuantizedVariables` that carry the remaining per-site smoothing vectors.

References:
  Xiao et al., "SmoothQuant: Accurate and Efficient Post-Training Quantization
  for Large Language Models", ICML 2023.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jq.flax._graph import Site, StateKey
from jq.flax.convert import convert
from jq.flax.dataflow import JaxprView
from jq.flax.qvars import QuantizedVariables
from jq.flax.rules import Rule
from jq.flax.select import (
    activation_matrix,
    dot_geometry,
    from_view,
    scan_lengths,
    stack_tree,
    to_view,
)
from jq.flax.stream import (
    Stream,
    abstract,
    calibration_stats,
    init_observers,
    model_kwargs_arg,
    observe_site,
    prepare,
    rules_then_batches,
    site_body,
)
from jq.smoothing import smoothing_factors

__all__ = ["act_smooth", "fold_groups", "smoothquant", "smoothing_factors_stacked"]


class _Target(NamedTuple):
    """A site SmoothQuant smooths: its weight leaf and the geometry of its dot."""

    leaf: int  # index of the parameter leaf
    w_contract: tuple[int, ...]  # the view's contracting dims: its leading axes
    x_contract: tuple[int, ...]  # the activation's contracting dims
    per_layer: tuple[int, ...]  # the shape of the weight's dot view, without scan-stacked axes
    site: Site
    perm: tuple[int, ...] = ()  # per-layer stored axes -> view (`select.to_view`)

    @property
    def k(self) -> int:
        """Input channels: the rows of the weight's ``(K, N)`` view."""
        return int(np.prod(self.per_layer[: len(self.w_contract)]))


# ---------------------------------------------------------------------------------------
# SmoothQuant folding: find the LayerNorm-style affine that produces a site's activation
# ---------------------------------------------------------------------------------------
_CAST_OPS = {"convert_element_type", "copy", "copy_p"}
# ops a per-channel norm parameter may go through on its way to the affine
_PARAM_OPS = _CAST_OPS | {"reshape", "expand_dims", "squeeze", "broadcast_in_dim"}


class _Dataflow:
    """The top level of the model's `JaxprView`: producers and consumers seen through calls.

    Call-like equations (jit, remat, custom_jvp, ...) are inlined by the view;
    every other equation outside scans is a consumer (a scan itself is an opaque
    one; its body's equations are not looked at), and so is each output of the
    model (`_OUT`). References are the view's ``("v", n)``.
    """

    _OUT = "output"

    def __init__(self, view: JaxprView, n_leaves: int):
        self.view = view
        self.strict = True  # False: ignore other uses (to tell the user why a norm is not folded)
        self.leaf_of = {r: i for i, r in enumerate(view.input_refs[:n_leaves])}
        self.node_of = {id(n.eqn): n for n in view.nodes}

    def producer(self, r):
        n = self.view.producer.get(r) if r[0] == "v" else None
        return None if n is None or n.scans else n

    def consumers(self, r) -> list:
        used = [n for n in self.view.consumers.get(r, ()) if not n.scans]
        return used + [self._OUT] * self.view.output_refs.count(r)

    def n_uses(self, r) -> int:
        return len(self.consumers(r)) if self.strict else 1

    def param_leaf(self, r, k: int):
        """The leaf index if `r` is a 1-D ``(K,)`` leaf broadcast along the last axis, else None.

        Every value on the way must have `r`'s chain as its only use.
        """
        while r not in self.leaf_of:
            n = self.producer(r)
            if n is None or n.prim not in _PARAM_OPS or self.n_uses(r) != 1:
                return None
            shape = n.eqn.outvars[0].aval.shape
            if (
                not shape
                or shape[-1] != k
                or int(np.prod(shape[:-1])) != 1
                and (n.prim != "broadcast_in_dim")
            ):
                return None
            if n.prim == "broadcast_in_dim":
                src = n.eqn.invars[0].aval.shape
                dims = n.eqn.params["broadcast_dimensions"]
                if (
                    not src
                    or src[-1] != k
                    or int(np.prod(src[:-1])) != 1
                    or dims[-1] != len(shape) - 1
                ):
                    return None
            r = n.ins[0]
            if r[0] != "v":
                return None
        return self.leaf_of[r] if self.n_uses(r) == 1 else None

    def scale_leaf(self, r, k: int, depth: int = 0):
        """The leaf ``g`` if `r` is a product linear in a per-channel ``(K,)`` leaf ``g``."""
        n = self.producer(r)
        if depth > 8 or n is None or n.prim != "mul" or self.n_uses(r) != 1 and depth:
            return None
        found = []
        for a in n.ins:
            if a[0] != "v":
                continue
            leaf = self.param_leaf(a, k)
            if leaf is None:
                leaf = self.scale_leaf(a, k, depth + 1)
            if leaf is not None:
                found.append(leaf)
        return found[0] if len(found) == 1 else None

    def norm_affine(self, x, k: int):
        """``(norm output ref, scale leaf, bias leaf or None)`` if `x` is ``y * g (+ b)``, else None.

        `x` may reach the site through dtype casts.
        """
        r = x
        while True:
            n = self.producer(r)
            if n is None:
                return None
            if n.prim in _CAST_OPS:
                r = n.ins[0]
                continue
            break
        if n.eqn.outvars[0].aval.shape[-1:] != (k,):
            return None
        if n.prim == "mul":
            g = self.scale_leaf(r, k)
            return None if g is None else (r, g, None)
        if n.prim == "add":
            a, b = n.ins
            for bias_r, prod_r in ((a, b), (b, a)):
                if bias_r[0] != "v" or prod_r[0] != "v":
                    continue
                bias = self.param_leaf(bias_r, k)
                if bias is None:
                    continue
                g = self.scale_leaf(prod_r, k, depth=1)
                if g is not None and g != bias:
                    return r, g, bias
        return None

    def final_uses(self, r) -> list:
        """The nodes that use `r`, looking through dtype casts with a single use."""
        out = []
        for c in self.consumers(r):
            if c != self._OUT and c.prim in _CAST_OPS:
                out.extend(self.final_uses(c.outs[0]))
            else:
                out.append(c)
        return out


def _weight_rowmax(w, target: _Target) -> jax.Array:
    """``max |W_j|`` over each input row of an unstacked weight, float32 ``(K,)``."""
    k = int(target.per_layer[0])  # folded sites contract one axis
    w = to_view(jnp.asarray(w), target.perm)
    return jnp.max(jnp.abs(w.reshape(k, -1).astype(jnp.float32)), axis=-1)


def fold_groups(t, targets: dict[str, _Target]) -> list[tuple[list[str], int, int | None]]:
    """Groups of smoothed sites fed by one LayerNorm-style affine, as ``(sites, scale leaf, bias leaf)``.

    A group is folded only when the norm's output goes to those sites alone and its
    parameters to the norm alone; other norm-fed sites are warned about (once) and keep
    the runtime multiply. Sites inside scans, or whose contracting axis is not the
    activation's last axis, are not considered.
    """
    flow = _Dataflow(t.finder.view, t.n_leaves)
    by_norm: dict = {}
    blocked: list[str] = []
    for name, tg in targets.items():
        wc, ac, per_layer, site = tg.w_contract, tg.x_contract, tg.per_layer, tg.site
        x = flow.node_of[id(site.eqn)].ins[1 - site.operand]
        x_ndim = len(site.in_avals[1 - site.operand].shape)
        if site.scans or len(wc) != 1 or tuple(ac) != (x_ndim - 1,) or x[0] != "v":
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
    for (ref, g, b), names in by_norm.items():
        eqns = {id(targets[n].site.eqn) for n in names}
        if all(u != _Dataflow._OUT and id(u.eqn) in eqns for u in flow.final_uses(ref)):
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


def act_smooth(s_flat, x_ndim, ac, kshape):
    """``(K,)`` factors (weight row order) -> keepdims factors for the activation."""
    shape, order = _smooth_shape(x_ndim, ac, kshape)
    return jnp.transpose(s_flat.reshape(kshape), order).reshape(shape)


def smoothquant(
    model,
    variables,
    rules: Sequence[Rule],
    batches: Iterable,
    *,
    inputs: Callable | None = None,
    model_kwargs: dict | None = None,
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
      model, variables: a linen Module and its variables, an nnx Module and None, a
        function ``fn(params, *args, **kwargs)`` and its params, or a Hugging Face Flax
        model and None (its own params) (`jq.flax.adapter`).
      batches: calibration inputs (each one positional argument or a tuple).
      rules: the `jq.Rule` list; sites whose rule quantizes activations are smoothed.
      alpha: migration strength in [0, 1] (0.5 in the paper for most models).
      power_of_two: round the factors to powers of two (smoothing then exact in float).
      fold: fold the factors into a preceding LayerNorm-style affine where one is
        found (default); False keeps every site's runtime multiply.
      inputs, model_kwargs, method, progress: as in `jq.calibrate`.
      kwargs: deprecated name of `model_kwargs`. The old order
        ``smoothquant(model, variables, batches, rules)`` works for one
        release, with a `DeprecationWarning`.

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
    rules, batches = rules_then_batches("smoothquant", rules, batches)
    kwargs = model_kwargs_arg("smoothquant", model_kwargs, kwargs)
    rules, kwargs, batches, adapter, args, t, chosen = prepare(
        model, variables, batches, rules, method, kwargs, "smoothquant", inputs
    )
    uses: dict[int, int] = {}
    for s in t.finder.sites:
        if s.leaf is not None:
            uses[s.leaf.index] = uses.get(s.leaf.index, 0) + 1
    targets: dict[str, _Target] = {}  # site name -> the site to smooth
    for name, c in chosen.items():
        s = c.site
        if c.mode == "weight_only" or s.leaf is None:
            continue
        geo = dot_geometry(s)
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
        perm, wc, ac = geo
        per_layer = s.leaf.shape[len(s.stack) :]
        targets[name] = _Target(s.leaf.index, wc, ac, tuple(per_layer[p] for p in perm), s, perm)

    # pass 1: per-channel max |X_j|
    def absmax_fn(site, eqn, invals, sts, enabled):
        tg = targets[site.name]
        xm = activation_matrix(invals[1 - site.operand], tg.x_contract, tg.k)
        key = site.key("absmax")
        sts[key] = jnp.maximum(sts[key], jnp.max(jnp.abs(xm), axis=0))

    init = {
        StateKey(n, "absmax"): stack_tree(
            jnp.zeros((tg.k,), jnp.float32), scan_lengths(tg.site, t.finder)
        )
        for n, tg in targets.items()
    }
    out, _ = Stream(adapter, kwargs, site_body(set(targets), absmax_fn), inputs).run(
        batches, adapter.values, init, desc="smoothquant", progress=progress, leave=False
    )
    amax = {n: out[StateKey(n, "absmax")] for n in targets}

    leaves = list(adapter.values)
    groups = fold_groups(t, targets) if fold else []
    group_s = {}  # site name -> the factors shared by its group (folded into the norm)
    for sites, g, b in groups:
        a_max = jnp.max(jnp.stack([amax[n] for n in sites]), axis=0)
        w_max = jnp.max(
            jnp.stack([_weight_rowmax(leaves[targets[n].leaf], targets[n]) for n in sites]), axis=0
        )
        s = smoothing_factors(a_max, w_max, alpha, power_of_two=power_of_two)
        for leaf in (g, b):
            if leaf is not None:
                p = jnp.asarray(leaves[leaf])
                leaves[leaf] = (p.astype(jnp.float32) / s).astype(p.dtype)
        group_s.update((n, s) for n in sites)
    smooth = {}
    for name, tg in targets.items():
        idx, wc, ac, per_layer, site, perm = tg
        w = jnp.asarray(leaves[idx])
        stack = w.shape[: w.ndim - len(per_layer)]
        k = tg.k
        # the dot's (K, N) view of the weight; scaled there and mapped back to the stored layout
        wm = to_view(w, perm).reshape(stack + (k, -1)).astype(jnp.float32)

        def stored(wm_, w=w, stack=stack, perm=perm, per_layer=per_layer):
            return from_view(wm_.reshape(stack + tuple(per_layer)), perm).astype(w.dtype)

        if name in group_s:
            leaves[idx] = stored(wm * group_s[name][:, None])
            continue
        s = smoothing_factors_stacked(
            amax[name], jnp.max(jnp.abs(wm), axis=-1), alpha, power_of_two
        )
        leaves[idx] = stored(wm * s[..., None])
        x_ndim = len(site.in_avals[1 - site.operand].shape)
        kshape = per_layer[: len(wc)]
        flat_s = s.reshape((-1, k))
        per = [act_smooth(flat_s[i], x_ndim, ac, kshape) for i in range(flat_s.shape[0])]
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
    sts, _ = Stream(adapter, kwargs, site_body(selected, observe_fn), inputs).run(
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
    new_model, new_vars = adapter.rebuilt(leaves)
    qvars = convert(
        new_model, new_vars, rules, stats, args=args, model_kwargs=kwargs, method=method
    )
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
