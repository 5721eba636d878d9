"""Data-parallel quantized inference on 8 simulated CPU devices against one device.

The 8 devices are simulated (``--xla_force_host_platform_device_count=8``) on
the same CPU cores as the one-device case, so this measures correctness and the
overhead of partitioning (per-device dispatch, collectives, smaller per-device
dots), not a speedup: the same cores do the same arithmetic either way.

Model: a linen MLP 784-1024-1024-10, int8 weights per channel and static int8
activations (jq.calibrate -> jq.convert -> jax.jit(jq.apply)), against the
float32 model. Cases, all in one process and timed *interleaved* (every repeat
times each case once, in a rotating order, as the mean of `--calls` back-to-back
calls; the table shows the median over `--repeats` and the min - max):

* ``1 device``: inputs and variables on device 0;
* ``8 devices, data parallel``: the batch split over a ("data",) mesh of 8,
  variables replicated (`jq.flax.sharding.shard_qvars` with no shardings);
* ``8 devices, tensor parallel``: the first kernel split on its output
  features, the second on its input features (Megatron style), batch
  replicated.

Ratios are medians of the same run: throughput relative to the same dtype on
one device. Outputs are checked against the one-device output of the same dtype
before timing.

Run:  python experiments/bench_sharding.py [--batch 256] [--repeats 9] [--calls 10]
Writes experiments/results/sharding_bench_b{batch}.json and prints a markdown table.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jq  # noqa: E402
import jq.flax.sharding as jfs  # noqa: E402
from jq import calibration as cal  # noqa: E402

SIZES = (784, 1024, 1024, 10)


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        for n in SIZES[1:-1]:
            x = nn.relu(nn.Dense(n)(x))
        return nn.Dense(SIZES[-1])(x)


def _time(cases: dict, repeats: int, calls: int) -> dict[str, list[float]]:
    for f, args in cases.values():  # compile and warm up
        jax.block_until_ready(f(*args))
        jax.block_until_ready(f(*args))
    names = list(cases)
    samples = {n: [] for n in names}
    for r in range(repeats):
        for n in names[r % len(names) :] + names[: r % len(names)]:  # rotate the order
            f, args = cases[n]
            t0 = time.perf_counter()
            for _ in range(calls):
                out = f(*args)
            jax.block_until_ready(out)
            samples[n].append((time.perf_counter() - t0) / calls)
    return samples


def _place(tree, sharding):
    return jax.device_put(tree, sharding)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--calls", type=int, default=10)
    a = ap.parse_args()
    if a.repeats < 5:
        ap.error("--repeats must be at least 5")
    assert jax.device_count() == 8, jax.devices()

    model = MLP()
    x = jax.random.normal(jax.random.key(1), (a.batch, SIZES[0]))
    v = model.init(jax.random.key(0), x[:2])
    rules = [
        jq.Rule(
            ".*",
            weight=jq.QuantSpec("int8", axis=-1),
            activation=jq.QuantSpec("int8", calibration=cal.MinMax()),
        )
    ]
    stats = jq.calibrate(
        model, v, rules, [x[i : i + 64] for i in range(0, a.batch, 64)], progress=False
    )
    qv = jq.convert(model, v, rules, stats)

    dev0 = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    dp = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    tp = jax.make_mesh((8,), ("model",), axis_types=(AxisType.Auto,))
    megatron = {
        "params/Dense_0/kernel": P(None, "model"),
        "params/Dense_0/bias": P("model"),
        "params/Dense_1/kernel": P("model", None),
    }
    f_float = jax.jit(lambda v, x: model.apply(v, x))
    f_int8 = jax.jit(lambda q, x: jq.apply(model, q, x))

    x1 = _place(x, dev0)
    x_dp = _place(x, NamedSharding(dp, P("data")))
    x_tp = _place(x, NamedSharding(tp, P()))
    v_tp = {
        "params": {
            layer: {
                k: _place(arr, NamedSharding(tp, megatron.get(f"params/{layer}/{k}", P())))
                for k, arr in p.items()
            }
            for layer, p in v["params"].items()
        }
    }
    cases = {
        ("float32", "1 device"): (f_float, (_place(v, dev0), x1)),
        ("float32", "8 devices, data parallel"): (
            f_float,
            (_place(v, NamedSharding(dp, P())), x_dp),
        ),
        ("float32", "8 devices, tensor parallel"): (f_float, (v_tp, x_tp)),
        ("int8", "1 device"): (f_int8, (_place(qv, dev0), x1)),
        ("int8", "8 devices, data parallel"): (f_int8, (jfs.shard_qvars(qv, mesh=dp), x_dp)),
        ("int8", "8 devices, tensor parallel"): (
            f_int8,
            (jfs.shard_qvars(qv, megatron, mesh=tp), x_tp),
        ),
    }
    max_err = {}
    for (dt, name), (f, args) in cases.items():
        ref = cases[(dt, "1 device")]
        err = float(np.max(np.abs(np.asarray(f(*args)) - np.asarray(ref[0](*ref[1])))))
        max_err[f"{dt} / {name}"] = err
        assert err < 1e-4, (dt, name, err)
    keyed = {f"{dt} / {n}": c for (dt, n), c in cases.items()}
    samples = _time(keyed, a.repeats, a.calls)

    rows = []
    for dt, name in cases:
        s = samples[f"{dt} / {name}"]
        base = float(np.median(samples[f"{dt} / 1 device"]))
        med = float(np.median(s))
        rows.append(
            {
                "dtype": dt,
                "case": name,
                "median_ms": med * 1e3,
                "min_ms": min(s) * 1e3,
                "max_ms": max(s) * 1e3,
                "samples_per_s": a.batch / med,
                "vs_1_device": base / med,
                "max_abs_diff_vs_1_device": max_err[f"{dt} / {name}"],
            }
        )
    lines = [
        f"MLP {'-'.join(map(str, SIZES))}, batch {a.batch}, median of {a.repeats} interleaved "
        f"repeats x {a.calls} calls; {os.cpu_count()} CPU cores shared by all 8 simulated devices.",
        "",
        "| dtype | case | median ms / batch (min - max) | samples / s | throughput vs 1 device | max abs diff vs 1 device |",  # noqa: E501
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['dtype']} | {r['case']} | {r['median_ms']:.2f} ({r['min_ms']:.2f} - {r['max_ms']:.2f}) "
            f"| {r['samples_per_s']:,.0f} | {r['vs_1_device']:.2f}x | {r['max_abs_diff_vs_1_device']:.1e} |"
        )
    i1 = next(r for r in rows if r["dtype"] == "int8" and r["case"] == "1 device")
    f1 = next(r for r in rows if r["dtype"] == "float32" and r["case"] == "1 device")
    lines += [
        "",
        f"int8 vs float32 on 1 device: {f1['median_ms'] / i1['median_ms']:.2f}x throughput.",
    ]
    table = "\n".join(lines)
    print(table)
    out = {
        "rows": rows,
        "table": table,
        "batch": a.batch,
        "repeats": a.repeats,
        "calls": a.calls,
        "jax": jax.__version__,
        "cpu_count": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        # the int8 form depends on these (u8s8 with VNNI, s8s8 without): name them with timings
        "cpu_int8_flags": jq.ops.lowering_info()["cpu"]["int8_flags"],
        "int8_cpu_form": jq.ops.lowering_info()["cpu"]["form"],
        "devices": "8 simulated CPU devices (--xla_force_host_platform_device_count=8)",
    }
    path = os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "results", f"sharding_bench_b{a.batch}.json"
    )
    with open(path, "w") as fh:
        json.dump(out, fh, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
