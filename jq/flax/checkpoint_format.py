"""The checkpoint format: `QuantizedVariables` as named tensors, each described in full.

`encode` turns `QuantizedVariables` into ``(arrays, meta)``: a flat dict of
numpy arrays in a *storage* dtype that every container knows (safetensors'
numpy API, orbax), and a JSON document. `decode` checks and inverts it.

Every stored tensor ``t`` has an entry ``meta["tensors"][t]`` that says, with
no other part of the document:

* ``role``: ``"quantized"`` (a weight's codes), ``"scale"``, ``"zero_point"``,
  ``"kept"`` (a variable kept as it was), ``"prng_key"``, ``"activation_scale"``,
  ``"activation_zero_point"`` or ``"smooth"``; ``variable``: the model variable
  (or site) it belongs to;
* ``dtype`` (the element type it holds), ``storage`` (the numpy dtype written),
  ``encoding`` and ``shape`` (the stored shape). Encodings:
  ``"native"``: storage is the dtype. ``"bits"``: the bit patterns of a float
  type numpy lacks, in an unsigned integer of its width: bfloat16 is the upper
  half of a float32; float8_e4m3fn is sign | 4 exponent bits (bias 7) | 3
  mantissa bits, no infinities, NaN = exponent and mantissa all ones;
  float8_e5m2 is sign | 5 exponent bits (bias 15) | 2 mantissa bits, IEEE-style
  inf / NaN at exponent 31; exponent 0 is subnormal. ``"int4_packed"``: two
  4-bit codes per uint8 along ``pack_axis``, element ``2i`` in the low nibble,
  two's complement for int4; ``unpacked_shape`` gives the shape after
  unpacking (an odd length was padded with one zero);
* for ``"quantized"``: ``format``, ``scheme``, the names of its ``scale`` and
  ``zero_point`` tensors, ``scale_axes`` / ``block_axis`` / ``block_size``,
  and its layout relative to the float parameter it replaces: ``perm`` (None:
  the model's layout; else stored = ``transpose(float, perm)``, so float =
  ``transpose(stored, argsort(perm))``), ``float_shape`` and ``float_dtype``.
  The parameter is ``x = transpose(scale * (q - zero_point), argsort(perm))``,
  with scale and zero point (rank of q, size 1 on unscaled axes) repeated
  ``block_size`` times along ``block_axis``;
* ``sha256``: of the stored bytes (C order, little-endian), and
  ``description_sha256``: of the entry itself (`canonical` JSON without it).

The document as a whole is sealed by ``meta_sha256`` (`canonical` JSON without
it). `decode` checks the seals, then every tensor's dtype, shape and bytes, and
raises a ValueError that names the tensor at the first mismatch.
"""

from __future__ import annotations

import hashlib
import json

import jax
import numpy as np

from jq.flax.qvars import Plan, QuantizedVariables, SitePlan
from jq.qparams import QParams, QuantSpec
from jq.quantize import QArray

__all__ = ["FORMAT_VERSION", "canonical", "decode", "encode", "seal"]

FORMAT_VERSION = 2

#: dtypes that safetensors' numpy API and orbax both store as themselves
NATIVE = {"bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64"}
NATIVE |= {"float16", "float32", "float64"}

_DEQUANTIZE = (
    "float parameter = transpose(scale * (q - zero_point), argsort(perm)) for every tensor of "
    "role 'quantized' (see its entry in 'tensors'); scale and zero_point have q's rank, size 1 "
    "on unscaled axes, repeated block_size times along block_axis; tensors of encoding 'bits' "
    "hold bfloat16 / float8 bit patterns, 'int4_packed' two 4-bit codes per byte"
)


