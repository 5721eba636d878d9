"""AWQ for Flax models: activation statistics from calibration batches, then `jq.awq_core` per input.

`awq` collects, for every selected weight dot, the mean magnitude and the Gram
matrix ``X^T X / n`` of its input channels with the traced-model interpreter
(`jq.flax.stream.Stream`, one pass over the batches), searches AWQ's exponent
per group of sites that read one activation (`jq.awq_core.awq_search`),
optionally clips the scaled weights (`jq.awq_core.awq_clip`), folds ``1 / s``
into the preceding LayerNorm-style affine with SmoothQuant's folding
(`jq.flax.smoothquant.fold_groups`) or keeps it as a run-time multiply
(`QuantizedVariables.smooth`), and rounds with `jq.convert` or `jq.gptq`.

References:
  Lin et al., "AWQ: Activation-aware Weight Quantization for On-Device LLM
  Compression and Acceleration", MLSys 2024.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jq.awq_core import awq_clip, awq_search, awq_weight_mean
from jq.flax._graph import Site, StateKey
from jq.flax.convert import convert
from jq.flax.gptq import gptq
from jq.flax.qvars import QuantizedVariables
from jq.flax.rules import Rule
from jq.flax.select import activation_matrix, dot_geometry, from_view, spec_to_view, to_view
from jq.flax.smoothquant import act_smooth, fold_groups
from jq.flax.stream import Stream, model_kwargs_arg, prepare, rules_then_batches, site_body
from jq.qparams import QuantSpec, qparams_from_array
from jq.quantize import fake_quant

__all__ = ["awq"]


class _Target(NamedTuple):
    """A weight AWQ scales (field names shared with `fold_groups`'s records)."""

    leaf: int  # index of the parameter leaf
    w_contract: tuple[int, ...]  # the view's contracting dims: its leading axes
    x_contract: tuple[int, ...]  # the activation's contracting dims
    per_layer: tuple[int, ...]  # the shape of the weight's dot view (`select.dot_geometry`)
    site: Site
    spec: QuantSpec  # the rule's weight spec, on the view
    perm: tuple[int, ...]  # stored axes -> view (`select.to_view`)

    @property
    def k(self) -> int:
        return int(np.prod(self.per_layer[: len(self.w_contract)]))


def _quantizer(tg: _Target) -> Callable[[jax.Array], jax.Array]:
    """Round-to-nearest of the ``(K, N)`` view with the rule's spec on the stored layout (min-max scales)."""

    def q(wm):
        w = wm.reshape(tg.per_layer)
        return fake_quant(w, qparams_from_array(w, tg.spec), tg.spec).reshape(wm.shape)

    return q


def _clip_group(tg: _Target) -> int:
    """Rows per clip block in the ``(K, N)`` view: the spec's block size along the last contracting axis."""
    r = len(tg.per_layer)
    ba = tg.spec.canonical_block_axis(r)
    if ba is not None and ba == len(tg.w_contract) - 1:
        return int(tg.spec.block_size)
    return tg.k


def awq(
    model,
    variables,
    rules: Sequence[Rule],
    batches: Iterable,
    *,
    inputs: Callable | None = None,
    model_kwargs: dict | None = None,
    method=None,
    n_grid: int = 20,
    duo: bool = False,
    clip: bool = True,
    clip_grid: int = 20,
    max_shrink: float = 0.5,
    fold: bool = True,
    rounding: str = "rtn",
    gptq_options: dict | None = None,
    progress: bool = True,
    return_info: bool = False,
):
    """Quantizes the weights of an unmodified Flax model with AWQ (activation-aware scaling).

    For every selected ``"dot"`` site (Dense, DenseGeneral, Einsum, ``x @ w``)
    whose rule has an integer weight spec, one pass over `batches` collects the
    per-input-channel mean ``m_j = mean |X_j|`` and ``G = X^T X / n`` of its
    activation. Sites that read the output of one LayerNorm-style affine (the
    query, key and value projections; see `jq.smoothquant`) form a group with one
    ``s``; every other site is its own group. Per group,
    `jq.awq_core.awq_search` picks ``alpha`` on the grid ``i / n_grid``
    minimising the summed output error of the round-to-nearest weights
    ``Q(diag(s) W) / s``, where ``s = m^alpha / sqrt(max m^alpha min m^alpha)``
    (with `duo`, also the two-sided ``s = m^alpha / w^(1 - alpha)``, ``w`` the
    group-normalised mean weight magnitude per input channel; the better family wins).
    Each weight is stored as ``diag(s) W``; the ``1 / s`` on the activation is
    folded into the norm (``g / s``, ``b / s``) when `fold` and the norm feeds
    only that group, and otherwise is applied at run time by `jq.apply`
    (`QuantizedVariables.smooth`, an elementwise multiply). The float model
    computes the same function before and after (up to float rounding).

    With `clip`, `jq.awq_core.awq_clip` then shrinks each quantization group's
    range (the spec's blocks along the contraction, or whole columns) to the
    ratio with the least output error.

    Rounding: ``"rtn"`` converts the scaled (and clipped) weights with
    `jq.convert` (min-max scales on the rule's grid). ``"gptq"`` hands the
    scaled model to `jq.gptq` (AWQ scales, then GPTQ's error-compensating
    rounding, with `gptq_options`); GPTQ's Hessians come from the model's own
    activations, so under ``"gptq"`` only groups folded into a norm are scaled
    (a run-time ``1 / s`` would change the activations GPTQ must see) and
    clipping is off (GPTQ chooses its own grid). The scales are searched for
    round-to-nearest, as in the paper, also under ``"gptq"``: scoring each
    ``alpha`` by GPTQ's own rounding instead (``jq.awq_core.awq_search(...,
    gram_aware=True)``) lowered the calibration layer error but gave a worse
    held-out bpc on the char-LM (+1.06% against +0.99%, GPTQ alone +0.96%).

    Args:
      model, variables: a linen Module and its variables, an nnx Module and None, a
        function ``fn(params, *args, **kwargs)`` and its params, or a Hugging Face Flax
        model and None (its own params) (`jq.flax.adapter`).
      rules: the `jq.Rule` list; weight specs must be integer formats, activations
        weight-only or dynamic.
      batches: calibration batches.
      inputs: maps a batch to the model's positional arguments (a tuple, or one
        argument); default: a tuple is the arguments, anything else the one argument.
      model_kwargs: fixed keyword arguments for every call (masks, ``train=False``).
      method: the model method.
      n_grid: points of the ``alpha`` grid.
      duo: also search the two-sided scales ``m^alpha / w^(1 - alpha)`` (AutoAWQ's
        ``duo_scaling``); the search keeps it only where its calibration error is
        lower. Off by default: on the char-LM it lowered the calibration error but
        gave a worse held-out bpc (int4 g128: +2.35% against +2.19% one-sided).
      clip, clip_grid, max_shrink: the clip search (ratios from 1 down to ``1 - max_shrink``).
      fold: fold ``1 / s`` into preceding norms where possible.
      rounding: ``"rtn"`` or ``"gptq"``.
      gptq_options: keyword arguments for `jq.gptq` (``percdamp``, ``act_order``, ...).
      progress: progress bars.
      return_info: also return one dict per group (sites, alpha, folded, errors).

    Returns:
      `QuantizedVariables` (and the info list with `return_info`).

    Raises:
      ValueError: empty batches, a non-integer weight format, a static activation
        rule, an unknown `rounding`, a bad grid.
      TypeError: `inputs` is not callable, `model_kwargs` not a dict.
    """
    fn = "jq.awq"
    if rounding not in ("rtn", "gptq"):
        raise ValueError(f"{fn}: rounding must be 'rtn' or 'gptq', got {rounding!r}")
    if inputs is not None and not callable(inputs):
        raise TypeError(f"{fn}: inputs must be a callable batch -> args, got {inputs!r}")
    model_kwargs = model_kwargs_arg("awq", model_kwargs, None)
    for name, v in (("n_grid", n_grid), ("clip_grid", clip_grid)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{fn}: {name} must be a positive int, got {v!r}")
    if not isinstance(max_shrink, (int, float)) or not 0.0 <= max_shrink < 1.0:
        raise ValueError(f"{fn}: max_shrink must lie in [0, 1), got {max_shrink!r}")
    rules, batches = rules_then_batches("awq", rules, batches)
    rules, kwargs, batches, adapter, args, t, chosen = prepare(
        model, variables, batches, rules, method, model_kwargs, "awq", inputs
    )
    uses = Counter(s.leaf.index for s in t.finder.sites if s.leaf is not None)
    targets: dict[str, _Target] = {}
    for name, c in chosen.items():
        s = c.site
        if c.mode == "static":
            raise ValueError(
                f"{fn}: rules[{c.rule_index}] quantizes activations statically (site {name!r}); "
                "AWQ is for weight-only or dynamic rules"
            )
        if s.kind != "dot" or s.leaf is None or c.rule.weight is None:
            continue
        if not c.rule.weight.fmt.is_integer:
            raise ValueError(
                f"{fn}: rules[{c.rule_index}] weight format {c.rule.weight.format!r} is not an "
                f"integer format (site {name!r})"
            )
        geo = dot_geometry(s)
        reason = geo if isinstance(geo, str) else None
        if reason is None and uses[s.leaf.index] != 1:
            reason = "weight shared by several sites"
        if reason is None and (s.stack or s.scans):
            reason = "site inside a scan"
        if reason is not None:
            warnings.warn(f"{fn}: site {name!r} is not scaled ({reason})", stacklevel=2)
            continue
        perm, wc, ac = geo
        try:
            c.rule.weight.param_shape(s.leaf.shape, name)
        except ValueError as e:
            raise ValueError(f"{fn}: rules[{c.rule_index}] does not fit site {name!r}: {e}") from e
        view = tuple(s.leaf.shape[p] for p in perm)
        spec = spec_to_view(c.rule.weight, perm)
        targets[name] = _Target(s.leaf.index, wc, ac, view, s, spec, perm)

    # groups: sites fed by one norm share s; the rest are searched alone
    folded = []
    if fold:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            folded = fold_groups(t, targets)
        for w in caught:
            warnings.warn(str(w.message).replace("jq.smoothquant", fn), stacklevel=2)
    in_group = {n for names, _, _ in folded for n in names}
    groups = [(names, g, b) for names, g, b in folded] + [
        ([n], None, None) for n in targets if n not in in_group
    ]
    if rounding == "gptq":
        groups = [gr for gr in groups if gr[1] is not None]
    rep = {names[0]: names for names, _, _ in groups}  # one statistics site per group

    def stats_fn(site, eqn, invals, sts, extra):
        tg = targets[site.name]
        xm = activation_matrix(invals[1 - site.operand], tg.x_contract, tg.k)
        key = site.key("awq")
        st = sts[key]
        sts[key] = {
            "gram": st["gram"] + jnp.matmul(xm.T, xm, precision=jax.lax.Precision.HIGHEST),
            "abs": st["abs"] + jnp.sum(jnp.abs(xm), axis=0),
            "n": st["n"] + jnp.float32(xm.shape[0]),
        }

    init = {
        StateKey(n, "awq"): {
            "gram": jnp.zeros((targets[n].k,) * 2, jnp.float32),
            "abs": jnp.zeros((targets[n].k,), jnp.float32),
            "n": jnp.zeros((), jnp.float32),
        }
        for n in rep
    }
    out, _ = Stream(adapter, kwargs, site_body(set(rep), stats_fn), inputs).run(
        batches, adapter.values, init, desc="awq", progress=progress, leave=False
    )

    leaves = list(adapter.values)
    smooth, info = {}, []
    for names, g_leaf, b_leaf in groups:
        st = out[StateKey(names[0], "awq")]
        n = jnp.maximum(st["n"], 1.0)
        gram, mean = st["gram"] / n, st["abs"] / n
        tgs = [targets[nm] for nm in names]
        ws = [
            to_view(jnp.asarray(leaves[tg.leaf], jnp.float32), tg.perm).reshape(tg.k, -1)
            for tg in tgs
        ]
        w_mean = awq_weight_mean(ws, [_clip_group(tg) for tg in tgs]) if duo else None
        res = awq_search(
            gram, mean, ws, [_quantizer(tg) for tg in tgs], n_grid=n_grid, weight_mean=w_mean
        )
        s = res.scales
        gram_s = gram / (s[:, None] * s[None, :])  # Gram matrix of X diag(s)^-1
        for tg, w in zip(tgs, ws):
            ws_ = w * s[:, None]
            if clip and rounding == "rtn":
                ws_ = awq_clip(
                    gram_s,
                    ws_,
                    _quantizer(tg),
                    _clip_group(tg),
                    n_grid=clip_grid,
                    max_shrink=max_shrink,
                )
            old = jnp.asarray(leaves[tg.leaf])
            leaves[tg.leaf] = from_view(ws_.reshape(tg.per_layer), tg.perm).astype(old.dtype)
        if g_leaf is not None:
            for leaf in (g_leaf, b_leaf):
                if leaf is not None:
                    p = jnp.asarray(leaves[leaf])
                    leaves[leaf] = (p.astype(jnp.float32) / s).astype(p.dtype)
        else:
            tg = tgs[0]
            x_ndim = len(tg.site.in_avals[1 - tg.site.operand].shape)
            smooth[names[0]] = act_smooth(
                s, x_ndim, tg.x_contract, tg.per_layer[: len(tg.w_contract)]
            )
        info.append(
            {
                "sites": list(names),
                "alpha": res.alpha,
                "duo": res.duo,
                "folded": g_leaf is not None,
                "error_rtn": float(res.errors[0]),
                "error_awq": float(
                    min(
                        res.errors.min(), np.inf if res.errors_duo is None else res.errors_duo.min()
                    )
                ),
            }
        )

    new_model, new_vars = adapter.rebuilt(leaves)
    if rounding == "gptq":
        qvars = gptq(
            new_model,
            new_vars,
            rules,
            batches,
            inputs=inputs,
            model_kwargs=model_kwargs,
            method=method,
            progress=progress,
            **(gptq_options or {}),
        )
    else:
        qvars = convert(new_model, new_vars, rules, args=args, model_kwargs=kwargs, method=method)
    qvars = QuantizedVariables(qvars.variables, qvars.activations, qvars.plan, smooth)
    return (qvars, info) if return_info else qvars
