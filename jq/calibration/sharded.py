"""Calibration on data-parallel shards that equals calibration on the concatenated data.

`sharded_update` runs ``observer.update`` on each device's slice of a batch
inside ``jax.shard_map`` and combines the shards' statistics. An observer that
knows how to combine itself across devices defines ``shard_update(state, xs,
axis_name)`` (`Histogram`: agree on the global range, bin on that common
lattice, ``psum`` the int32 counts); every other observer is gathered
(``all_gather``) and folded with its ``merge`` (`MinMax`: min of mins, max of
maxes). Either way the result equals one ``update`` on the whole batch, bit for
bit for MinMax, MovingAverageMinMax and Histogram.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

__all__ = ["merge_states", "sharded_update", "with_common_range"]


def with_common_range(observer, state, lo: jax.Array, hi: jax.Array):
    """``observer.with_range(state, lo, hi)`` for observers with a bin lattice (`Histogram`); `state` otherwise.

    Args:
      observer: the observer.
      state: its state.
      lo, hi: the global batch extrema in the state's keepdims shape (e.g. a
        ``pmin`` / ``pmax`` of the shards' extrema).

    Returns:
      The state widened to ``[lo, hi]`` (see ``Histogram.with_range``), or
      `state` itself for observers without a lattice.
    """
    widen = getattr(observer, "with_range", None)
    return state if widen is None else widen(state, lo, hi)


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
    xspec = [None] * nd
    xspec[batch_axis] = axis_name
    own = getattr(observer, "shard_update", None)

    @functools.partial(
        jax.shard_map,
        mesh=mesh,
        in_specs=(PartitionSpec(), PartitionSpec(*xspec)),
        out_specs=PartitionSpec(),
        check_vma=False,
    )
    def step(st, xs):
        if own is not None:
            return own(st, xs, axis_name)
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
