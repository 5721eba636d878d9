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
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from jax.sharding import Mesh, PartitionSpec

from jq import sharding as _sharding
from jq.quantize import QArray

__all__ = [
    "float_logical_specs",
    "logical_shardings",
    "logical_specs",
    "merge_stats",
    "shard_logical",
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
    flat = _sharding.flatten_shardings(specs)
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
    out = {}
    for path, v in qvars.variables.items():
        spec = flat.get(path, PartitionSpec())
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
    return _sharding.qvars_shardings(qvars, mesh_specs, mesh=mesh)


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
