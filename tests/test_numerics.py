"""Tests for `jq.numerics`: format table, format_info and its checks."""

import ml_dtypes
import numpy as np
import pytest

import jq
from jq import numerics

FLOATS = {
    "float8_e4m3fn": ml_dtypes.float8_e4m3fn,
    "float8_e5m2": ml_dtypes.float8_e5m2,
    "float16": np.float16,
    "bfloat16": ml_dtypes.bfloat16,
}


class TestFormatTable:
    @pytest.mark.parametrize(
        "name,dtype,qmin,qmax,narrow_qmin",
        [
            pytest.param("int8", np.int8, -128, 127, -127, id="int8"),
            pytest.param("uint8", np.uint8, 0, 255, 0, id="uint8"),
            pytest.param("int16", np.int16, -32768, 32767, -32767, id="int16"),
            pytest.param("int4", np.int8, -8, 7, -7, id="int4"),
        ],
    )
    def test_integer_formats(self, name, dtype, qmin, qmax, narrow_qmin):
        fmt = jq.get_format(name)
        assert fmt.dtype == np.dtype(dtype)
        assert fmt.accum_dtype == np.dtype(np.int32)
        assert fmt.is_integer
        assert fmt.grid(narrow_range=False) == (qmin, qmax)
        assert fmt.grid(narrow_range=True) == (narrow_qmin, qmax)
        if name != "int4":
            info = np.iinfo(dtype)
            assert (qmin, qmax) == (info.min, info.max)

    def test_int4_bits(self):
        assert jq.get_format("int4").bits == 4
        assert jq.format_info("int4").bits == 4

    @pytest.mark.parametrize(
        "name,fmax,scaled",
        [
            pytest.param("float8_e4m3fn", 448.0, True, id="e4m3"),
            pytest.param("float8_e5m2", 57344.0, True, id="e5m2"),
            pytest.param("float16", 65504.0, False, id="fp16"),
            pytest.param(
                "bfloat16", float(ml_dtypes.finfo(ml_dtypes.bfloat16).max), False, id="bf16"
            ),
        ],
    )
    def test_float_formats(self, name, fmax, scaled):
        fmt = jq.get_format(name)
        assert fmt.dtype == np.dtype(FLOATS[name])
        assert fmt.accum_dtype == np.dtype(np.float32)
        assert (fmt.qmin, fmt.qmax) == (-fmax, fmax)
        assert fmt.scaled == scaled
        assert not fmt.is_integer
        with pytest.raises(ValueError, match="no integer grid"):
            fmt.grid(narrow_range=True)

    @pytest.mark.parametrize(
        "alias,name",
        [
            ("e4m3", "float8_e4m3fn"),
            ("fp8", "float8_e4m3fn"),
            ("E5M2", "float8_e5m2"),
            ("bf16", "bfloat16"),
            ("fp16", "float16"),
            ("i8", "int8"),
            ("u8", "uint8"),
        ],
    )
    def test_aliases(self, alias, name):
        assert numerics.canonical_name(alias) == name

    def test_unknown_format(self):
        with pytest.raises(ValueError, match=r"unknown format 'int3'.*int8"):
            jq.get_format("int3")
        with pytest.raises(ValueError, match="unknown format 'float7'"):
            jq.QuantSpec("float7")

    def test_format_must_be_a_string(self):
        with pytest.raises(TypeError, match="format must be a string"):
            jq.get_format(8)


