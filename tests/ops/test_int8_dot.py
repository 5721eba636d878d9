"""Lowering tests: integer dots in StableHLO for cpu / cuda / tpu, and the mixed-dot primitive."""

import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hloparse import platform_views

import jq
from jq import ops
from jq.lowering import int8_lowering
from jq.ops import int8_dot

DENSE = (((1,), (0,)), ((), ()))
PLATFORMS = ("cpu", "cuda", "tpu")

INT_DOT = re.compile(
    r"stablehlo\.dot_general[^\n]*:\s*\(tensor<[^>]*x(ui8|i8)>, tensor<[^>]*xi8>\)\s*->\s*tensor<[^>]*xi32>"
)
INT_CONV = re.compile(
    r"stablehlo\.convolution[^\n]*:\s*\(tensor<[^>]*x(ui8|i8)>, tensor<[^>]*xi8>\)\s*->\s*tensor<[^>]*xi32>"
)
FLOAT_DOT = re.compile(r"stablehlo\.(dot_general|convolution)[^\n]*:\s*\(tensor<[^>]*xf(16|32|64)>")


def _export(f, *args):
    exp = jax.export.export(jax.jit(f), platforms=PLATFORMS)(*args)
    return exp.mlir_module(), exp.platforms


def _static_dense():
    w = jnp.asarray(np.random.default_rng(0).normal(size=(64, 16)), jnp.float32)
    qw = jq.quantize(w, None, jq.QuantSpec("int8", axis=-1))
    spec = jq.QuantSpec("int8")
    qp = jq.qparams_from_range(-3.0, 3.0, spec)

    def dense(x, qw):
        return ops.dot_general(x, qw, DENSE, lhs_spec=spec, lhs_qparams=qp)

    return dense, (jax.ShapeDtypeStruct((4, 64), jnp.float32), qw)


def _static_conv():
    w = jnp.asarray(np.random.default_rng(1).normal(size=(3, 3, 3, 8)), jnp.float32)
    qw = jq.quantize(w, None, jq.QuantSpec("int8", axis=-1))
    spec = jq.QuantSpec("int8")
    qp = jq.qparams_from_range(-3.0, 3.0, spec)

    def conv(x, qw):
        return ops.conv_general_dilated(
            x,
            qw,
            (1, 1),
            "SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            lhs_spec=spec,
            lhs_qparams=qp,
        )

    return conv, (jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.float32), qw)


class TestExport:
    @pytest.mark.parametrize(
        "make,patterns",
        [
            pytest.param(
                _static_dense, {"cpu": INT_DOT, "cuda": INT_DOT, "tpu": INT_DOT}, id="dense"
            ),
            # a conv is patches x weight through the integer dot on every platform
            # (XLA:GPU raises UNIMPLEMENTED for integer convolutions)
            pytest.param(
                _static_conv, {"cpu": INT_DOT, "cuda": INT_DOT, "tpu": INT_DOT}, id="conv"
            ),
        ],
    )
    def test_each_platform_branch_has_an_integer_op(self, make, patterns):
        f, args = make()
        module, platforms = _export(f, *args)
        assert tuple(platforms) == PLATFORMS
        assert '"stablehlo.case"' in module  # one module, a case over platforms
        views = platform_views(module, platforms)
        for platform in PLATFORMS:
            assert re.search(patterns[platform], views[platform]), platform
            assert FLOAT_DOT.search(views[platform]) is None, platform
        # and nowhere in the module a float dot (no dequantize-then-float-dot), nor an
        # integer convolution
        assert FLOAT_DOT.search(module) is None
        assert INT_CONV.search(module) is None

    @pytest.mark.parametrize(
        "form,cpu_t",
        [pytest.param("u8s8", "ui8", id="u8s8"), pytest.param("s8s8", "i8", id="s8s8")],
    )
    def test_cpu_branch_follows_the_form_and_others_signed(self, form, cpu_t):
        f, args = _static_dense()
        with int8_lowering(cpu=form):
            views = platform_views(*_export(f, *args))
        assert INT_DOT.search(views["cpu"]).group(1) == cpu_t
        for platform in ("cuda", "tpu"):
            assert INT_DOT.search(views[platform]).group(1) == "i8"
            assert "xui8>, tensor" not in views[platform]

    def test_parser_sees_branches_separately(self):
        """The view of one platform must not contain another platform's branch."""
        f, args = _static_dense()
        module, platforms = _export(f, *args)
        views = platform_views(module, platforms)
        assert module.count("stablehlo.dot_general") > views["cpu"].count("stablehlo.dot_general")
        assert views["cpu"].count("stablehlo.dot_general") == 1
        assert views["cuda"].count("stablehlo.dot_general") == 1

    def test_float_reference_is_detected(self):
        """The checker flags a dequantize-then-float dot (so a pass is meaningful)."""
        qw = jq.quantize(jnp.ones((64, 16)), None, jq.QuantSpec("int8", axis=-1))
        module, platforms = _export(
            lambda x, qw: x @ jq.dequantize(qw), jax.ShapeDtypeStruct((4, 64), jnp.float32), qw
        )
        assert FLOAT_DOT.search(module) is not None
        assert INT_DOT.search(platform_views(module, platforms)["cpu"]) is None


