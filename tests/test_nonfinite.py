"""NaN and inf inputs: each reaches only the outputs it reaches in the float op.

A non-finite value in an activation row makes that output row NaN (in a conv,
the outputs whose window covers it) and leaves every other output exactly as
it is without that row. With ``check_finite=True``, `checkify` with
``user_checks`` reports it; by default no check is staged, so jitted functions
keep JAX's fast dispatch path.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify
from models import MLP

import jq
from jq import calibration as cal
from jq import ops

DENSE = (((1,), (0,)), ((), ()))
W8 = jq.QuantSpec("int8", axis=-1)
BAD = (("nan", np.nan), ("inf", np.inf), ("neg_inf", -np.inf))
# activation specs of the modes; None is weight-only
MODES = {
    "static": (jq.QuantSpec("int8"), jq.QParams(jnp.float32(3.0 / 127))),
    "dynamic_tensor": (jq.QuantSpec("int8"), None),
    "dynamic_token": (jq.QuantSpec("int8", axis=0), None),
    "dynamic_affine": (jq.QuantSpec("uint8", scheme="affine"), None),
    "weight_only": (None, None),
}


def _normal(seed, shape, scale=1.0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape) * scale, jnp.float32)


def _poison(x, index, value):
    """`x` with the row of `index` halved (so a per-tensor range stays that of the other rows)
    and the element at `index` set to `value`."""
    row = index[:-1]
    return x.at[row].multiply(0.5).at[index].set(value)


def _n_checks(jaxpr) -> int:
    """The number of checkify `check` equations in a (closed) jaxpr, sub-jaxprs included."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    n = 0
    for eqn in jaxpr.eqns:
        n += eqn.primitive.name == "check"
        for p in eqn.params.values():
            for sub in p if isinstance(p, (list, tuple)) else (p,):
                if hasattr(sub, "eqns") or hasattr(getattr(sub, "jaxpr", None), "eqns"):
                    n += _n_checks(sub)
    return n


def _product(*named):
    return [(f"{a[0]}_{b[0]}", *a[1:], *b[1:]) for a in named[0] for b in named[1]]


