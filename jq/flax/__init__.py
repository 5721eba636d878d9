"""Flax integration: rules, calibrate, convert, apply, QAT and reports for linen and nnx.

One module per verb: `calibrate`, `convert`, `apply`, `qat`, `report` (with
`sites`), `export`, `checkpoint`; `precision` (cast, sensitivity,
auto_quantize) and `ptq` (gptq, smoothquant). The data types live in `qvars`,
and the engine they share in `adapter` (linen / nnx as one function, traced),
`_graph` (sites, the interpreter and its `StateKey` state), `select` (rule
matching, specs) and `stream` (batches, observers).
"""

from jq.flax.apply import apply
from jq.flax.calibrate import calibrate
from jq.flax.convert import convert
from jq.flax.export import export
from jq.flax.precision import (
    AutoQuantResult,
    CastModel,
    SensitivityResult,
    auto_quantize,
    cast,
    sensitivity,
)
from jq.flax.ptq import (
    gptq,
    smoothquant,
)
from jq.flax.qat import (
    QAT,
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

__all__ = [
    "OP_KINDS",
    "QAT",
    "AutoQuantResult",
    "CalibrationStats",
    "CastModel",
    "QuantizedVariables",
    "Rule",
    "SensitivityResult",
    "SitePlan",
    "apply",
    "auto_quantize",
    "calibrate",
    "cast",
    "convert",
    "export",
    "format_table",
    "gptq",
    "qat",
    "report",
    "sensitivity",
    "sites",
    "smoothquant",
]
