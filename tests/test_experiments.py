"""Smoke test of experiments/digits.py: the whole pipeline at a tiny size, checked row by row."""

import json
import math
import os
import sys

import numpy as np
import pytest

# optional dependencies of the experiments (the "experiments" extra): the digits data set, its
# plots, and the artifact the deploy round trip writes
pytest.importorskip("sklearn", reason="experiments/digits.py needs scikit-learn (load_digits)")
pytest.importorskip("matplotlib", reason="experiments/digits.py draws its plots with matplotlib")
pytest.importorskip("flatbuffers", reason="the digits deploy round trip serializes a jax.export")

sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments")
)
import digits  # noqa: E402

WIDTH = 32  # MLP 64 -> 32 -> 32 -> 10


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    cfg = digits.parse_args(
        [
            "--models",
            "mlp",
            "--epochs",
            "6",
            "--qat-epochs",
            "1",
            "--repeats",
            "3",
            "--size",
            str(WIDTH),
            "--out",
            str(out),
            "--name",
            "tiny",
        ]
    )
    cfg.calib_batches = 2
    return digits.run(cfg), out


def _rows(result):
    return {r["method"]: r for r in result[0]["rows"]}


def test_split_is_the_documented_one():
    xtr, ytr, xte, yte = digits.load_data()
    assert (len(xtr), len(xte)) == (1257, 540)
    assert xtr.dtype == np.float32 and 0.0 <= xtr.min() and xtr.max() <= 1.0
    # stratified: every class keeps its share of the test set to within one image
    counts = np.bincount(yte, minlength=10)
    expected = np.bincount(np.concatenate([ytr, yte]), minlength=10) * 0.3
    assert np.all(np.abs(counts - expected) <= 1)


def test_files_hold_every_row_in_order(result):
    res, out = result
    names = [m.name for m in digits.methods()]
    assert [r["method"] for r in res["rows"]] == names
    with open(out / "tiny.json") as f:
        payload = json.load(f)
    assert [r["method"] for r in payload["rows"]] == names
    md = (out / "tiny.md").read_text()
    for n in names:
        assert f"| {n} |" in md
    assert (out / "tiny_bits.png").stat().st_size > 0 and (
        out / "tiny_calibration.png"
    ).stat().st_size > 0


def test_accuracy_and_drop(result):
    rows = _rows(result)
    f32 = rows["float32"]["accuracy"]
    assert f32 > 0.85  # a 32-wide MLP after 6 epochs; chance is 0.1
    for name, r in rows.items():
        assert 0.0 <= r["accuracy"] <= 1.0
        assert math.isclose(r["drop_points"], 100 * (f32 - r["accuracy"]), abs_tol=1e-9), name
        # every 8-bit or wider method stays near float (one test image = 0.185 points)
        if "int4" not in name:
            assert abs(r["drop_points"]) < 5.0, (name, r["drop_points"])


def test_bytes_match_hand_count(result):
    rows = _rows(result)
    w = [(64, WIDTH), (WIDTH, WIDTH), (WIDTH, 10)]
    n_kernel = sum(k * n for k, n in w)
    n_out = sum(n for _, n in w)  # biases; also one per-channel scale per output
    assert rows["float32"]["bytes"] == 4 * (n_kernel + n_out)
    # int8 per channel: 1 byte per weight + float32 scales + float32 biases
    int8 = n_kernel + 4 * n_out + 4 * n_out
    assert rows["weight-only int8"]["bytes"] == int8
    assert rows["dynamic int8"]["bytes"] == int8
    assert rows["static int8, min-max"]["bytes"] == int8 + 3 * 4  # one activation scale per layer
    assert (
        rows["static int8, min-max, per-tensor weights"]["bytes"]
        == n_kernel + 3 * 4 + 4 * n_out + 3 * 4
    )
    # fp8 e4m3: one byte per weight and per-channel scales, as int8
    assert rows["fp8 e4m3, dynamic"]["bytes"] == int8
    assert rows["fp8 e4m3, static, min-max"]["bytes"] == int8 + 3 * 4
    # int4 packs two values per byte along the output axis (rounded up: 10 -> 5 bytes per row)
    int4 = sum(k * math.ceil(n / 2) for k, n in w) + 4 * n_out + 4 * n_out
    assert rows["weight-only int4"]["bytes"] == int4
    # float16: 2 bytes per weight; a plain cast keeps one (unit) float32 scale per kernel
    assert rows["float16"]["bytes"] == rows["bfloat16"]["bytes"] == 2 * n_kernel + 3 * 4 + 4 * n_out
    assert 16.0 <= rows["float16"]["bits_per_weight"] < 16.1
    assert 8.0 < rows["weight-only int8"]["bits_per_weight"] < 9.0
    assert 4.0 < rows["weight-only int4"]["bits_per_weight"] < 5.0


def test_latency_columns_are_sane(result):
    rows = _rows(result)
    for name, r in rows.items():
        for b in (1, 256):
            lat = r[f"latency_b{b}_us"]
            lo, hi = r[f"latency_b{b}_range_us"]
            assert 0 < lo <= lat <= hi and math.isfinite(hi), name
            f32 = rows["float32"][f"latency_b{b}_us"]
            assert math.isclose(r[f"speedup_b{b}"], f32 / lat, rel_tol=1e-9)
    assert rows["float32"]["speedup_b1"] == 1.0


def test_targets_cover_every_calibrator_and_qat(result):
    checks = result[0]["targets"]
    assert len(checks) == len(digits.CALIBRATORS) + 2 + 1  # + fp8 dynamic / static, + QAT
    for c in checks:
        assert c["met"] == (c["value"] <= (1.0 if "QAT" in c["check"] else 0.5))


def test_calibrated_ranges_are_ordered(result):
    # min-max is the widest range any observer can pick from the same data
    ranges = result[0]["models"]["mlp"]["ranges"]
    mm = ranges["static int8, min-max"]
    for name, rs in ranges.items():
        for site, (lo, hi) in rs.items():
            tol = 1e-3 * (mm[site][1] - mm[site][0])  # histogram thresholds sit on bin edges
            assert mm[site][0] - tol <= lo <= hi <= mm[site][1] + tol, (name, site)
    # ReLU outputs feed the second and third layers: their ranges start at 0
    assert mm["Dense_1/kernel"][0] == 0.0 and mm["Dense_2/kernel"][0] == 0.0


def test_bad_model_name():
    with pytest.raises(ValueError, match="unknown model"):
        digits.parse_args(["--models", "mlp,resnet"])