# ---------------------------------------------------------------------------------------
# jq.ops
# ---------------------------------------------------------------------------------------
class TestDot:
    def setup_method(self):
        self.x = _normal(0, (8, 32))
        self.qw = jq.quantize(_normal(1, (32, 6)), None, W8)

    def _dot(self, mode, check_finite=False):
        spec, qp = MODES[mode]
        return jax.jit(
            lambda x: ops.dot_general(
                x, self.qw, DENSE, lhs_spec=spec, lhs_qparams=qp, check_finite=check_finite
            )
        )

    @pytest.mark.parametrize(
        "mode,value",
        [
            pytest.param(*c[1:], id=c[0])
            for c in _product([(m, m) for m in MODES], [(n, v) for n, v in BAD])
        ],
    )
    def test_bad_row_is_nonfinite_and_other_rows_are_as_alone(self, mode, value):
        f = self._dot(mode)
        x = _poison(self.x, (2, 5), value)
        y = np.asarray(f(x))
        assert not np.isfinite(y[2]).any()
        clean = np.r_[0:2, 3:8]
        spec = MODES[mode][0]
        if spec is not None and spec.axis is None:  # precondition: the same per-tensor range
            a = ops.dynamic_qparams(x, spec)
            b = ops.dynamic_qparams(self.x[clean], spec)
            np.testing.assert_array_equal(a.scale, b.scale)
        alone = np.asarray(f(self.x[clean]))
        if mode == "weight_only":  # a float dot: its blocking may differ with the row count
            np.testing.assert_allclose(y[clean], alone, rtol=1e-6, atol=1e-6)
        else:
            np.testing.assert_array_equal(y[clean], alone)

    @pytest.mark.parametrize(
        "mode",
        [
            pytest.param("dynamic_tensor", id="int8"),
            pytest.param("dynamic_affine", id="uint8_affine"),
        ],
    )
    def test_dynamic_range_leaves_out_the_whole_bad_row(self, mode):
        # the bad row's finite values are 10x the others: they must not set the range
        f = self._dot(mode)
        x = self.x.at[2].multiply(10.0).at[2, 5].set(np.nan)
        y = np.asarray(f(x))
        clean = np.r_[0:2, 3:8]
        assert np.isnan(y[2]).all()
        np.testing.assert_array_equal(y[clean], np.asarray(f(self.x[clean])))

    @pytest.mark.parametrize(
        "fmt,axis,scheme",
        [
            pytest.param("int8", None, "symmetric", id="int8_tensor"),
            pytest.param("int8", 0, "symmetric", id="int8_token"),
            pytest.param("uint8", None, "affine", id="uint8_affine"),
            pytest.param("int16", None, "symmetric", id="int16"),
            pytest.param("e4m3", None, "symmetric", id="e4m3"),
        ],
    )
    def test_finite_inputs_take_the_integer_path_unchanged(self, fmt, axis, scheme):
        # the row-wise finite range equals the plain min-max range bit for bit
        spec = jq.QuantSpec(fmt, axis=axis, scheme=scheme)
        qw = self.qw if fmt != "e4m3" else jq.quantize(_normal(1, (32, 6)), None, spec)
        y = jax.jit(lambda x: ops.dot_general(x, qw, DENSE, lhs_spec=spec))(self.x)
        qx = jq.quantize(self.x, jq.qparams_from_array(self.x, spec), spec)
        np.testing.assert_array_equal(y, ops.dot_general(qx, qw, DENSE))

    def test_quantized_modes_give_nan_rows(self):
        for mode in ("static", "dynamic_tensor", "dynamic_token"):
            y = self._dot(mode)(self.x.at[4, 0].set(np.inf))
            assert np.isnan(np.asarray(y[4])).all(), mode

    def test_all_rows_nonfinite(self):
        y = self._dot("dynamic_tensor")(jnp.full_like(self.x, np.nan))
        assert np.isnan(np.asarray(y)).all()

    def test_dynamic_range_ignores_nonfinite_values(self):
        x = self.x.at[1, 1].set(np.nan).at[3, 3].set(-np.inf).at[5, 5].set(np.inf)
        finite = jnp.where(jnp.isfinite(x), x, 0.0)
        for spec in (
            jq.QuantSpec("int8"),
            jq.QuantSpec("uint8", scheme="affine"),
            jq.QuantSpec("int8", axis=0),
            jq.QuantSpec("e4m3"),
        ):
            a = jax.jit(ops.dynamic_qparams, static_argnums=1)(x, spec)
            b = jq.qparams_from_array(finite, spec)
            np.testing.assert_array_equal(a.scale, b.scale)
            assert np.isfinite(np.asarray(a.scale)).all()

    @pytest.mark.parametrize(
        "value", [pytest.param(np.nan, id="nan"), pytest.param(np.inf, id="inf")]
    )
    def test_einsum_rows_and_activation_rhs_columns(self, value):
        # x @ W: row (b, s) of x
        x = _normal(2, (2, 4, 32))
        spec = jq.QuantSpec("int8")
        f = jax.jit(lambda x: ops.einsum("bsd,dn->bsn", x, self.qw, lhs_spec=spec))
        xb = _poison(x, (1, 2, 7), value)
        y = np.asarray(f(xb))
        assert np.isnan(y[1, 2]).all()
        ref = np.asarray(f(xb.at[1, 2, 7].set(0.0)))  # the same row, finite
        mask = np.ones(y.shape, bool)
        mask[1, 2] = False
        np.testing.assert_array_equal(y[mask], ref[mask])
        # q . k^T with both operands dynamic activations: a bad k row is a bad output column
        q, k = _normal(3, (2, 5, 8)), _normal(4, (2, 6, 8))
        g = jax.jit(lambda q, k: ops.einsum("bqd,bkd->bqk", q, k, lhs_spec=spec, rhs_spec=spec))
        kb = _poison(k, (0, 3, 5), value)
        y = np.asarray(g(q, kb))
        assert np.isnan(y[0, :, 3]).all()
        mask = np.ones(y.shape, bool)
        mask[0, :, 3] = False
        np.testing.assert_array_equal(y[mask], np.asarray(g(q, kb.at[0, 3, 5].set(0.0)))[mask])

    @pytest.mark.parametrize(
        "mode",
        [
            pytest.param("static", id="static"),
            pytest.param("dynamic_tensor", id="dynamic"),
            pytest.param("weight_only", id="weight_only"),
        ],
    )
    def test_checkify_reports_nonfinite_activation(self, mode):
        checked = checkify.checkify(self._dot(mode, True), errors=checkify.user_checks)
        err, _ = checked(self.x)
        assert err.get() is None
        err, y = checked(self.x.at[0, 0].set(np.nan))
        assert "NaN or inf" in err.get()
        assert "lhs" in err.get()
        assert np.isnan(np.asarray(y[0])).all()
        # off by default: a check costs a jitted function JAX's fast dispatch path
        on = _n_checks(jax.make_jaxpr(self._dot(mode, True))(self.x))
        assert on - _n_checks(jax.make_jaxpr(self._dot(mode))(self.x)) == 1


