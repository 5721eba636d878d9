"""Saving and restoring `QuantizedVariables` with orbax-checkpoint, specs included.

orbax keeps arrays but drops the static fields of custom pytrees (a QArray's
format, logical shape and packing axis; the site plan). jq therefore saves the
arrays as a flat ``{name: array}`` dict through orbax and the static parts as a
JSON file beside them (``jq_meta.json``). Restoring reads the JSON (no pickle,
no code execution) and the arrays, and rebuilds the exact pytree.
"""

from __future__ import annotations

import importlib
import json
import os

import jax
import numpy as np

from jq.flax.qvars import Plan, QuantizedVariables, SitePlan
from jq.qparams import QParams, QuantSpec
from jq.quantize import QArray

__all__ = ["decode", "encode", "restore", "restore_safetensors", "save", "save_safetensors"]

_FORMAT_VERSION = 1
_META = "jq_meta.json"
_ARRAYS = "arrays"


def _spec_to_json(spec: QuantSpec | None):
    if spec is None:
        return None
    return {
        "format": spec.format,
        "scheme": spec.scheme,
        "axis": list(spec.axis) if spec.axis is not None else None,
        "block_size": spec.block_size,
        "block_axis": spec.block_axis,
        "narrow_range": spec.narrow_range,
    }


def _spec_from_json(d):
    if d is None:
        return None
    axis = tuple(d["axis"]) if d["axis"] is not None else None
    return QuantSpec(
        d["format"],
        scheme=d["scheme"],
        axis=axis,
        block_size=d["block_size"],
        block_axis=d["block_axis"],
        narrow_range=d["narrow_range"],
    )


