"""Deployment artifacts: a serialized `jax.export` module in a checked container.

`export_function` exports a plain JAX function of arrays (``f(*weights,
*inputs)``) with `jax.export`, for one or several platforms and with a symbolic
batch dimension, and packs it into one self-describing byte string;
`load_exported` turns those bytes back into a callable. `jq.flax.export.export`
builds the function from a Flax model and its `QuantizedVariables`; loading
needs neither the model class nor the rules, and imports no Flax.

Artifact layout (all integers little-endian)::

    offset  size  field
    0       8     magic  b"\\x89JQX\\r\\n\\x1a\\n"
    8       4     format version (uint32), currently 1
    12      8     payload length N (uint64)
    20      32    SHA-256 of the payload
    52      N     payload: a sequence of sections
                    uint16 name length, name (UTF-8),
                    uint64 data length, data

Sections: ``manifest`` (JSON: platforms, input and output signatures, weight
names / shapes / dtypes, versions), ``module`` (the bytes of
``jax.export.Exported.serialize()``: StableHLO bytecode plus calling
convention, a flatbuffer) and, for separate weights, one ``weight:<i>``
section per array (its raw little-endian bytes; shape and dtype are in the
manifest).

Loading parses only this container, JSON and the flatbuffer: no pickle and no
code from the file runs. A file that is too short, has another magic, another
version, a payload of the wrong length, a wrong hash, or inconsistent sections
raises `ValueError` saying which.

Weights: ``"embedded"`` keeps them as constants of the StableHLO module (one
blob; XLA may fold weight-only work such as the weight sums of a zero-point
correction at compile time); ``"separate"`` makes them arguments of the
exported function and stores them as raw sections next to the module (the
module stays small and the same for any weights of that shape, and
`load_exported` accepts replacement weights).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import struct
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import checkify

from jq import lowering as _lowering

__all__ = [
    "FORMAT_VERSION",
    "MAGIC",
    "Artifact",
    "Deployed",
    "export_function",
    "load_exported",
    "pack_artifact",
    "plain_tree",
    "read_artifact",
]

MAGIC = b"\x89JQX\r\n\x1a\n"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<8sIQ32s")
_NAME_LEN = struct.Struct("<H")
_DATA_LEN = struct.Struct("<Q")
_WEIGHTS_MODES = ("embedded", "separate")
_KNOWN_PLATFORMS = ("cpu", "cuda", "rocm", "tpu")


# ---------------------------------------------------------------------------------------
# container
# ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Artifact:
    """The parsed sections of an artifact.

    Attributes:
      manifest: the JSON manifest (a dict).
      module: the serialized `jax.export.Exported` bytes.
      weights: the separate weights in argument order (read-only numpy
        arrays); empty for embedded weights.
    """

    manifest: dict
    module: bytes
    weights: tuple[np.ndarray, ...]


def _weight_bytes(a: np.ndarray) -> bytes:
    a = np.asarray(a)
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    return np.ascontiguousarray(a).tobytes()


def pack_artifact(
    manifest: Mapping[str, Any], module: bytes, weights: Sequence[np.ndarray] = ()
) -> bytes:
    """Packs a manifest, a serialized module and weights into artifact bytes.

    Args:
      manifest: JSON-serializable dict. Its ``"weights"`` entry (a list of
        ``{"name", "shape", "dtype"}``) is filled in from `weights`.
      module: ``jax.export.Exported.serialize()`` bytes.
      weights: arrays stored as raw sections, in argument order.

    Returns:
      The artifact: header (magic, version, payload length, SHA-256) + payload.
    """
    weights = [np.asarray(w) for w in weights]
    manifest = dict(manifest)
    names = [e.get("name", f"w{i}") for i, e in enumerate(manifest.get("weights") or [])]
    names += [f"w{i}" for i in range(len(names), len(weights))]
    manifest["weights"] = [
        {"name": names[i], "shape": list(w.shape), "dtype": w.dtype.name}
        for i, w in enumerate(weights)
    ]
    sections = [
        ("manifest", json.dumps(manifest, sort_keys=True).encode()),
        ("module", bytes(module)),
    ]
    sections += [(f"weight:{i}", _weight_bytes(w)) for i, w in enumerate(weights)]
    buf = io.BytesIO()
    for name, data in sections:
        n = name.encode()
        buf.write(_NAME_LEN.pack(len(n)))
        buf.write(n)
        buf.write(_DATA_LEN.pack(len(data)))
        buf.write(data)
    payload = buf.getvalue()
    return (
        _HEADER.pack(MAGIC, FORMAT_VERSION, len(payload), hashlib.sha256(payload).digest())
        + payload
    )


def _read_bytes(source, caller: str) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as f:
            return f.read()
    raise TypeError(
        f"{caller}: `path_or_bytes` must be bytes or a file path, got {type(source).__name__}"
    )


def _sections(payload: bytes, caller: str) -> dict[str, bytes]:
    out, i, n = {}, 0, len(payload)
    while i < n:
        if i + _NAME_LEN.size > n:
            raise ValueError(f"{caller}: corrupted payload (a section header runs past the end)")
        (ln,) = _NAME_LEN.unpack_from(payload, i)
        i += _NAME_LEN.size
        if i + ln + _DATA_LEN.size > n:
            raise ValueError(f"{caller}: corrupted payload (a section name runs past the end)")
        try:
            name = payload[i : i + ln].decode()
        except UnicodeDecodeError:
            raise ValueError(f"{caller}: corrupted payload (a section name is not UTF-8)") from None
        i += ln
        (dl,) = _DATA_LEN.unpack_from(payload, i)
        i += _DATA_LEN.size
        if i + dl > n:
            raise ValueError(f"{caller}: corrupted payload (section {name!r} runs past the end)")
        if name in out:
            raise ValueError(f"{caller}: corrupted payload (section {name!r} appears twice)")
        out[name] = payload[i : i + dl]
        i += dl
    return out


def read_artifact(path_or_bytes) -> Artifact:
    """Checks and parses an artifact (no pickle, no code from the file runs).

    Args:
      path_or_bytes: the artifact bytes, or the path of a file holding them.

    Returns:
      `Artifact` with the manifest, module bytes and separate weights.

    Raises:
      ValueError: not a jq artifact (magic), unsupported format version,
        truncated (payload shorter than the header says), trailing bytes,
        SHA-256 mismatch (corrupted), or sections that do not match the manifest.
      TypeError: `path_or_bytes` is neither bytes nor a path.
    """
    return parse_artifact(path_or_bytes, "jq.deploy.read_artifact")


def parse_artifact(path_or_bytes, caller: str) -> Artifact:
    """`read_artifact`, its errors named after `caller` (the public function the user called)."""
    data = _read_bytes(path_or_bytes, caller)
    if len(data) < len(MAGIC) or data[: len(MAGIC)] != MAGIC:
        raise ValueError(
            f"{caller}: not a jq export artifact (the file does not start with the jq magic "
            f"{MAGIC!r}; got {data[: len(MAGIC)]!r})"
        )
    if len(data) < _HEADER.size:
        raise ValueError(
            f"{caller}: truncated: {len(data)} bytes, shorter than the {_HEADER.size}-byte header"
        )
    _, version, n, digest = _HEADER.unpack_from(data, 0)
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{caller}: format version {version} is not supported (this jq reads version {FORMAT_VERSION})"
        )
    got = len(data) - _HEADER.size
    if got < n:
        raise ValueError(
            f"{caller}: truncated: the header announces a {n}-byte payload, but only {got} "
            "bytes follow"
        )
    if got > n:
        raise ValueError(f"{caller}: {got - n} unexpected bytes after the {n}-byte payload")
    payload = data[_HEADER.size :]
    if hashlib.sha256(payload).digest() != digest:
        raise ValueError(
            f"{caller}: corrupted: the SHA-256 of the payload does not match the header"
        )
    sec = _sections(payload, caller)
    for req in ("manifest", "module"):
        if req not in sec:
            raise ValueError(f"{caller}: missing section {req!r}")
    try:
        manifest = json.loads(sec["manifest"].decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{caller}: the manifest is not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("weights"), list):
        raise ValueError(f"{caller}: the manifest has no `weights` list")
    weights = []
    for i, w in enumerate(manifest["weights"]):
        key = f"weight:{i}"
        if key not in sec:
            raise ValueError(f"{caller}: missing section {key!r} named in the manifest")
        try:
            dtype = np.dtype(jax.numpy.dtype(w["dtype"]))
            shape = tuple(int(d) for d in w["shape"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(
                f"{caller}: manifest entry for weight {i} is invalid ({e!r})"
            ) from None
        size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if len(sec[key]) != size:
            raise ValueError(
                f"{caller}: weight {i} ({w.get('name')!r}) has {len(sec[key])} bytes, expected {size} for "
                f"shape {shape} {dtype.name}"
            )
        weights.append(np.frombuffer(sec[key], dtype=dtype.newbyteorder("<")).reshape(shape))
    extra = set(sec) - {"manifest", "module"} - {f"weight:{i}" for i in range(len(weights))}
    if extra:
        raise ValueError(f"{caller}: unexpected sections {sorted(extra)}")
    return Artifact(manifest, sec["module"], tuple(weights))


# ---------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------
def default_platform() -> str:
    """The `jax.export` name (``cpu``, ``cuda``, ``rocm``, ``tpu``) of JAX's default backend."""
    backend = jax.default_backend()
    if backend != "gpu":
        return backend
    version = str(getattr(jax.devices()[0].client, "platform_version", "")).lower()
    return "rocm" if "rocm" in version else "cuda"