def _receptive_field(bad, k, stride, pad_lo, out_size):
    """numpy: out[n, i, j] is reached by bad[n, h, w] when the window of (i, j) covers (h, w)."""
    n, h, w = bad.shape
    out = np.zeros((n, out_size, out_size), bool)
    for i in range(out_size):
        for j in range(out_size):
            for a in range(k):
                for b in range(k):
                    r, c = i * stride - pad_lo + a, j * stride - pad_lo + b
                    if 0 <= r < h and 0 <= c < w:
                        out[:, i, j] |= bad[:, r, c]
    return out


class TestConv:
    @pytest.mark.parametrize(
        "mode,stride,padding,pad_lo,out_size",
        [
            pytest.param(*c[1:], id=c[0])
            for c in _product(
                [
                    ("static", "static"),
                    ("dynamic", "dynamic_tensor"),
                    ("weight_only", "weight_only"),
                ],
                [("same_s1", 1, "SAME", 1, 8), ("valid_s2", 2, "VALID", 0, 3)],
            )
        ],
    )
    def test_bad_pixel_reaches_its_window_only(self, mode, stride, padding, pad_lo, out_size):
        x = _normal(5, (3, 8, 8, 4))
        qw = jq.quantize(_normal(6, (3, 3, 4, 5)), None, W8)
        spec, qp = MODES[mode]
        f = jax.jit(
            lambda x: ops.conv_general_dilated(
                x,
                qw,
                (stride, stride),
                padding,
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
                lhs_spec=spec,
                lhs_qparams=qp,
            )
        )
        xb = x.at[1].multiply(0.5).at[1, 4, 2, 0].set(np.nan)
        y = np.asarray(f(xb))
        bad = np.zeros((3, 8, 8), bool)
        bad[1, 4, 2] = True
        reach = _receptive_field(bad, 3, stride, pad_lo, out_size)
        assert reach.any()
        np.testing.assert_array_equal(~np.isfinite(y).all(axis=-1), reach)
        if mode != "weight_only":
            assert np.isnan(y[reach]).all()
        # other examples as alone; the bad example outside the window as with a finite pixel
        alone = np.asarray(f(xb[np.array([0, 2])]))
        same = (
            np.testing.assert_array_equal
            if mode != "weight_only"
            else functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-6)
        )
        same(y[np.array([0, 2])], alone)
        ref = np.asarray(f(xb.at[1, 4, 2, 0].set(0.0)))
        same(y[~reach], ref[~reach])

    @pytest.mark.parametrize(
        "check", [pytest.param(False, id="default"), pytest.param(True, id="check_finite")]
    )
    def test_checkify_reports_nonfinite_conv_input(self, check):
        qw = jq.quantize(_normal(6, (3, 3, 4, 5)), None, W8)

        def conv(check):
            return lambda x: ops.conv_general_dilated(
                x,
                qw,
                (1, 1),
                "SAME",
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
                lhs_spec=jq.QuantSpec("int8"),
                check_finite=check,
            )

        x = _normal(5, (2, 8, 8, 4)).at[0, 1, 1, 1].set(np.inf)
        err, y = checkify.checkify(jax.jit(conv(check)), errors=checkify.user_checks)(x)
        assert np.isnan(np.asarray(y[0, 1, 1])).all()  # propagated either way
        if check:
            assert "conv_general_dilated `lhs`" in err.get()
            assert "NaN or inf" in err.get()
        else:
            assert err.get() is None
        # one check for the quantized operand, none by default
        on, off = (_n_checks(jax.make_jaxpr(conv(c))(x)) for c in (True, False))
        assert on - off == 1


