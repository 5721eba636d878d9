"""Saving and restoring `QuantizedVariables`: orbax directories and safetensors files.

Both containers hold the same thing (`jq.flax.checkpoint_format`): the arrays
as named tensors in a storage dtype every reader knows, and one sealed JSON
document that describes each tensor completely (role, element dtype, storage,
encoding, shape, SHA-256; for a quantized weight its format, scale axes and
layout relative to the float parameter) plus the site plan and the keyword
arguments the model was converted with. orbax keeps the arrays (it drops the
static fields of custom pytrees) and the document goes to ``jq_meta.json``
beside them; safetensors keeps it in the file's metadata under ``"jq"``.
Restoring reads JSON (no pickle, no code execution), checks the seals, every
tensor's dtype, shape and bytes, and raises a ValueError naming the tensor at
the first mismatch: a damaged, edited or mixed-up checkpoint never loads.
"""

from __future__ import annotations

import importlib
import json
import os

from jq.flax.checkpoint_format import check_meta, decode, encode
from jq.flax.qvars import QuantizedVariables

__all__ = ["decode", "encode", "restore", "restore_safetensors", "save", "save_safetensors"]


_META = "jq_meta.json"
_ARRAYS = "arrays"


def _optional(module: str, extra: str):
    """Imports an optional dependency, or says which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"jq: this checkpoint format needs {module.split('.')[0]}: "
            f"pip install 'jq-quant[{extra}]'"
        ) from e


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


def restore(
    path: str | os.PathLike, *, caller: str = "jq.flax.checkpoint.restore"
) -> QuantizedVariables:
    """Restores `QuantizedVariables` saved by `save`; arrays bit-identical to the saved ones.

    Raises:
      ValueError: not a jq checkpoint, an unsupported version, or any damage: metadata
        that does not match its seal, a tensor missing, extra, of another dtype or shape,
        or whose bytes do not match their SHA-256 (the error names the tensor).
    """
    path = os.path.abspath(os.fspath(path))
    meta_path = os.path.join(path, _META)
    if not os.path.exists(meta_path):
        raise ValueError(f"{caller}: {path!r} is not a jq checkpoint (no {_META})")
    where = f"{path!r} ({_META})"
    try:
        with open(meta_path, "rb") as f:
            meta = json.loads(f.read())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{caller}: the metadata {where} is not valid JSON (damaged): {e}") from e
    check_meta(meta, caller, where)
    ocp = _optional("orbax.checkpoint", "checkpoint")
    try:
        with ocp.StandardCheckpointer() as ckptr:
            arrays = ckptr.restore(os.path.join(path, _ARRAYS))
    except Exception as e:  # orbax / tensorstore raise many types for damaged files
        raise ValueError(
            f"{caller}: orbax could not read the arrays of {path!r} (damaged or truncated): "
            f"{type(e).__name__}: {str(e)[:300]}"
        ) from e
    if not isinstance(arrays, dict):
        raise ValueError(f"{caller}: the arrays of {path!r} are not a flat dict of tensors")
    return decode(meta, arrays, caller, repr(path))


# ---------------------------------------------------------------------------------------
# safetensors: one file other tools can read
# ---------------------------------------------------------------------------------------
#: safetensors' header dtype tags of the storage dtypes jq writes
_TAGS = {
    "bool": "BOOL",
    "int8": "I8",
    "uint8": "U8",
    "int16": "I16",
    "uint16": "U16",
    "int32": "I32",
    "uint32": "U32",
    "int64": "I64",
    "uint64": "U64",
    "float16": "F16",
    "float32": "F32",
    "float64": "F64",
}


def save_safetensors(path: str | os.PathLike, qvars: QuantizedVariables) -> None:
    """Saves `qvars` as one ``.safetensors`` file (no pickle), readable without jq.

    Tensors are named by variable path: ``params/Dense_0/kernel`` holds the
    stored codes (int8; int4 packed two per uint8; float8 and bfloat16 as their
    bit patterns in uint8 / uint16), ``....scale`` and ``....zero_point`` its
    parameters; ``activation/<site>.scale`` the static activation parameters.
    The file's metadata ``"jq"`` is the JSON document of
    `jq.flax.checkpoint_format`, whose ``tensors[name]`` describes each tensor
    completely; ``docs/readme/core.md`` has a numpy-only reader.
    """
    st = _optional("safetensors.numpy", "safetensors")
    arrays, meta = encode(qvars, names=True)
    st.save_file(arrays, os.fspath(path), metadata={"jq": json.dumps(meta)})


def _st_header(path: str, caller: str) -> dict:
    """The safetensors header of `path` (8-byte little-endian length, then JSON), checked
    against the file's length: a truncated file names the first tensor it cuts off."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        n = int.from_bytes(raw, "little") if len(raw) == 8 else -1
        if n < 2 or 8 + n > size:
            raise ValueError(
                f"{caller}: {path!r} is not a complete safetensors file (its header length "
                f"{n} does not fit in {size} bytes: truncated or damaged)"
            )
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(
                f"{caller}: the header of {path!r} is not valid JSON (damaged): {e}"
            ) from e
    if not isinstance(header, dict):
        raise ValueError(f"{caller}: the header of {path!r} is not a JSON object (damaged)")
    data = size - 8 - n
    for k, h in header.items():
        if k == "__metadata__":
            continue
        end = h.get("data_offsets", [0, 0])[1] if isinstance(h, dict) else 0
        if not isinstance(end, int) or end > data:
            raise ValueError(
                f"{caller}: tensor {k!r} ends at byte {end} of the data, but {path!r} holds only "
                f"{data} bytes of data: the file is truncated"
            )
    return header


def restore_safetensors(
    path: str | os.PathLike, *, caller: str = "jq.flax.checkpoint.restore_safetensors"
) -> QuantizedVariables:
    """Restores `QuantizedVariables` saved by `save_safetensors`, arrays bit-identical.

    Raises:
      ValueError: as `restore`; also a header dtype or shape that disagrees with the
        tensor's description, and a truncated file (naming the tensor cut off).
    """
    _optional("safetensors.numpy", "safetensors")
    from safetensors import safe_open

    path = os.fspath(path)
    header = _st_header(path, caller)
    md = header.get("__metadata__") or {}
    if not isinstance(md, dict) or "jq" not in md:
        raise ValueError(f"{caller}: {path!r} is a safetensors file without jq metadata")
    where = f"{path!r}"
    try:
        meta = json.loads(md["jq"])
    except (TypeError, json.JSONDecodeError) as e:
        raise ValueError(
            f"{caller}: the jq metadata of {where} is not valid JSON (damaged): {e}"
        ) from e
    check_meta(meta, caller, where)
    for k, d in meta["tensors"].items():
        h = header.get(k)
        if not isinstance(h, dict):
            continue  # missing: `decode` names it
        want = (_TAGS.get(d["storage"]), list(d["shape"]))
        if (h.get("dtype"), h.get("shape")) != want:
            raise ValueError(
                f"{caller}: tensor {k!r} in {where} has header dtype {h.get('dtype')} shape "
                f"{h.get('shape')}, but its description says {want[0]} {want[1]} "
                f"({d['dtype']}, {d['encoding']})"
            )
    try:
        with safe_open(path, framework="numpy") as f:
            arrays = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (no iterator)
    except Exception as e:  # safetensors raises its own error type for damaged files
        raise ValueError(f"{caller}: safetensors could not read {where}: {e}") from e
    return decode(meta, arrays, caller, where)
