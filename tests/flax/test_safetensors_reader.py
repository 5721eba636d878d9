"""safetensors checkpoints: a round trip, and a reader that knows only safetensors + numpy."""

import json

import jax
import numpy as np
import pytest
from models import MLP

import jq

safetensors = pytest.importorskip("safetensors", reason="the optional safetensors extra")
from safetensors import safe_open  # noqa: E402


def read_dequantized(path) -> dict[str, np.ndarray]:
    """What another tool does with the file: numpy only, guided by the JSON metadata."""
    with safe_open(str(path), framework="numpy") as f:
        meta = json.loads(f.metadata()["jq"])
        t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    out = {}
    for name, d in meta["variables"].items():
        q, v = d.get("qarray"), t[d["key"]]
        if q is None:
            out[name] = v
            continue
        shape = tuple(q["shape"])
        if q["pack_axis"] is not None:  # two nibbles per byte, element 2i low
            ax = q["pack_axis"] % len(shape)
            lo, hi = (v & 0xF).astype(np.int8), (v >> 4).astype(np.int8)
            if q["format"] == "int4":
                lo, hi = (lo ^ 8) - 8, (hi ^ 8) - 8
            v = np.stack([lo, hi], axis=ax + 1).reshape(
                v.shape[:ax] + (2 * v.shape[ax],) + v.shape[ax + 1 :]
            )
            v = np.take(v, np.arange(shape[ax]), axis=ax)

        def expand(p, shape=shape):
            for a, n in enumerate(shape):
                if p.shape[a] not in (1, n):
                    p = np.repeat(p, n // p.shape[a], axis=a)
            return p

        x = v.astype(np.float32)
        if q["zero_point"]:
            x = x - expand(t[d["key"] + ".zero_point"]).astype(np.float32)
        out[name] = x * expand(t[d["key"] + ".scale"])
    return out


def test_reader_without_jq_matches_dequantize_and_round_trip(tmp_path):
    m = MLP(hidden=16, out=5)
    xs = [np.random.RandomState(0).randn(4, 8).astype(np.float32)]
    v = m.init(jax.random.key(0), xs[0])
    rules = [
        jq.Rule("Dense_0", weight=jq.QuantSpec("int4", axis=-1, block_axis=0, block_size=4)),
        jq.Rule(
            "Dense_1",
            weight=jq.QuantSpec("uint8", scheme="affine", axis=-1),
            activation=jq.QuantSpec("int8", calibration=jq.calibration.MinMax()),
        ),
    ]
    qm = jq.quantize_model(m, v, xs, rules, progress=False)
    path = tmp_path / "mlp.safetensors"
    qm.save(path, format="safetensors")
    assert path.read_bytes()[8:9] == b"{"  # a safetensors header, no pickle
    got = read_dequantized(path)
    for name, w in qm.variables.variables.items():
        want = jq.dequantize(w) if isinstance(w, jq.QArray) else w
        np.testing.assert_array_equal(got[name], np.asarray(want), err_msg=name)
    meta = json.loads(safe_open(str(path), framework="numpy").metadata()["jq"])
    q0 = meta["variables"]["params/Dense_0/kernel"]["qarray"]
    assert (q0["format"], q0["block_axis"], q0["block_size"], q0["axis"]) == ("int4", 0, 4, [1])
    assert meta["variables"]["params/Dense_1/kernel"]["qarray"]["scheme"] == "affine"
    back = jq.load_model(path, m)
    for a, b in zip(
        jax.tree_util.tree_leaves(back.variables), jax.tree_util.tree_leaves(qm.variables)
    ):
        assert np.asarray(a).dtype == np.asarray(b).dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(back.apply(xs[0])), np.asarray(qm.apply(xs[0])))


def test_bfloat16_and_fp8_arrays_travel_as_bits(tmp_path):
    m = MLP(hidden=16, out=5)
    x = np.random.RandomState(1).randn(2, 8).astype(np.float32)
    v = m.init(jax.random.key(0), x)
    qm = jq.quantize_model(m, v, [x], jq.presets.fp8(), progress=False)
    qm.save(tmp_path / "f.safetensors", format="safetensors")
    back = jq.load_model(tmp_path / "f.safetensors", m)
    w, w2 = (
        qm.variables.variables["params/Dense_0/kernel"],
        back.variables.variables["params/Dense_0/kernel"],
    )
    assert w2.value.dtype == w.value.dtype == jax.numpy.float8_e4m3fn
    np.testing.assert_array_equal(np.asarray(back.apply(x)), np.asarray(qm.apply(x)))
