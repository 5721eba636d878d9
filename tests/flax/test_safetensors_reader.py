"""safetensors checkpoints read without jq: the README's numpy-only reader, run as printed.

`docs/readme/core.md` prints a reference reader (safetensors + numpy). This file
executes exactly that code block on a checkpoint of a chain of square Dense
layers, one per preset (`jq.presets.*`) plus one per other format jq writes
(uint8 affine, int16, fp8 e5m2, float16, bfloat16), with and without
``target="gpu"`` (kernels stored (N, K)), and of a bfloat16 model. Every float
parameter must come back in the model's layout within its quantization error,
measured against the original float parameter.
"""

import dataclasses
import os
import re

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jq

pytest.importorskip("safetensors", reason="the optional safetensors extra")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
D = 16  # every kernel (D, D): a transposed one has the right shape and the wrong values


def reader() -> dict:
    """The code block that follows "**Checkpoints.**" in docs/readme/core.md, executed."""
    with open(os.path.join(ROOT, "docs", "readme", "core.md")) as f:
        text = f.read().split("**Checkpoints.**", 1)[1]
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    ns: dict = {}
    exec(compile(code, "docs/readme/core.md:reader", "exec"), ns)  # noqa: S102
    return ns


class Chain(nn.Module):
    n: int

    @nn.compact
    def __call__(self, x):
        for _ in range(self.n):
            x = nn.tanh(nn.Dense(D)(x))
        return x


def _with_path(rules: list, i: int) -> jq.Rule:
    # a preset's first rule is its dot rule (weight-only presets add one for convs / embeddings)
    r = rules[0]
    assert "dot" in r.ops
    return dataclasses.replace(r, path_regex=f"Dense_{i}")


PRESETS = [
    jq.presets.w8a8_static(),
    jq.presets.w8a8_dynamic(),
    jq.presets.w8_weight_only(),
    jq.presets.w4_weight_only(group_size=8),
    jq.presets.w4_weight_only(group_size=None),
    jq.presets.fp8(),
]
FORMATS = [
    jq.Rule(
        ".*",
        weight=jq.QuantSpec("uint8", scheme="affine", axis=-1),
        activation=jq.QuantSpec("uint8", scheme="affine", calibration=jq.calibration.MinMax()),
    ),
    jq.Rule(".*", weight=jq.QuantSpec("int16", axis=-1)),
    jq.Rule(".*", weight=jq.QuantSpec("float8_e5m2", axis=-1)),
    jq.Rule(".*", weight=jq.QuantSpec("float16")),
    jq.Rule(".*", weight=jq.QuantSpec("bfloat16")),
]
RULES = [_with_path(p, i) for i, p in enumerate(PRESETS)]
RULES += [_with_path([r], len(PRESETS) + i) for i, r in enumerate(FORMATS)]


def _bound(w: np.ndarray, fmt: str) -> float:
    """The largest error quantizing `w` may make, from `w` alone: half a grid step of a
    per-tensor scale (per-channel and per-block scales are finer), or half an ulp."""
    amax = float(np.abs(w).max())
    levels = {"int8": 127, "uint8": 255 / 2, "int16": 32767, "int4": 7}
    if fmt in levels:
        return 0.5 * amax / levels[fmt] * (1 + 1e-5) + 1e-7
    mant = {"float8_e4m3fn": 3, "float8_e5m2": 2, "float16": 10, "bfloat16": 7}[fmt]
    return amax * 2.0 ** -(mant + 1) * (1 + 1e-5) + 1e-7


@pytest.fixture(scope="module")
def chain():
    m = Chain(len(RULES))
    xs = [np.random.RandomState(i).randn(4, D).astype(np.float32) for i in range(2)]
    return m, m.init(jax.random.key(0), xs[0]), xs


@pytest.mark.parametrize("target", [None, "gpu"])
def test_reference_reader_recovers_every_float_parameter(tmp_path, chain, target):
    m, v, xs = chain
    qm = jq.quantize_model(m, v, xs, RULES, progress=False, target=target)
    if target == "gpu":  # the layout this test is about: int8 / fp8 kernels stored (N, K)
        permuted = {s.leaf for s in qm.variables.plan.sites if s.weight_perm}
        assert {"params/Dense_0/kernel", "params/Dense_5/kernel"} <= permuted
    path = tmp_path / "m.safetensors"
    qm.save(path, format="safetensors")
    got = reader()["read"](str(path))
    flat = {
        "params/" + "/".join(k.key for k in p): np.asarray(a)
        for p, a in jax.tree_util.tree_flatten_with_path(v["params"])[0]
    }
    assert set(got) == set(flat)
    formats = set()
    for name, w in flat.items():
        q = qm.variables.variables[name]
        assert got[name].shape == w.shape, name
        if not isinstance(q, jq.QArray):
            np.testing.assert_array_equal(got[name], w, err_msg=name)
            continue
        formats.add(q.format)
        err = float(np.abs(got[name] - w).max())
        assert err <= _bound(w, q.format), (name, q.format, err, _bound(w, q.format))
    assert formats == {
        "int8",
        "uint8",
        "int16",
        "int4",
        "float8_e4m3fn",
        "float8_e5m2",
        "float16",
        "bfloat16",
    }
    back = jq.load_model(path, m).variables
    chex.assert_trees_all_equal(back, qm.variables)
    chex.assert_trees_all_equal_dtypes(back, qm.variables)  # float8 / bfloat16 come back as such


def test_reference_reader_on_a_bfloat16_model(tmp_path, chain):
    m, v, xs = chain
    vb = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), v)
    rules = [_with_path(jq.presets.w8_weight_only(), 0), _with_path(jq.presets.fp8(), 1)]
    qm = jq.quantize_model(m, vb, xs[:1], rules, progress=False, target="gpu")
    qm.save(tmp_path / "b.safetensors", format="safetensors")
    got = reader()["read"](str(tmp_path / "b.safetensors"))
    kept = np.asarray(vb["params"]["Dense_2"]["kernel"]).astype(np.float32)
    np.testing.assert_array_equal(got["params/Dense_2/kernel"], kept)  # bf16 bits, decoded
    w = np.asarray(vb["params"]["Dense_1"]["kernel"]).astype(np.float32)
    assert np.abs(got["params/Dense_1/kernel"] - w).max() <= _bound(w, "float8_e4m3fn") + 2**-8


def test_fp8_decoding_covers_every_bit_pattern():
    """The reader's float8 decoding against ml_dtypes on all 256 codes (NaN, inf, subnormals)."""
    decode = reader()["decode"]
    codes = np.arange(256, dtype=np.uint8)
    for dt in ("float8_e4m3fn", "float8_e5m2"):
        want = codes.view(getattr(ml_dtypes, dt)).astype(np.float32)
        got = decode(codes, {"encoding": "bits", "dtype": dt})
        np.testing.assert_array_equal(got, want, err_msg=dt)
    bf = np.array([0, 1, 0x7F80, 0xFF80, 0x7FC0, 0x3F80, 0x8001], np.uint16)
    np.testing.assert_array_equal(
        reader()["decode"](bf, {"encoding": "bits", "dtype": "bfloat16"}),
        bf.view(ml_dtypes.bfloat16).astype(np.float32),
    )
