"""One check of jq on whatever accelerator (or CPU) JAX sees, summarised in JSON and markdown.

Stages, each with its own time limit so that the whole run stays under about
five minutes on a GPU machine:

1. ``env``: JAX version, backend, devices, `jq.ops.lowering_info()`.
2. ``sweep``: exactness of int8 dots over small shapes, M in {1, 2, 6, 12},
   K in {1, 2, 3, 4, 5, 8, 16, 40}, N in {2, 5, 16}, both weight layouts:
   the plain ``jax.lax.dot_general(s8, s8, preferred_element_type=int32)``
   (which XLA:GPU got wrong at K = 3) next to jq's `int8_dot_general`, and
   jq's integer conv (plain, grouped, lhs-dilated) against an int64 reference.
3. ``tests``: the test suite (without tests/sharded) on the default backend,
   with a JUnit report; failures and skips are listed in the summary.
4. ``bench``: ``experiments/bench_ops.py --quick`` (the MLP groups).
5. ``gpu``: ``experiments/bench_gpu.py`` (bf16 against jq static / dynamic
   int8, fp8, a hand-written int8 reference, QAT steps), within
   ``--gpu-budget`` seconds (groups that would start later are skipped) and
   killed at ``--gpu-timeout``. With ``--quick``: tiny sizes, for a CPU run.

Run:  python experiments/device_check.py --out DIR   (scripts/device_check.sh does)
Writes DIR/summary.json, DIR/summary.md, DIR/junit.xml, DIR/ops.md, DIR/bench_gpu.md,
DIR/*.log.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DENSE = (((1,), (0,)), ((), ()))
NK = (((1,), (1,)), ((), ()))


def stage_env() -> dict:
    import jax

    from jq import ops
    from jq.ops import int8_dot

    return {
        "python": sys.version.split()[0],
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "device_kind": jax.devices()[0].device_kind,
        "lowering_api_available": int8_dot.AVAILABLE,
        "tested_jax_versions": list(int8_dot.TESTED_JAX_VERSIONS),
        "lowering": ops.lowering_info(),
    }


def stage_sweep() -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jq
    from jq import ops
    from jq.ops import int8_dot

    rng = np.random.default_rng(0)
    plain = jax.jit(
        lambda a, b, dn: jax.lax.dot_general(a, b, dn, preferred_element_type=jnp.int32),
        static_argnums=2,
    )
    ours = jax.jit(lambda a, b, dn: int8_dot.int8_dot_general(a, b, dn), static_argnums=2)
    rows = []
    for m in (1, 2, 6, 12):
        for k in (1, 2, 3, 4, 5, 8, 16, 40):
            for n in (2, 5, 16):
                for layout in ("kn", "nk"):
                    a = rng.integers(-128, 128, (m, k)).astype(np.int8)
                    w = rng.integers(-128, 128, (k, n)).astype(np.int8)
                    b, dn = (w, DENSE) if layout == "kn" else (np.ascontiguousarray(w.T), NK)
                    ref = a.astype(np.int64) @ w.astype(np.int64)
                    row = {"m": m, "k": k, "n": n, "layout": layout}
                    for name, f in (("lax", plain), ("jq", ours)):
                        try:
                            out = np.asarray(f(jnp.asarray(a), jnp.asarray(b), dn))
                            row[name] = "exact" if np.array_equal(out, ref) else "WRONG"
                        except Exception as e:  # a compile failure is a finding, not a crash
                            row[name] = f"ERROR: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
                    rows.append(row)
    convs = []
    for groups, ldil in ((1, (1, 1)), (2, (1, 1)), (1, (2, 2))):
        x = rng.normal(size=(2, 9, 9, 4)).astype(np.float32)
        w = rng.normal(size=(3, 3, 4 // groups, 8)).astype(np.float32)
        qx = jq.quantize(jnp.asarray(x), None, jq.QuantSpec("uint8", scheme="affine"))
        qw = jq.quantize(jnp.asarray(w), None, jq.QuantSpec("int8", axis=-1))
        kw = dict(
            window_strides=(1, 1),
            padding=((1, 1), (1, 1)),
            lhs_dilation=ldil,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=groups,
        )
        row = {"groups": groups, "lhs_dilation": list(ldil)}
        try:
            out = np.asarray(jax.jit(functools.partial(ops.conv_general_dilated, **kw))(qx, qw))
            xv = np.asarray(qx.int_value()).astype(np.float64) - np.asarray(qx.zero_point)
            wv = np.asarray(qw.int_value()).astype(np.float64)
            # integer values, |sums| < 2**24: exact in float32 at precision "highest"
            acc = np.asarray(
                jax.lax.conv_general_dilated(
                    jnp.asarray(xv, jnp.float32),
                    jnp.asarray(wv, jnp.float32),
                    precision="highest",
                    **kw,
                ),
                np.float64,
            )
            ref = acc * float(np.asarray(qx.scale).reshape(())) * np.asarray(qw.scale).reshape(-1)
            err = float(np.abs(out - ref).max() / np.abs(ref).max())
            row["rel_err"] = err
            row["result"] = "exact" if err < 1e-5 else "WRONG"
        except Exception as e:
            row["result"] = f"ERROR: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
        convs.append(row)

    def count(key, what):
        return sum(1 for r in rows if r[key].startswith(what))

    return {
        "dots": rows,
        "convs": convs,
        "totals": {
            "shapes": len(rows),
            "lax_wrong": count("lax", "WRONG"),
            "lax_error": count("lax", "ERROR"),
            "jq_wrong": count("jq", "WRONG"),
            "jq_error": count("jq", "ERROR"),
            "conv_not_exact": sum(1 for c in convs if c["result"] != "exact"),
        },
    }


def _run(cmd, log, timeout, env=None) -> tuple[int, float]:
    t0 = time.time()
    with open(log, "w") as fh:
        try:
            rc = subprocess.run(
                cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout, env=env
            ).returncode
        except subprocess.TimeoutExpired:
            fh.write(f"\n[device_check] timed out after {timeout} s\n")
            rc = 124
    return rc, time.time() - t0


def stage_tests(out: str, timeout: int, workers: int) -> dict:
    env = dict(os.environ)
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # several workers share one GPU
    junit = os.path.join(out, "junit.xml")
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "tests",
        "--ignore=tests/sharded",
        f"--junitxml={junit}",
        "-rs",
    ]
    if workers > 1 and importlib.util.find_spec("xdist") is not None:
        cmd += ["-n", str(workers)]
    rc, secs = _run(cmd, os.path.join(out, "tests.log"), timeout, env)
    res = {"returncode": rc, "seconds": round(secs, 1), "command": " ".join(cmd[1:])}
    if os.path.exists(junit):
        root = ET.parse(junit).getroot()
        suites = [root] if root.tag == "testsuite" else list(root)
        tot = {
            k: sum(int(s.get(k, 0)) for s in suites)
            for k in ("tests", "failures", "errors", "skipped")
        }
        res.update(tot)
        res["passed"] = tot["tests"] - tot["failures"] - tot["errors"] - tot["skipped"]
        failed, skipped = [], {}
        for case in root.iter("testcase"):
            name = f"{case.get('classname')}.{case.get('name')}"
            for tag in ("failure", "error"):
                el = case.find(tag)
                if el is not None:
                    failed.append(
                        {"test": name, "kind": tag, "message": (el.get("message") or "")[:300]}
                    )
            el = case.find("skipped")
            if el is not None:
                reason = (el.get("message") or "")[:200]
                skipped[reason] = skipped.get(reason, 0) + 1
        res["failed"] = failed
        res["skip_reasons"] = skipped
    return res


def stage_bench(out: str, timeout: int) -> dict:
    md = os.path.join(out, "ops.md")
    cmd = [
        sys.executable,
        "experiments/bench_ops.py",
        "--quick",
        "--repeats",
        "5",
        "--calls",
        "10",
        "--out",
        md,
    ]
    rc, secs = _run(cmd, os.path.join(out, "bench.log"), timeout)
    res = {"returncode": rc, "seconds": round(secs, 1)}
    if os.path.exists(md):
        res["table"] = [ln for ln in open(md).read().splitlines() if ln.startswith("| ")]
    return res


def stage_gpu(out: str, timeout: int, budget: float, quick: bool) -> dict:
    md = os.path.join(out, "bench_gpu.md")
    cmd = [sys.executable, "experiments/bench_gpu.py", "--budget", str(budget), "--out", md]
    if quick:
        cmd.append("--quick")
    rc, secs = _run(cmd, os.path.join(out, "bench_gpu.log"), timeout)
    res = {"returncode": rc, "seconds": round(secs, 1)}
    if os.path.exists(md):
        text = open(md).read().splitlines()
        res["table"] = [ln for ln in text if ln.startswith("|")]
        res["notes"] = [ln for ln in text if ln and not ln.startswith(("|", "#"))]
    return res


def _markdown(s: dict) -> str:
    lines = ["# jq device check", ""]
    env = s.get("env", {})
    if env and "error" not in env:
        low = env["lowering"]
        lines += [
            f"- jax {env['jax']}, backend `{env['backend']}`, device {env['device_kind']} "
            f"({len(env['devices'])} device(s)); jq tested JAX versions {env['tested_jax_versions']}",
            f"- CPU kind `{low['cpu']['kind']}`, CPU form `{low['cpu']['form']}`; accelerator form "
            f"`{low['accelerator']['form']}` (K multiple {low['accelerator']['k_multiple']})",
        ]
    sw = s.get("sweep", {})
    if "totals" in sw:
        t = sw["totals"]
        lines += [
            "",
            "## int8 dot exactness sweep",
            "",
            f"{t['shapes']} shapes: plain lax s8 dot {t['lax_wrong']} wrong, {t['lax_error']} "
            f"failed to compile; jq {t['jq_wrong']} wrong, {t['jq_error']} failed; "
            f"integer convs not exact: {t['conv_not_exact']}",
        ]
        bad = [r for r in sw["dots"] if r["lax"] != "exact" or r["jq"] != "exact"]
        if bad:
            lines += ["", "| M | K | N | layout | lax | jq |", "|---|---|---|---|---|---|"]
            lines += [
                f"| {r['m']} | {r['k']} | {r['n']} | {r['layout']} | {r['lax']} | {r['jq']} |"
                for r in bad
            ]
    tests = s.get("tests", {})
    if tests:
        lines += [
            "",
            "## test suite",
            "",
            f"passed {tests.get('passed')}, failed {tests.get('failures')}, errors "
            f"{tests.get('errors')}, skipped {tests.get('skipped')} in {tests['seconds']} s "
            f"(return code {tests['returncode']})",
        ]
        for f in tests.get("failed", []):
            lines.append(f"- FAILED {f['test']}: {f['message']}")
        for reason, n in tests.get("skip_reasons", {}).items():
            lines.append(f"- skipped x{n}: {reason}")
    bench = s.get("bench", {})
    if bench:
        lines += [
            "",
            "## bench_ops --quick",
            "",
            f"return code {bench['returncode']}, {bench['seconds']} s",
            "",
        ]
        lines += bench.get("table", [])
    gpu = s.get("gpu", {})
    if gpu and "error" not in gpu:
        lines += [
            "",
            "## bench_gpu",
            "",
            f"return code {gpu['returncode']}, {gpu['seconds']} s",
            "",
        ]
        lines += gpu.get("notes", []) + [""] + gpu.get("table", [])
    for k, v in s.items():
        if isinstance(v, dict) and "error" in v:
            lines += ["", f"**stage {k} crashed:** `{v['error']}`"]
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(ROOT, "experiments", "results", "device"))
    p.add_argument("--stages", default="env,sweep,tests,bench,gpu")
    p.add_argument("--tests-timeout", type=int, default=180)
    p.add_argument("--bench-timeout", type=int, default=75)
    p.add_argument("--gpu-budget", type=float, default=180.0)
    p.add_argument("--gpu-timeout", type=int, default=240)
    p.add_argument("--quick", action="store_true", help="tiny benchmark sizes (a CPU run)")
    p.add_argument("--workers", type=int, default=4)
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    summary, t0 = {}, time.time()
    stages = args.stages.split(",")
    for name in stages:
        print(f"[device_check] stage {name} ...", flush=True)
        try:
            if name == "env":
                summary[name] = stage_env()
            elif name == "sweep":
                summary[name] = stage_sweep()
            elif name == "tests":
                summary[name] = stage_tests(args.out, args.tests_timeout, args.workers)
            elif name == "bench":
                summary[name] = stage_bench(args.out, args.bench_timeout)
            elif name == "gpu":
                summary[name] = stage_gpu(args.out, args.gpu_timeout, args.gpu_budget, args.quick)
            else:
                raise ValueError(f"unknown stage {name!r}")
        except Exception as e:
            summary[name] = {
                "error": f"{type(e).__name__}: {e}",
                "traceback": traceback.format_exc(),
            }
        with open(os.path.join(args.out, "summary.json"), "w") as fh:  # after every stage
            json.dump(summary, fh, indent=1, default=str)
    summary["seconds"] = round(time.time() - t0, 1)
    with open(os.path.join(args.out, "summary.json"), "w") as fh:
        json.dump(summary, fh, indent=1, default=str)
    md = _markdown(summary)
    with open(os.path.join(args.out, "summary.md"), "w") as fh:
        fh.write(md)
    print(md)
    t = summary.get("tests", {})
    ok = (
        summary.get("sweep", {}).get("totals", {}).get("jq_wrong", 0) == 0
        and summary.get("sweep", {}).get("totals", {}).get("jq_error", 0) == 0
        and (not t or (t.get("failures", 1) == 0 and t.get("errors", 1) == 0))
        and all(summary.get(k, {}).get("returncode", 0) == 0 for k in ("bench", "gpu"))
        and not any(isinstance(v, dict) and "error" in v for v in summary.values())
    )
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
