"""Every integer form is exact on this CPU, the choice follows the hardware, and the
accelerator form is what the cuda / tpu branches of an export carry.

The forms (`jq.lowering`): ``u8s8`` (x86 VNNI / AMX), ``s8s8`` (other CPUs) and
``s8s8_padk`` (every non-CPU platform). Any form can be selected on CPU with
`jq.ops.int8_lowering`, so the GPU / TPU form is proven bit-exact here against an
int64 numpy reference, without an accelerator.
"""

import os
import re
from types import SimpleNamespace
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hloparse import platform_views
from hypothesis import given, settings
from hypothesis import strategies as st

import jq
from jq import lowering, ops
from jq.flax._graph import scan_counts
from jq.lowering import int8_lowering
from jq.ops import int8_dot

FORMS = tuple(lowering.CPU_FORMS)
DENSE = (((1,), (0,)), ((), ()))
NK = (((1,), (1,)), ((), ()))


def _ints(rng, shape, dtype):
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max + 1, shape).astype(dtype)


def _np_dot(a, b, dn):
    """int64 numpy reference of `jax.lax.dot_general`'s semantics."""
    (lc, rc), (lb, rb) = dn
    lf = [i for i in range(a.ndim) if i not in lc and i not in lb]
    rf = [i for i in range(b.ndim) if i not in rc and i not in rb]
    a2 = np.transpose(a, list(lb) + lf + list(lc)).astype(np.int64)
    b2 = np.transpose(b, list(rb) + list(rc) + rf).astype(np.int64)
    bs = [a.shape[i] for i in lb]
    k = int(np.prod([a.shape[i] for i in lc], dtype=np.int64))
    m = int(np.prod([a.shape[i] for i in lf], dtype=np.int64))
    n = int(np.prod([b.shape[i] for i in rf], dtype=np.int64))
    out = np.matmul(a2.reshape(bs + [m, k]), b2.reshape(bs + [k, n]))
    return out.reshape(bs + [a.shape[i] for i in lf] + [b.shape[i] for i in rf])


@st.composite
def _dot_case(draw):
    """A random dot: batch dims, several free / contracting axes, either weight layout."""
    nb = draw(st.integers(0, 1))
    batch = [draw(st.integers(1, 3)) for _ in range(nb)]
    lfree = [draw(st.integers(1, 5)) for _ in range(draw(st.integers(0, 2)))]
    rfree = [draw(st.integers(1, 6)) for _ in range(draw(st.integers(0, 2)))]
    contract = [draw(st.sampled_from([1, 2, 3, 4, 5, 7, 16]))]
    if draw(st.booleans()):
        contract.append(draw(st.integers(1, 3)))
    # lhs axes: batch, free, contracting in a drawn order; rhs likewise
    lkinds = [("b", i) for i in range(nb)] + [("f", i) for i in range(len(lfree))]
    lkinds += [("c", i) for i in range(len(contract))]
    rkinds = [("b", i) for i in range(nb)] + [("g", i) for i in range(len(rfree))]
    rkinds += [("c", i) for i in range(len(contract))]
    lperm = draw(st.permutations(lkinds))
    rperm = draw(st.permutations(rkinds))
    size = {"b": batch, "f": lfree, "g": rfree, "c": contract}
    ashape = tuple(size[k][i] for k, i in lperm)
    bshape = tuple(size[k][i] for k, i in rperm)
    lc = tuple(lperm.index(("c", i)) for i in range(len(contract)))
    rc = tuple(rperm.index(("c", i)) for i in range(len(contract)))
    lb = tuple(lperm.index(("b", i)) for i in range(nb))
    rb = tuple(rperm.index(("b", i)) for i in range(nb))
    return ashape, bshape, ((lc, rc), (lb, rb))


