"""Flax sharding metadata for quantized variables.

Flax annotates parameters with *logical* axis names: linen with
``nn.with_logical_partitioning(init, ("embed", "mlp"))`` (the variables hold
`nn.LogicallyPartitioned` boxes), nnx with ``nnx.with_partitioning(init,
("embed", "mlp"))`` or ``sharding_names`` / ``out_sharding`` metadata on
`nnx.Param`. `jq.convert` and `jq.calibrate` accept the boxed variables as they
are; these helpers carry the annotations over to the `QuantizedVariables`:

* `logical_specs` gives each quantized leaf its logical `PartitionSpec` (a
  `QArray` of specs for a quantized weight: the value keeps the weight's names,
  the scale keeps the names of its channel / block axes);
* `logical_shardings` / `shard_logical` turn them into `NamedSharding`s on a
  mesh with logical-axis rules, with the divisibility checks of
  `jq.sharding.qarray_partition_specs`.
* `qvars_shardings` / `shard_qvars` derive every leaf's `NamedSharding` of a
  `QuantizedVariables` from the float variables' shardings (each QArray's parts
  by `jq.sharding.qarray_shardings`; activation QParams replicated). They lived
  in `jq.sharding` before, where the old names still work (deprecated).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec, Sharding

from jq import sharding as _sharding
from jq.quantize import QArray

__all__ = [
    "flatten_shardings",
    "float_logical_specs",
    "logical_shardings",
    "logical_specs",
    "merge_stats",
    "qvars_shardings",
    "shard_logical",
    "shard_qvars",
]


def float_logical_specs(variables_or_model) -> dict[str, PartitionSpec]:
    """``{path: logical PartitionSpec}`` of the float variables (paths as in `QuantizedVariables`).

    Args:
      variables_or_model: linen variables (boxed by ``nn.with_logical_partitioning``;
        unannotated leaves get ``P()``), or an nnx Module whose `nnx.Param`s carry
        sharding metadata.

    Raises:
      TypeError: neither a variables dict nor an nnx Module.
    """
    import flax.linen as nn
    from flax import nnx

    if isinstance(variables_or_model, nnx.Module):
        specs = nnx.get_partition_spec(nnx.state(variables_or_model))
    elif isinstance(variables_or_model, dict) or hasattr(variables_or_model, "items"):
        specs = nn.get_partition_spec(variables_or_model)
    else:
        raise TypeError(
            "float_logical_specs: `variables_or_model` must be linen variables or an nnx Module, "
            f"got {type(variables_or_model).__name__}"
        )
    flat = flatten_shardings(specs)
    return {p: (s if isinstance(s, PartitionSpec) else PartitionSpec()) for p, s in flat.items()}


def logical_specs(qvars, variables_or_model) -> dict:
    """The float variables' logical annotations, carried to each leaf of ``qvars.variables``.

    Args:
      qvars: `QuantizedVariables` converted from these variables.
      variables_or_model: the annotated float variables (linen) or module (nnx).

    Returns:
      ``{path: PartitionSpec}`` for float leaves and ``{path: QArray of
      PartitionSpecs}`` for quantized ones, with logical axis names (see
      `jq.sharding.qarray_partition_specs` for how the names map onto the value,
      scale and zero point).

    Raises:
      ValueError: an annotated path is not a variable of `qvars`.
    """
    flat = float_logical_specs(variables_or_model)
    unknown = sorted(set(flat) - set(qvars.variables))
    if unknown:
        raise ValueError(
            f"logical_specs: `variables_or_model` has annotated paths that `qvars` lacks: {unknown[:5]}"
        )
    perms = _weight_perms(qvars)  # kernels stored transposed: their names move too
    out = {}
    for path, v in qvars.variables.items():
        spec = _stored_spec(flat.get(path, PartitionSpec()), perms.get(path))
        out[path] = _sharding.qarray_specs(v, spec, None) if isinstance(v, QArray) else spec
    return out


def _to_mesh(spec: PartitionSpec, rules) -> PartitionSpec:
    import flax.linen as nn

    if rules is None:  # the names are mesh axes already (nnx's usual form)
        return spec
    return nn.logical_to_mesh_axes(tuple(spec), rules)


def logical_shardings(
    qvars, variables_or_model, mesh: Mesh, rules: Sequence[tuple[str, str | None]] | None = None
):
    """`NamedSharding`s for `qvars` from the float variables' logical annotations.

    Args:
      qvars: `QuantizedVariables`.
      variables_or_model: the annotated float variables (linen) or module (nnx).
      mesh: the `Mesh`.
      rules: logical-axis rules, ``(("batch", "data"), ("mlp", "model"), ...)``
        as for ``nn.logical_to_mesh_sharding``; None when the annotations
        already name mesh axes.

    Returns:
      A pytree of shardings with the structure of `qvars` (see
      `jq.sharding.qvars_shardings`).
    """
    flat = float_logical_specs(variables_or_model)
    mesh_specs = {p: _to_mesh(s, rules) for p, s in flat.items()}
    return qvars_shardings(qvars, mesh_specs, mesh=mesh)


def shard_logical(
    qvars, variables_or_model, mesh: Mesh, rules: Sequence[tuple[str, str | None]] | None = None
):
    """`jax.device_put` of `qvars` onto `logical_shardings(...)`."""
    return jax.device_put(qvars, logical_shardings(qvars, variables_or_model, mesh, rules))


def merge_stats(*stats):
    """Merges `jq.CalibrationStats` gathered independently (e.g. one per host or per shard).

    Each site's states are combined with its observer's ``merge``: MinMax
    exactly (the result equals calibrating on all the batches), histograms
    within half a bin (``Histogram.merge``; for bit-exact histograms calibrate
    on one global, data-sharded batch stream instead, or use
    `jq.sharding.sharded_update`).

    Args:
      *stats: two or more `CalibrationStats` from `jq.calibrate` with the same
        model and rules.

    Returns:
      One `CalibrationStats` for `jq.convert`.

    Raises:
      ValueError: fewer than two, or they observed different sites / observers.
    """
    from jq.flax.qvars import CalibrationStats

    if len(stats) < 2 or not all(isinstance(s, CalibrationStats) for s in stats):
        raise ValueError("merge_stats: pass two or more CalibrationStats from jq.calibrate")
    first = stats[0]
    for s in stats[1:]:
        if set(s.states) != set(first.states) or s.observers != first.observers:
            raise ValueError(
                "merge_stats: the CalibrationStats observed different sites or observers "
                f"({sorted(first.states)[:3]} vs {sorted(s.states)[:3]}); calibrate with the same rules"
            )
    states = {}
    for k, obs in first.observers.items():
        merge = jax.jit(obs.merge)
        st = first.states[k]
        for s in stats[1:]:
            st = merge(st, s.states[k])
        states[k] = st
    return CalibrationStats(
        states,
        dict(first.observers),
        sum(s.num_batches for s in stats),
        first.example,
        first.site_names,
    )


# ---------------------------------------------------------------------------------------
# QuantizedVariables
# ---------------------------------------------------------------------------------------
def _key(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _is_spec_leaf(x) -> bool:
    return isinstance(x, (Sharding, PartitionSpec, jax.Array, jax.ShapeDtypeStruct))


def flatten_shardings(shardings) -> dict[str, Any]:
    """``{"a/b/c": leaf}`` from a flat dict keyed by paths or any nested pytree."""
    if isinstance(shardings, Mapping) and all(isinstance(k, str) and "/" in k for k in shardings):
        return dict(shardings)
    flat, _ = jax.tree_util.tree_flatten_with_path(shardings, is_leaf=_is_spec_leaf)
    out = {}
    for path, leaf in flat:
        keys = [_key(k) for k in path]
        # boxed values (flax metadata, nnx variables) end in a "value" key
        while len(keys) > 1 and keys[-1] in ("value", ".value", "raw_value"):
            keys.pop()
        out["/".join(keys)] = leaf
    return out


def _as_named(leaf, mesh: Mesh | None, path: str) -> NamedSharding | None:
    if isinstance(leaf, (jax.Array, jax.ShapeDtypeStruct)):
        leaf = getattr(leaf, "sharding", None)
        if leaf is None:
            return None
    if isinstance(leaf, NamedSharding):
        return leaf
    if isinstance(leaf, PartitionSpec):
        if mesh is None:
            raise ValueError(
                f"shard_qvars: `shardings[{path!r}]` is a PartitionSpec; pass mesh= to say which mesh"
            )
        return NamedSharding(mesh, leaf)
    if isinstance(leaf, Sharding):
        if leaf.is_fully_replicated and mesh is not None:
            return NamedSharding(mesh, PartitionSpec())
        raise TypeError(
            f"shard_qvars: `shardings[{path!r}]` is a {type(leaf).__name__}; jq needs a "
            "NamedSharding (or a PartitionSpec with mesh=) to place the parts of a QArray"
        )
    raise TypeError(
        f"shard_qvars: `shardings[{path!r}]` must be a NamedSharding, a PartitionSpec or a "
        f"jax.Array, got {type(leaf).__name__}"
    )


def _find_mesh(named: dict) -> Mesh | None:
    for s in named.values():
        if isinstance(s, NamedSharding):
            return s.mesh
    return None


def _weight_perms(qvars) -> dict[str, tuple[int, ...]]:
    """``{path: perm}`` of the weights that `jq.convert(target=)` stored transposed."""
    sites = getattr(getattr(qvars, "plan", None), "sites", ())
    return {sp.leaf: sp.weight_perm for sp in sites if getattr(sp, "weight_perm", None)}


def _stored_spec(spec: PartitionSpec, perm: tuple[int, ...] | None) -> PartitionSpec:
    """A float weight's spec for its QArray as stored: axis ``i`` of the stored array is
    axis ``perm[i]`` of the weight (None: as the weight)."""
    if perm is None:
        return spec
    ent = tuple(spec) + (None,) * (len(perm) - len(spec))
    return PartitionSpec(*(ent[p] for p in perm))


def qvars_shardings(qvars, shardings=None, *, mesh: Mesh | None = None):
    """Shardings for every leaf of a `jq.QuantizedVariables`, derived from the float ones.

    Args:
      qvars: `QuantizedVariables` from `jq.convert` (any pytree with
        ``.variables`` ``{path: array | QArray}`` and ``.activations``).
      shardings: the float variables' shardings, as

        * a dict keyed by the paths of ``qvars.variables``
          (``"params/Dense_0/kernel"`` for linen, ``"l1/kernel"`` for nnx), or
        * a nested pytree with the float variables' structure (the linen
          variables dict, an nnx `State`, or the output of
          ``nn.logical_to_mesh_sharding``);

        whose leaves are `NamedSharding`s, `PartitionSpec`s (with `mesh`) or the
        float arrays themselves (their ``.sharding`` is used: this is how
        `convert` "preserves" the float shardings). Paths left out, and every
        activation `QParams`, are replicated. None replicates everything (pure
        data parallelism).
      mesh: the `Mesh`; needed for PartitionSpecs and when `shardings` is None.

    Returns:
      A pytree of NamedShardings with the structure of `qvars` (QArrays map to
      QArrays of shardings, see `qarray_partition_specs`), usable as
      ``in_shardings`` / ``out_shardings`` of `jax.jit` or with `jax.device_put`.

    Raises:
      ValueError: a path in `shardings` is not a variable of `qvars`; no mesh.
      TypeError: a leaf that is not a sharding.
    """
    if not hasattr(qvars, "variables") or not hasattr(qvars, "activations"):
        raise TypeError(
            f"qvars_shardings: `qvars` must be jq.QuantizedVariables, got {type(qvars).__name__}"
        )
    flat = {} if shardings is None else flatten_shardings(shardings)
    unknown = sorted(set(flat) - set(qvars.variables))
    if unknown:
        raise ValueError(
            f"qvars_shardings: `shardings` names paths that are not variables of `qvars`: "
            f"{unknown[:5]} (variables: {sorted(qvars.variables)[:5]}...)"
        )
    named = {p: _as_named(v, mesh, p) for p, v in flat.items()}
    named = {p: s for p, s in named.items() if s is not None}
    mesh = mesh if mesh is not None else _find_mesh(named)
    if mesh is None:
        raise ValueError("qvars_shardings: no mesh; pass mesh= (or NamedShardings in `shardings`)")
    repl = NamedSharding(mesh, PartitionSpec())
    perms = _weight_perms(qvars)
    out_vars = {}
    for path, v in qvars.variables.items():
        s = named.get(path, repl)
        if isinstance(v, QArray):
            if path in perms:
                s = NamedSharding(s.mesh, _stored_spec(s.spec, perms[path]))
            out_vars[path] = _sharding.qarray_shardings(v, s)
        else:
            out_vars[path] = s
    acts = jax.tree_util.tree_map(lambda _: repl, qvars.activations)
    smooth = jax.tree_util.tree_map(lambda _: repl, qvars.smooth)
    return type(qvars)(out_vars, acts, qvars.plan, smooth)


def shard_qvars(qvars, shardings=None, *, mesh: Mesh | None = None):
    """Places `qvars` on devices consistently with the float variables' shardings.

    ``jax.device_put(qvars, qvars_shardings(qvars, shardings, mesh=mesh))``:
    each QArray's int values follow the float weight's layout (int4 bytes along
    the pack axis included), its per-channel scales and zero points are split
    along the channel axis with it, and activation `QParams` are replicated.

    To keep the shardings of already-sharded float variables, pass them as
    `shardings` (``shard_qvars(jq.convert(model, v, rules, stats), v)``).

    Args:
      qvars, shardings, mesh: as in `qvars_shardings`.

    Returns:
      The same `QuantizedVariables`, with every array committed to its sharding.
    """
    return jax.device_put(qvars, qvars_shardings(qvars, shardings, mesh=mesh))