# ---------------------------------------------------------------------------------------
# jq.apply
# ---------------------------------------------------------------------------------------
class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3))(x))
        return nn.Dense(10)(x.reshape(x.shape[0], -1))


@functools.cache
def _converted(model_name, mode):
    model, shape = {"mlp": (MLP(), (8, 16)), "cnn": (CNN(), (4, 6, 6, 3))}[model_name]
    x = _normal(7, shape)
    v = model.init(jax.random.key(0), x)
    act = {
        "static": jq.QuantSpec("int8", calibration=cal.MinMax()),
        "dynamic": jq.QuantSpec("int8"),
        "weight_only": None,
    }[mode]
    rules = [jq.Rule(".*", weight=W8, activation=act)]
    if mode == "static":
        qv = jq.convert(model, v, rules, jq.calibrate(model, v, rules, [x], progress=False))
    else:
        qv = jq.convert(model, v, rules, args=(x,))
    return model, qv, x


class TestApply:
    @pytest.mark.parametrize(
        "model_name,mode,value",
        [
            pytest.param(*c[1:], id=c[0])
            for c in _product(
                [
                    ("mlp_static", "mlp", "static"),
                    ("mlp_dynamic", "mlp", "dynamic"),
                    ("mlp_weight_only", "mlp", "weight_only"),
                    ("cnn_static", "cnn", "static"),
                    ("cnn_dynamic", "cnn", "dynamic"),
                ],
                [("nan", np.nan), ("inf", np.inf)],
            )
        ],
    )
    def test_bad_example_is_nonfinite_and_others_as_alone(self, model_name, mode, value):
        m, qv, x = _converted(model_name, mode)
        f = jax.jit(lambda x: jq.apply(m, qv, x))
        xb = x.at[2].set(value)  # a whole example: the per-tensor range stays that of the others
        y = np.asarray(f(xb))
        assert not np.isfinite(y[2]).any()
        keep = np.array([i for i in range(x.shape[0]) if i != 2])
        alone = np.asarray(f(x[keep]))
        if mode == "weight_only":
            np.testing.assert_allclose(y[keep], alone, rtol=1e-6, atol=1e-6)
        else:
            np.testing.assert_array_equal(y[keep], alone)

    def test_checkify_through_apply(self):
        m, qv, x = _converted("mlp", "static")
        checked = checkify.checkify(
            jax.jit(lambda x: jq.apply(m, qv, x, check_finite=True)), errors=checkify.user_checks
        )
        assert checked(x)[0].get() is None
        err, _ = checked(x.at[1, 3].set(np.nan))
        assert "NaN or inf" in err.get()
        # one check per quantized activation, none by default
        off = _n_checks(jax.make_jaxpr(lambda x: jq.apply(m, qv, x))(x))
        on = _n_checks(jax.make_jaxpr(lambda x: jq.apply(m, qv, x, check_finite=True))(x))
        assert on - off == 2
