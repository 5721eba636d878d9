"""jq.awq and jq.awq_core: the search against a numpy transcription of the paper, outliers, folding."""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jq

INT4 = jq.QuantSpec("int4", axis=-1)  # symmetric, narrow: codes in [-7, 7], scale = max|w| / 7


def _np_rtn_int4(w):
    """Per-column symmetric int4 round-to-nearest in float64 (the grid of `INT4`)."""
    scale = np.abs(w).max(axis=0, keepdims=True) / 7.0
    scale = np.where(scale == 0, 1.0, scale)
    return np.clip(np.round(w / scale), -7, 7) * scale


def _np_awq_search(x, w, n_grid):
    """AWQ's scale search (Lin et al. 2024, Alg. / auto_scale) on one linear layer, in float64.

    s = mean|x|^alpha, normalised by sqrt(max s * min s); loss = mean((x (Q(w s) / s) - x w)^2).
    """
    x_mean = np.abs(x).mean(axis=0)
    ref = x @ w
    losses = []
    for i in range(n_grid):
        ratio = i / n_grid
        s = x_mean**ratio
        s = s / np.sqrt(s.max() * s.min())
        wq = _np_rtn_int4(w * s[:, None]) / s[:, None]
        losses.append(np.mean((x @ wq - ref) ** 2))
    losses = np.array(losses)
    best = int(np.argmin(losses))
    s = x_mean ** (best / n_grid)
    return best / n_grid, s / np.sqrt(s.max() * s.min()), losses


def _outlier_data(seed, n=256, k=32, nout=16, outliers=(3, 17), gain=30.0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, k))
    x[:, list(outliers)] *= gain
    w = rng.normal(size=(k, nout)) * 0.1
    return x, w


def _core_quantizer(w):
    return jq.fake_quant(w, jq.qparams_from_array(w, INT4), INT4)


def test_search_matches_numpy_reference():
    x, w = _outlier_data(0)
    n_grid = 10
    alpha, s_ref, losses = _np_awq_search(x, w, n_grid)
    gram = x.T @ x / len(x)
    res = jq.awq_search(gram, np.abs(x).mean(0), [w], [_core_quantizer], n_grid=n_grid)
    # the core's error is summed over the N columns; the reference averages over them
    np.testing.assert_allclose(res.errors / w.shape[1], losses, rtol=2e-3)
    assert res.alpha == alpha
    assert alpha > 0  # the planted outliers make scaling worthwhile
    np.testing.assert_allclose(np.asarray(res.scales), s_ref, rtol=1e-4)


def _np_duo_search(x, w, n_grid, group):
    """AutoAWQ's ``duo_scaling`` family in float64: s = x_mean^r / w_mean^(1 - r), where
    w_mean averages |w| / (max |w| of its group of `group` rows in that column) over columns."""
    k, n = w.shape
    blocks = np.abs(w).reshape(k // group, group, n)
    w_mean = (blocks / blocks.max(axis=1, keepdims=True)).reshape(k, n).mean(axis=1)
    x_mean = np.abs(x).mean(axis=0)
    ref = x @ w
    losses = []
    for i in range(n_grid):
        r = i / n_grid
        s = x_mean**r / w_mean ** (1 - r)
        s = s / np.sqrt(s.max() * s.min())
        wq = _np_rtn_int4(w * s[:, None]) / s[:, None]
        losses.append(np.mean((x @ wq - ref) ** 2))
    return w_mean, np.array(losses)


def test_two_sided_search_matches_numpy_reference_and_keeps_the_better_family():
    x, w = _outlier_data(2, gain=8.0)
    w[5] *= 6.0  # one large weight row: the two-sided family can tell it apart
    n_grid = 10
    w_mean_ref, losses_duo = _np_duo_search(x, w, n_grid, group=8)
    w_mean = jq.awq_core.awq_weight_mean([w], 8)
    np.testing.assert_allclose(np.asarray(w_mean), w_mean_ref, rtol=1e-5)
    gram = x.T @ x / len(x)
    one = jq.awq_search(gram, np.abs(x).mean(0), [w], [_core_quantizer], n_grid=n_grid)
    res = jq.awq_search(
        gram, np.abs(x).mean(0), [w], [_core_quantizer], n_grid=n_grid, weight_mean=w_mean
    )
    np.testing.assert_allclose(res.errors_duo / w.shape[1], losses_duo, rtol=2e-3)
    np.testing.assert_array_equal(res.errors, one.errors)  # the one-sided grid is unchanged
    best = min(one.errors.min(), res.errors_duo.min())
    assert res.duo == (res.errors_duo.min() < one.errors.min())
    w_s = w * np.asarray(res.scales)[:, None]
    got = np.sum(
        (x @ (np.asarray(_core_quantizer(w_s)) / np.asarray(res.scales)[:, None] - w)) ** 2
    )
    np.testing.assert_allclose(got / len(x), best, rtol=2e-3)  # the scales returned are the best


def test_weight_mean_checks_groups():
    with pytest.raises(ValueError, match="divisible by its group"):
        jq.awq_core.awq_weight_mean([np.ones((10, 3))], 4)


def test_clip_never_worse_and_reduces_error_with_heavy_tails():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(128, 32))
    w = rng.standard_t(2, size=(32, 8)) * 0.1  # heavy tails: min-max wastes the grid
    gram = x.T @ x / len(x)

    def err(wq):
        return float(np.sum((x @ (np.asarray(wq, np.float64) - w)) ** 2) / len(x))

    # one block per column, as the per-column quantizer: the columns' errors are independent,
    # so the per-block choice is the grid optimum and r = 1 (plain RTN) is in the grid
    wc = np.asarray(jq.awq_clip(gram, w, _core_quantizer, 32))
    assert np.all(np.abs(wc) <= np.abs(w) + 1e-7)
    e_clip, e_rtn = err(_core_quantizer(jnp.asarray(wc))), err(_core_quantizer(jnp.asarray(w)))
    assert e_clip < e_rtn