def canonical(doc) -> bytes:
    """The bytes a seal is computed over: sorted keys, no spaces, ASCII."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def seal(doc: dict, key: str) -> dict:
    """`doc` with ``doc[key]`` = the SHA-256 of the rest of it."""
    body = {k: v for k, v in doc.items() if k != key}
    return {**body, key: _sha(canonical(body))}


def _sealed(doc: dict, key: str) -> bool:
    return isinstance(doc, dict) and doc.get(key) == seal(doc, key)[key]


def tensor_sha(a: np.ndarray) -> str:
    """SHA-256 of an array's bytes in C order, little-endian (hashed in place, no copy)."""
    a = np.ascontiguousarray(a)
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    return _sha(a.reshape(-1).view(np.uint8).data)


# ---------------------------------------------------------------------------------------
# encode
# ---------------------------------------------------------------------------------------
def _store(a, role: str, variable: str) -> tuple[np.ndarray, dict]:
    """A numpy array in its storage dtype, and the common part of its description."""
    a = np.asarray(a)
    name = a.dtype.name
    if name in NATIVE:
        s, enc = a, "native"
    else:  # bfloat16, float8_*: their bit patterns
        s, enc = a.view(np.dtype(f"uint{8 * a.dtype.itemsize}")), "bits"
    s = np.ascontiguousarray(s)
    return s, {
        "role": role,
        "variable": variable,
        "dtype": name,
        "storage": s.dtype.name,
        "encoding": enc,
        "shape": list(s.shape),
        "sha256": tensor_sha(s),
    }


def _quantized(q: QArray, key: str, perm, float_leaf) -> dict:
    shape, sshape = tuple(q.shape), tuple(np.shape(q.scale))
    axes = [a for a, (n, m) in enumerate(zip(shape, sshape)) if m == n and n > 1]
    blocks = [a for a, (n, m) in enumerate(zip(shape, sshape)) if m not in (1, n)]
    inv = None if perm is None else [int(i) for i in np.argsort(perm)]
    fshape = shape if inv is None else tuple(shape[i] for i in inv)
    d = {
        "format": q.format,
        "scheme": "affine" if q.zero_point is not None else "symmetric",
        "scale": key + ".scale",
        "zero_point": key + ".zero_point" if q.zero_point is not None else None,
        "scale_axes": axes or None,
        "block_axis": blocks[0] if blocks else None,
        "block_size": shape[blocks[0]] // sshape[blocks[0]] if blocks else None,
        "unpacked_shape": list(shape),
        "pack_axis": None,
        "perm": None if perm is None else [int(p) for p in perm],
        "float_shape": list(float_leaf[1]) if float_leaf else list(fshape),
        "float_dtype": float_leaf[2] if float_leaf else np.dtype(q.scale.dtype).name,
    }
    if q.pack_axis is not None:
        d["encoding"] = "int4_packed"
        d["dtype"] = q.format
        d["pack_axis"] = q.pack_axis % len(shape)
    return d


