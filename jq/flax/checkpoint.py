"""Saving and restoring `QuantizedVariables` with orbax-checkpoint, specs included.

orbax keeps arrays but drops the static fields of custom pytrees (a QArray's
format, logical shape and packing axis; the site plan). jq therefore saves the
arrays as a flat ``{name: array}`` dict through orbax and the static parts as a
JSON file beside them (``jq_meta.json``). Restoring reads the JSON (no pickle,
no code execution) and the arrays, and rebuilds the exact pytree.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from jq.flax.qvars import Plan, QuantizedVariables, SitePlan
from jq.qparams import QParams, QuantSpec
from jq.quantize import QArray

__all__ = ["restore", "save"]

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


def _ocp():
    try:
        import orbax.checkpoint as ocp
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "jq checkpoints need orbax-checkpoint: pip install 'jq-quant[checkpoint]'"
        ) from e
    return ocp


def save(path: str | os.PathLike, qvars: QuantizedVariables) -> None:
    """Saves `qvars` to the directory `path` (created; must not exist yet)."""
    if not isinstance(qvars, QuantizedVariables):
        raise TypeError(
            f"jq.flax.checkpoint.save: expected QuantizedVariables, got {type(qvars).__name__}"
        )
    path = os.path.abspath(os.fspath(path))
    arrays, leaves = {}, {}
    for i, (name, v) in enumerate(qvars.variables.items()):
        k = f"v{i}"
        if isinstance(v, QArray):
            arrays[k + ".value"] = v.value
            arrays[k + ".scale"] = v.scale
            if v.zero_point is not None:
                arrays[k + ".zero_point"] = v.zero_point
            leaves[name] = {
                "key": k,
                "qarray": {
                    "format": v.format,
                    "shape": list(v.shape),
                    "pack_axis": v.pack_axis,
                    "zero_point": v.zero_point is not None,
                },
            }
        else:
            if hasattr(v, "dtype") and jax.dtypes.issubdtype(v.dtype, jax.dtypes.prng_key):
                leaves[name] = {"key": k, "prng_impl": str(jax.random.key_impl(v))}
                v = jax.random.key_data(v)
            else:
                leaves[name] = {"key": k}
            arrays[k] = v
    acts = {}
    for i, (name, qp) in enumerate(qvars.activations.items()):
        k = f"a{i}"
        arrays[k + ".scale"] = qp.scale
        if qp.zero_point is not None:
            arrays[k + ".zero_point"] = qp.zero_point
        acts[name] = {"key": k, "zero_point": qp.zero_point is not None}
    smooth = {}
    for i, (name, sv) in enumerate(qvars.smooth.items()):
        arrays[f"s{i}"] = sv
        smooth[name] = f"s{i}"
    p = qvars.plan
    meta = {
        "jq_checkpoint_version": _FORMAT_VERSION,
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
            }
            for s in p.sites
        ],
        "variables": leaves,
        "activations": acts,
        "smooth": smooth,
    }
    os.makedirs(path, exist_ok=False)
    ocp = _ocp()
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
    ocp = _ocp()
    with ocp.StandardCheckpointer() as ckptr:
        arrays = ckptr.restore(os.path.join(path, _ARRAYS))
    variables = {}
    for name, d in meta["variables"].items():
        k = d["key"]
        if "qarray" in d:
            q = d["qarray"]
            zp = arrays[k + ".zero_point"] if q["zero_point"] else None
            variables[name] = QArray(
                arrays[k + ".value"],
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
            )
            for s in meta["sites"]
        ),
        tuple((a, tuple(b), c) for a, b, c in meta["float_leaves"]),
    )
    smooth = {name: arrays[k] for name, k in meta.get("smooth", {}).items()}
    return QuantizedVariables(variables, acts, plan, smooth)