class TestEveryFormIsExact:
    @pytest.mark.parametrize("form", FORMS)
    @pytest.mark.parametrize("lhs", ("int8", "uint8"))
    @settings(max_examples=10, deadline=None)  # x 6 (form, lhs): 60 random dots
    @given(case=_dot_case(), seed=st.integers(0, 2**31 - 1), sums=st.booleans())
    def test_primitive_matches_int64(self, form, lhs, case, seed, sums):
        ashape, bshape, dn = case
        rng = np.random.default_rng(seed)
        a, b = _ints(rng, ashape, np.dtype(lhs)), _ints(rng, bshape, np.int8)
        with int8_lowering(cpu=form):
            res = jax.jit(lambda a, b: int8_dot.int8_dot_general(a, b, dn, rhs_sums=sums))(a, b)
        out = res[0] if sums else res
        np.testing.assert_array_equal(np.asarray(out), _np_dot(a, b, dn))
        assert out.dtype == jnp.int32
        if sums:
            (_, rc), (_, rb) = dn
            kept = [i for i in range(b.ndim) if i not in rc]
            ref = b.astype(np.int64).sum(axis=rc)
            order = [kept.index(i) for i in rb] + [kept.index(i) for i in kept if i not in rb]
            np.testing.assert_array_equal(np.asarray(res[1]), np.transpose(ref, order))

    @pytest.mark.parametrize("form", FORMS)
    @pytest.mark.parametrize("k", (1, 2, 3, 5))
    @pytest.mark.parametrize("m", (1, 2, 12))
    @pytest.mark.parametrize("layout", ("kn", "nk"))
    def test_small_contractions_and_extremes(self, form, k, m, layout):
        """K in {1, 2, 3, 5} (K = 3 is wrong in XLA:GPU's plain s8 dot), extreme values."""
        rng = np.random.default_rng(k * 100 + m)
        a = _ints(rng, (m, k), np.int8)
        a[0] = -128  # -128 * -128 products
        w = _ints(rng, (k, 5), np.int8)
        w[:, 0] = -128
        b, dn = (w, DENSE) if layout == "kn" else (w.T.copy(), NK)
        with int8_lowering(cpu=form):
            out = int8_dot.int8_dot_general(a, b, dn)
        np.testing.assert_array_equal(np.asarray(out), a.astype(np.int64) @ w.astype(np.int64))

    @pytest.mark.parametrize("form", FORMS)
    def test_vmap(self, form):
        rng = np.random.default_rng(0)
        a, b = _ints(rng, (4, 3, 5), np.uint8), _ints(rng, (4, 5, 2), np.int8)
        with int8_lowering(cpu=form):
            out = jax.vmap(lambda a, b: int8_dot.int8_dot_general(a, b, DENSE))(a, b)
        np.testing.assert_array_equal(
            np.asarray(out), np.einsum("bmk,bkn->bmn", a.astype(np.int64), b.astype(np.int64))
        )

    @pytest.mark.parametrize("form", FORMS)
    def test_export_with_symbolic_batch(self, form):
        """A shape-polymorphic export (batch symbolic, possibly 1 at run time) stays exact.

        Exported for the platform it is called on: on cpu the form under test, on an
        accelerator its one form (``s8s8_padk``) whatever `form` is.
        """
        pytest.importorskip("flatbuffers", reason="jax.export serialization needs flatbuffers")
        rng = np.random.default_rng(1)
        w = _ints(rng, (3, 4), np.int8)
        f = jax.jit(lambda a, w: int8_dot.int8_dot_general(a, w, DENSE, rhs_sums=True))
        (b,) = jax.export.symbolic_shape("b")
        with int8_lowering(cpu=form):
            exp = jax.export.export(f, platforms=(jq.deploy.default_platform(),))(
                jax.ShapeDtypeStruct((b, 3), jnp.uint8), jax.ShapeDtypeStruct((3, 4), jnp.int8)
            )
        back = jax.export.deserialize(exp.serialize())
        for m in (1, 2, 7):
            a = _ints(rng, (m, 3), np.uint8)
            out, sums = back.call(a, w)
            np.testing.assert_array_equal(np.asarray(out), a.astype(np.int64) @ w.astype(np.int64))
            np.testing.assert_array_equal(np.asarray(sums), w.astype(np.int64).sum(0))