class _LNMLP(nn.Module):
    """LayerNorm -> Dense(hidden) -> gelu -> Dense(out): a foldable site and a run-time one."""

    hidden: int = 32
    out: int = 16

    @nn.compact
    def __call__(self, x):
        h = nn.gelu(nn.Dense(self.hidden)(nn.LayerNorm()(x)))  # Dense_0
        return nn.Dense(self.out)(h)  # Dense_1


def _planted_model(seed=0, k=32):
    model = _LNMLP()
    x = jnp.asarray(np.random.default_rng(seed).normal(size=(64, k)), jnp.float32)
    variables = model.init(jax.random.key(seed), x)
    # planted outlier input channels: the LayerNorm scale blows up channels 3 and 17
    scale = np.ones(k, np.float32)
    scale[[3, 17]] = 40.0
    variables = jax.tree_util.tree_map(lambda a: a, variables)
    variables["params"]["LayerNorm_0"]["scale"] = jnp.asarray(scale)
    batches = [x[i : i + 16] for i in range(0, 64, 16)]
    return model, variables, x, batches


def test_awq_beats_rtn_on_planted_outliers_and_folds_into_layernorm():
    model, variables, x, batches = _planted_model()
    rules = [jq.Rule(".*", ops=("dot",), weight=INT4)]
    ref = np.asarray(model.apply(variables, x), np.float64)
    rtn = jq.convert(model, variables, rules, args=(x,))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the LayerNorm feeds only Dense_0: folded, no warning
        aw, info = jq.awq(model, variables, rules, batches, progress=False, return_info=True)
    err = lambda q: float(np.mean((np.asarray(jq.apply(model, q, x), np.float64) - ref) ** 2))
    assert err(aw) < 0.5 * err(rtn)
    by_site = {tuple(d["sites"]): d for d in info}
    d0 = by_site[("Dense_0/kernel",)]
    assert d0["folded"] and d0["alpha"] > 0 and d0["error_awq"] < d0["error_rtn"]
    # folded: the norm holds g / s, Dense_0 has no run-time factor; Dense_1 (after gelu) has one
    g = np.asarray(aw.variables["params/LayerNorm_0/scale"])
    assert not np.allclose(g, np.asarray(variables["params"]["LayerNorm_0"]["scale"]))
    assert set(aw.smooth) == {"Dense_1/kernel"}
    assert aw.smooth["Dense_1/kernel"].shape == (1, 32)


def test_awq_unfolded_equals_folded_in_float_function():
    """fold=False keeps every 1/s at run time; its outputs match the folded variables' closely."""
    model, variables, x, batches = _planted_model(seed=2)
    rules = [jq.Rule(".*", ops=("dot",), weight=jq.QuantSpec("int8", axis=-1))]
    kw = dict(progress=False, clip=False)
    a = jq.apply(model, jq.awq(model, variables, rules, batches, fold=True, **kw), x)
    b = jq.apply(model, jq.awq(model, variables, rules, batches, fold=False, **kw), x)
    ref = model.apply(variables, x)
    scale = float(jnp.max(jnp.abs(ref)))
    assert float(jnp.max(jnp.abs(a - b))) < 2e-2 * scale


def test_gram_aware_search_scores_gptq_rounding_and_alpha_zero_is_plain_gptq():
    x, w = _outlier_data(4, n=512)
    gram = x.T @ x / len(x)

    def gptq_q(w_s, g_s):
        return jq.gptq_quantize(w_s, g_s, INT4).weight

    res = jq.awq_search(gram, np.abs(x).mean(0), [w], [gptq_q], n_grid=8, gram_aware=True)
    out_err = lambda wq: float(np.sum((x @ (np.asarray(wq, np.float64) - w)) ** 2) / len(x))
    plain = out_err(jq.gptq_quantize(w, gram, INT4).weight)
    np.testing.assert_allclose(res.errors[0], plain, rtol=1e-3)  # alpha = 0: GPTQ itself
    s = np.asarray(res.scales)
    chosen = out_err(np.asarray(gptq_q(w * s[:, None], gram / np.outer(s, s))) / s[:, None])
    np.testing.assert_allclose(chosen, res.errors.min(), rtol=1e-3)
    assert chosen <= plain * (1 + 1e-3)


