"""Quantized `dot_general`, `einsum` and `conv_general_dilated`.

The ops take float arrays or `QArray`s and keep `jax.lax`'s signatures and
output layouts (batch dims, then lhs free dims, then rhs free dims).

Modes, chosen by the operands:

* two integer QArrays: one exact integer dot, ``S_l S_r (q_l - Z_l) . (q_r -
  Z_r)`` with int32 accumulation;
* a float lhs with ``lhs_spec`` and ``lhs_qparams``: static activation
  quantization, then the integer path;
* a float lhs with ``lhs_spec`` and no ``lhs_qparams``: dynamic quantization
  (min-max per tensor, per row when ``lhs_spec.axis`` names free lhs axes, or
  per token with ``axis="rows"``: every axis the op does not contract, any rank);
* a float rhs with ``rhs_spec``: the rhs is quantized from its own min-max;
* a float lhs and an integer QArray rhs without ``lhs_spec``: weight-only
  (int8, uint8 or packed int4 weights, float activations);
* fp16 / bf16 / fp8 QArrays: a dot in that format with float32 accumulation.

Modules, from the primitive up:

* `int8_dot`: the primitive behind every 8-bit integer dot and its
  per-backend forms (chosen by `jq.lowering`);
* `_dims`: dimension numbers, free axes, parameters mapped onto the output;
* `_operands`: operand checks, parameter layouts, dynamic (run-time) ranges;
* `_kernels`: the integer path (zero-point terms, blocks, overflow-safe
  chunks, int16 byte splits) and `max_safe_contraction`;
* `_float_operands`: quantizing float operands inside an op, with
  straight-through gradients and NaN / inf propagation;
* `_dot`, `_einsum`, `_conv`: the ops; `_qat`: their quantization-aware forms.
"""

from jq.lowering import int8_lowering, lowering_info
from jq.ops._conv import conv_general_dilated
from jq.ops._dot import dot_general
from jq.ops._einsum import einsum
from jq.ops._kernels import max_safe_contraction
from jq.ops._operands import dynamic_qparams
from jq.ops._qat import qat_conv_general_dilated, qat_dot_general, qat_einsum

__all__ = [
    "conv_general_dilated",
    "dot_general",
    "dynamic_qparams",
    "einsum",
    "int8_lowering",
    "lowering_info",
    "max_safe_contraction",
    "qat_conv_general_dilated",
    "qat_dot_general",
    "qat_einsum",
]
