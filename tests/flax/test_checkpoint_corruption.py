"""Damaged checkpoints never load: each damage raises a ValueError that names its cause.

One small model is quantized and saved once per format (safetensors and orbax),
plus a second checkpoint of other weights to mix in; each case damages a copy
(bit flips, header and metadata edits, truncation, tensors swapped between
names and files, missing and extra tensors, dtype changes) and `jq.load_model`
must refuse it with an error naming the tensor (or the metadata) at fault.
"""

import dataclasses
import gc
import json
import os
import shutil

import chex
import flax.linen as nn
import jax
import numpy as np
import pytest

import jq

pytest.importorskip("safetensors", reason="the optional safetensors extra")
pytest.importorskip("orbax.checkpoint", reason="jq checkpoints need orbax-checkpoint")
from safetensors.numpy import load_file, save_file  # noqa: E402


class Chain3(nn.Module):
    @nn.compact
    def __call__(self, x):
        for _ in range(3):
            x = nn.relu(nn.Dense(16)(x))
        return x


RULES = [
    jq.Rule("Dense_[01]", activation=jq.QuantSpec("int8", calibration=jq.calibration.MinMax())),
    jq.Rule("Dense_2", weight=jq.QuantSpec("int4", axis=-1, block_axis=0, block_size=8)),
]
K0, K1, K2 = (f"params/Dense_{i}/kernel" for i in range(3))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = tmp_path_factory.mktemp("ck")
    m = Chain3()
    x = np.random.RandomState(0).randn(8, 16).astype(np.float32)
    v = m.init(jax.random.key(0), x)
    other = jax.tree_util.tree_map(lambda a: 1.5 * a + 0.01, v)
    for name, vv in (("a", v), ("b", other)):
        qm = jq.quantize_model(m, vv, [x], RULES, progress=False)
        qm.save(d / f"{name}.safetensors", format="safetensors")
        qm.save(d / name)
        if name == "a":
            ref = qm
    return m, d, ref


# ----------------------------------------------------------------------------- helpers
def _st_split(path):
    raw = open(path, "rb").read()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _st_join(path, header, data):
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    open(path, "wb").write(len(h).to_bytes(8, "little") + h + data)


def _flip_in_tensor(name, byte=0, bit=3):
    def damage(p, _):
        header, data = _st_split(p)
        start = header[name]["data_offsets"][0] + byte
        data = bytearray(data)
        data[start] ^= 1 << bit
        _st_join(p, header, bytes(data))

    return damage


def _flip_byte(offset, bit=0):
    def damage(p, _):
        raw = bytearray(open(p, "rb").read())
        raw[offset] ^= 1 << bit
        open(p, "wb").write(bytes(raw))

    return damage


def _header_edit(name, **fields):
    def damage(p, _):
        header, data = _st_split(p)
        header[name].update(fields)
        _st_join(p, header, data)

    return damage


def _raw_replace(old: bytes, new: bytes, file=None):
    def damage(p, _):
        f = os.path.join(p, file) if file else p
        raw = open(f, "rb").read()
        assert old in raw, old
        open(f, "wb").write(raw.replace(old, new, 1))

    return damage


def _st_resave(edit_tensors=None, edit_meta=None, keep_meta=True):
    """Rewrites the file through safetensors: tensors and / or the jq document edited."""

    def damage(p, other):
        from safetensors import safe_open

        with safe_open(p, framework="numpy") as f:
            md = f.metadata()
        t = load_file(p)
        if edit_tensors:
            edit_tensors(t, load_file(other))
        meta = json.loads(md["jq"])
        if edit_meta:
            meta = edit_meta(meta, other)
        save_file(t, p, metadata={"jq": json.dumps(meta)} if keep_meta else None)

    return damage


def _swap(a, b):
    def edit(t, _):
        t[a], t[b] = t[b], t[a]

    return edit


def _other_meta(meta, other):
    from safetensors import safe_open

    with safe_open(other, framework="numpy") as f:
        return json.loads(f.metadata()["jq"])


def _describe(key, **fields):
    def edit(meta, _):
        meta["tensors"][key].update(fields)
        return meta

    return edit


def _flip_perm(key):
    """The tensor's recorded layout changed: (K, N) read as (N, K) or the other way round."""

    def edit(meta, _):
        d = meta["tensors"][key]
        d["perm"] = [0, 1] if d.get("perm") == [1, 0] else [1, 0]
        return meta

    return edit


def _truncate(n, file=None):
    def damage(p, _):
        f = p if file is None else _data_file(p)
        raw = open(f, "rb").read()
        open(f, "wb").write(raw[: n if n > 0 else len(raw) + n])

    return damage