def _check_platforms(platforms, caller: str) -> tuple[str, ...]:
    if platforms is None:
        return (default_platform(),)
    if isinstance(platforms, str):
        platforms = (platforms,)
    platforms = tuple(platforms)
    if not platforms:
        raise ValueError(f"{caller}: `platforms` is empty")
    bad = [p for p in platforms if p not in _KNOWN_PLATFORMS]
    if bad:
        raise ValueError(
            f"{caller}: unknown platforms {bad} in `platforms`; choose from {_KNOWN_PLATFORMS}"
        )
    if len(set(platforms)) != len(platforms):
        raise ValueError(f"{caller}: `platforms` {platforms} has duplicates")
    return platforms


def _shape_json(shape) -> list:
    return [d if isinstance(d, int) else str(d) for d in shape]


def _aval_json(a) -> dict:
    return {"shape": _shape_json(a.shape), "dtype": np.dtype(a.dtype).name}


def plain_tree(tree):
    """`tree` with every node `jax.export` cannot serialize turned into a dict of its children.

    ``None``, tuples, lists and dicts stay; any other pytree node (a dataclass
    or ``flax.struct`` output such as Hugging Face's ``ModelOutput``, a
    namedtuple, an ``OrderedDict``) becomes a ``dict`` keyed by its
    children's key names (``{"logits": ..., "past_key_values": None}``), so
    that an artifact loads in a process without the output's class.
    """
    if tree is None:
        return None
    t = type(tree)
    if t in (tuple, list):
        return t(plain_tree(c) for c in tree)
    if t is dict:
        return {k: plain_tree(v) for k, v in tree.items()}
    children, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda y: y is not tree)
    if treedef.num_nodes == 1 and treedef.num_leaves == 1 and children[0][0] == ():
        return tree  # an array
    out = {}
    for path, c in children:
        k = path[0]
        name = next((getattr(k, a) for a in ("name", "key", "idx") if hasattr(k, a)), k)
        out[name if isinstance(name, (str, int)) else str(name)] = plain_tree(c)
    return out


