"""GPTQ against round-to-nearest, and W8A8 with and without SmoothQuant, on the character-level transformer.

The model, corpus, training and evaluation are `experiments/charlm.py`'s (same
`Config`, same seed: the float model is the one of charlm's table when the
configuration matches). Rows, all through jq's public workflow:

* float32;
* weight-only int4 and 3-bit (3-bit codes stored as int4) at every weight dot
  (attention projections, MLP, output head), per output channel or with group
  scales (``--groups``), by round-to-nearest (`jq.convert`) and by GPTQ
  (``jq.gptq``, sequential, ``percdamp=0.01``), GPTQ also with ``act_order``;
  embeddings stay float32 in every row;
* W8A8: static int8 activations (min-max, per tensor) at every dot and at the
  attention's activation einsums, int8 per-channel weights, without and with
  SmoothQuant (alpha 0.5).

Group scales by layer (jq blocks run along one stored axis): Dense kernels
``(K, N)`` group K; query / key / value kernels ``(D, heads, head_dim)`` have
one scale per (head, dim) and group D; the attention output kernel
``(heads, head_dim, D)`` has one scale per output and groups of
``min(group, head_dim)`` along head_dim.

Columns: bits per character on the held-out text, its increase over float32,
the share of RTN's increase that GPTQ recovers, model bytes, and the wall time
of the quantization call (GPTQ: Hessians, factorisations and the jitted passes,
compilation included; the time of the GPTQ passes alone is listed too).

Run::

    python experiments/bench_gptq.py            # charlm's full model (train ~15 min on 2 idle cores)
    python experiments/bench_gptq.py --quick    # charlm's --quick model

Writes ``experiments/results/gptq.{json,md}`` (``gptq_quick.*`` with ``--quick``).
The trained float parameters are cached in ``--cache`` (a .npz) between runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

import jq
import jq.calibration as cal
from jq.flax.gptq import gptq
from jq.flax.smoothquant import smoothquant

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import charlm  # noqa: E402
from _common import RESULTS_DIR, machine_info, markdown_table, tree_nbytes, write_results  # noqa: E402


def weight_rules(fmt: str, group: int | None, head_dim: int) -> list[jq.Rule]:
    """Weight-only rules for every dot with a weight; embeddings are left float."""
    if group is None:
        qkv = jq.QuantSpec(fmt, axis=(1, 2))
        out = jq.QuantSpec(fmt, axis=-1)
        dense = jq.QuantSpec(fmt, axis=-1)
    else:
        qkv = jq.QuantSpec(fmt, axis=(1, 2), block_axis=0, block_size=group)
        out = jq.QuantSpec(fmt, axis=-1, block_axis=1, block_size=min(group, head_dim))
        dense = jq.QuantSpec(fmt, axis=-1, block_axis=0, block_size=group)
    return [
        jq.Rule(r".*/(query|key|value)", ops=("dot",), weight=qkv),
        jq.Rule(r".*/out", ops=("dot",), weight=out),
        jq.Rule(r".*", ops=("dot",), weight=dense),
    ]


def w8a8_rules() -> list[jq.Rule]:
    a8 = jq.QuantSpec("int8", calibration=cal.MinMax())
    return [
        jq.Rule(".*", ops=("dot",), weight=jq.QuantSpec("int8", axis=-1), activation=a8),
        jq.Rule(".*", ops=("act_dot",), weight=None, activation=a8),
    ]


def load_or_train(model, train_ids, cfg, cache):
    if cache and os.path.exists(cache):
        flat = dict(np.load(cache))
        ref = jax.eval_shape(
            lambda: model.init(jax.random.key(0), jnp.zeros((1, cfg.ctx), jnp.int32))
        )
        leaves, tree = jax.tree_util.tree_flatten_with_path(ref)
        keys = ["/".join(str(getattr(k, "key", k)) for k in p) for p, _ in leaves]
        if set(keys) == set(flat) and all(
            flat[k].shape == x.shape for k, (_, x) in zip(keys, leaves)
        ):
            print(f"float parameters from {cache}")
            return jax.tree_util.tree_unflatten(tree, [jnp.asarray(flat[k]) for k in keys])
    variables = charlm.train_float(model, train_ids, cfg)
    if cache:
        flat, _ = jax.tree_util.tree_flatten_with_path(variables)
        np.savez(
            cache,
            **{"/".join(str(getattr(k, "key", k)) for k in p): np.asarray(x) for p, x in flat},
        )
    return variables


def run(cfg, groups, cache, out_dir, name, smooth=True):
    train_ids, test_ids, vocab, info = charlm.load_corpus()
    model = charlm.CharLM(
        vocab=len(vocab), width=cfg.width, layers=cfg.layers, heads=cfg.heads, ctx=cfg.ctx
    )
    t0 = time.perf_counter()
    variables = load_or_train(model, train_ids, cfg, cache)
    train_s = time.perf_counter() - t0
    xte, yte = charlm.eval_windows(test_ids, cfg.ctx)
    rng = np.random.default_rng(cfg.seed + 2)
    calib = [
        charlm._windows(train_ids, rng, cfg.calib_batch, cfg.ctx)[0]
        for _ in range(cfg.calib_batches)
    ]
    head_dim = cfg.width // cfg.heads
    f_float = jax.jit(lambda v, x: model.apply(v, x))
    f_q = jax.jit(lambda q, x: jq.apply(model, q, x))
    bpc_f = charlm.bits_per_char(f_float, variables, xte, yte)
    rows = [
        {
            "method": "float32",
            "bits": 32,
            "group": "-",
            "bpc": bpc_f,
            "bytes": tree_nbytes(variables),
            "time_s": None,
            "gptq_pass_s": None,
        }
    ]
    print(f"float32 bpc {bpc_f:.4f}")

    def add(method, bits, group, qv, secs, pass_s=None):
        bpc = charlm.bits_per_char(f_q, qv, xte, yte)
        rows.append(
            {
                "method": method,
                "bits": bits,
                "group": group if group else "channel",
                "bpc": bpc,
                "bytes": qv.nbytes()["total_after"],
                "time_s": secs,
                "gptq_pass_s": pass_s,
            }
        )
        print(f"{method:28s} bits={bits} group={group} bpc={bpc:.4f} time={secs:.1f}s")

    for bits in (4, 3):
        for group in groups:
            rules = weight_rules("int4", group, head_dim)
            bits_kw = None if bits == 4 else 3
            t = time.perf_counter()
            if bits_kw is None:
                qv = jq.convert(model, variables, rules, args=(calib[0],))
            else:  # jq.convert has no 3-bit grid: round-to-nearest on GPTQ's grid (H = I)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    qv = gptq(
                        model, variables, rules, calib, bits=bits_kw, rtn=True, progress=False
                    )
            jax.block_until_ready(jax.tree_util.tree_leaves(qv))
            add("RTN", bits, group, qv, time.perf_counter() - t)
            for act_order in (False, True):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    t = time.perf_counter()
                    qv, gi = gptq(
                        model,
                        variables,
                        rules,
                        calib,
                        bits=bits_kw,
                        act_order=act_order,
                        progress=False,
                        return_info=True,
                    )
                    secs = time.perf_counter() - t
                add(
                    "GPTQ" + (" act_order" if act_order else ""),
                    bits,
                    group,
                    qv,
                    secs,
                    sum(r["seconds"] for r in gi),
                )

    if smooth:
        rules = w8a8_rules()
        t = time.perf_counter()
        stats = jq.calibrate(model, variables, rules, calib, progress=False)
        qv = jq.convert(model, variables, rules, stats)
        add("W8A8 static (min-max)", 8, None, qv, time.perf_counter() - t)
        for alpha in (0.5, 0.8):
            t = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                qv = smoothquant(model, variables, rules, calib, alpha=alpha, progress=False)
            add(f"W8A8 + SmoothQuant a={alpha}", 8, None, qv, time.perf_counter() - t)

    timings = pass_timings(variables, groups[-1], cfg.repeats)

    # share of RTN's bpc loss that GPTQ recovers, per (bits, group)
    for r in rows:
        r["delta_bpc"] = r["bpc"] - bpc_f
        r["delta_pct"] = 100.0 * (r["bpc"] / bpc_f - 1.0)
        r["recovered"] = None
        if r["method"].startswith("GPTQ"):
            base = next(
                x
                for x in rows
                if x["method"] == "RTN" and x["bits"] == r["bits"] and x["group"] == r["group"]
            )
            if base["delta_bpc"] > 0:
                r["recovered"] = 1.0 - r["delta_bpc"] / base["delta_bpc"]
    result = {
        "config": dataclasses.asdict(cfg),
        "groups": list(groups),
        "machine": machine_info(),
        "corpus": info,
        "train_or_load_s": train_s,
        "rows": rows,
        "pass_timings": timings,
    }
    md = render(result)
    files = write_results(out_dir, name, result, md)
    print(md)
    print("wrote " + ", ".join(files))
    return result


def pass_timings(variables, group, repeats):
    """Warm `jq.gptq_core.gptq_quantize` time per distinct kernel shape (compiled once, median of repeats).

    The model's kernels as (K, N) matrices with a random SPD Hessian; one first call
    (compilation) then `repeats` timed calls, alternating with jitted round-to-nearest
    (`jq.quantize` with min-max scales).
    """
    from jq.gptq_core import gptq_quantize

    rtn = jax.jit(jq.quantize, static_argnums=2)

    shapes = set()
    for path, x in jax.tree_util.tree_flatten_with_path(variables["params"])[0]:
        keys = [str(getattr(p, "key", p)) for p in path]
        if keys[-1] == "kernel":
            # the attention output kernel (heads, head_dim, D) contracts its first two axes
            k = x.shape[0] * x.shape[1] if keys[-2] == "out" else x.shape[0]
            shapes.add((k, int(np.prod(x.shape)) // k))
    out = []
    rng = np.random.default_rng(0)
    for k, n in sorted(shapes):
        g = group if group and k % group == 0 else None
        spec = jq.QuantSpec("int4", axis=-1, block_axis=0 if g else None, block_size=g)
        w = rng.normal(size=(k, n)).astype(np.float32)
        x = rng.normal(size=(4 * k, k)).astype(np.float32)
        h = 2 * x.T @ x / len(x)
        t = time.perf_counter()
        jax.block_until_ready(gptq_quantize(w, h, spec).weight)
        first = time.perf_counter() - t
        jax.block_until_ready(rtn(w, None, spec).value)
        tg, tr = [], []
        for _ in range(repeats):
            t = time.perf_counter()
            jax.block_until_ready(gptq_quantize(w, h, spec).weight)
            tg.append(time.perf_counter() - t)
            t = time.perf_counter()
            jax.block_until_ready(rtn(w, None, spec).value)
            tr.append(time.perf_counter() - t)
        out.append(
            {
                "K": k,
                "N": n,
                "group": g,
                "first_call_s": first,
                "gptq_ms": 1e3 * float(np.median(tg)),
                "rtn_path_ms": 1e3 * float(np.median(tr)),
            }
        )
        print(out[-1])
    return out


def render(result) -> str:
    cfg = result["config"]
    weights = lambda b: "float32" if b == 32 else ("3-bit (int4)" if b == 3 else f"int{b}")  # noqa: E731
    cols = [
        ("method", "method", None),
        ("bits", "weights", weights),
        ("group", "group", None),
        ("bpc", "bpc", ".4f"),
        ("delta_bpc", "Δ bpc", "+.4f"),
        ("delta_pct", "Δ %", "+.2f"),
        ("recovered", "RTN loss recovered", lambda v: f"{100 * v:.0f}%"),
        ("bytes", "bytes", ","),
        ("time_s", "time (s)", ".1f"),
        ("gptq_pass_s", "GPTQ passes (s)", ".1f"),
    ]
    m = result["machine"]
    rows = result["rows"]
    summary = []
    for r in rows:
        if r["method"] == "GPTQ" and r["recovered"] is not None:
            base = next(
                x
                for x in rows
                if x["method"] == "RTN" and x["bits"] == r["bits"] and x["group"] == r["group"]
            )
            gname = "per channel" if r["group"] == "channel" else f"groups of {r['group']}"
            target = " (target at int4: at least 50%)" if r["bits"] == 4 else ""
            summary.append(
                f"- {weights(r['bits'])}, {gname}: RTN {base['bpc']:.4f} bpc ({base['delta_pct']:+.2f}%), "
                f"GPTQ {r['bpc']:.4f} ({r['delta_pct']:+.2f}%): GPTQ recovers "
                f"{100 * r['recovered']:.0f}% of RTN's loss{target}."
            )
    w8 = [r for r in rows if r["method"].startswith("W8A8")]
    if w8:
        summary.append(
            "- W8A8 (static per-tensor int8 activations): "
            + "; ".join(f"{r['method']}: {r['bpc']:.4f} bpc ({r['delta_pct']:+.2f}%)" for r in w8)
            + "."
        )
    lines = [
        "# GPTQ and SmoothQuant on the character-level transformer",
        "",
        "```python",
        "rules = [jq.Rule('.*', ops=('dot',), weight=jq.QuantSpec('int4', axis=-1, block_axis=0, block_size=128))]",
        "qvars = jq.gptq(model, variables, rules, calib_batches)            # sequential GPTQ, percdamp=0.01",
        "qvars = jq.gptq(model, variables, rules, calib_batches, act_order=True, bits=3)",
        "y = jq.apply(model, qvars, x)                                      # ordinary quantized variables",
        "qvars = jq.smoothquant(model, variables, w8a8_rules, calib_batches, alpha=0.5)",
        "```",
        "",
        *summary,
        "",
        f"Model: charlm (width {cfg['width']}, {cfg['layers']} layers, {cfg['heads']} heads, context {cfg['ctx']}), "
        f"{cfg['steps']} training steps; corpus sha256 {result['corpus']['sha256'][:12]}; calibration: "
        f"{cfg['calib_batches']} batches of {cfg['calib_batch']} training windows "
        f"({cfg['calib_batches'] * cfg['calib_batch'] * cfg['ctx']:,} tokens). Weight rows quantize every "
        "weight dot (embeddings stay float32); bytes are the whole model's. Machine: "
        f"{m.get('cpu', '?')} ({m.get('cpu_count')} cores, 1-min load {m.get('load_avg_1m')}), jax {m.get('jax')}.",
        "",
        markdown_table(result["rows"], cols),
        "",
        "`time` is the wall time of the whole call (GPTQ: sequential Hessian passes over the calibration "
        "batches, float64 Cholesky factorisations and the jitted passes, compilation included); "
        "`GPTQ passes` sums the per-weight factorisation + pass times. 3-bit rows use codes in [-3, 3] "
        "(symmetric, narrow) stored as int4, so their size equals int4's; their RTN row is `jq.gptq(..., "
        "rtn=True)` (round-to-nearest on the same grid).",
    ]
    if result.get("pass_timings"):
        lines += [
            "",
            "Warm `jq.gptq_core.gptq_quantize` per kernel shape (int4, groups where they divide K; "
            "medians of interleaved repeats after one compiling call):",
            "",
            markdown_table(
                result["pass_timings"],
                [
                    ("K", "K", None),
                    ("N", "N", None),
                    ("group", "group", None),
                    ("first_call_s", "first call (s, compile)", ".2f"),
                    ("gptq_ms", "GPTQ (ms)", ".1f"),
                    ("rtn_path_ms", "RTN jq.quantize (ms)", ".2f"),
                ],
            ),
        ]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="charlm's --quick model")
    p.add_argument(
        "--groups", default="none,128", help="comma-separated group sizes ('none' = per channel)"
    )
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--cache", default=None, help="npz cache of the float parameters")
    p.add_argument("--no-smooth", action="store_true")
    p.add_argument("--out", default=RESULTS_DIR)
    p.add_argument("--render", default=None, help="only rewrite the markdown of this results .json")
    a = p.parse_args(argv)
    if a.render:
        import json

        with open(a.render) as f:
            result = json.load(f)
        with open(a.render[: -len(".json")] + ".md", "w") as f:
            f.write(render(result).rstrip() + "\n")
        return
    cfg = charlm.Config(quick=a.quick)
    if a.quick:
        cfg.width, cfg.layers, cfg.steps = 128, 2, 300
    if a.steps is not None:
        cfg.steps = a.steps
    groups = tuple(None if g.strip() == "none" else int(g) for g in a.groups.split(","))
    name = "gptq_quick" if a.quick else "gptq"
    cache = a.cache or os.path.join(
        "/tmp", f"jq_{name}_w{cfg.width}_l{cfg.layers}_s{cfg.steps}.npz"
    )
    run(cfg, groups, cache, a.out, name, smooth=not a.no_smooth)


if __name__ == "__main__":
    main()