def _optional(module: str, extra: str):
    """Imports an optional dependency, or says which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"jq: this checkpoint format needs {module.split('.')[0]}: "
            f"pip install 'jq-quant[{extra}]'"
        ) from e


def _layout(q: QArray) -> dict:
    """What a reader needs to dequantize `q` without jq (``x = scale * (q - zero_point)``)."""
    shape, sshape = tuple(q.shape), tuple(np.shape(q.scale))
    axes = [a for a, (n, m) in enumerate(zip(shape, sshape)) if m == n and n > 1]
    blocks = [a for a, (n, m) in enumerate(zip(shape, sshape)) if m not in (1, n)]
    return {
        "format": q.format,
        "shape": list(shape),
        "pack_axis": q.pack_axis,
        "zero_point": q.zero_point is not None,
        "scheme": "affine" if q.zero_point is not None else "symmetric",
        "axis": axes or None,
        "block_axis": blocks[0] if blocks else None,
        "block_size": shape[blocks[0]] // sshape[blocks[0]] if blocks else None,
        "storage": np.dtype(q.value.dtype).name,
    }


def encode(qvars: QuantizedVariables, names: bool = False) -> tuple[dict, dict]:
    """``(arrays, meta)``: every array of `qvars` in a flat dict, and the JSON-able rest.

    Array keys are ``v<i>`` / ``a<i>`` / ``s<i>`` (orbax), or with ``names=True``
    the variable's path (``params/Dense_0/kernel``, then ``.scale`` and
    ``.zero_point``), ``activation/<site>.scale`` and ``smooth/<site>``.
    """
    if not isinstance(qvars, QuantizedVariables):
        raise TypeError(
            f"jq.flax.checkpoint.save: expected QuantizedVariables, got {type(qvars).__name__}"
        )
    arrays, leaves = {}, {}
    for i, (name, v) in enumerate(qvars.variables.items()):
        k = name if names else f"v{i}"
        if isinstance(v, QArray):
            arrays[k if names else k + ".value"] = v.value
            arrays[k + ".scale"] = v.scale
            if v.zero_point is not None:
                arrays[k + ".zero_point"] = v.zero_point
            leaves[name] = {"key": k, "qarray": _layout(v)}
        else:
            if hasattr(v, "dtype") and jax.dtypes.issubdtype(v.dtype, jax.dtypes.prng_key):
                leaves[name] = {"key": k, "prng_impl": str(jax.random.key_impl(v))}
                v = jax.random.key_data(v)
            else:
                leaves[name] = {"key": k}
            arrays[k] = v
    acts = {}
    for i, (name, qp) in enumerate(qvars.activations.items()):
        k = f"activation/{name}" if names else f"a{i}"
        arrays[k + ".scale"] = qp.scale
        if qp.zero_point is not None:
            arrays[k + ".zero_point"] = qp.zero_point
        acts[name] = {"key": k, "zero_point": qp.zero_point is not None}
    smooth = {}
    for i, (name, sv) in enumerate(qvars.smooth.items()):
        k = f"smooth/{name}" if names else f"s{i}"
        arrays[k] = sv
        smooth[name] = k
    p = qvars.plan
    meta = {
        "jq_checkpoint_version": _FORMAT_VERSION,
        "dequantize": "x = scale * (value - zero_point); scale and zero_point have the value's "
        "rank, size 1 on unscaled axes, and are repeated block_size times along block_axis; "
        "int4 / uint4 values are packed two per byte along pack_axis, element 2i in the low "
        "nibble (two's complement for int4)",
        "model_kind": p.model_kind,
        "signature": [[path_, list(shape)] for path_, shape in p.signature],
        "float_leaves": [[a, list(b), c] for a, b, c in p.float_leaves],
        "sites": [
            {
                "name": s.name,
                "kind": s.kind,
                "leaf": s.leaf,
                "mode": s.mode,
                "activation": _spec_to_json(s.activation),
                "rule_index": s.rule_index,
                "weight_perm": None if s.weight_perm is None else list(s.weight_perm),
                "note": s.note,
            }
            for s in p.sites
        ],
        "variables": leaves,
        "activations": acts,
        "smooth": smooth,
    }
    return arrays, meta


def save(path: str | os.PathLike, qvars: QuantizedVariables) -> None:
    """Saves `qvars` to the directory `path` (created; must not exist yet)."""
    arrays, meta = encode(qvars)
    path = os.path.abspath(os.fspath(path))
    os.makedirs(path, exist_ok=False)
    ocp = _optional("orbax.checkpoint", "checkpoint")
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(path, _ARRAYS), arrays)
    with open(os.path.join(path, _META), "w") as f:
        json.dump(meta, f, indent=1)


def restore(path: str | os.PathLike) -> QuantizedVariables:
    """Restores `QuantizedVariables` saved by `save`; arrays bit-identical to the saved ones."""
    path = os.path.abspath(os.fspath(path))
    meta_path = os.path.join(path, _META)
    if not os.path.exists(meta_path):
        raise ValueError(
            f"jq.flax.checkpoint.restore: {path!r} is not a jq checkpoint (no {_META})"
        )
    with open(meta_path) as f:
        meta = json.load(f)
    if meta.get("jq_checkpoint_version") != _FORMAT_VERSION:
        raise ValueError(
            "jq.flax.checkpoint.restore: checkpoint format version "
            f"{meta.get('jq_checkpoint_version')!r} is not supported (this jq reads version {_FORMAT_VERSION})"
        )
    ocp = _optional("orbax.checkpoint", "checkpoint")
    with ocp.StandardCheckpointer() as ckptr:
        arrays = ckptr.restore(os.path.join(path, _ARRAYS))
    return decode(meta, arrays)


def decode(meta: dict, arrays: dict) -> QuantizedVariables:
    """`QuantizedVariables` from `encode`'s two halves."""
    variables = {}
    for name, d in meta["variables"].items():
        k = d["key"]
        if "qarray" in d:
            q = d["qarray"]
            zp = arrays[k + ".zero_point"] if q["zero_point"] else None
            variables[name] = QArray(
                arrays[k + ".value"] if k + ".value" in arrays else arrays[k],
                arrays[k + ".scale"],
                zp,
                q["format"],
                tuple(q["shape"]),
                q["pack_axis"],
            )
        elif "prng_impl" in d:
            variables[name] = jax.random.wrap_key_data(np.asarray(arrays[k]), impl=d["prng_impl"])
        else:
            variables[name] = arrays[k]
    acts = {}
    for name, d in meta["activations"].items():
        k = d["key"]
        acts[name] = QParams(
            arrays[k + ".scale"], arrays[k + ".zero_point"] if d["zero_point"] else None
        )
    plan = Plan(
        meta["model_kind"],
        tuple((p, tuple(s)) for p, s in meta["signature"]),
        tuple(
            SitePlan(
                s["name"],
                s["kind"],
                s["leaf"],
                s["mode"],
                _spec_from_json(s["activation"]),
                s["rule_index"],
                None if s.get("weight_perm") is None else tuple(s["weight_perm"]),
                s.get("note"),
            )
            for s in meta["sites"]
        ),
        tuple((a, tuple(b), c) for a, b, c in meta["float_leaves"]),
    )
    smooth = {name: arrays[k] for name, k in meta.get("smooth", {}).items()}
    return QuantizedVariables(variables, acts, plan, smooth)


