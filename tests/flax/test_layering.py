"""Each thing on its layer: moved names keep working, observers carry their own sharded merge."""

import jax.numpy as jnp
import numpy as np
import pytest

import jq.sharding
from jq import calibration as cal
from jq.calibration import sharded
from jq.flax import sharding as jfs


@pytest.mark.parametrize("name", ["shard_qvars", "qvars_shardings", "flatten_shardings"])
def test_flax_sharding_names_moved_with_a_deprecation(name):
    with pytest.warns(DeprecationWarning, match=f"jq.flax.sharding.{name}"):
        old = getattr(jq.sharding, name)
    assert old is getattr(jfs, name)
    with pytest.raises(AttributeError):
        jq.sharding.no_such_name  # noqa: B018


def test_common_range_widens_a_histogram_and_leaves_minmax_alone():
    x = jnp.array([[-1.0, 2.0], [0.5, 3.0]])
    h = cal.Histogram(num_bins=16, axis=1)
    st = h.update(h.init(x), x)
    wide = jq.sharding.with_common_range(h, st, jnp.array([[-4.0, 2.5]]), jnp.array([[0.0, 9.0]]))
    np.testing.assert_array_equal(wide.lo, [[-4.0, 2.0]])  # min(state, given) per channel
    np.testing.assert_array_equal(wide.hi, [[0.5, 9.0]])
    np.testing.assert_array_equal(wide.counts, st.counts)  # the counts move only at the next update
    m = cal.MinMax()
    ms = m.update(m.init(x), x)
    assert sharded.with_common_range(m, ms, -10.0, 10.0) is ms
    assert jq.sharding.sharded_update is sharded.sharded_update