# ---------------------------------------------------------------------------------------
# compiled CPU HLO
# ---------------------------------------------------------------------------------------
def _hlo_dots(hlo: str):
    """(lhs type, rhs type, result type) of every dot in an optimized HLO module."""
    out = []
    for comp in re.split(r"\n\n", hlo):
        types = dict(re.findall(r"(%[\w.\-]+) = (\w+)\[", comp))
        for m in re.finditer(r"= (\w+)\[[^\]]*\]\S* dot\((%[\w.\-]+), (%[\w.\-]+)\)", comp):
            out.append((types.get(m.group(2)), types.get(m.group(3)), m.group(1)))
    return out


@pytest.mark.cpu_only  # the optimized HLO of XLA:CPU (jit compiles for the default backend)
class TestCompiledCpu:
    @pytest.mark.parametrize(
        "m,rows",
        [
            # (M, rows of the main dot): a small lhs gets the row of ones appended (M + 1);
            # M = 32 > N = 16 takes the weight sums from a reduction over the weight
            pytest.param(1, 2, id="matrix_vector"),
            pytest.param(8, 9, id="small_batch"),
            pytest.param(32, 32, id="large_batch"),
        ],
    )
    def test_cpu_keeps_the_mixed_dot(self, m, rows):
        f, _ = _static_dense()
        w = jq.quantize(jnp.ones((64, 16)), None, jq.QuantSpec("int8", axis=-1))
        with int8_lowering(cpu="u8s8"):
            hlo = jax.jit(f).lower(jnp.ones((m, 64)), w).compile().as_text()
        dots = _hlo_dots(hlo)
        assert dots
        assert all(d == ("u8", "s8", "s32") for d in dots), dots
        if rows > m:  # the int8 weight is never widened to s32 (the sums come from the dot)
            assert not re.search(r"s32\[64,16\]", hlo)
        # M = 1 is padded to 2 rows (never an M = 1 integer dot)
        assert re.search(rf"u8\[{rows},64\]", hlo)

    def test_plain_lax_mixed_dot_is_widened(self):
        """The trap the primitive avoids: lax converts u8 x s8 to s32 x s32."""
        f = jax.jit(lambda a, b: jax.lax.dot_general(a, b, DENSE, preferred_element_type=jnp.int32))
        hlo = (
            f.lower(jnp.ones((4, 64), jnp.uint8), jnp.ones((64, 16), jnp.int8)).compile().as_text()
        )
        assert ("u8", "s8", "s32") not in _hlo_dots(hlo)


