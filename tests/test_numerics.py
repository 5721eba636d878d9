"""Tests for `jq.numerics`: format table, format_info and its checks."""

import ml_dtypes
import numpy as np
from absl.testing import absltest, parameterized

import jq
from jq import numerics

FLOATS = {
    "float8_e4m3fn": ml_dtypes.float8_e4m3fn,
    "float8_e5m2": ml_dtypes.float8_e5m2,
    "float16": np.float16,
    "bfloat16": ml_dtypes.bfloat16,
}


class FormatTableTest(parameterized.TestCase):
    @parameterized.named_parameters(
        ("int8", "int8", np.int8, -128, 127, -127),
        ("uint8", "uint8", np.uint8, 0, 255, 0),
        ("int16", "int16", np.int16, -32768, 32767, -32767),
        ("int4", "int4", np.int8, -8, 7, -7),
    )
    def test_integer_formats(self, name, dtype, qmin, qmax, narrow_qmin):
        fmt = jq.get_format(name)
        self.assertEqual(fmt.dtype, np.dtype(dtype))
        self.assertEqual(fmt.accum_dtype, np.dtype(np.int32))
        self.assertTrue(fmt.is_integer)
        self.assertEqual(fmt.grid(narrow_range=False), (qmin, qmax))
        self.assertEqual(fmt.grid(narrow_range=True), (narrow_qmin, qmax))
        if name != "int4":
            info = np.iinfo(dtype)
            self.assertEqual((qmin, qmax), (info.min, info.max))

    def test_int4_bits(self):
        self.assertEqual(jq.get_format("int4").bits, 4)
        self.assertEqual(jq.format_info("int4").bits, 4)

    @parameterized.named_parameters(
        ("e4m3", "float8_e4m3fn", 448.0, True),
        ("e5m2", "float8_e5m2", 57344.0, True),
        ("fp16", "float16", 65504.0, False),
        ("bf16", "bfloat16", float(ml_dtypes.finfo(ml_dtypes.bfloat16).max), False),
    )
    def test_float_formats(self, name, fmax, scaled):
        fmt = jq.get_format(name)
        self.assertEqual(fmt.dtype, np.dtype(FLOATS[name]))
        self.assertEqual(fmt.accum_dtype, np.dtype(np.float32))
        self.assertEqual((fmt.qmin, fmt.qmax), (-fmax, fmax))
        self.assertEqual(fmt.scaled, scaled)
        self.assertFalse(fmt.is_integer)
        with self.assertRaisesRegex(ValueError, "no integer grid"):
            fmt.grid(narrow_range=True)

    @parameterized.parameters(
        ("e4m3", "float8_e4m3fn"),
        ("fp8", "float8_e4m3fn"),
        ("E5M2", "float8_e5m2"),
        ("bf16", "bfloat16"),
        ("fp16", "float16"),
        ("i8", "int8"),
        ("u8", "uint8"),
    )
    def test_aliases(self, alias, name):
        self.assertEqual(numerics.canonical_name(alias), name)

    def test_unknown_format(self):
        with self.assertRaisesRegex(ValueError, r"unknown format 'int3'.*int8"):
            jq.get_format("int3")
        with self.assertRaisesRegex(ValueError, "unknown format 'float7'"):
            jq.QuantSpec("float7")

    def test_format_must_be_a_string(self):
        with self.assertRaisesRegex(TypeError, "format must be a string"):
            jq.get_format(8)


