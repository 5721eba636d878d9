"""jq: functional quantization for JAX / XLA.

Pure quantize / dequantize / fake-quant functions (`jq.quantize`), streaming
calibration observers (`jq.calibration`), integer dot_general / einsum / conv
(`jq.ops`), and the Flax workflow (`jq.Rule`, `jq.calibrate`, `jq.convert`,
`jq.apply`, `jq.qat`) for unmodified linen and nnx models.

Importing jq does not import Flax; the Flax functions import it when called.
"""

from jq import (
    calibration,
    checks,
    deploy,
    hlo,
    lowering,
    numerics,
    ops,
    presets,
    sharding,
)
from jq.awq_core import (
    awq_clip,
    awq_search,
)
from jq.checks import (
    value_checks,
)
from jq.deploy import (
    load_exported,
)
from jq.flax import (
    QAT,
    AutoQuantResult,
    CalibrationStats,
    CastModel,
    QatVariables,
    QuantizedModel,
    QuantizedVariables,
    Rule,
    SensitivityResult,
    apply,
    auto_quantize,
    awq,
    calibrate,
    cast,
    convert,
    export,
    format_table,
    gptq,
    kv_cache,
    kv_cache_bytes,
    kv_cache_rule,
    load_model,
    qat,
    quantize_model,
    report,
    sensitivity,
    sites,
    smoothquant,
    with_cache,
)
from jq.gptq_core import (
    gptq_quantize,
    rtn_quantize,
)
from jq.numerics import (
    format_info,
    get_format,
)
from jq.ops import (
    conv_general_dilated,
    dot_general,
    einsum,
)
from jq.qparams import (
    QParams,
    QuantSpec,
    qparams_from_array,
    qparams_from_range,
)
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
    "apply",
    "auto_quantize",
    "awq",
    "awq_clip",
    "awq_search",
    "AutoQuantResult",
    "calibrate",
    "calibration",
    "CalibrationStats",
    "cast",
    "CastModel",
    "checks",
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
    "gptq",
    "gptq_quantize",
    "hlo",
    "kv_cache",
    "kv_cache_bytes",
    "kv_cache_rule",
    "load_exported",
    "load_model",
    "lowering",
    "lsq_fake_quant",
    "numerics",
    "ops",
    "pack_int4",
    "presets",
    "QArray",
    "QAT",
    "qat",
    "QatVariables",
    "QParams",
    "qparams_from_array",
    "qparams_from_range",
    "quantize",
    "quantize_model",
    "QuantizedModel",
    "QuantizedVariables",
    "QuantSpec",
    "report",
    "rtn_quantize",
    "Rule",
    "sensitivity",
    "SensitivityResult",
    "sharding",
    "sites",
    "smoothquant",
    "unpack_int4",
    "value_checks",
    "with_cache",
]