class TestFormatInfo:
    @pytest.mark.parametrize("name", FLOATS)
    def test_matches_finfo(self, name):
        fi = ml_dtypes.finfo(FLOATS[name])
        info = jq.format_info(name)
        assert info.max == float(fi.max)
        assert info.min == float(fi.min)
        assert info.smallest_normal == float(fi.smallest_normal)
        assert info.smallest_subnormal == float(fi.smallest_subnormal)
        assert info.eps == float(fi.eps)
        assert info.bits == np.dtype(FLOATS[name]).itemsize * 8

    def test_known_values(self):
        # independent constants: IEEE half, OCP fp8 and bfloat16 definitions
        assert jq.format_info("float16").max == 65504.0
        assert jq.format_info("float16").smallest_normal == 2.0**-14
        assert jq.format_info("float16").eps == 2.0**-10
        assert jq.format_info("e4m3").max == 448.0
        assert jq.format_info("e4m3").smallest_normal == 2.0**-6
        assert jq.format_info("e4m3").eps == 2.0**-3
        assert jq.format_info("e5m2").max == 57344.0
        assert jq.format_info("e5m2").smallest_normal == 2.0**-14
        assert jq.format_info("bf16").smallest_normal == 2.0**-126
        assert jq.format_info("bf16").eps == 2.0**-7

    @pytest.mark.parametrize(
        "name,qmax,qmin",
        [("int8", 127, -128), ("uint8", 255, 0), ("int16", 32767, -32768), ("int4", 7, -8)],
    )
    def test_integer_info(self, name, qmax, qmin):
        info = jq.format_info(name)
        assert (info.max, info.min, info.eps) == (qmax, qmin, 1.0)

    def test_check_integer_formats(self):
        info = jq.format_info("int8")
        assert "underflows to 0 in int8" in info.check(0.3)
        assert "underflows to 0 in int8" in info.check(0.5)  # half to even
        assert info.check(0.7) == "normal in int8"  # rounds to 1, not "subnormal"
        assert info.check(127.0) == "normal in int8"
        assert "overflows int8" in info.check(127.6)
        assert "overflows int8" in info.check(-200.0)
        assert info.check(-128.0) == "normal in int8"
        assert "overflows uint8" in jq.format_info("uint8").check(-1.0)
        assert jq.format_info("uint8").representable(255)
        assert not jq.format_info("int4").representable(8)

    def test_layernorm_epsilon_in_float16(self):
        # the example: does a LayerNorm epsilon of 1e-12 survive float16? No.
        msg = jq.format_info("float16").check(1e-12)
        assert "underflows to 0 in float16" in msg
        assert float(np.float16(1e-12)) == 0.0
        assert not jq.format_info("float16").representable(1e-12)
        # ... but it does survive bfloat16 (8 exponent bits)
        assert jq.format_info("bfloat16").check(1e-12) == "normal in bfloat16"
        assert jq.format_info("bfloat16").representable(1e-12)
        # 1e-5 is subnormal in float16: stored, with precision lost
        assert "subnormal in float16" in jq.format_info("float16").check(1e-5)

    def test_check_categories(self):
        info = jq.format_info("float16")
        assert info.check(0.0) == "exact zero"
        assert "overflows float16" in info.check(1e5)
        assert "overflows float16" in info.check(-1e5)
        assert info.check(1.0) == "normal in float16"

    @pytest.mark.parametrize(
        "name,rounds_to_max,overflows",
        [
            pytest.param("float16", 65519.0, 65520.0, id="fp16"),  # max 65504, next would be 65536
            pytest.param("float8_e4m3fn", 464.0, 465.0, id="e4m3"),  # max 448, tie goes to 448
            pytest.param(
                "float8_e5m2", 61439.0, 61440.0, id="e5m2"
            ),  # max 57344, next would be 65536
        ],
    )
    def test_overflow_threshold(self, name, rounds_to_max, overflows):
        info = jq.format_info(name)
        assert info.check(rounds_to_max) == f"normal in {name}"
        assert f"overflows {name}" in info.check(overflows)
        assert not info.representable(overflows)
        # the cast agrees
        dtype = FLOATS[name]
        assert float(np.float32(rounds_to_max).astype(dtype)) == info.max
        with np.errstate(over="ignore", invalid="ignore"):
            assert not np.isfinite(float(np.float32(overflows).astype(dtype)))

    @pytest.mark.parametrize("name", FLOATS)
    def test_check_agrees_with_a_cast(self, name):
        # underflow iff the cast gives 0, subnormal iff it gives a nonzero value
        # below the smallest normal; probes straddle both thresholds
        dtype = FLOATS[name]
        fi = ml_dtypes.finfo(dtype)
        sub, norm = float(fi.smallest_subnormal), float(fi.smallest_normal)
        info = jq.format_info(name)
        for v in [sub / 4, sub / 2, sub * 0.51, sub, 1.5 * sub, norm * 0.99, norm, norm * 3]:
            stored = float(np.asarray(v, np.float32).astype(dtype))
            msg = info.check(v)
            if stored == 0.0:
                assert "underflows" in msg, (v, stored)
            elif stored < norm:
                assert "subnormal" in msg, (v, stored)
            else:
                assert "normal in" in msg, (v, stored)
                assert "subnormal" not in msg, (v, stored)


def test_module_docstring_example():
    assert jq.numerics.format_info("float16").check(1e-12) == (
        "underflows to 0 in float16 (smallest subnormal 5.96e-08)"
    )
