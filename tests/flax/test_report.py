"""`jq.report`: per-site SQNR and clipping."""

import jax
import numpy as np
import pytest
from models import ScanMLP, static_rules

import jq
import jq.hlo

KEY = jax.random.key(0)


def test_report_sqnr_and_clipping(mlp):
    m, v, x = mlp
    rules = static_rules()
    stats = jq.calibrate(m, v, rules, [x * 0.5], progress=False)  # calibrated on a narrower range
    qv = jq.convert(m, v, rules, stats)
    rows = {r["site"]: r for r in jq.report(m, v, qv, x)}
    r0 = rows["Dense_0/kernel"]
    xs = np.abs(np.asarray(x))
    expected_clip = np.mean(xs > 127.5 * (xs.max() * 0.5 / 127))
    assert r0["act_clip_frac"] == pytest.approx(expected_clip, abs=1e-6)
    assert r0["act_clip_frac"] > 0
    assert r0["weight_sqnr_db"] > 35 and r0["act_sqnr_db"] > 5


def test_report_static_sites_inside_nn_scan():
    """`report` quantizes a scanned site's activation with that layer's QParams (they used to be stacked)."""
    x = jax.random.normal(KEY, (64, 8))
    m = ScanMLP()
    v = m.init(KEY, x)
    rules = static_rules()
    qv = jq.convert(m, v, rules, jq.calibrate(m, v, rules, [x], progress=False))
    rows = {r["site"]: r for r in jq.report(m, v, qv, x)}
    assert set(rows) == {
        "Dense_0/kernel",
        "Dense_1/kernel",
        "ScanScanBlk_0/Dense_0/kernel",
        "ScanScanBlk_0/Dense_1/kernel",
    }
    for r in rows.values():  # calibrated on this batch: nothing clips, int8 keeps > 30 dB
        assert r["act_clip_frac"] == 0.0 and r["act_sqnr_db"] > 30 and r["weight_sqnr_db"] > 30, r