def encode(qvars: QuantizedVariables, names: bool = False) -> tuple[dict, dict]:
    """``(arrays, meta)``: every array of `qvars` as a numpy array in its storage dtype,
    and the sealed JSON document that describes each one (see the module docstring).

    Tensor names are ``v<i>`` / ``a<i>`` / ``s<i>`` (orbax), or with ``names=True``
    the variable's path (``params/Dense_0/kernel``, then ``.scale`` and
    ``.zero_point``), ``activation/<site>.scale`` and ``smooth/<site>``.
    """
    if not isinstance(qvars, QuantizedVariables):
        raise TypeError(
            f"jq.flax.checkpoint.save: expected QuantizedVariables, got {type(qvars).__name__}"
        )
    p = qvars.plan
    perms = {s.weight_key or s.leaf: s.weight_perm for s in p.sites if s.weight_perm is not None}
    float_leaves = {a: (a, b, c) for a, b, c in p.float_leaves}
    arrays, tensors = {}, {}

    def put(key, a, role, variable, **extra):
        if key in arrays:  # e.g. a variable path that ends in ".scale"
            raise ValueError(f"jq.flax.checkpoint.save: two tensors would be named {key!r}")
        arrays[key], d = _store(a, role, variable)
        tensors[key] = {**d, **extra}

    variables = {}
    for i, (name, v) in enumerate(qvars.variables.items()):
        k = name if names else f"v{i}"
        variables[name] = k
        if isinstance(v, QArray):
            put(k + ".scale", v.scale, "scale", name, of=k)
            if v.zero_point is not None:
                put(k + ".zero_point", v.zero_point, "zero_point", name, of=k)
            put(k, v.value, "quantized", name)
            tensors[k].update(_quantized(v, k, perms.get(name), float_leaves.get(name)))
        elif hasattr(v, "dtype") and jax.dtypes.issubdtype(v.dtype, jax.dtypes.prng_key):
            put(k, jax.random.key_data(v), "prng_key", name, impl=str(jax.random.key_impl(v)))
        else:
            put(k, v, "kept", name)
    acts = {}
    for i, (site, qp) in enumerate(qvars.activations.items()):
        k = f"activation/{site}" if names else f"a{i}"
        put(k + ".scale", qp.scale, "activation_scale", site)
        zp = None
        if qp.zero_point is not None:
            zp = k + ".zero_point"
            put(zp, qp.zero_point, "activation_zero_point", site)
        acts[site] = {"scale": k + ".scale", "zero_point": zp}
    smooth = {}
    for i, (site, sv) in enumerate(qvars.smooth.items()):
        k = f"smooth/{site}" if names else f"s{i}"
        put(k, sv, "smooth", site)
        smooth[site] = k
    meta = {
        "jq_checkpoint_version": FORMAT_VERSION,
        "dequantize": _DEQUANTIZE,
        "model_kind": p.model_kind,
        "model_kwargs": dict(p.model_kwargs),
        "method": p.method,
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
                "weight_key": s.weight_key,
                "note": s.note,
            }
            for s in p.sites
        ],
        "variables": variables,
        "activations": acts,
        "smooth": smooth,
        "tensors": {k: seal(d, "description_sha256") for k, d in tensors.items()},
    }
    return arrays, seal(meta, "meta_sha256")


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


# ---------------------------------------------------------------------------------------
# decode: check everything, then rebuild
# ---------------------------------------------------------------------------------------
def check_meta(meta, caller: str, where: str) -> dict:
    """The version and the seals of the document and of every tensor description."""
    if not isinstance(meta, dict):
        raise ValueError(f"{caller}: the metadata of {where} is not a JSON object")
    if meta.get("jq_checkpoint_version") != FORMAT_VERSION:
        raise ValueError(
            f"{caller}: checkpoint format version {meta.get('jq_checkpoint_version')!r} of "
            f"{where} is not supported (this jq reads version {FORMAT_VERSION})"
        )
    tensors = meta.get("tensors")
    if isinstance(tensors, dict):
        for k, d in tensors.items():
            if not _sealed(d, "description_sha256"):
                raise ValueError(
                    f"{caller}: the description of tensor {k!r} in {where} does not match its "
                    "SHA-256 (description_sha256): the metadata was modified or damaged"
                )
    if not _sealed(meta, "meta_sha256"):
        raise ValueError(
            f"{caller}: the metadata of {where} does not match its SHA-256 (meta_sha256): it was "
            "modified or damaged"
        )
    return meta


def _name(k: str, d: dict) -> str:
    v = d.get("variable")
    return f"tensor {k!r}" if v in (None, k) else f"tensor {k!r} ({d['role']} of {v!r})"


def _expected_storage(d: dict) -> tuple[str, tuple]:
    """The storage dtype and shape a description implies (a check of the description)."""
    enc, dt = d["encoding"], d["dtype"]
    if enc == "native":
        return dt, tuple(d["shape"])
    if enc == "bits":
        return f"uint{8 * np.dtype(jax.numpy.dtype(dt)).itemsize}", tuple(d["shape"])
    if enc == "int4_packed":
        shape = list(d["unpacked_shape"])
        shape[d["pack_axis"]] = (shape[d["pack_axis"]] + 1) // 2
        return "uint8", tuple(shape)
    raise ValueError(f"unknown encoding {enc!r}")