# ---------------------------------------------------------------------------------------
# safetensors: one file other tools can read
# ---------------------------------------------------------------------------------------
_ST_NATIVE = {"bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64"}
_ST_NATIVE |= {"float16", "float32", "float64"}


def save_safetensors(path: str | os.PathLike, qvars: QuantizedVariables) -> None:
    """Saves `qvars` as one ``.safetensors`` file (no pickle), readable without jq.

    Tensors are named by variable path: ``params/Dense_0/kernel`` holds the
    stored integers (int8, or int4 packed two per uint8), ``....scale`` and
    ``....zero_point`` its parameters; ``activation/<site>.scale`` the static
    activation parameters. The file's metadata ``"jq"`` is a JSON document
    (`encode`) whose ``variables[name]["qarray"]`` gives ``format``, ``scheme``,
    ``axis``, ``block_axis``, ``block_size``, ``zero_point`` and ``pack_axis``,
    and whose ``dequantize`` entry states the formula. Arrays of a type
    safetensors' numpy API does not know (bfloat16, float8) are stored as
    their raw bits (uint16 / uint8), named in ``meta["bits"]``.
    """
    st = _optional("safetensors.numpy", "safetensors")
    arrays, meta = encode(qvars, names=True)
    out, bits = {}, {}
    for k, v in arrays.items():
        a = np.asarray(v)
        if a.dtype.name not in _ST_NATIVE:
            bits[k] = a.dtype.name
            a = a.view(np.dtype(f"uint{8 * a.dtype.itemsize}"))
        out[k] = np.ascontiguousarray(a)
    meta["bits"] = bits
    st.save_file(out, os.fspath(path), metadata={"jq": json.dumps(meta)})


def restore_safetensors(path: str | os.PathLike) -> QuantizedVariables:
    """Restores `QuantizedVariables` saved by `save_safetensors`, arrays bit-identical."""
    _optional("safetensors.numpy", "safetensors")
    from safetensors import safe_open

    path = os.fspath(path)
    with safe_open(path, framework="numpy") as f:
        md = f.metadata() or {}
        if "jq" not in md:
            raise ValueError(f"jq.load_model: {path!r} is a safetensors file without jq metadata")
        arrays = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iterator)
    meta = json.loads(md["jq"])
    if meta.get("jq_checkpoint_version") != _FORMAT_VERSION:
        raise ValueError(
            f"jq.load_model: checkpoint format version {meta.get('jq_checkpoint_version')!r} is not "
            f"supported (this jq reads version {_FORMAT_VERSION})"
        )
    for k, name in meta.get("bits", {}).items():
        arrays[k] = arrays[k].view(jax.numpy.dtype(name))
    return decode(meta, {k: jax.numpy.asarray(v) for k, v in arrays.items()})
