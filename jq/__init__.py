"""jq: functional quantization for JAX / XLA.

Pure quantize / dequantize / fake-quant functions, streaming calibration
observers, integer dot_general / einsum / conv, and Flax integration.
"""

from jq import numerics
from jq.numerics import format_info, get_format
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
    "QArray",
    "QParams",
    "QuantSpec",
    "dequantize",
    "fake_quant",
    "format_info",
    "get_format",
    "lsq_fake_quant",
    "numerics",
    "pack_int4",
    "qparams_from_array",
    "qparams_from_range",
    "quantize",
    "unpack_int4",
]
