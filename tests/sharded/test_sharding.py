"""jq on a device mesh: sharded QArrays, jitted apply / QAT on a Mesh, distributed calibration.

Runs on 8 simulated CPU devices (see conftest.py). Every sharded result is
compared with the same computation on one device.
"""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jq
import jq.hlo
import jq.sharding as js
from jq import calibration as cal
from jq.flax import sharding as jfs

# with fewer devices conftest.py fails every test with a message that says how to run them
MESH = (
    jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto, AxisType.Auto))
    if jax.device_count() == 8
    else None
)
X = jax.random.normal(jax.random.key(1), (16, 32))


def ns(*spec):
    return NamedSharding(MESH, P(*spec))


def rules(wfmt="int8", static=True):
    act = jq.QuantSpec("int8", calibration=cal.MinMax()) if static else jq.QuantSpec("int8")
    return [jq.Rule(".*", weight=jq.QuantSpec(wfmt, axis=-1), activation=act)]


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(64)(x))
        return nn.Dense(16)(h)


class LogicalMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        init = nn.initializers.lecun_normal()
        h = nn.Dense(64, kernel_init=nn.with_logical_partitioning(init, ("embed", "mlp")))(x)
        return nn.Dense(16, kernel_init=nn.with_logical_partitioning(init, ("mlp", "embed")))(
            nn.relu(h)
        )


class NnxMLP(nnx.Module):
    def __init__(self, rngs):
        init = nnx.initializers.lecun_normal()
        self.l1 = nnx.Linear(
            32, 64, kernel_init=nnx.with_partitioning(init, (None, "model")), rngs=rngs
        )
        self.l2 = nnx.Linear(
            64, 16, kernel_init=nnx.with_partitioning(init, ("model", None)), rngs=rngs
        )

    def __call__(self, x):
        return self.l2(nnx.relu(self.l1(x)))


# Megatron-style tensor parallelism: the first kernel split on its output features, the
# second on its input features; "column" splits both on output features, "dp" replicates.
LAYOUTS = {
    "dp": {},
    "column": {
        "params/Dense_0/kernel": P(None, "model"),
        "params/Dense_0/bias": P("model"),
        "params/Dense_1/kernel": P(None, "model"),
        "params/Dense_1/bias": P("model"),
    },
    "megatron": {
        "params/Dense_0/kernel": P(None, "model"),
        "params/Dense_0/bias": P("model"),
        "params/Dense_1/kernel": P("model", None),
    },
}


def place_float(variables, layout):
    flat = jax.tree_util.tree_flatten_with_path(variables)[0]
    placed = {}
    for path, leaf in flat:
        key = "/".join(k.key for k in path)
        placed[key] = jax.device_put(leaf, ns(*LAYOUTS[layout].get(key, P())))
    out: dict = {}
    for key, leaf in placed.items():
        node = out
        *head, last = key.split("/")
        for k in head:
            node = node.setdefault(k, {})
        node[last] = leaf
    return out


@pytest.fixture(scope="module")
def linen():
    m = MLP()
    v = m.init(jax.random.key(0), X)
    return m, v


def local_shards(a):
    """{device: numpy shard} of a committed array."""
    return {s.device: np.asarray(s.data) for s in a.addressable_shards}


def float_index(sharding, shape):
    return sharding.devices_indices_map(shape)


