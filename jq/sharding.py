"""Quantized variables and calibration on a device mesh, with JAX's own sharding.

jq adds no distribution layer: a converted model is a pytree, so `jax.device_put`
places it and `jax.jit` partitions `jq.apply` (and a QAT step) over a `Mesh` the
way it partitions the float model. This module supplies the two things that JAX
cannot guess:

1. **Where each part of a `QArray` goes.** A float weight sharded with
   ``PartitionSpec(a_0, ..., a_{n-1})`` gives its `QArray`:

   * ``value``: the same spec. For int4, two values share a byte along
     `pack_axis`; byte ``i`` holds elements ``2i`` and ``2i + 1``, so a shard of
     the bytes is a shard of the elements exactly when every device's slice of
     that axis has an even length (``n % (2 * k) == 0`` for ``k`` shards).
   * ``scale`` and ``zero_point`` (keepdims shape): on a channel axis (full
     size) the weight's mesh axes; on an axis of size 1 none (replicated); on a
     block axis the weight's mesh axes when no block straddles two devices
     (``n % (block_size * k) == 0``), otherwise replicated (the scales are
     small; each device reads the ones it needs).

   So per-channel scales of a Dense kernel ``(K, N)`` split on the output
   features ``N`` are split with it, and the integer dot of each shard uses
   only local values and local scales.

2. **Calibration on data-parallel shards** that equals calibration on the
   concatenated data: `sharded_update`, `merge_states` and `with_common_range`,
   which live in `jq.calibration.sharded` and are re-exported here.

The Flax-layer helpers that place a whole `QuantizedVariables`
(`shard_qvars`, `qvars_shardings`) live in `jq.flax.sharding`; their old names
here still work, with a DeprecationWarning.

Example (tensor-parallel on output features, data-parallel on the batch)::

    mesh = jax.make_mesh((2, 4), ("data", "model"))
    float_shardings = {"params/Dense_0/kernel": NamedSharding(mesh, P(None, "model"))}
    qvars = jq.flax.sharding.shard_qvars(jq.convert(model, variables, rules, stats),
                                    float_shardings, mesh=mesh)
    x = jax.device_put(x, NamedSharding(mesh, P("data")))
    y = jax.jit(lambda qv, x: jq.apply(model, qv, x))(qvars, x)
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jq.calibration.sharded import merge_states, sharded_update, with_common_range
from jq.quantize import QArray

__all__ = [
    "merge_states",
    "qarray_partition_specs",
    "qarray_shardings",
    "sharded_update",
    "with_common_range",
]

# moved to the Flax layer (they build `QuantizedVariables`): jq.flax.sharding
_MOVED = ("flatten_shardings", "qvars_shardings", "shard_qvars")


def __getattr__(name: str):
    if name in _MOVED:
        warnings.warn(
            f"jq.sharding.{name} is deprecated; use jq.flax.sharding.{name}",
            DeprecationWarning,
            stacklevel=2,
        )
        from jq.flax import sharding as flax_sharding

        return getattr(flax_sharding, name)
    raise AttributeError(f"module 'jq.sharding' has no attribute {name!r}")


# ---------------------------------------------------------------------------------------
# QArray <- float weight sharding
# ---------------------------------------------------------------------------------------
def _entries(spec: PartitionSpec, ndim: int, what: str) -> list:
    if not isinstance(spec, PartitionSpec):
        raise TypeError(f"{what}: expected a jax.sharding.PartitionSpec, got {type(spec).__name__}")
    ent = list(spec)
    if len(ent) > ndim:
        raise ValueError(
            f"{what}: PartitionSpec {spec} has {len(ent)} entries but the weight has rank {ndim}"
        )
    return ent + [None] * (ndim - len(ent))


def _num_shards(entry, mesh_shape: Mapping[str, int] | None, what: str) -> int:
    if entry is None or mesh_shape is None:  # None: logical names, no sizes to check
        return 1
    names = entry if isinstance(entry, tuple) else (entry,)
    n = 1
    for name in names:
        if name not in mesh_shape:
            raise ValueError(
                f"{what}: mesh axis {name!r} is not in the mesh (axes {tuple(mesh_shape)})"
            )
        n *= mesh_shape[name]
    return n


def qarray_partition_specs(q: QArray, spec: PartitionSpec, mesh: Mesh) -> QArray:
    """The `PartitionSpec` of each part of `q`, given the float weight's `spec`.

    Rules (``k`` = number of shards of an axis, ``n`` = its size in `q.shape`):

    * ``value``: `spec`; on the int4 `pack_axis` it needs ``n % (2k) == 0``
      (each device's slice of elements packs into whole bytes);
    * ``scale``, ``zero_point``: the axis's entry where the scale has the full
      size ``n`` (a channel axis); None where it has size 1; on a block axis
      (``n / block_size`` scales) the entry if ``(n / k) % block_size == 0``,
      else None.

    Args:
      q: a `QArray` (its static `shape` and the scale's shape are used).
      spec: the float weight's `PartitionSpec` (shorter specs are padded with None).
      mesh: the `Mesh` that `spec` refers to (for the shard counts).

    Returns:
      A `QArray` whose ``value`` / ``scale`` / ``zero_point`` fields are
      PartitionSpecs (``zero_point`` None when `q` has none). PartitionSpecs
      are pytree leaves, so it can be passed to `jax.tree_util.tree_map`.

    Raises:
      TypeError: `q` is not a `QArray`, or `spec` not a PartitionSpec.
      ValueError: `spec` is longer than the rank, names an axis the mesh lacks,
        splits an axis unevenly, or splits an int4 pack axis into slices of
        odd length.
    """
    if not isinstance(mesh, Mesh):
        raise TypeError(
            f"qarray_partition_specs: `mesh` must be a jax.sharding.Mesh, got {type(mesh).__name__}"
        )
    return qarray_specs(q, spec, dict(mesh.shape))


def qarray_specs(q: QArray, spec: PartitionSpec, sizes: Mapping[str, int] | None) -> QArray:
    if not isinstance(q, QArray):
        raise TypeError(f"qarray_partition_specs: `q` must be a QArray, got {type(q).__name__}")
    what = f"qarray_partition_specs(QArray shape {q.shape})"
    nd = len(q.shape)
    if q.value.ndim != nd or q.scale.ndim != nd:
        raise ValueError(
            f"{what}: `q` has extra leading axes (value rank {q.value.ndim}, logical rank {nd}); "
            "shard a QArray that is not vmapped"
        )
    ent = _entries(spec, nd, what)
    pack = None if q.pack_axis is None else q.pack_axis % nd
    scale_ent = []
    for a, e in enumerate(ent):
        n, k = q.shape[a], _num_shards(e, sizes, what)
        if n % k:
            raise ValueError(
                f"{what}: axis {a} of size {n} does not split evenly into {k} shards ({e!r})"
            )
        if a == pack and k > 1 and n % (2 * k):
            raise ValueError(
                f"{what}: the int4 values are packed two per byte along axis {a} (size {n}); "
                f"splitting it into {k} shards leaves slices of odd length {n // k}, so a byte "
                "would straddle two devices. Split another axis, or use a multiple of "
                f"{2 * k} features"
            )
        s = q.scale.shape[a]
        if s == 1 or e is None:
            scale_ent.append(None)
        elif s == n:
            scale_ent.append(e)
        else:  # a block axis: s = n / block_size scales
            bs = n // s
            scale_ent.append(e if (n // k) % bs == 0 else None)
    vspec = PartitionSpec(*ent)
    sspec = PartitionSpec(*scale_ent)
    return QArray(
        vspec, sspec, None if q.zero_point is None else sspec, q.format, q.shape, q.pack_axis
    )


def qarray_shardings(q: QArray, sharding: NamedSharding) -> QArray:
    """`qarray_partition_specs` as `NamedSharding`s on the float weight's mesh.

    Args:
      q: a `QArray`.
      sharding: the float weight's `NamedSharding`.

    Returns:
      A `QArray` of NamedShardings, a valid ``out_shardings`` / `jax.device_put`
      target for `q`.

    Raises:
      TypeError: `sharding` is not a NamedSharding.
    """
    if not isinstance(sharding, NamedSharding):
        raise TypeError(
            f"qarray_shardings: `sharding` must be a NamedSharding, got {type(sharding).__name__}"
        )
    specs = qarray_partition_specs(q, sharding.spec, sharding.mesh)
    return jax.tree_util.tree_map(
        lambda s: NamedSharding(sharding.mesh, s, memory_kind=sharding.memory_kind), specs
    )