def _q(x, fmt, **kw):
    return jq.quantize(jnp.asarray(x), None, jq.QuantSpec(fmt, **kw))


def _int_ref(ql, qr, subscripts):
    """``(q_l - Z_l)(q_r - Z_r)`` contracted in int64, times both scales (float64)."""

    def centred(q):
        v = np.asarray(q.int_value()).astype(np.int64)
        return v - (0 if q.zero_point is None else np.asarray(q.zero_point).astype(np.int64))

    acc = np.einsum(subscripts, centred(ql), centred(qr))
    ls, rs = np.asarray(ql.scale, np.float64), np.asarray(qr.scale, np.float64)
    return acc, np.einsum(subscripts, ls, rs)


class TestOpsExactInEveryForm:
    """jq.ops integer paths give the same result in every form (int64 reference)."""

    @pytest.mark.parametrize("form", FORMS)
    @pytest.mark.parametrize(
        "case",
        (
            "int8_per_channel",
            "uint8_affine_lhs",
            "affine_both",
            "int4_per_block",
            "int16_lhs",
            "batched_einsum",
        ),
    )
    def test_case(self, form, case):
        rng = np.random.default_rng(hash(case) % 2**32)
        x = rng.normal(size=(5, 24)).astype(np.float32)
        w = rng.normal(size=(24, 7)).astype(np.float32)
        if case == "int8_per_channel":
            ql, qr, sub = _q(x, "int8", axis=0), _q(w, "int8", axis=1), "mk,kn->mn"
        elif case == "uint8_affine_lhs":
            ql, qr, sub = _q(x, "uint8", scheme="affine"), _q(w, "int8", axis=1), "mk,kn->mn"
        elif case == "affine_both":
            ql = _q(x, "int8", scheme="affine", axis=0)
            qr = _q(w, "uint8", scheme="affine", axis=1)
            sub = "mk,kn->mn"
        elif case == "int4_per_block":
            ql, qr = _q(x, "int8"), _q(w, "int4", axis=1, block_size=8, block_axis=0)
            sub = None
        elif case == "int16_lhs":
            ql, qr, sub = _q(x, "int16"), _q(w, "int8", axis=1), "mk,kn->mn"
        else:
            x3 = rng.normal(size=(2, 5, 24)).astype(np.float32)
            w3 = rng.normal(size=(2, 24, 3)).astype(np.float32)
            ql, qr, sub = _q(x3, "int8"), _q(w3, "int8", axis=(0, 2)), "bmk,bkn->bmn"
        with int8_lowering(cpu=form):
            if sub == "bmk,bkn->bmn":
                out = ops.einsum(sub, ql, qr)
            else:
                out = ops.dot_general(ql, qr, DENSE)
        out = np.asarray(out, np.float64)
        if sub is None:  # per block: the reference sums the blocks of 8 one by one
            vl = np.asarray(ql.int_value()).astype(np.int64)
            vr = np.asarray(qr.int_value()).astype(np.int64)
            rs = np.asarray(qr.scale, np.float64)  # (3, 7): one scale per block of 8 rows
            ref = sum(
                (vl[:, i * 8 : (i + 1) * 8] @ vr[i * 8 : (i + 1) * 8]) * rs[i] for i in range(3)
            ) * float(ql.scale.reshape(()))
        else:
            acc, scale = _int_ref(ql, qr, sub)
            ref = acc * scale
        np.testing.assert_allclose(out, ref, rtol=2e-6, atol=1e-6 * np.abs(ref).max())


