"""Smoke run of experiments/bench_gpu.py at tiny sizes on the CPU (its ``--quick`` mode)."""

import json
import os
import sys

sys.path.insert(
    0,
    os.path.join(
        os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "experiments"
    ),
)
import bench_gpu  # noqa: E402

CASES = [
    "bf16",
    "jq static int8",
    "jq static int8 (K,N)",
    "jq dynamic int8",
    "jq fp8",
    "ref int8",
]


def test_quick_mlp_group_writes_every_case(tmp_path):
    out = tmp_path / "bench_gpu.md"
    argv = ["--quick", "--groups", "mlp", "--batches", "4", "--repeats", "3", "--out", str(out)]
    payload = bench_gpu.run(bench_gpu.parse_args(argv))
    rows = {r["case"]: r for r in payload["rows"]}
    assert list(rows) == CASES
    assert rows["bf16"]["vs_bf16"] == 1.0
    for name in CASES[1:]:
        r = rows[name]
        assert r["ms"] > 0 and r["vs_bf16"] > 0
        # quantized for real (an error), and close to bf16 (a sane quantization)
        assert 0 < r["err"] < (0.25 if name == "jq fp8" else 0.1), (name, r["err"])
    for name in ("jq static int8", "jq static int8 (K,N)"):
        assert rows[name]["jq_over_ref"] > 0
    # the (N, K) and (K, N) layouts compute the same numbers
    assert rows["jq static int8"]["err"] == rows["jq static int8 (K,N)"]["err"]
    md = out.read_text()
    assert "speed vs bf16" in md and "jq speed / ref" in md and md.count("| MLP 64x4") == 6
    saved = json.loads((tmp_path / "bench_gpu.json").read_text())
    assert [r["case"] for r in saved["rows"]] == CASES and saved["quick"] is True