# ---------------------------------------------------------------------------------------
# the primitive
# ---------------------------------------------------------------------------------------
def _ints(seed, shape, dtype):
    info = np.iinfo(dtype)
    return np.random.default_rng(seed).integers(info.min, info.max + 1, shape).astype(dtype)


def _np_dot(a, b, dn):
    (lc, rc), (lb, rb) = dn
    return np.asarray(
        jax.lax.dot_general(
            jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32), dn, precision="highest"
        ),
        np.int64,
    )


class TestPrimitive:
    def setup_method(self):
        assert int8_dot.AVAILABLE, "the lowering API should import on the tested JAX"

    @pytest.mark.parametrize(
        "dt", [pytest.param(np.uint8, id="u8"), pytest.param(np.int8, id="s8")]
    )
    def test_abstract_eval(self, dt):
        a = jax.ShapeDtypeStruct((2, 5, 7), dt)
        b = jax.ShapeDtypeStruct((2, 3, 7), jnp.int8)
        dn = (((2,), (2,)), ((0,), (0,)))
        out = jax.eval_shape(lambda a, b: int8_dot.int8_dot_general(a, b, dn, rhs_sums=True), a, b)
        assert (out[0].shape, out[0].dtype) == ((2, 5, 3), jnp.int32)
        assert (out[1].shape, out[1].dtype) == ((2, 3), jnp.int32)

    @pytest.mark.parametrize(
        "dt,ashape,bshape,dn",
        [
            pytest.param(np.uint8, (3, 9), (9, 4), DENSE, id="u8_dense"),
            pytest.param(np.int8, (3, 9), (9, 4), DENSE, id="s8_dense"),
            pytest.param(np.int8, (9,), (9, 4), (((0,), (0,)), ((), ())), id="s8_vector"),
            pytest.param(np.uint8, (1, 9), (4, 9), (((1,), (1,)), ((), ())), id="u8_nk"),
            pytest.param(
                np.int8,
                (2, 3, 4, 5),
                (5, 2, 4, 6),
                (((2, 3), (2, 0)), ((0,), (1,))),
                id="s8_batch_multi",
            ),
        ],
    )
    def test_impl_is_exact(self, variant, dt, ashape, bshape, dn):
        # extreme values included: -128 * -128 and 255 * -128 products
        a, b = _ints(0, ashape, dt), _ints(1, bshape, np.int8)
        out, sums = variant(lambda a, b: int8_dot.int8_dot_general(a, b, dn, rhs_sums=True))(a, b)
        np.testing.assert_array_equal(out, _np_dot(a, b, dn))
        (_, rc), (_, rb) = dn
        ref_sums = _np_dot(
            np.ones([bshape[i] for i in rb] + [bshape[i] for i in rc], np.int8),
            b,
            ((tuple(range(len(rb), len(rb) + len(rc))), rc), (tuple(range(len(rb))), rb)),
        )
        np.testing.assert_array_equal(sums, ref_sums)
        assert out.dtype == jnp.int32

    @pytest.mark.parametrize(
        "in_axes",
        [
            pytest.param((0, None), id="lhs"),
            pytest.param((None, 0), id="rhs"),
            pytest.param((0, 0), id="both"),
            pytest.param((1, 2), id="inner_axes"),
        ],
    )
    def test_batching_rule(self, in_axes):
        dn = (((1,), (0,)), ((), ()))
        a = _ints(2, (3, 4, 6), np.int8)  # 3 along in_axes[0], or the first slice if unmapped
        b = _ints(3, (6, 5), np.int8)
        if in_axes[0] is None:
            a = a[0]
        elif in_axes[0] == 1:
            a = np.moveaxis(a, 0, 1)
        if in_axes[1] is not None:
            b = np.stack([b, -b, b // 2], axis=in_axes[1])  # 3 along in_axes[1]
        a_sl = lambda i: np.take(a, i, axis=in_axes[0]) if in_axes[0] is not None else a  # noqa: E731
        b_sl = lambda i: np.take(b, i, axis=in_axes[1]) if in_axes[1] is not None else b  # noqa: E731
        f = jax.vmap(lambda a, b: int8_dot.int8_dot_general(a, b, dn, rhs_sums=True), in_axes)
        out, sums = f(a, b)
        for i in range(3):
            np.testing.assert_array_equal(out[i], _np_dot(a_sl(i), b_sl(i), dn))
            np.testing.assert_array_equal(sums[i], b_sl(i).astype(np.int64).sum(0))

    def test_lowering_per_platform(self):
        dn = DENSE
        f = lambda a, b: int8_dot.int8_dot_general(a, b, dn)  # noqa: E731
        for dt, cpu_t in ((np.int8, "ui8"), (np.uint8, "ui8")):
            args = (jax.ShapeDtypeStruct((4, 8), dt), jax.ShapeDtypeStruct((8, 3), jnp.int8))
            with int8_lowering(cpu="u8s8"):
                views = platform_views(*_export(f, *args))
            assert INT_DOT.search(views["cpu"]).group(1) == cpu_t
            assert INT_DOT.search(views["cuda"]).group(1) == "i8"
            assert INT_DOT.search(views["tpu"]).group(1) == "i8"

    def test_bad_dtypes(self):
        with pytest.raises(TypeError, match="int8/uint8 lhs and an int8 rhs"):
            int8_dot.int8_dot_general(
                jnp.ones((2, 3), jnp.int16), jnp.ones((3, 2), jnp.int8), DENSE
            )
        with pytest.raises(TypeError, match="int8/uint8 lhs and an int8 rhs"):
            int8_dot.int8_dot_general(
                jnp.ones((2, 3), jnp.int8), jnp.ones((3, 2), jnp.uint8), DENSE
            )

    def test_fallback_warns_and_stays_exact(self):
        a, b = _ints(4, (3, 7), np.uint8), _ints(5, (7, 2), np.int8)
        saved = (int8_dot.AVAILABLE, int8_dot._warned)
        int8_dot.AVAILABLE, int8_dot._warned = False, False
        int8_dot._IMPORT_ERROR = "simulated"
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                out, sums = int8_dot.int8_dot_general(a, b, DENSE, rhs_sums=True)
                ops_out = ops.dot_general(
                    jq.QArray(jnp.asarray(a), jnp.ones((1, 1)), None, "uint8", (3, 7)),
                    jq.QArray(jnp.asarray(b), jnp.ones((1, 1)), None, "int8", (7, 2)),
                    DENSE,
                )
        finally:
            int8_dot.AVAILABLE, int8_dot._warned = saved
        assert any(
            issubclass(w.category, RuntimeWarning) and "0.10.2" in str(w.message) for w in caught
        )
        ref = a.astype(np.int64) @ b.astype(np.int64)
        np.testing.assert_array_equal(out, ref)
        np.testing.assert_array_equal(sums, b.astype(np.int64).sum(0))
        np.testing.assert_array_equal(ops_out, ref.astype(np.float32))

    def test_supported_range_matches_pyproject_and_this_jax(self):
        """pyproject's jax pin is SUPPORTED_JAX, this JAX is inside it, tested ones too."""
        import os

        import tomllib

        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        with open(os.path.join(root, "pyproject.toml"), "rb") as f:
            deps = tomllib.load(f)["project"]["dependencies"]
        lo_op, lo, hi_op, hi = int8_dot.SUPPORTED_JAX
        pin = f"jax{lo_op}{'.'.join(map(str, lo))},{hi_op}{'.'.join(map(str, hi))}"
        assert pin in [d.replace(" ", "") for d in deps]

        def inside(v):
            t = tuple(int(p) for p in re.match(r"(\d+)\.(\d+)\.(\d+)", v).groups())
            return lo <= t < hi

        assert inside(jax.__version__), jax.__version__
        assert all(inside(v) for v in int8_dot.TESTED_JAX_VERSIONS)