def check_tensors(meta: dict, arrays: dict, caller: str, where: str) -> dict:
    """Every stored array against its description: the same set of names, then dtype, shape
    and SHA-256 of each. Returns the arrays decoded to their element dtypes (numpy)."""
    tensors = meta["tensors"]
    missing = [k for k in tensors if k not in arrays]
    if missing:
        d = tensors[missing[0]]
        raise ValueError(
            f"{caller}: {_name(missing[0], d)} is described in the metadata of {where} but not "
            f"stored there ({len(missing)} missing: {missing[:4]})"
        )
    extra = [k for k in arrays if k not in tensors]
    if extra:
        raise ValueError(
            f"{caller}: tensor {extra[0]!r} is stored in {where} but not described in its "
            f"metadata ({len(extra)} extra: {extra[:4]})"
        )
    out = {}
    for k, d in tensors.items():
        a = np.asarray(arrays[k])
        try:
            storage, shape = _expected_storage(d)
        except (TypeError, KeyError, ValueError) as e:
            raise ValueError(
                f"{caller}: {_name(k, d)} in {where} has a bad description: {e}"
            ) from e
        if (storage, shape) != (d["storage"], tuple(d["shape"])):
            raise ValueError(
                f"{caller}: {_name(k, d)} in {where}: its description is inconsistent (dtype "
                f"{d['dtype']} encoded {d['encoding']!r} is stored as {storage} {shape}, not "
                f"{d['storage']} {tuple(d['shape'])})"
            )
        if a.dtype.name != storage or a.shape != shape:
            raise ValueError(
                f"{caller}: {_name(k, d)} in {where} is stored as {a.dtype.name} {a.shape}, but "
                f"its description says {storage} {shape}"
            )
        if tensor_sha(a) != d["sha256"]:
            raise ValueError(
                f"{caller}: the bytes of {_name(k, d)} in {where} do not match their SHA-256: "
                "the tensor was modified, damaged or swapped"
            )
        out[k] = a.view(jax.numpy.dtype(d["dtype"])) if d["encoding"] == "bits" else a
    return out


def decode(
    meta: dict, arrays: dict, caller: str = "jq.flax.checkpoint.decode", where=""
) -> QuantizedVariables:
    """`QuantizedVariables` from `encode`'s two halves, after `check_meta` and `check_tensors`."""
    where = where or "the checkpoint"
    meta = check_meta(meta, caller, where)
    t = check_tensors(meta, arrays, caller, where)
    tensors = meta["tensors"]
    try:
        return _rebuild(meta, tensors, {k: jax.numpy.asarray(v) for k, v in t.items()})
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(
            f"{caller}: the metadata of {where} does not describe a model: {e!r}"
        ) from e


def _rebuild(meta, tensors, arrays) -> QuantizedVariables:
    variables = {}
    for name, k in meta["variables"].items():
        d = tensors[k]
        if d["role"] == "quantized":
            zp = arrays[d["zero_point"]] if d["zero_point"] else None
            pack = d["pack_axis"]
            variables[name] = QArray(
                arrays[k], arrays[d["scale"]], zp, d["format"], tuple(d["unpacked_shape"]), pack
            )
        elif d["role"] == "prng_key":
            variables[name] = jax.random.wrap_key_data(arrays[k], impl=d["impl"])
        else:
            variables[name] = arrays[k]
    acts = {}
    for site, d in meta["activations"].items():
        acts[site] = QParams(
            arrays[d["scale"]], arrays[d["zero_point"]] if d["zero_point"] else None
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
                s.get("weight_key"),
                s.get("note"),
            )
            for s in meta["sites"]
        ),
        tuple((a, tuple(b), c) for a, b, c in meta["float_leaves"]),
        tuple(sorted(meta["model_kwargs"].items())),
        meta["method"],
    )
    smooth = {site: arrays[k] for site, k in meta["smooth"].items()}
    return QuantizedVariables(variables, acts, plan, smooth)
