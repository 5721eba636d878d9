"""Flax integration: rules, calibrate, convert, apply, QAT and reports for linen and nnx."""

from jq.flax.api import (
    QAT,
    CalibrationStats,
    QuantizedVariables,
    SitePlan,
    apply,
    calibrate,
    convert,
    format_table,
    qat,
    report,
    sites,
)
from jq.flax.rules import OP_KINDS, Rule

__all__ = [
    "OP_KINDS",
    "QAT",
    "CalibrationStats",
    "QuantizedVariables",
    "Rule",
    "SitePlan",
    "apply",
    "calibrate",
    "convert",
    "format_table",
    "qat",
    "report",
    "sites",
]
