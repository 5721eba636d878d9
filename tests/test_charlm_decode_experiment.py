"""Smoke test of experiments/charlm_decode.py: the decode loop at a tiny size, checked against itself."""

import json
import os
import sys

import pytest

sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments")
)
import charlm_decode  # noqa: E402


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("decode")
    cfg = charlm_decode.parse_args(["--quick", "--caches", "int8", "--out", str(out)])
    cfg.weights = ("float32", "int8 W8A8")  # the other rows' verbs have their own tests
    return charlm_decode.run(cfg), cfg


def test_rows_and_files(result):
    res, cfg = result
    names = [r["method"] for r in res["rows"]]
    assert names == [
        "float32 / float32 cache",
        "float32 / int8 cache",
        "int8 W8A8 / float32 cache",
        "int8 W8A8 / int8 cache",
    ]
    with open(res["files"][0]) as f:
        assert json.load(f)["rows"][0]["method"] == names[0]
    assert res["targets"] == []  # a partial run checks no targets


def test_decode_path_reproduces_the_full_sequence_model(result):
    """Teacher-forced decoding with a float cache scores what the causal full-sequence model does."""
    res, _ = result
    f32 = res["rows"][0]
    assert f32["bpc"] == pytest.approx(res["bpc_full_sequence_float"], rel=1e-4)


def test_int8_cache_bytes_and_bpc(result):
    res, cfg = result
    rows = {r["method"]: r for r in res["rows"]}
    d = cfg.width // cfg.heads
    for w in ("float32", "int8 W8A8"):
        r8, rf = rows[f"{w} / int8 cache"], rows[f"{w} / float32 cache"]
        # per token: layers x (keys, values) x heads x (head_dim codes + one bf16 scale)
        assert r8["cache_bytes_per_token"] == cfg.layers * 2 * cfg.heads * (d + 2)
        assert rf["cache_bytes_per_token"] == cfg.layers * 2 * cfg.heads * d * 4
        assert abs(r8["bpc"] / rf["bpc"] - 1) < 0.01
        assert r8["tok_s_b1"] > 0 and "tok_s_b4" not in r8


def test_samples_start_with_the_prompt(result):
    res, cfg = result
    for r in res["rows"]:
        assert r["sample"].startswith(charlm_decode.PROMPT)
        assert len(r["sample"]) == cfg.ctx