def _without_checks(fn: Callable) -> Callable:
    """`fn` with its `checkify` debug checks discharged and dropped.

    jq's value checks under jit (``checkify.debug_check``: NaN ranges, lo > hi)
    are no-ops in a plain `jax.jit`, but their effect would stop `jax.export`
    from serializing the module. Discharging them gives the same computation as
    ``jax.jit(fn)``; XLA removes the unused predicates.
    """

    def run(*args):
        _, out = checkify.checkify(fn, errors=checkify.user_checks)(*args)
        return plain_tree(out)

    return run


def export_function(
    fn: Callable,
    example_inputs: Sequence[Any],
    *,
    weights: Sequence[Any] = (),
    weight_names: Sequence[str] | None = None,
    platforms: Sequence[str] | None = None,
    batch_polymorphic: bool = True,
    info: Mapping[str, Any] | None = None,
) -> bytes:
    """Exports ``fn(*weights, *inputs)`` with `jax.export` into artifact bytes.

    Args:
      fn: a function of arrays: the separate weights first, then the inputs.
        Its output is an array or a tuple / list / dict of arrays.
      example_inputs: one example per input (only shapes and dtypes matter).
      weights: arrays passed to `fn` first and stored as separate sections.
        Arrays closed over by `fn` are embedded as module constants instead.
      weight_names: names for the manifest (default ``w0, w1, ...``).
      platforms: any of ``"cpu"``, ``"cuda"``, ``"rocm"``, ``"tpu"``; several
        give one module with a ``stablehlo.case`` over platforms. No
        accelerator is needed to export for it. Default: the platform of JAX's
        default backend (`default_platform`). The ``cpu`` branch carries the
        integer form `jq.lowering` chooses on the exporting machine (recorded
        in the manifest as ``int8_cpu_form``; override it with
        `jq.ops.int8_lowering` when the artifact will run on another CPU kind).
      batch_polymorphic: the leading axis of every input becomes one symbolic
        dimension ``b`` (``jax.export.symbolic_shape("b, ...")``), so the
        artifact serves any batch size.
      info: extra JSON-serializable entries for the manifest.

    Returns:
      The artifact bytes (see the module docstring).

    Raises:
      ValueError: bad platforms, an input without a batch axis, or weight names
        that do not match the weights.
    """
    return build_artifact(
        fn,
        example_inputs,
        weights=weights,
        weight_names=weight_names,
        platforms=platforms,
        batch_polymorphic=batch_polymorphic,
        info=info,
        caller="jq.deploy.export_function",
    )


