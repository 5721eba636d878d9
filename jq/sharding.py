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
   concatenated data. MinMax merges by a min / max reduction. Histograms first
   agree on a common range (a ``pmin`` / ``pmax`` of the shards' extrema), so
   that every shard bins on the same lattice, and are then summed bin by bin
   (``psum`` of int32 counts): the result is bit-identical to one ``update`` on
   the whole batch.

Example (tensor-parallel on output features, data-parallel on the batch)::

    mesh = jax.make_mesh((2, 4), ("data", "model"))
    float_shardings = {"params/Dense_0/kernel": NamedSharding(mesh, P(None, "model"))}
    qvars = jq.sharding.shard_qvars(jq.convert(model, variables, rules, stats),
                                    float_shardings, mesh=mesh)
    x = jax.device_put(x, NamedSharding(mesh, P("data")))
    y = jax.jit(lambda qv, x: jq.apply(model, qv, x))(qvars, x)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec, Sharding

from jq.quantize import QArray

__all__ = [
    "merge_states",
    "qarray_partition_specs",
    "qarray_shardings",
    "qvars_shardings",
    "shard_qvars",
    "sharded_update",
    "with_common_range",
]


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
    out_vars = {}
    for path, v in qvars.variables.items():
        s = named.get(path, repl)
        if isinstance(v, QArray):
            out_vars[path] = qarray_shardings(v, s)
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


# ---------------------------------------------------------------------------------------
# calibration on data-parallel shards
# ---------------------------------------------------------------------------------------
def _is_histogram(obs) -> bool:
    from jq.calibration import Histogram

    return isinstance(obs, Histogram)


def with_common_range(observer, state, lo: jax.Array, hi: jax.Array):
    """A histogram state whose lattice will cover ``[lo, hi]`` (other observers: unchanged).

    A `Histogram` sets (and widens) its bin lattice from the running extrema
    and the batch's. Widening the state's extrema to the global range of a
    batch before each shard's `update` puts every shard on the same lattice, the
    one that a single `update` on the whole batch would choose, so the shards'
    counts add up bin by bin, exactly.

    Args:
      observer: the observer.
      state: its state.
      lo, hi: the global batch extrema in the state's keepdims shape (e.g. a
        ``pmin`` / ``pmax`` of the shards' extrema).

    Returns:
      The state with ``lo = min(state.lo, lo)``, ``hi = max(state.hi, hi)`` for
      a Histogram; `state` itself for other observers.
    """
    if not _is_histogram(observer):
        return state
    lo = jnp.asarray(lo, jnp.float32).reshape(state.lo.shape)
    hi = jnp.asarray(hi, jnp.float32).reshape(state.hi.shape)
    return state._replace(lo=jnp.minimum(state.lo, lo), hi=jnp.maximum(state.hi, hi))


def merge_states(observer, states):
    """Folds ``observer.merge`` over the leading (shard) axis of stacked states.

    Use it after computing one state per shard, e.g.
    ``jax.vmap(obs.update, in_axes=(None, 0))(state, x.reshape(n, -1, *x.shape[1:]))``.
    MinMax merges exactly; histograms merge exactly when the shards share a
    lattice (see `with_common_range`), otherwise within half a bin (see
    ``Histogram.merge``).

    Args:
      observer: an observer with a ``merge`` method.
      states: its state with a leading axis of shards.

    Returns:
      One merged state.

    Raises:
      TypeError: the observer has no ``merge``.
      ValueError: `states` has no leading axis.
    """
    if not hasattr(observer, "merge"):
        raise TypeError(f"merge_states: `observer` {type(observer).__name__} has no merge method")
    leaves = jax.tree_util.tree_leaves(states)
    if not leaves or any(np.ndim(a) == 0 for a in leaves):
        raise ValueError("merge_states: `states` must carry a leading axis of shards")
    n = int(np.shape(leaves[0])[0])
    out = jax.tree_util.tree_map(lambda a: a[0], states)
    for i in range(1, n):
        out = observer.merge(out, jax.tree_util.tree_map(lambda a, i=i: a[i], states))
    return out


def _local_extrema(x, axis, ndim):
    finite = jnp.isfinite(x)
    red = tuple(i for i in range(ndim) if axis is None or i != axis % ndim)
    lo = jnp.min(jnp.where(finite, x, jnp.inf), axis=red, keepdims=True).astype(jnp.float32)
    hi = jnp.max(jnp.where(finite, x, -jnp.inf), axis=red, keepdims=True).astype(jnp.float32)
    return lo, hi


def sharded_update(
    observer, state, x: jax.Array, mesh: Mesh, axis_name: str | tuple = "data", batch_axis: int = 0
):
    """``observer.update(state, x)`` with `x` split over `axis_name` and observed per shard.

    Each device observes only its slice of the batch (inside `jax.shard_map`),
    then the shards' statistics are combined: histograms agree on the global
    range first (`with_common_range`, a ``pmin`` / ``pmax``) and sum their
    int32 counts (``psum``); other observers are gathered and folded with
    ``observer.merge`` (MinMax: min of mins, max of maxes; the moving average
    too, which is exact for one step from a shared state since the average is
    monotone in the batch extremum). The result equals ``observer.update(state,
    x)`` on the whole batch: bit for bit for MinMax, MovingAverageMinMax and
    Histogram.

    Args:
      observer: a jq.calibration observer.
      state: its state (replicated).
      x: the global batch; its `batch_axis` must divide evenly over `axis_name`.
      mesh: the `Mesh`.
      axis_name: the data-parallel mesh axis (or axes).
      batch_axis: the axis of `x` that is split.

    Returns:
      The updated state, replicated over the mesh.

    Raises:
      ValueError: `batch_axis` is the observer's channel axis, or does not split
        evenly.
    """
    x = jnp.asarray(x)
    nd = x.ndim
    if isinstance(axis_name, list):
        axis_name = tuple(axis_name)
    if not -nd <= batch_axis < nd:
        raise ValueError(f"sharded_update: batch_axis={batch_axis} is out of range for rank {nd}")
    batch_axis %= nd
    ch = getattr(observer, "axis", None)
    if ch is not None and ch % nd == batch_axis:
        raise ValueError(
            f"sharded_update: batch_axis={batch_axis} is the observer's channel axis; split the "
            "batch along another axis"
        )
    names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
    k = math.prod(mesh.shape[a] for a in names)
    if x.shape[batch_axis] % k:
        raise ValueError(
            f"sharded_update: `x` axis {batch_axis} (size {x.shape[batch_axis]}) does not split "
            f"into {k} shards over {axis_name!r}"
        )
    return _sharded_step(observer, mesh, axis_name, batch_axis, nd)(state, x)


@functools.lru_cache(maxsize=64)
def _sharded_step(observer, mesh, axis_name, batch_axis, nd):
    """One jitted shard_map step per (observer, mesh, axes, rank): no retracing per batch."""
    ch = getattr(observer, "axis", None)
    xspec = [None] * nd
    xspec[batch_axis] = axis_name
    hist = _is_histogram(observer)

    @functools.partial(
        jax.shard_map,
        mesh=mesh,
        in_specs=(PartitionSpec(), PartitionSpec(*xspec)),
        out_specs=PartitionSpec(),
        check_vma=False,
    )
    def step(st, xs):
        if hist:
            lo, hi = _local_extrema(xs, ch, nd)
            st0 = with_common_range(
                observer, st, jax.lax.pmin(lo, axis_name), jax.lax.pmax(hi, axis_name)
            )
            # the earlier counts are re-binned identically everywhere: keep them on one shard
            first = jax.lax.axis_index(axis_name) == 0
            st0 = st0._replace(counts=jnp.where(first, st0.counts, 0))
            new = observer.update(st0, xs)
            return new._replace(
                counts=jax.lax.psum(new.counts, axis_name),
                nonfinite=st.nonfinite + jax.lax.psum(new.nonfinite - st.nonfinite, axis_name),
            )
        new = observer.update(st, xs)
        gathered = jax.tree_util.tree_map(lambda a: jax.lax.all_gather(a, axis_name), new)
        merged = merge_states(observer, gathered)
        if hasattr(merged, "nonfinite"):
            bad = jax.tree_util.tree_map(lambda a: a - st.nonfinite, gathered.nonfinite)
            merged = merged._replace(nonfinite=st.nonfinite + jnp.sum(bad))
        if hasattr(merged, "count"):
            merged = merged._replace(count=st.count + 1)
        return merged

    return jax.jit(step)