def test_awq_then_gptq_not_worse_than_gptq():
    model, variables, x, batches = _planted_model(seed=3)
    rules = [jq.Rule(".*", ops=("dot",), weight=INT4)]
    ref = np.asarray(model.apply(variables, x), np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        g = jq.gptq(model, variables, rules, batches, progress=False)
        ag = jq.awq(model, variables, rules, batches, rounding="gptq", progress=False)
    err = lambda q: float(np.mean((np.asarray(jq.apply(model, q, x), np.float64) - ref) ** 2))
    assert err(ag) <= err(g) * 1.05


@pytest.mark.parametrize(
    "kwargs, exc, msg",
    [
        (dict(rounding="nearest"), ValueError, "rounding"),
        (dict(n_grid=0), ValueError, "n_grid"),
        (dict(inputs=3), TypeError, "inputs"),
        (dict(max_shrink=1.0), ValueError, "max_shrink"),
    ],
)
def test_awq_bad_arguments(kwargs, exc, msg):
    model, variables, _, batches = _planted_model()
    rules = [jq.Rule(".*", ops=("dot",), weight=INT4)]
    with pytest.raises(exc, match=f"jq.awq: {msg}"):
        jq.awq(model, variables, rules, batches, progress=False, **kwargs)


def test_awq_rejects_float_weights_and_static_rules():
    model, variables, _, batches = _planted_model()
    with pytest.raises(ValueError, match="jq.awq: .*not an integer format"):
        jq.awq(
            model, variables, [jq.Rule(".*", ops=("dot",), weight=jq.QuantSpec("e4m3"))], batches
        )
    static = jq.Rule(
        ".*", weight=INT4, activation=jq.QuantSpec("int8", calibration=jq.calibration.MinMax())
    )
    with pytest.raises(ValueError, match="jq.awq: .*statically"):
        jq.awq(model, variables, [static], batches)


def test_awq_on_nnx_with_outlier_inputs_runtime_scales():
    """nnx, no norm to fold into: both sites keep run-time factors, and AWQ beats RTN."""
    from flax import nnx
    from models import NnxMLP

    model = NnxMLP(nnx.Rngs(0), din=16, hidden=32, out=8)
    rng = np.random.default_rng(4)
    x = rng.normal(size=(64, 16)).astype(np.float32)
    x[:, [2, 9]] *= 40.0  # planted outlier input channels
    x = jnp.asarray(x)
    rules = [jq.Rule(".*", ops=("dot",), weight=INT4)]
    ref = np.asarray(model(x), np.float64)
    rtn = jq.convert(model, None, rules, args=(x,))
    aw = jq.awq(model, None, rules, [x[:32], x[32:]], progress=False)
    assert set(aw.smooth) == {"l1/kernel", "l2/kernel"}
    err = lambda q: float(np.mean((np.asarray(jq.apply(model, q, x), np.float64) - ref) ** 2))
    assert err(aw) < 0.5 * err(rtn)


def test_core_rejects_bad_input():
    g, w = np.eye(4), np.ones((4, 3))
    with pytest.raises(ValueError, match="jq.awq_search: need one quantizer per weight"):
        jq.awq_search(g, np.ones(4), [w], [])
    with pytest.raises(ValueError, match=r"jq.awq_search: weights\[0\] must be \(K=4, N\)"):
        jq.awq_search(g, np.ones(4), [np.ones((5, 3))], [_core_quantizer])
    with pytest.raises(ValueError, match="jq.awq_search: gram must be"):
        jq.awq_search(np.eye(3), np.ones(4), [w], [_core_quantizer])
    with pytest.raises(ValueError, match="jq.awq_clip: group=3 does not divide"):
        jq.awq_clip(g, w, _core_quantizer, 3)


def test_scales_are_normalised_and_alpha_zero_is_identity():
    m = np.array([0.5, 2.0, 8.0, 0.0])
    s = np.asarray(jq.awq_core.awq_scales(m, 0.5))
    np.testing.assert_allclose(s[:3] / np.sqrt(s[:3].max() * s[:3].min()), s[:3], rtol=1e-6)
    np.testing.assert_allclose(
        s[:3], np.sqrt(m[:3]) / np.sqrt(np.sqrt(0.5) * np.sqrt(8.0)), rtol=1e-6
    )
    assert s[3] == 1.0
    np.testing.assert_array_equal(np.asarray(jq.awq_core.awq_scales(m, 0.0)), np.ones(4))
