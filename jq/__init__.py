"""jq: functional quantization for JAX / XLA.

Pure quantize / dequantize / fake-quant functions (`jq.quantize`), streaming
calibration observers (`jq.calibration`), integer dot_general / einsum / conv
(`jq.ops`), and the Flax workflow (`jq.Rule`, `jq.calibrate`, `jq.convert`,
`jq.apply`, `jq.qat`) for unmodified linen and nnx models.

Importing jq does not import Flax; the Flax functions import it when called.
"""

from jq import calibration, deploy, hlo, numerics, ops, sharding
from jq.deploy import load_exported
from jq.flax import (
    QAT,
    CalibrationStats,
    QuantizedVariables,
    Rule,
    apply,
    calibrate,
    convert,
    format_table,
    qat,
    report,
    sites,
)
from jq.flax.export import export
from jq.flax.precision import (
    AutoQuantResult,
    CastModel,
    SensitivityResult,
    auto_quantize,
    cast,
    sensitivity,
)
from jq.flax.ptq import gptq, smoothquant
from jq.gptq_core import gptq_quantize, rtn_quantize
from jq.numerics import format_info, get_format
from jq.ops import conv_general_dilated, dot_general, einsum
from jq.qparams import QParams, QuantSpec, qparams_from_array, qparams_from_range
from jq.quantize import (
    QArray,
    dequantize,
    fake_quant,
    lsq_fake_quant,
    pack_int4,
    quantize,
    unpack_int4,
)

__version__ = "0.1.0"

__all__ = [
    "gptq",
    "gptq_quantize",
    "rtn_quantize",
    "smoothquant",
    "AutoQuantResult",
    "CastModel",
    "SensitivityResult",
    "auto_quantize",
    "cast",
    "sensitivity",
    "sharding",
    "QAT",
    "CalibrationStats",
    "QArray",
    "QParams",
    "QuantSpec",
    "QuantizedVariables",
    "Rule",
    "apply",
    "calibrate",
    "calibration",
    "conv_general_dilated",
    "convert",
    "deploy",
    "dequantize",
    "dot_general",
    "einsum",
    "export",
    "fake_quant",
    "format_info",
    "format_table",
    "get_format",
    "hlo",
    "load_exported",
    "lsq_fake_quant",
    "numerics",
    "ops",
    "pack_int4",
    "qat",
    "qparams_from_array",
    "qparams_from_range",
    "quantize",
    "report",
    "sites",
    "unpack_int4",
]