class FormatInfoTest(parameterized.TestCase):
    @parameterized.named_parameters(*[(n, n) for n in FLOATS])
    def test_matches_finfo(self, name):
        fi = ml_dtypes.finfo(FLOATS[name])
        info = jq.format_info(name)
        self.assertEqual(info.max, float(fi.max))
        self.assertEqual(info.min, float(fi.min))
        self.assertEqual(info.smallest_normal, float(fi.smallest_normal))
        self.assertEqual(info.smallest_subnormal, float(fi.smallest_subnormal))
        self.assertEqual(info.eps, float(fi.eps))
        self.assertEqual(info.bits, np.dtype(FLOATS[name]).itemsize * 8)

    def test_known_values(self):
        # independent constants: IEEE half, OCP fp8 and bfloat16 definitions
        self.assertEqual(jq.format_info("float16").max, 65504.0)
        self.assertEqual(jq.format_info("float16").smallest_normal, 2.0**-14)
        self.assertEqual(jq.format_info("float16").eps, 2.0**-10)
        self.assertEqual(jq.format_info("e4m3").max, 448.0)
        self.assertEqual(jq.format_info("e4m3").smallest_normal, 2.0**-6)
        self.assertEqual(jq.format_info("e4m3").eps, 2.0**-3)
        self.assertEqual(jq.format_info("e5m2").max, 57344.0)
        self.assertEqual(jq.format_info("e5m2").smallest_normal, 2.0**-14)
        self.assertEqual(jq.format_info("bf16").smallest_normal, 2.0**-126)
        self.assertEqual(jq.format_info("bf16").eps, 2.0**-7)

    @parameterized.parameters(
        ("int8", 127, -128), ("uint8", 255, 0), ("int16", 32767, -32768), ("int4", 7, -8)
    )
    def test_integer_info(self, name, qmax, qmin):
        info = jq.format_info(name)
        self.assertEqual((info.max, info.min, info.eps), (qmax, qmin, 1.0))

    def test_check_integer_formats(self):
        info = jq.format_info("int8")
        self.assertIn("underflows to 0 in int8", info.check(0.3))
        self.assertIn("underflows to 0 in int8", info.check(0.5))  # half to even
        self.assertEqual(info.check(0.7), "normal in int8")  # rounds to 1, not "subnormal"
        self.assertEqual(info.check(127.0), "normal in int8")
        self.assertIn("overflows int8", info.check(127.6))
        self.assertIn("overflows int8", info.check(-200.0))
        self.assertEqual(info.check(-128.0), "normal in int8")
        self.assertIn("overflows uint8", jq.format_info("uint8").check(-1.0))
        self.assertTrue(jq.format_info("uint8").representable(255))
        self.assertFalse(jq.format_info("int4").representable(8))

    def test_layernorm_epsilon_in_float16(self):
        # the example: does a LayerNorm epsilon of 1e-12 survive float16? No.
        msg = jq.format_info("float16").check(1e-12)
        self.assertIn("underflows to 0 in float16", msg)
        self.assertEqual(float(np.float16(1e-12)), 0.0)
        self.assertFalse(jq.format_info("float16").representable(1e-12))
        # ... but it does survive bfloat16 (8 exponent bits)
        self.assertEqual(jq.format_info("bfloat16").check(1e-12), "normal in bfloat16")
        self.assertTrue(jq.format_info("bfloat16").representable(1e-12))
        # 1e-5 is subnormal in float16: stored, with precision lost
        self.assertIn("subnormal in float16", jq.format_info("float16").check(1e-5))

    def test_check_categories(self):
        info = jq.format_info("float16")
        self.assertEqual(info.check(0.0), "exact zero")
        self.assertIn("overflows float16", info.check(1e5))
        self.assertIn("overflows float16", info.check(-1e5))
        self.assertEqual(info.check(1.0), "normal in float16")

    @parameterized.named_parameters(
        ("fp16", "float16", 65519.0, 65520.0),  # max 65504, next would be 65536
        ("e4m3", "float8_e4m3fn", 464.0, 465.0),  # max 448, tie goes to 448
        ("e5m2", "float8_e5m2", 61439.0, 61440.0),  # max 57344, next would be 65536
    )
    def test_overflow_threshold(self, name, rounds_to_max, overflows):
        info = jq.format_info(name)
        self.assertEqual(info.check(rounds_to_max), f"normal in {name}")
        self.assertIn(f"overflows {name}", info.check(overflows))
        self.assertFalse(info.representable(overflows))
        # the cast agrees
        dtype = FLOATS[name]
        self.assertEqual(float(np.float32(rounds_to_max).astype(dtype)), info.max)
        with np.errstate(over="ignore", invalid="ignore"):
            self.assertFalse(np.isfinite(float(np.float32(overflows).astype(dtype))))

    @parameterized.named_parameters(*[(n, n) for n in FLOATS])
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
                self.assertIn("underflows", msg, (v, stored))
            elif stored < norm:
                self.assertIn("subnormal", msg, (v, stored))
            else:
                self.assertIn("normal in", msg, (v, stored))
                self.assertNotIn("subnormal", msg, (v, stored))


def test_module_docstring_example():
    assert jq.numerics.format_info("float16").check(1e-12) == (
        "underflows to 0 in float16 (smallest subnormal 5.96e-08)"
    )


if __name__ == "__main__":
    absltest.main()
