"""Smoke test of experiments/bench_decode.py: a tiny decoder, two rows, checked for their bytes."""

import json
import os
import sys

import pytest

sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments")
)
import bench_decode  # noqa: E402


@pytest.mark.slow
def test_quick_run_bytes_and_report(tmp_path):
    cfg = bench_decode.parse_args(
        ["--quick", "--batches", "1", "--tokens", "2", "--no-torch", "--out", str(tmp_path)]
    )
    cfg.rows = ("W8 weight-only, int8",)
    res = bench_decode.run(cfg)
    rows = {r["row"]: r for r in res["rows"]}
    assert set(rows) == {"float32, float KV cache", "W8 weight-only, int8 KV cache"}
    f32, w8 = rows["float32, float KV cache"], rows["W8 weight-only, int8 KV cache"]
    assert f32["vs_float32"] == 1.0 and w8["tokens_per_s"] > 0
    # Dense kernels of the tiny decoder (width 128, 2 layers, vocab 256): 4 bytes per weight
    # in float32; int8 codes (1 byte) plus one float32 scale per output channel
    d, n_layers, vocab = 128, 2, 256
    per_layer = [(d, d)] * 4 + [(d, 4 * d), (4 * d, d)]  # q, k, v, out, fc, proj
    shapes = per_layer * n_layers + [(d, vocab)]
    n_w = sum(k * n for k, n in shapes)
    # scales: one per output channel (axis="out": every axis the dot does not contract), so
    # the (width, heads, head_dim) q, k, v kernels get heads * head_dim = width scales each
    n_out = n_layers * (3 * d + d + 4 * d + d) + vocab
    assert f32["weight_bytes"] == 4 * n_w
    assert w8["weight_bytes"] == n_w + 4 * n_out
    # KV cache per token: keys and values of every layer, float32 against int8 codes plus
    # one bfloat16 scale per token and head (2 heads)
    assert f32["cache_bytes_per_token"] == 2 * n_layers * d * 4
    assert w8["cache_bytes_per_token"] == 2 * n_layers * (d + 2 * 2)
    bench_decode.main(
        ["--quick", "--batches", "1", "--tokens", "2", "--no-torch", "--out", str(tmp_path)]
        + ["--rows", "bf16, float"]
    )
    md = (tmp_path / "decode_quick.md").read_text()
    assert "int8 flags" in md and "| 1 | bf16, float KV cache |" in md
    saved = json.loads((tmp_path / "decode_quick.json").read_text())
    assert saved["machine"]["jax"] and saved["lowering"]["form"]
