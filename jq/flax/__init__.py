"""Flax integration: rules, calibrate, convert, apply, QAT and reports for linen and nnx.

One module per verb: `calibrate`, `convert`, `apply`, `qat`, `report` (with
`sites`), `export`, `checkpoint`, `model` (`QuantizedModel`, `quantize_model`),
`cast` (its policy in `cast_policy`), `sensitivity`, `auto_quantize`, `gptq`,
`smoothquant`, `awq` and `kv_cache`. The data types live
in `qvars`, and the engine the verbs share in `adapter` (linen / nnx as one
function, traced), `dataflow` (the one view of the traced jaxpr), `_graph`
(sites, the interpreter and its `StateKey` / `EqnKey` state), `select` (rule
matching, specs) and `stream` (batches, observers).
"""

from jq.flax.apply import apply
from jq.flax.auto_quantize import (
    AutoQuantResult,
    auto_quantize,
)
from jq.flax.awq import awq
from jq.flax.calibrate import calibrate
from jq.flax.cast import (
    CastModel,
    cast,
)
from jq.flax.convert import convert
from jq.flax.export import export
from jq.flax.gptq import gptq
from jq.flax.kv_cache import (
    kv_cache,
    kv_cache_bytes,
    kv_cache_rule,
    with_cache,
)
from jq.flax.model import (
    QuantizedModel,
    load_model,
    quantize_model,
)
from jq.flax.qat import (
    QAT,
    QatVariables,
    qat,
)
from jq.flax.qvars import (
    CalibrationStats,
    QuantizedVariables,
    SitePlan,
)
from jq.flax.report import (
    format_table,
    report,
    sites,
)
from jq.flax.rules import (
    OP_KINDS,
    Rule,
)
from jq.flax.sensitivity import (
    SensitivityResult,
    sensitivity,
)
from jq.flax.smoothquant import smoothquant

__all__ = [
    "OP_KINDS",
    "QAT",
    "QatVariables",
    "AutoQuantResult",
    "CalibrationStats",
    "CastModel",
    "QuantizedModel",
    "QuantizedVariables",
    "Rule",
    "SensitivityResult",
    "SitePlan",
    "apply",
    "auto_quantize",
    "awq",
    "calibrate",
    "cast",
    "convert",
    "export",
    "format_table",
    "gptq",
    "kv_cache",
    "kv_cache_bytes",
    "kv_cache_rule",
    "load_model",
    "qat",
    "quantize_model",
    "report",
    "sensitivity",
    "sites",
    "smoothquant",
    "with_cache",
]