class TestConvInEveryForm:
    @pytest.mark.parametrize("form", FORMS)
    @pytest.mark.parametrize("groups", (1, 2))
    @pytest.mark.parametrize("lhs_dilation", ((1, 1), (2, 1)))
    @pytest.mark.parametrize("fmt", ("int8", "uint8"))
    @pytest.mark.parametrize("per_example", (False, True))
    def test_conv_matches_int_reference(self, form, groups, lhs_dilation, fmt, per_example):
        rng = np.random.default_rng(groups * 7 + lhs_dilation[0])
        x = rng.normal(size=(2, 7, 6, 4)).astype(np.float32)
        w = rng.normal(size=(3, 2, 4 // groups, 6)).astype(np.float32)
        spec = dict(scheme="affine") if fmt == "uint8" else {}
        if per_example:
            spec["axis"] = 0
        qx, qw = _q(x, fmt, **spec), _q(w, "int8", axis=-1)
        kw = dict(
            window_strides=(2, 1),
            padding=((1, 1), (0, -1)),  # negative padding crops
            lhs_dilation=lhs_dilation,
            rhs_dilation=(1, 2),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=groups,
        )
        with int8_lowering(cpu=form):
            out = np.asarray(ops.conv_general_dilated(qx, qw, **kw), np.float64)
        xv = np.asarray(qx.int_value()).astype(np.float64)
        if qx.zero_point is not None:
            xv = xv - np.asarray(qx.zero_point)
        wv = np.asarray(qw.int_value()).astype(np.float64)
        # integer values below 2**24 and sums of at most 12 products: exact in float32
        acc = np.asarray(
            jax.lax.conv_general_dilated(
                jnp.asarray(xv, jnp.float32),
                jnp.asarray(wv, jnp.float32),
                precision="highest",
                **kw,
            ),
            np.float64,
        )
        sx = np.asarray(qx.scale, np.float64).reshape(-1, 1, 1, 1)
        ref = acc * sx * np.asarray(qw.scale, np.float64).reshape(-1)
        np.testing.assert_allclose(out, ref, rtol=2e-6, atol=1e-6 * np.abs(ref).max())


class TestConvNonFiniteReach:
    """A NaN pixel makes exactly the outputs NaN that a float conv makes NaN."""

    @pytest.mark.parametrize("lhs_dilation", ((1, 1), (2, 1)))
    @pytest.mark.parametrize("rhs_dilation", ((1, 1), (1, 2)))
    @pytest.mark.parametrize("stride", ((1, 1), (2, 1)))
    @pytest.mark.parametrize("groups", (1, 2))
    @pytest.mark.parametrize("layout", (("NHWC", "HWIO", "NHWC"), ("NCHW", "OIHW", "NHWC")))
    def test_nan_pattern(self, lhs_dilation, rhs_dilation, stride, groups, layout):
        rng = np.random.default_rng(3)
        x = rng.normal(size=(2, 7, 6, 4)).astype(np.float32)
        x[1, 3, 2, 0] = np.nan
        x[0, 6, 5, 3] = np.inf
        w = rng.normal(size=(3, 2, 4 // groups, 6)).astype(np.float32)
        if layout[0] == "NCHW":
            x = x.transpose(0, 3, 1, 2)
            w = w.transpose(3, 2, 0, 1)
        qw = _q(w, "int8", axis=0 if layout[1] == "OIHW" else -1)
        spec = jq.QuantSpec("int8")
        kw = dict(
            window_strides=stride,
            padding=((1, 1), (0, 1)),
            lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation,
            dimension_numbers=layout,
            feature_group_count=groups,
        )
        out = ops.conv_general_dilated(
            jnp.asarray(x),
            qw,
            lhs_spec=spec,
            lhs_qparams=jq.qparams_from_range(-3.0, 3.0, spec),
            **kw,
        )
        ref = jax.lax.conv_general_dilated(jnp.asarray(x), jq.dequantize(qw), **kw)
        np.testing.assert_array_equal(np.isfinite(np.asarray(out)), np.isfinite(np.asarray(ref)))
        assert np.isfinite(np.asarray(out)).any()


# ---------------------------------------------------------------------------------------
# the choice
# ---------------------------------------------------------------------------------------
AVX2_ONLY = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma bmi2\n"
VNNI = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512bw avx512_vnni\n"
AVX_VNNI = "processor\t: 0\nflags\t\t: fpu avx2 avx_vnni\n"
AMX = "processor\t: 0\nflags\t\t: fpu avx2 avx512f amx_int8 amx_tile\n"
ARM = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes asimddp i8mm\n"


def _feat(arch, text):
    return lowering.CpuFeatures(arch, lowering._parse_cpuinfo(text), "/proc/cpuinfo")


class TestChoice:
    @pytest.mark.parametrize(
        "arch,text,form,kind",
        [
            pytest.param("x86_64", AVX2_ONLY, "s8s8", "x86-avx2", id="avx2_only"),
            pytest.param("x86_64", VNNI, "u8s8", "x86-vnni", id="avx512_vnni"),
            pytest.param("x86_64", AVX_VNNI, "u8s8", "x86-avx-vnni", id="avx_vnni"),
            pytest.param("x86_64", AMX, "u8s8", "x86-avx-vnni", id="amx"),
            pytest.param("aarch64", ARM, "s8s8", "aarch64", id="aarch64"),
        ],
    )
    def test_form_per_cpu(self, arch, text, form, kind):
        feat = _feat(arch, text)
        assert lowering._auto_cpu_form(feat)[0] == form
        assert feat.kind == kind

    def test_this_machine(self):
        """The automatic choice agrees with /proc/cpuinfo read independently."""
        try:
            with open("/proc/cpuinfo") as f:
                text = f.read()
        except OSError:
            pytest.skip("no /proc/cpuinfo on this OS")  # numpy's features are used there
        has = re.search(r"\b(avx512_vnni|avx_vnni|amx_int8)\b", text) is not None
        x86 = os.uname().machine in ("x86_64", "amd64")
        with mock.patch.dict(os.environ, {lowering.ENV_VAR: "auto"}):
            form = lowering.current().cpu_form
        assert form == ("u8s8" if (x86 and has) else "s8s8")

    def test_precedence_override_env_auto(self):
        with mock.patch.dict(os.environ, {lowering.ENV_VAR: "s8s8_padk"}):
            assert lowering.current().cpu_form == "s8s8_padk"
            assert lowering.current().source == "env"
            with int8_lowering(cpu="s8s8"):
                assert lowering.current().cpu_form == "s8s8"
                with int8_lowering(k_multiple=16):  # nests: keeps the outer form
                    assert lowering.current().cpu_form == "s8s8"
                    assert lowering.current().k_multiple == 16
                assert lowering.current().k_multiple == 4
            assert lowering.current().source == "env"

    def test_bad_values_are_named(self):
        with pytest.raises(ValueError, match="unknown integer form 'vnni'.*'u8s8'"):
            with int8_lowering(cpu="vnni"):
                pass
        with pytest.raises(ValueError, match="k_multiple must be a positive int"):
            with int8_lowering(k_multiple=0):
                pass
        with mock.patch.dict(os.environ, {lowering.ENV_VAR: "fast"}):
            with pytest.raises(ValueError, match="JQ_INT8_CPU_FORM"):
                int8_dot.int8_dot_general(
                    jnp.ones((2, 3), jnp.int8), jnp.ones((3, 2), jnp.int8), DENSE
                )

    def test_lowering_info(self):
        info = ops.lowering_info()
        assert info["cpu"]["form"] in FORMS
        assert info["accelerator"]["form"] == "s8s8_padk"
        assert "float32" in info["cpu"]["no_gain"]  # says where int8 does not win
        assert info["cpu"]["expectation"]
        with int8_lowering(cpu="s8s8"):
            assert ops.lowering_info()["cpu"]["chosen_by"] == "override"

    def test_numpy_feature_fallback(self):
        fake = {"AVX2": True, "AVX512VNNI": True, "ASIMDDP": False, "SSE": True}
        with mock.patch("numpy._core._multiarray_umath.__cpu_features__", fake, create=True):
            assert lowering._numpy_flags() == frozenset({"avx2", "avx512_vnni"})


class TestScanParams:
    def test_jax_010_names(self):
        assert scan_counts({"num_consts": 2, "num_carry": 3, "length": 4}) == (2, 3)

    def test_jax_011_flat_tree(self):
        """jax 0.11 replaced num_consts / num_carry by ft_in (groups: consts, carry, xs)."""
        ft = SimpleNamespace(unpack=lambda: (("c0",), ("k0", "k1", "k2"), ("x0", "x1")))
        assert scan_counts({"ft_in": ft, "length": 4}) == (1, 3)

    def test_this_jax(self):
        j = jax.make_jaxpr(lambda c, w, xs: jax.lax.scan(lambda c, x: (c * w + x, c), c, xs))(
            1.0, 2.0, jnp.ones(3)
        )
        (eqn,) = [e for e in j.jaxpr.eqns if e.primitive.name == "scan"]
        assert scan_counts(eqn.params) == (1, 1)

    def test_unknown_params_are_named(self):
        with pytest.raises(KeyError, match="unrecognised scan parameters"):
            scan_counts({"length": 3})


# ---------------------------------------------------------------------------------------
# the accelerator branch of an export
# ---------------------------------------------------------------------------------------
_DOT = re.compile(
    r"stablehlo\.dot_general[^\n]*contracting_dims = \[(\d+)\] x \[(\d+)\][^\n]*:\s*"
    r"\(tensor<([\dx]+)x(ui8|i8)>, tensor<([\dx]+)xi8>\)"
)


class TestAcceleratorExport:
    def _branches(self, f, *args):
        exp = jax.export.export(jax.jit(f), platforms=("cpu", "cuda", "tpu"))(*args)
        return platform_views(exp.mlir_module(), exp.platforms)

    def test_cuda_contraction_is_padded_to_a_multiple_of_4(self):
        """K = 3 (wrong in XLA:GPU's plain s8 dot) reaches cuda / tpu as K = 4, free dims >= 16."""
        f = lambda a, b: int8_dot.int8_dot_general(a, b, DENSE)  # noqa: E731
        args = (jax.ShapeDtypeStruct((12, 3), jnp.int8), jax.ShapeDtypeStruct((3, 5), jnp.int8))
        with int8_lowering(cpu="u8s8"):
            views = self._branches(f, *args)
        for p in ("cuda", "tpu"):
            (m,) = _DOT.findall(views[p])
            lhs = [int(d) for d in m[2].split("x")]
            rhs = [int(d) for d in m[4].split("x")]
            assert m[3] == "i8"
            assert lhs == [16, 4]  # M 12 -> 16, K 3 -> 4
            assert rhs == [4, 16]  # N 5 -> 16
        (m,) = _DOT.findall(views["cpu"])
        assert m[3] == "ui8"  # the cpu branch keeps the VNNI form, unpadded K
        assert [int(d) for d in m[4].split("x")] == [3, 5]

    def test_k_multiple_override_reaches_the_cuda_branch(self):
        f = lambda a, b: int8_dot.int8_dot_general(a, b, NK)  # noqa: E731
        args = (jax.ShapeDtypeStruct((32, 40), jnp.int8), jax.ShapeDtypeStruct((24, 40), jnp.int8))
        with int8_lowering(k_multiple=16):
            views = self._branches(f, *args)
        (m,) = _DOT.findall(views["cuda"])
        assert [int(d) for d in m[2].split("x")] == [32, 48]
        assert [int(d) for d in m[4].split("x")] == [24, 48]  # (N, K) kept: no transpose

    def test_conv_has_no_integer_convolution_on_any_platform(self):
        qw = _q(np.ones((3, 3, 2, 8), np.float32), "int8", axis=-1)  # 2 groups of 2 inputs
        spec = jq.QuantSpec("int8")
        qp = jq.qparams_from_range(-1.0, 1.0, spec)

        def conv(x, qw):
            return ops.conv_general_dilated(
                x,
                qw,
                (1, 1),
                "SAME",
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
                feature_group_count=2,
                lhs_spec=spec,
                lhs_qparams=qp,
            )

        views = self._branches(conv, jax.ShapeDtypeStruct((2, 6, 6, 4), jnp.float32), qw)
        for p, v in views.items():
            assert _DOT.search(v) is not None, p
            assert not re.search(r"stablehlo\.convolution[^\n]*xi8>", v), p