# ------------------------------------------------------------------------------------------
# 1. QArray shardings follow the float weight
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "fmt,spec,wspec,want_value,want_scale",
    [
        (
            "int8",
            jq.QuantSpec("int8", axis=-1),
            P(None, "model"),
            P(None, "model"),
            P(None, "model"),
        ),
        ("int8", jq.QuantSpec("int8", axis=-1), P("model", None), P("model", None), P(None, None)),
        (
            "int8",
            jq.QuantSpec("int8", axis=-1),
            P("data", "model"),
            P("data", "model"),
            P(None, "model"),
        ),
        (
            "uint8",
            jq.QuantSpec("uint8", scheme="affine", axis=-1),
            P(None, "model"),
            P(None, "model"),
            P(None, "model"),
        ),
        (
            "int4",
            jq.QuantSpec("int4", axis=-1),
            P(None, "model"),
            P(None, "model"),
            P(None, "model"),
        ),
        ("int4", jq.QuantSpec("int4", axis=-1), P("model", None), P("model", None), P(None, None)),
        # blocks of 8 rows: a shard of 16 rows holds whole blocks, so the block scales split too
        (
            "int4",
            jq.QuantSpec("int4", axis=-1, block_axis=0, block_size=8),
            P("model", None),
            P("model", None),
            P("model", None),
        ),
        # blocks of 32 rows straddle the 16-row shards: the block scales stay replicated
        (
            "int8",
            jq.QuantSpec("int8", axis=-1, block_axis=0, block_size=32),
            P("model", None),
            P("model", None),
            P(None, None),
        ),
        ("int8", jq.QuantSpec("int8"), P(None, "model"), P(None, "model"), P(None, None)),
    ],
)
def test_qarray_parts_are_the_float_weights_shards(fmt, spec, wspec, want_value, want_scale):
    w = jax.random.normal(jax.random.key(2), (64, 32))
    q = jq.quantize(w, None, spec)
    wsh = NamedSharding(MESH, wspec)
    specs = js.qarray_partition_specs(q, wspec, MESH)
    assert specs.value == want_value
    assert specs.scale == want_scale
    assert specs.zero_point == (None if q.zero_point is None else want_scale)
    qs = jax.device_put(q, js.qarray_shardings(q, wsh))
    ints = np.asarray(q.int_value())
    scale = np.broadcast_to(
        np.repeat(np.asarray(q.scale), 64 // q.scale.shape[0], 0)
        if q.scale.shape[0] not in (1, 64)
        else np.asarray(q.scale),
        (64, 32),
    )
    for dev, idx in float_index(wsh, w.shape).items():
        v = local_shards(qs.value)[dev]
        if q.pack_axis is not None:  # each device's bytes unpack to its slice of the int4 values
            v = np.asarray(jq.unpack_int4(jnp.asarray(v), v.shape[-1] * 2, -1))
        np.testing.assert_array_equal(v, ints[idx])
        # the local scales, broadcast over the local values, are the scales of the float shard
        s = local_shards(qs.scale)[dev]
        if s.shape == q.scale.shape:  # replicated: every device holds all the scales
            np.testing.assert_array_equal(s, np.asarray(q.scale))
            continue
        loc = np.broadcast_to(
            np.repeat(s, v.shape[0] // s.shape[0], 0) if s.shape[0] not in (1, v.shape[0]) else s,
            v.shape,
        )
        np.testing.assert_array_equal(loc, scale[idx])


def test_int4_pack_axis_split_into_odd_slices_is_rejected():
    q = jq.quantize(jnp.ones((8, 12)), None, jq.QuantSpec("int4", axis=-1))  # 12 / 4 = 3 per device
    with pytest.raises(ValueError, match="packed two per byte along axis 1"):
        js.qarray_partition_specs(q, P(None, "model"), MESH)
    # the unpacked axis may split (8 / 4 = 2 rows each)
    assert js.qarray_partition_specs(q, P("model", None), MESH).value == P("model", None)


@pytest.mark.parametrize(
    "spec,err,match",
    [
        (P(None, None, "model"), ValueError, "has 3 entries but the weight has rank 2"),
        (P(None, "nope"), ValueError, "mesh axis 'nope' is not in the mesh"),
        (P("model", None), ValueError, "does not split evenly"),
        ((None, "model"), TypeError, "PartitionSpec"),
    ],
)
def test_qarray_partition_specs_bad_input(spec, err, match):
    q = jq.quantize(jnp.ones((6, 8)), None, jq.QuantSpec("int8", axis=-1))
    with pytest.raises(err, match=match):
        js.qarray_partition_specs(q, spec, MESH)


def test_qarray_partition_specs_needs_a_qarray_and_a_mesh():
    with pytest.raises(TypeError, match="`q` must be a QArray"):
        js.qarray_partition_specs(jnp.ones((4, 4)), P(), MESH)
    q = jq.quantize(jnp.ones((4, 4)), None, jq.QuantSpec("int8"))
    with pytest.raises(TypeError, match="`mesh` must be a jax.sharding.Mesh"):
        js.qarray_partition_specs(q, P(), {"model": 4})
    with pytest.raises(TypeError, match="NamedSharding"):
        js.qarray_shardings(q, jax.sharding.SingleDeviceSharding(jax.devices()[0]))


# ------------------------------------------------------------------------------------------
# convert keeps the float shardings; shard_qvars places QuantizedVariables
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("wfmt", ["int8", "int4"])
def test_convert_keeps_float_shardings(linen, wfmt):
    m, v = linen
    fv = place_float(v, "megatron")
    stats = jq.calibrate(m, fv, rules(wfmt), [X], progress=False)
    qv = jq.convert(m, fv, rules(wfmt), stats)
    perms = {sp.leaf: sp.weight_perm for sp in qv.plan.sites if sp.weight_perm}
    for path, want in LAYOUTS["megatron"].items():
        got = qv.variables[path]
        if isinstance(got, jq.QArray):
            # a kernel stored in its dot's layout (jq.lowering.weight_layout) has its spec
            # permuted alike; a scale is split where it has more than one entry
            if path in perms:
                want = P(*(tuple(want)[p] for p in perms[path]))
            assert got.value.sharding.spec == want, path
            scale_spec = P(*(a if n > 1 else None for a, n in zip(want, got.scale.shape)))
            assert got.scale.sharding.spec == scale_spec, path
        else:
            assert got.sharding.spec == want, path
    # shard_qvars from the float arrays themselves gives the same layout
    qs = jfs.shard_qvars(jq.convert(m, v, rules(wfmt), stats), fv)
    for path in qv.variables:
        a, b = (
            jax.tree_util.tree_leaves(qv.variables[path]),
            jax.tree_util.tree_leaves(qs.variables[path]),
        )
        assert [x.sharding.spec for x in a] == [x.sharding.spec for x in b], path
    for qp in jax.tree_util.tree_leaves(qs.activations):
        assert qp.sharding.is_fully_replicated


def test_qvars_shardings_bad_input(linen):
    m, v = linen
    qv = jq.convert(m, v, rules(static=False), args=(X,))
    with pytest.raises(ValueError, match="not variables of `qvars`"):
        jfs.qvars_shardings(qv, {"params/Nope/kernel": ns()})
    with pytest.raises(ValueError, match="pass mesh="):
        jfs.qvars_shardings(qv, {"params/Dense_0/kernel": P(None, "model")})
    with pytest.raises(ValueError, match="no mesh"):
        jfs.qvars_shardings(qv)
    with pytest.raises(TypeError, match="must be a NamedSharding, a PartitionSpec or a jax.Array"):
        jfs.qvars_shardings(qv, {"params/Dense_0/kernel": "model"}, mesh=MESH)
    with pytest.raises(TypeError, match="jq.QuantizedVariables"):
        jfs.qvars_shardings(v, mesh=MESH)


# ------------------------------------------------------------------------------------------
# 2. apply under jit on the mesh: DP and TP equal one device; integer dots inside each shard
# ------------------------------------------------------------------------------------------
def hlo_dots(hlo: str):
    """(lhs, rhs, result) as 'type[shape]' for every dot of an optimized HLO module."""
    out = []
    for comp in re.split(r"\n\n", hlo):
        types = dict(re.findall(r"(%[\w.\-]+) = (\w+\[[^\]]*\])", comp))
        for m in re.finditer(r"= (\w+\[[^\]]*\])\S* dot\((%[\w.\-]+), (%[\w.\-]+)\)", comp):
            out.append((types.get(m.group(2)), types.get(m.group(3)), m.group(1)))
    return out


@pytest.mark.parametrize(
    "wfmt,layout", [("int8", "dp"), ("int8", "column"), ("int8", "megatron"), ("int4", "megatron")]
)
def test_apply_on_mesh_equals_one_device(linen, layout, wfmt):
    m, v = linen
    stats = jq.calibrate(m, v, rules(wfmt), [X], progress=False)
    qv = jq.convert(m, v, rules(wfmt), stats)
    f = jax.jit(lambda q, x: jq.apply(m, q, x))
    ref = f(qv, X)
    qs = jfs.shard_qvars(qv, LAYOUTS[layout], mesh=MESH)
    xs = jax.device_put(X, ns("data"))
    y = f(qs, xs)
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-6, atol=1e-6)
    assert y.sharding.spec[0] == "data"
    if wfmt == "int8":
        dots = hlo_dots(f.lower(qs, xs).compile().as_text())
        # two dots, both integer, on per-device shapes, output features split over "model"
        # where the layout says: on VNNI CPUs u8 x s8 -> s32 with 8 rows + 1 row of ones for
        # the weight sums; elsewhere s8 x s8 -> s32 on the 8 rows (8 >= the M padding of 2)
        a, rows = ("u8", 9) if jq.ops.lowering_info()["cpu"]["form"] == "u8s8" else ("s8", 8)
        k1, n1 = 32, 64 if layout == "dp" else 16
        k2, n2 = {"dp": (64, 16), "column": (64, 4), "megatron": (16, 16)}[layout]
        # the int8 kernel as convert stored it: (N, K) or (K, N) (jq.lowering.weight_layout)
        nk = qv.plan.sites[0].weight_perm is not None
        w = lambda k, n: f"s8[{n},{k}]" if nk else f"s8[{k},{n}]"
        assert sorted(dots) == sorted(
            [
                (f"{a}[{rows},{k1}]", w(k1, n1), f"s32[{rows},{n1}]"),
                (f"{a}[{rows},{k2}]", w(k2, n2), f"s32[{rows},{n2}]"),
            ]
        ), dots


def test_row_parallel_sums_int32_partials_across_devices(linen):
    """A weight split on its input features: the int32 partial dots are all-reduced as s32."""
    m, v = linen
    qv = jq.convert(m, v, rules(static=False), args=(X,))
    f = jax.jit(lambda q, x: jq.apply(m, q, x))
    qs = jfs.shard_qvars(qv, LAYOUTS["megatron"], mesh=MESH)
    hlo = f.lower(qs, jax.device_put(X, ns("data"))).compile().as_text()
    rows = 9 if jq.ops.lowering_info()["cpu"]["form"] == "u8s8" else 8  # + a row of ones on VNNI
    assert re.search(rf"= s32\[{rows},16\]\S* all-reduce\(", hlo), (
        "no s32 all-reduce of the partial dots"
    )
    np.testing.assert_allclose(
        np.asarray(f(qs, jax.device_put(X, ns("data")))), np.asarray(f(qv, X)), rtol=1e-6, atol=1e-6
    )


# ------------------------------------------------------------------------------------------
# QAT train step on the mesh
# ------------------------------------------------------------------------------------------
def test_qat_train_step_on_mesh_equals_one_device(linen):
    m, v = linen
    q = jq.qat(m, rules())
    qv = q.init(v, X)
    y_true = jax.random.normal(jax.random.key(3), (16, 16))
    opt = optax.adam(1e-2)

    def step(qv, opt_state, x, y):
        def loss_fn(params):
            out, state = q.apply({**qv, "params": params}, x, update_stats=True)
            return jnp.mean((out - y) ** 2), state

        (loss, state), g = jax.value_and_grad(loss_fn, has_aux=True)(qv["params"])
        upd, opt_state = opt.update(g, opt_state, qv["params"])
        return (
            {**qv, "params": optax.apply_updates(qv["params"], upd), "state": state},
            opt_state,
            loss,
        )

    f = jax.jit(step)
    ref_qv, ref_os, ref_loss = qv, opt.init(qv["params"]), []
    for _ in range(2):
        ref_qv, ref_os, loss = f(ref_qv, ref_os, X, y_true)
        ref_loss.append(float(loss))
    params = place_float({"params": qv["params"]}, "megatron")["params"]
    sqv = {**qv, "params": params}
    sqv = {**sqv, "state": jax.device_put(sqv["state"], ns())}
    s_os = opt.init(params)
    xs, ys = jax.device_put(X, ns("data")), jax.device_put(y_true, ns("data"))
    losses = []
    for _ in range(2):
        sqv, s_os, loss = f(sqv, s_os, xs, ys)
        losses.append(float(loss))
    np.testing.assert_allclose(losses, ref_loss, rtol=1e-5)
    chex_close = lambda a, b: np.testing.assert_allclose(
        np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6
    )
    jax.tree_util.tree_map(chex_close, sqv["params"], ref_qv["params"])
    jax.tree_util.tree_map(chex_close, sqv["state"]["ranges"], ref_qv["state"]["ranges"])
    assert sqv["params"]["Dense_0"]["kernel"].sharding.spec == P(None, "model")
    # the trained variables convert to a sharded int8 model equal to the one-device one
    a = jq.convert(m, sqv, rules())
    b = jq.convert(m, ref_qv, rules())
    np.testing.assert_allclose(
        np.asarray(jq.apply(m, a, xs)), np.asarray(jq.apply(m, b, X)), rtol=1e-5, atol=1e-5
    )


# ------------------------------------------------------------------------------------------
# 3. distributed calibration equals calibration on the concatenated data
# ------------------------------------------------------------------------------------------
def _data(seed=0, shape=(64, 12)):
    k1, k2 = jax.random.split(jax.random.key(seed))
    # shards with different ranges: each data shard (8 rows) has its own scale and offset
    rows = jnp.repeat(jnp.arange(8.0), shape[0] // 8)[:, None]
    return jax.random.normal(k1, shape) * (1 + rows) + rows - 3.0


OBSERVERS = [
    ("minmax_channel", cal.MinMax(axis=-1)),
    ("ema", cal.MovingAverageMinMax(averaging_constant=0.3)),
    ("hist_entropy", cal.Histogram(num_bins=128, method="entropy")),
    ("hist_mse_channel", cal.Histogram(num_bins=64, method="mse", axis=-1)),
    (
        "hist_percentile_sym",
        cal.Histogram(num_bins=256, method="percentile", percentile=99.0, symmetric=True),
    ),
]


def _assert_states_equal(a, b, exact_count=True):
    for name, x, y in zip(a._fields, a, b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=name)


@pytest.mark.parametrize("name,obs", OBSERVERS, ids=[o[0] for o in OBSERVERS])
def test_sharded_update_equals_full_batch(name, obs):
    x1, x2 = _data(0), _data(1) * 3.0  # the second batch widens the range (histograms re-bin)
    full = obs.init(x1)
    shard = obs.init(x1)
    for x in (x1, x2):
        full = jax.jit(obs.update)(full, x)
        shard = js.sharded_update(
            obs, shard, jax.device_put(x, ns(("data", "model"))), MESH, axis_name=("data", "model")
        )
    _assert_states_equal(shard, full)
    for a, b in zip(obs.range(shard), obs.range(full)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_per_shard_states_merge_to_full_data():
    """vmap over shards, then merge: exact for MinMax; histograms agree on a common range first."""
    x = _data(2)
    shards = x.reshape(4, 16, 12)
    mm = cal.MinMax(axis=-1)
    states = jax.jit(jax.vmap(mm.update, in_axes=(None, 0)))(mm.init(shards[0]), shards)
    merged = js.merge_states(mm, states)
    full = jax.jit(mm.update)(mm.init(x), x)
    np.testing.assert_array_equal(merged.lo, full.lo)
    np.testing.assert_array_equal(merged.hi, full.hi)
    hist = cal.Histogram(num_bins=128, method="percentile", percentile=99.9)
    common = js.with_common_range(hist, hist.init(shards[0]), x.min(), x.max())
    states = jax.jit(jax.vmap(hist.update, in_axes=(None, 0)))(common, shards)
    merged = jax.jit(js.merge_states, static_argnums=0)(hist, states)
    full = jax.jit(hist.update)(hist.init(x), x)
    np.testing.assert_array_equal(merged.counts, full.counts)
    np.testing.assert_array_equal(merged.width, full.width)
    np.testing.assert_array_equal(merged.offset, full.offset)
    assert int(merged.counts.sum()) == x.size
    np.testing.assert_array_equal(hist.range(merged), hist.range(full))
    # other observers ignore a common range
    assert js.with_common_range(mm, states, 0.0, 1.0) is states


def test_sharded_update_counts_nonfinite_once():
    obs = cal.MinMax(nonfinite="ignore")
    x = _data(3).at[40, 2].set(jnp.nan)
    st = js.sharded_update(obs, obs.init(x), jax.device_put(x, ns("data")), MESH)
    assert int(st.nonfinite) == 1 and int(st.count) == 1
    hist = cal.Histogram(num_bins=64, method="percentile", nonfinite="ignore")
    st = js.sharded_update(hist, hist.init(x), jax.device_put(x, ns("data")), MESH)
    assert int(st.nonfinite) == 1 and int(st.counts.sum()) == x.size - 1


def test_sharded_update_bad_input():
    x = _data(0)
    with pytest.raises(ValueError, match="is the observer's channel axis"):
        js.sharded_update(cal.MinMax(axis=0), cal.MinMax(axis=0).init(x), x, MESH)
    with pytest.raises(ValueError, match="does not split into 8 shards"):
        js.sharded_update(cal.MinMax(), cal.MinMax().init(x[:4]), x[:4], MESH, ("data", "model"))
    with pytest.raises(ValueError, match="batch_axis=2 is out of range"):
        js.sharded_update(cal.MinMax(), cal.MinMax().init(x), x, MESH, batch_axis=2)
    with pytest.raises(TypeError, match="has no merge method"):
        js.merge_states(object(), {"a": jnp.zeros((2,))})
    with pytest.raises(ValueError, match="leading axis of shards"):
        js.merge_states(cal.MinMax(), cal.MinMax().init(jnp.ones(())))


@pytest.mark.parametrize(
    "obs",
    [cal.MinMax(), cal.Histogram(num_bins=128, method="entropy")],
    ids=["minmax", "histogram"],
)
def test_model_calibration_on_sharded_batches_equals_one_device(linen, obs):
    m, v = linen
    r = [
        jq.Rule(
            ".*",
            weight=jq.QuantSpec("int8", axis=-1),
            activation=jq.QuantSpec("int8", calibration=obs),
        )
    ]
    batches = [_data(s, (16, 32)) for s in range(3)]
    ref = jq.calibrate(m, v, r, batches, progress=False)
    got = jq.calibrate(
        m,
        jax.device_put(v, ns()),
        r,
        [jax.device_put(b, ns("data")) for b in batches],
        progress=False,
    )
    for k in ref.states:
        _assert_states_equal(got.states[k], ref.states[k])
        # replicated, so `range` can read them on every host
        assert all(a.sharding.is_fully_replicated for a in jax.tree_util.tree_leaves(got.states[k]))
    assert ref.ranges().keys() == got.ranges().keys()


@pytest.mark.parametrize("layout", ["dp", "column", "megatron"])
def test_calibration_with_sharded_kernels_is_exact_or_within_one_ulp(linen, layout):
    """What the README's sharded-calibration example promises: the one-device ranges bit for
    bit with replicated kernels; with split kernels within one float32 ulp (a device runs its
    slice of a column-parallel dot with a kernel of another shape, and a row-parallel dot,
    Megatron's second layer, sums partial products across devices in another order)."""
    m, v = linen
    batches = [_data(s, (16, 32)) for s in range(2)]
    ref = jq.calibrate(m, v, rules(), batches, progress=False).ranges()
    got = jq.calibrate(
        m, place_float(v, layout), rules(), [jax.device_put(b, ns("data")) for b in batches],
        progress=False,
    ).ranges()  # fmt: skip
    assert got.keys() == ref.keys()
    for k in ref:
        for a, b in zip(got[k], ref[k]):
            if layout != "dp":
                np.testing.assert_array_max_ulp(np.asarray(a), np.asarray(b), maxulp=1)
            else:
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=k)


# ------------------------------------------------------------------------------------------
# Flax logical-axis metadata carries through
# ------------------------------------------------------------------------------------------
def test_linen_logical_partitioning_carries_to_quantized_variables():
    m = LogicalMLP()
    v = m.init(jax.random.key(0), X)  # kernels are nn.LogicallyPartitioned boxes
    stats = jq.calibrate(m, v, rules("int4"), [X], progress=False)
    qv = jq.convert(m, v, rules("int4"), stats)
    specs = jfs.logical_specs(qv, v)
    assert specs["params/Dense_0/kernel"].value == P("embed", "mlp")
    assert specs["params/Dense_0/kernel"].scale == P(None, "mlp")
    assert specs["params/Dense_1/kernel"].scale == P(None, "embed")
    assert specs["params/Dense_0/bias"] == P()
    logical_rules = (("mlp", "model"), ("embed", None))
    qs = jfs.shard_logical(qv, v, MESH, logical_rules)
    assert qs.variables["params/Dense_0/kernel"].value.sharding.spec == P(None, "model")
    assert qs.variables["params/Dense_0/kernel"].scale.sharding.spec == P(None, "model")
    assert qs.variables["params/Dense_1/kernel"].value.sharding.spec == P("model", None)
    # the same shardings Flax gives the float variables
    float_sh = nn.logical_to_mesh_sharding(nn.get_partition_spec(v), MESH, logical_rules)
    assert float_sh["params"]["Dense_1"]["kernel"].spec == P("model", None)
    f = jax.jit(lambda q, x: jq.apply(m, q, x))
    np.testing.assert_allclose(
        np.asarray(f(qs, jax.device_put(X, ns("data")))), np.asarray(f(qv, X)), rtol=1e-6, atol=1e-6
    )


def test_nnx_sharding_annotations_carry_to_quantized_variables():
    with jax.set_mesh(MESH):
        model = NnxMLP(nnx.Rngs(0))  # eager sharding: the kernels live on the mesh
    assert jfs.float_logical_specs(model)["l1/kernel"] == P(None, "model")
    stats = jq.calibrate(model, None, rules("int4"), [X], progress=False)
    qv = jq.convert(model, None, rules("int4"), stats)
    assert qv.variables["l1/kernel"].value.sharding.spec == P(None, "model")
    assert qv.variables["l1/kernel"].scale.sharding.spec == P(None, "model")
    assert qv.variables["l2/kernel"].value.sharding.spec == P("model", None)
    qs = jfs.shard_logical(qv, model, MESH)
    assert qs.variables["l2/kernel"].scale.sharding.spec == P(None, None)
    # the module's own (sharded) state works as the float shardings too
    qs2 = jfs.shard_qvars(jax.device_get(qv), nnx.state(model))
    for path in qv.variables:
        assert [a.sharding.spec for a in jax.tree_util.tree_leaves(qs2.variables[path])] == [
            a.sharding.spec for a in jax.tree_util.tree_leaves(qs.variables[path])
        ], path
    y = jax.jit(lambda q, x: jq.apply(model, q, x))(qs, jax.device_put(X, ns("data")))
    ref = jq.apply(model, jax.device_get(qv), X)
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-6, atol=1e-6)


def test_logical_specs_bad_input(linen):
    m, v = linen
    qv = jq.convert(m, v, rules(static=False), args=(X,))
    with pytest.raises(TypeError, match="linen variables or an nnx Module"):
        jfs.float_logical_specs(3)
    lv = LogicalMLP().init(jax.random.key(0), jnp.ones((2, 8)))
    other = {"params": {**lv["params"], "Extra": lv["params"]["Dense_0"]}}
    with pytest.raises(ValueError, match="annotated paths that `qvars` lacks"):
        jfs.logical_specs(qv, other)


def test_exported_tpu_and_cuda_modules_keep_sharded_int8_dots(linen):
    """For pods: the exported module has i8 x i8 -> i32 dots and the int8 kernel's mesh sharding."""
    m, v = linen
    qv = jq.convert(m, v, rules(), jq.calibrate(m, v, rules(), [X], progress=False))
    sh = jfs.qvars_shardings(qv, LAYOUTS["megatron"], mesh=MESH)
    f = jax.jit(lambda q, x: jq.apply(m, q, x), in_shardings=(sh, ns("data")))
    for platform in ("tpu", "cuda"):
        exp = jax.export.export(f, platforms=(platform,))(
            jax.device_put(qv, sh), jax.device_put(X, ns("data"))
        )
        txt = exp.mlir_module()
        assert exp.nr_devices == 8
        assert len(jq.hlo.integer_ops(txt)) == 2 and jq.hlo.float_ops(txt) == [], platform
        # the (32, 64) int8 kernel argument is split on "model" along its output features,
        # stored (K, N) or (N, K) as convert chose for this CPU (jq.lowering.weight_layout)
        nk = qv.plan.sites[0].weight_perm is not None
        t, spec = ("64x32", '{"model"}, {}') if nk else ("32x64", '{}, {"model"}')
        arg = re.search(
            rf"tensor<{t}xi8> \{{sdy\.sharding = #sdy\.sharding<@mesh, \[([^\]]*)\]", txt
        )
        assert arg is not None and arg.group(1) == spec, platform


def test_merge_stats_of_independent_calibrations(linen):
    """Per-host calibration on disjoint batches, merged: MinMax equals calibrating on all of them."""
    m, v = linen
    batches = [_data(s, (16, 32)) for s in range(4)]
    r = rules()
    a = jq.calibrate(m, v, r, batches[:1], progress=False)
    b = jq.calibrate(m, v, r, batches[1:], progress=False)
    full = jq.calibrate(m, v, r, batches, progress=False)
    merged = jfs.merge_stats(a, b)
    assert merged.num_batches == 4
    for k in full.states:
        _assert_states_equal(merged.states[k], full.states[k])
    y = jq.apply(m, jq.convert(m, v, r, merged), X)
    np.testing.assert_array_equal(
        np.asarray(y), np.asarray(jq.apply(m, jq.convert(m, v, r, full), X))
    )
    with pytest.raises(ValueError, match="two or more CalibrationStats"):
        jfs.merge_stats(a)
    other = jq.calibrate(
        m,
        v,
        [
            jq.Rule(
                "Dense_0",
                weight=jq.QuantSpec("int8", axis=-1),
                activation=jq.QuantSpec("int8", calibration=cal.MinMax()),
            )
        ],
        batches[:1],
        progress=False,
    )
    with pytest.raises(ValueError, match="different sites or observers"):
        jfs.merge_stats(a, other)


def test_explicit_axis_types_mesh_through_auto_axes(linen):
    """`jax.make_mesh` defaults to Explicit axes; jq.apply runs there inside `jax.sharding.auto_axes`."""
    m, v = linen
    qv = jq.convert(m, v, rules(), jq.calibrate(m, v, rules(), [X], progress=False))
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
    with jax.set_mesh(mesh):
        qs = jfs.shard_qvars(qv, LAYOUTS["megatron"], mesh=mesh)
        f = jax.jit(jax.sharding.auto_axes(lambda q, x: jq.apply(m, q, x), out_sharding=P("data")))
        y = f(qs, jax.device_put(X, NamedSharding(mesh, P("data"))))
    assert y.sharding.spec[0] == "data"
    np.testing.assert_allclose(np.asarray(y), np.asarray(jq.apply(m, qv, X)), rtol=1e-6, atol=1e-6)


def test_convert_warns_when_int4_bytes_cannot_follow_the_float_split():
    m = nn.Dense(12)  # 12 output features over 4 devices: 3 each, an odd number of nibbles
    v = m.init(jax.random.key(0), X)
    fv = {
        "params": {
            "kernel": jax.device_put(v["params"]["kernel"], ns(None, "model")),
            "bias": jax.device_put(v["params"]["bias"], ns("model")),
        }
    }
    with pytest.warns(UserWarning, match="cannot follow its float sharding"):
        qv = jq.convert(m, fv, rules("int4", static=False), args=(X,))
    ref = jq.convert(m, v, rules("int4", static=False), args=(X,))
    np.testing.assert_array_equal(
        np.asarray(qv.variables["params/kernel"].value),
        np.asarray(ref.variables["params/kernel"].value),
    )
    np.testing.assert_allclose(
        np.asarray(jax.jit(lambda q, x: jq.apply(m, q, x))(qv, X)),
        np.asarray(jq.apply(m, ref, X)),
        rtol=1e-6,
        atol=1e-6,
    )