def build_artifact(
    fn: Callable,
    example_inputs: Sequence[Any],
    *,
    weights: Sequence[Any],
    weight_names: Sequence[str] | None,
    platforms: Sequence[str] | None,
    batch_polymorphic: bool,
    info: Mapping[str, Any] | None,
    caller: str,
) -> bytes:
    """`export_function`, its errors named after `caller` (the public function the user called)."""
    platforms = _check_platforms(platforms, caller)
    inputs = [jax.ShapeDtypeStruct(np.shape(x), jax.numpy.result_type(x)) for x in example_inputs]
    if batch_polymorphic:
        for i, a in enumerate(inputs):
            if not a.shape:
                raise ValueError(
                    f"{caller}: input {i} is a scalar and has no batch axis; pass batch_polymorphic=False"
                )
        inputs = list(jax.export.symbolic_args_specs(inputs, "b, ..."))
    ws = [np.asarray(w) for w in weights]
    names = list(weight_names) if weight_names is not None else [f"w{i}" for i in range(len(ws))]
    if len(names) != len(ws):
        raise ValueError(f"{caller}: {len(names)} `weight_names` for {len(ws)} weights")
    w_avals = [jax.ShapeDtypeStruct(w.shape, w.dtype) for w in ws]
    exp = jax.export.export(jax.jit(_without_checks(fn)), platforms=platforms)(*w_avals, *inputs)
    module = exp.serialize()
    manifest = {
        "format": "jq-export",
        "jax_version": jax.__version__,
        "platforms": list(exp.platforms),
        "int8_cpu_form": _lowering.current().cpu_form,
        "batch_polymorphic": bool(batch_polymorphic),
        "weights_mode": "separate" if ws else "embedded",
        "inputs": [_aval_json(a) for a in exp.in_avals[len(ws) :]],
        "outputs": [_aval_json(a) for a in exp.out_avals],
        "weights": [{"name": n} for n in names],
        "info": dict(info or {}),
    }
    return pack_artifact(manifest, module, ws)