def _data_file(p):
    """orbax's merged data file (``arrays/d/<hash>``), the one its manifest reads."""
    d = os.path.join(p, "arrays", "d")
    (name,) = os.listdir(d)
    return os.path.join(d, name)


def _ob_flip(p, _):
    f = _data_file(p)
    raw = bytearray(open(f, "rb").read())
    raw[len(raw) // 2] ^= 0x10
    open(f, "wb").write(bytes(raw))


def _ob_meta(edit):
    def damage(p, other):
        with open(os.path.join(p, "jq_meta.json")) as f:
            meta = json.load(f)
        meta = edit(meta, other)
        with open(os.path.join(p, "jq_meta.json"), "w") as f:
            json.dump(meta, f, indent=1)

    return damage


def _ob_key(meta, name):
    return meta["variables"][name]


def _ob_describe(name, **fields):
    def edit(meta, _):
        meta["tensors"][_ob_key(meta, name)].update(fields)
        return meta

    return edit


def _ob_copy(what):
    def damage(p, other):
        src = os.path.join(other, what)
        dst = os.path.join(p, what)
        (shutil.rmtree if os.path.isdir(dst) else os.remove)(dst)
        (shutil.copytree if os.path.isdir(src) else shutil.copy)(src, dst)

    return damage


def _ob_resave(edit):
    """Rewrites the orbax arrays with `edit` applied to the ``{key: array}`` dict (as a user
    re-saving a checkpoint with orbax would), keeping jq_meta.json."""

    def damage(p, _):
        import orbax.checkpoint as ocp

        with ocp.StandardCheckpointer() as c:
            arrays = {k: np.asarray(a) for k, a in c.restore(os.path.join(p, "arrays")).items()}
        with open(os.path.join(p, "jq_meta.json")) as f:
            meta = json.load(f)
        edit(arrays, meta)
        shutil.rmtree(os.path.join(p, "arrays"))
        with ocp.StandardCheckpointer() as c:
            c.save(os.path.join(p, "arrays"), arrays)

    return damage


def _ob_drop(name, suffix=""):
    def edit(arrays, meta):
        del arrays[_ob_key(meta, name) + suffix]

    return edit


def _ob_add(arrays, meta):
    arrays["v99"] = np.zeros(3, np.float32)


def _ob_relabel(arrays, meta):
    k = _ob_key(meta, K0)
    arrays[k] = arrays[k].view(np.uint8)  # the same bytes, read as uint8


ST_CASES = {
    "bit flip in a kernel": (_flip_in_tensor(K0, 5), rf"tensor '{K0}'.*SHA-256"),
    "bit flip in a scale": (_flip_in_tensor(K1 + ".scale", 2, 6), rf"'{K1}\.scale'.*SHA-256"),
    "bit flip in an int4 kernel": (_flip_in_tensor(K2, 17, 7), rf"tensor '{K2}'.*SHA-256"),
    "bit flip in an activation scale": (
        _flip_in_tensor("activation/Dense_0/kernel.scale", 1),
        r"'activation/Dense_0/kernel\.scale'.*SHA-256",
    ),
    "bit flip in the last byte": (_flip_byte(-1, 4), r"SHA-256"),
    "bit flip in the header's JSON": (_flip_byte(8, 1), r"header .* is not valid JSON"),
    "bit flip in the header length": (_flip_byte(5, 2), r"not a complete safetensors file"),
    "header dtype I8 -> U8": (_header_edit(K0, dtype="U8"), rf"'{K0}'.*header dtype U8"),
    "header shape edited": (_header_edit(K2, shape=[4, 32]), rf"'{K2}'.*shape \[4, 32\]"),
    "metadata: first format int8 -> int4": (
        _raw_replace(b'\\"format\\": \\"int8\\"', b'\\"format\\": \\"int4\\"'),
        r"metadata .* does not match its SHA-256",
    ),
    "metadata: a kernel's format int8 -> int4": (
        _st_resave(edit_meta=_describe(K0, format="int4")),
        rf"description of tensor '{K0}'.*SHA-256",
    ),
    "metadata: a kernel's layout perm changed": (
        _st_resave(edit_meta=_flip_perm(K1)),
        rf"description of tensor '{K1}'",
    ),
    "metadata: model_kwargs edited": (
        _st_resave(edit_meta=lambda meta, _: {**meta, "model_kwargs": {"train": True}}),
        r"metadata .* does not match its SHA-256",
    ),
    "metadata: version edited": (
        _raw_replace(b'\\"jq_checkpoint_version\\": 2', b'\\"jq_checkpoint_version\\": 1'),
        r"version 1 .* not supported",
    ),
    "metadata removed": (_st_resave(keep_meta=False), r"without jq metadata"),
    "metadata of another checkpoint": (_st_resave(edit_meta=_other_meta), r"SHA-256"),
    "truncated data": (_truncate(-7), r"truncated"),
    "truncated header": (_truncate(100), r"not a complete safetensors file"),
    "kernels swapped between names": (
        _st_resave(edit_tensors=_swap(K0, K1)),
        rf"tensor '{K0}'.*SHA-256",
    ),
    "scales swapped between names": (
        _st_resave(edit_tensors=_swap(K0 + ".scale", K1 + ".scale")),
        rf"'{K0}\.scale'.*SHA-256",
    ),
    "a kernel from another file": (
        _st_resave(edit_tensors=lambda t, o: t.update({K1: o[K1]})),
        rf"tensor '{K1}'.*SHA-256",
    ),
    "a missing tensor": (
        _st_resave(edit_tensors=lambda t, o: t.pop(K1 + ".scale")),
        rf"'{K1}\.scale'.*not stored",
    ),
    "an extra tensor": (
        _st_resave(edit_tensors=lambda t, o: t.update(extra=np.zeros(2, np.float32))),
        r"tensor 'extra' is stored .* not described",
    ),
}
OB_CASES = {
    "jq_meta.json: first format int8 -> int4": (
        _raw_replace(b'"format": "int8"', b'"format": "int4"', "jq_meta.json"),
        r"metadata .* does not match its SHA-256",
    ),
    "jq_meta.json: a kernel's format int8 -> int4": (
        _ob_meta(_ob_describe(K0, format="int4")),
        r"description of tensor 'v\d+'.*SHA-256",
    ),
    "jq_meta.json: a site's mode edited": (
        _raw_replace(b'"mode": "static"', b'"mode": "dynamic"', "jq_meta.json"),
        r"metadata .* does not match its SHA-256",
    ),
    "jq_meta.json truncated": (
        lambda p, o: _truncate(200)(os.path.join(p, "jq_meta.json"), o),
        r"not valid JSON",
    ),
    "jq_meta.json missing": (
        lambda p, o: os.remove(os.path.join(p, "jq_meta.json")),
        r"not a jq checkpoint",
    ),
    "jq_meta.json of another checkpoint": (_ob_copy("jq_meta.json"), r"SHA-256"),
    "arrays of another checkpoint": (_ob_copy("arrays"), r"SHA-256"),
    "bit flip in the data file": (_ob_flip, r"orbax could not read|SHA-256"),
    "truncated data file": (_truncate(-50, "data"), r"orbax could not read|truncated"),
    "a missing tensor": (_ob_resave(_ob_drop(K1, ".scale")), r"'v\d+\.scale'.*not stored"),
    "an extra tensor": (_ob_resave(_ob_add), r"tensor 'v99' is stored .* not described"),
    "a kernel stored as uint8": (_ob_resave(_ob_relabel), r"'v\d+' \(quantized of .*uint8"),
}


@pytest.mark.parametrize("case", sorted(ST_CASES))
def test_damaged_safetensors_never_loads(saved, tmp_path, case):
    m, d, _ = saved
    damage, match = ST_CASES[case]
    p = str(tmp_path / "c.safetensors")
    shutil.copy(d / "a.safetensors", p)
    damage(p, str(d / "b.safetensors"))
    with pytest.raises(ValueError, match=match):
        jq.load_model(p, m)


# orbax leaves callbacks of a failed read behind, which report "Event loop is closed" when
# collected: collect them here, inside the test that caused them
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("case", sorted(OB_CASES))
def test_damaged_orbax_never_loads(saved, tmp_path, case):
    m, d, _ = saved
    damage, match = OB_CASES[case]
    p = str(tmp_path / "c")
    shutil.copytree(d / "a", p)
    damage(p, str(d / "b"))
    with pytest.raises(ValueError, match=match):
        jq.load_model(p, m)
    gc.collect()


def test_undamaged_copies_load_bit_identical(saved, tmp_path):
    """The control: the same copy step without damage loads, in both formats."""
    m, d, ref = saved
    shutil.copy(d / "a.safetensors", tmp_path / "c.safetensors")
    shutil.copytree(d / "a", tmp_path / "c")
    for p in (tmp_path / "c.safetensors", tmp_path / "c"):
        chex.assert_trees_all_equal(jq.load_model(p, m).variables, ref.variables)


def test_colliding_tensor_names_are_refused(saved, tmp_path):
    _, _, ref = saved
    qv = ref.variables
    bad = dataclasses.replace(qv, variables={**qv.variables, K0 + ".scale": np.zeros(1)})
    with pytest.raises(ValueError, match=rf"two tensors would be named '{K0}\.scale'"):
        jq.QuantizedModel(ref.model, bad).save(tmp_path / "x.safetensors", format="safetensors")