# ---------------------------------------------------------------------------------------
# load
# ---------------------------------------------------------------------------------------
class Deployed:
    """A loaded artifact: call it like the exported function on the inputs only.

    Attributes:
      manifest: the artifact's JSON manifest.
      exported: the deserialized `jax.export.Exported`.
      platforms: the platforms the artifact was lowered for.
      weights: the separate weights (device arrays), empty when embedded.
    """

    def __init__(self, artifact: Artifact, weights=None):
        caller = "jq.load_exported"  # what constructs a Deployed
        try:
            exp = jax.export.deserialize(bytearray(artifact.module))
        except Exception as e:  # the flatbuffer / bytecode reader raises assorted types
            raise ValueError(
                f"{caller}: the module section cannot be deserialized ({type(e).__name__}: {e})"
            ) from None
        ws = artifact.weights if weights is None else _replacement_weights(artifact, weights)
        n_in = len(exp.in_avals) - len(ws)
        if n_in < 0 or n_in != len(artifact.manifest.get("inputs", [])):
            raise ValueError(
                f"{caller}: the module takes {len(exp.in_avals)} arguments, but the manifest lists "
                f"{len(ws)} weights and {len(artifact.manifest.get('inputs', []))} inputs"
            )
        for i, (w, a) in enumerate(zip(ws, exp.in_avals)):
            if tuple(w.shape) != tuple(a.shape) or np.dtype(w.dtype) != np.dtype(a.dtype):
                raise ValueError(
                    f"{caller}: weight {i} is {tuple(w.shape)} {np.dtype(w.dtype).name}, but the module expects "
                    f"{tuple(a.shape)} {np.dtype(a.dtype).name}"
                )
        self.manifest = artifact.manifest
        self.exported = exp
        self.platforms = tuple(exp.platforms)
        self.weights = tuple(jax.numpy.asarray(w) for w in ws)
        self._n_inputs = n_in
        self._call = jax.jit(exp.call)

    def __call__(self, *inputs):
        """Runs the exported function on `inputs` (the model's positional inputs)."""
        if len(inputs) != self._n_inputs:
            raise TypeError(
                f"jq: the exported function takes {self._n_inputs} inputs, got {len(inputs)}"
            )
        return self._call(*self.weights, *inputs)

    def __repr__(self) -> str:
        ins = ", ".join(
            f"{tuple(i['shape'])} {i['dtype']}" for i in self.manifest.get("inputs", [])
        )
        return (
            f"Deployed(platforms={self.platforms}, inputs=[{ins}], "
            f"weights={self.manifest.get('weights_mode')}, {len(self.weights)} arrays)"
        )


def _replacement_weights(artifact: Artifact, weights):
    if isinstance(weights, Mapping):
        names = [w["name"] for w in artifact.manifest["weights"]]
        missing = [n for n in names if n not in weights]
        if missing:
            raise ValueError(f"jq.load_exported: `weights` lacks {missing[:5]}")
        weights = [weights[n] for n in names]
    weights = [np.asarray(w) for w in weights]
    if len(weights) != len(artifact.weights):
        raise ValueError(
            f"jq.load_exported: `weights` has {len(weights)} arrays, the artifact takes {len(artifact.weights)}"
        )
    return weights


def load_exported(path_or_bytes, *, weights=None) -> Deployed:
    """Loads an artifact written by `jq.export` / `export_function` into a callable.

    Needs no model code, no rules and no Flax: only jax and jq. The artifact is
    checked (magic, version, length, SHA-256) before anything is deserialized.

    Args:
      path_or_bytes: the artifact bytes, or a file path.
      weights: optional replacement for separate weights: a sequence in the
        artifact's order or a mapping by manifest name (same shapes and dtypes).

    Returns:
      `Deployed`: ``deployed(*inputs)`` runs the exported function (jitted; the
      symbolic batch dimension takes any size).

    Raises:
      ValueError: a truncated, corrupted or foreign file (see `read_artifact`),
        or replacement weights that do not fit.
    """
    return Deployed(parse_artifact(path_or_bytes, "jq.load_exported"), weights)
