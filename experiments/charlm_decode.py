"""Autoregressive decoding of the char-level transformer with quantized weights and a quantized KV cache.

The model, corpus and float training are `experiments/charlm.py`'s (its
`CharLM`, whose ``decode=True`` variant has the same parameters and keeps
keys and values in linen's ``cache`` collection). Weights are quantized on the
full-sequence model with jq's public verbs; decoding then runs the decode
model one token per step inside one jitted ``lax.scan``:

* float32: ``model.apply(..., mutable=["cache"])``, plain Flax;
* every other row: ``jq.apply(model, qvars, tok, pos, mutable=["cache"])`` then
  ``jq.with_cache`` (the float weights' rows with a quantized cache use
  `jq.convert` with the cache rule alone).

Weight rows (embeddings stay float32 in every row): float32; int8 (per-channel
weights, dynamic per-tensor int8 activations: jq's integer dots); int4 with
groups of `group` input rows (the attention output projection groups its
head_dim, 32) by round-to-nearest (`jq.convert`), AWQ (`jq.awq`, scale and
clip search), GPTQ (`jq.gptq`, sequential) and AWQ then GPTQ
(``jq.awq(..., rounding="gptq")``). KV caches: float32, int8 and fp8 e4m3
(`jq.kv_cache`, one float32 scale per token and head).

Columns: teacher-forced bits per character of the held-out windows through
the decode path (position t's logits from a cache holding tokens 0..t);
cache bytes per token (all layers, keys and values); generation tokens/s at
batch 1 and 16 (greedy, `ctx` steps per call, median of interleaved repeats).
A greedy sample from a fixed prompt shows that generation works.

Run::

    python experiments/charlm_decode.py           # width 128, 2 layers, 800 steps (training ~4 min, cached)
    python experiments/charlm_decode.py --quick   # a smoke run (tiny model, few windows)

Writes ``experiments/results/charlm_decode.{json,md}`` (``charlm_decode_quick.*`` with ``--quick``).
The float parameters are cached in ``/tmp`` (a .npz) between runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jq

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_gptq  # noqa: E402
import charlm  # noqa: E402
from _common import (  # noqa: E402
    RESULTS_DIR,
    interleaved_latency,
    machine_info,
    markdown_table,
    write_results,
)

TARGETS = {"awq_recovery": 0.5, "kv_int8_bpc_pct": 0.5, "kv_int8_bytes_ratio": 0.27}
PROMPT = "def __init__(self"
WEIGHTS = (
    "float32",
    "int8 W8A8",
    "int4 RTN",
    "int4 AWQ",
    "int4 AWQ, no clip",
    "int4 GPTQ",
    "int4 AWQ+GPTQ",
)


@dataclasses.dataclass
class Config(charlm.Config):
    """charlm's configuration (its training fields are used as they are), smaller by default."""

    layers: int = 2
    steps: int = 800
    group: int = 128
    eval_windows: int | None = 512  # held-out windows scored (None: all)
    eval_batch: int = 64
    gen_batches: tuple[int, ...] = (1, 16)
    weights: tuple[str, ...] = WEIGHTS  # weight rows (float32 always runs)
    caches: tuple[str, ...] = ("float32", "int8", "e4m3")  # e4m3 only with float32 / int8 weights
    name: str = "charlm_decode"
    repeats: int = 9
    min_seconds: float = 0.05  # each timing sample repeats a generation call for at least this long


# ---------------------------------------------------------------------------------------
# rows: quantized weights (on the full-sequence model)
# ---------------------------------------------------------------------------------------
def weight_rows(cfg, model, variables, calib):
    """``{name: (qvars or None, seconds to build)}``."""
    hd = cfg.width // cfg.heads
    group = min(cfg.group, cfg.width)
    w4 = bench_gptq.weight_rules("int4", group, hd)
    w8 = [
        dataclasses.replace(r, activation=jq.QuantSpec("int8"))
        for r in bench_gptq.weight_rules("int8", None, hd)
    ]
    args = (calib[0],)
    all_builders = {
        "float32": lambda: None,
        "int8 W8A8": lambda: jq.convert(model, variables, w8, args=args),
        "int4 RTN": lambda: jq.convert(model, variables, w4, args=args),
        "int4 AWQ": lambda: jq.awq(model, variables, w4, calib, progress=False),
        "int4 AWQ, no clip": lambda: jq.awq(
            model, variables, w4, calib, clip=False, progress=False
        ),
        "int4 GPTQ": lambda: jq.gptq(model, variables, w4, calib, progress=False),
        "int4 AWQ+GPTQ": lambda: jq.awq(
            model, variables, w4, calib, rounding="gptq", progress=False
        ),
    }
    builders = {k: v for k, v in all_builders.items() if k in cfg.weights}
    out = {}
    for name, build in builders.items():
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            qv = build()
        out[name] = (qv, time.perf_counter() - t0)
    return out


# ---------------------------------------------------------------------------------------
# decoding
# ---------------------------------------------------------------------------------------
def decoder(dmodel, params, qv, kv_fmt, batch):
    """``(state, step)``: the decode state for `batch` sequences and ``step(state, tok, pos) -> (logits, state)``."""
    cache = dmodel.init(
        jax.random.key(0),
        jnp.zeros((batch, dmodel.ctx), jnp.int32),
        jnp.zeros((batch, dmodel.ctx), jnp.int32),
    )["cache"]
    if qv is None and kv_fmt == "float32":

        def step(st, tok, pos):
            logits, upd = dmodel.apply({"params": params, **st}, tok, pos, mutable=["cache"])
            return logits, upd

        return {"cache": cache}, step
    rules = [] if kv_fmt == "float32" else [jq.kv_cache_rule(kv_fmt)]
    if qv is None:  # float weights, quantized cache: a conversion with the cache rule alone
        qv = jq.convert(dmodel.clone(decode=False), {"params": params}, rules, args=(cache_tok(),))
    q = jq.with_cache(qv, {"cache": cache})
    if rules:
        q = jq.kv_cache(dmodel, q, rules)

    def qstep(st, tok, pos):
        logits, upd = jq.apply(dmodel, st, tok, pos, mutable=["cache"])
        return logits, jq.with_cache(st, upd)

    return q, qstep


def cache_tok():
    return jnp.zeros((1, 4), jnp.int32)


def cache_bytes(state) -> int:
    if isinstance(state, jq.QuantizedVariables):
        return jq.kv_cache_bytes(state)
    leaves = jax.tree_util.tree_leaves_with_path(state["cache"])
    return sum(
        int(x.size) * x.dtype.itemsize
        for p, x in leaves
        if str(getattr(p[-1], "key", "")) in ("cached_key", "cached_value")
    )


def teacher_forced(step, ctx):
    """Jitted ``(state, x, y) -> per-window NLL sums (nats)``, one decode step per position."""

    @jax.jit
    def run(state, x, y):
        b = x.shape[0]

        def body(carry, t):
            st, tot = carry
            logits, st = step(st, x[:, t][:, None], jnp.full((b, 1), t, jnp.int32))
            nll = optax.softmax_cross_entropy_with_integer_labels(
                logits[:, 0].astype(jnp.float32), y[:, t]
            )
            return (st, tot + nll), None

        (_, tot), _ = jax.lax.scan(body, (state, jnp.zeros((b,), jnp.float32)), jnp.arange(ctx))
        return tot

    return run


def generator(step, ctx):
    """Jitted greedy generation ``(state, prompt (P,), batch-shaped dummy) -> tokens (B, ctx)``.

    Positions below the prompt's length are fed the prompt; later ones the previous output.
    """

    @jax.jit
    def run(state, prompt, first):
        b = first.shape[0]
        plen = prompt.shape[0]

        def body(carry, t):
            st, prev = carry
            fed = jnp.where(t < plen, prompt[jnp.minimum(t, plen - 1)], prev)
            logits, st = step(st, fed[:, None], jnp.full((b, 1), t, jnp.int32))
            nxt = jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)
            return (st, nxt), fed

        _, toks = jax.lax.scan(body, (state, first), jnp.arange(ctx))
        return toks.T

    return run


def run(cfg: Config) -> dict:
    t_start = time.perf_counter()
    train_ids, test_ids, vocab, info = charlm.load_corpus()
    model = charlm.CharLM(
        vocab=len(vocab), width=cfg.width, layers=cfg.layers, heads=cfg.heads, ctx=cfg.ctx
    )
    dmodel = model.clone(decode=True)
    cache_file = os.path.join(
        "/tmp", f"jq_charlm_decode_w{cfg.width}_l{cfg.layers}_s{cfg.steps}_c{cfg.ctx}.npz"
    )
    variables = bench_gptq.load_or_train(model, train_ids, cfg, cache_file)
    params = variables["params"]
    rng = np.random.default_rng(cfg.seed + 2)
    calib = []
    for _ in range(cfg.calib_batches):
        starts = rng.integers(0, len(train_ids) - cfg.ctx - 1, cfg.calib_batch)
        calib.append(jnp.asarray(train_ids[starts[:, None] + np.arange(cfg.ctx)[None]]))
    xte, yte = charlm.eval_windows(test_ids, cfg.ctx)
    if cfg.eval_windows is not None:
        xte, yte = xte[: cfg.eval_windows], yte[: cfg.eval_windows]
    index = {c: i for i, c in enumerate(vocab)}
    prompt = jnp.asarray([index[c] for c in PROMPT], jnp.int32)

    # the full-sequence float model's bpc on the same windows: the decode path must reproduce it
    f_full = jax.jit(lambda v, x: model.apply(v, x))
    bpc_full = charlm.bits_per_char(f_full, variables, xte, yte, batch=cfg.eval_batch)

    wrows = weight_rows(cfg, model, variables, calib)
    caches = cfg.caches
    rows, gens = [], {}
    for wname, (qv, build_s) in wrows.items():
        for kv in caches:
            if (kv == "e4m3" and wname not in ("float32", "int8 W8A8")) or (
                kv != "float32" and wname == "int4 AWQ, no clip"
            ):
                continue
            name = f"{wname} / {kv} cache"
            row = {"weights": wname, "cache": kv, "method": name, "build_s": build_s}
            state, step = decoder(dmodel, params, qv, kv, cfg.eval_batch)
            tf = teacher_forced(step, cfg.ctx)
            total, n = 0.0, len(xte)
            for i in range(0, n, cfg.eval_batch):
                xb, yb = xte[i : i + cfg.eval_batch], yte[i : i + cfg.eval_batch]
                keep = len(xb)
                if keep < cfg.eval_batch:  # pad the last batch; padded windows are not counted
                    pad = cfg.eval_batch - keep
                    xb = np.concatenate([xb, np.zeros((pad, cfg.ctx), xb.dtype)])
                    yb = np.concatenate([yb, np.zeros((pad, cfg.ctx), yb.dtype)])
                total += float(np.asarray(tf(state, xb, yb), np.float64)[:keep].sum())
            row["bpc"] = total / (n * cfg.ctx) / math.log(2)
            row["cache_bytes_per_token"] = cache_bytes(state) / (cfg.eval_batch * cfg.ctx)
            for b in cfg.gen_batches:
                st_b, step_b = decoder(dmodel, params, qv, kv, b)
                gens[(name, b)] = (
                    generator(step_b, cfg.ctx),
                    (st_b, prompt, jnp.zeros((b,), jnp.int32)),
                )
            toks = np.asarray(gens[(name, 1)][0](*gens[(name, 1)][1]))[0]
            row["sample"] = "".join(vocab[int(t)] for t in toks)
            rows.append(row)
            print(f"  {name}: bpc {row['bpc']:.4f}", flush=True)
    base = {r["cache"]: r for r in rows if r["weights"] == "float32"}
    f32 = base["float32"]
    for r in rows:
        r["bpc_increase_pct"] = 100.0 * (r["bpc"] / f32["bpc"] - 1.0)
        r["bytes_ratio"] = r["cache_bytes_per_token"] / f32["cache_bytes_per_token"]
    for b in cfg.gen_batches:
        lat = interleaved_latency(
            {name: g for (name, bb), g in gens.items() if bb == b},
            cfg.repeats,
            min_seconds=cfg.min_seconds,
            desc=f"generate b{b}",
        )
        # on a shared machine the fastest sample estimates the uncontended speed
        ref = lat[f32["method"]]["min"]
        for r in rows:
            s = lat[r["method"]]
            r[f"tok_s_b{b}"] = b * cfg.ctx / s["min"]
            r[f"tok_s_b{b}_median"] = b * cfg.ctx / s["median"]
            r[f"speedup_b{b}"] = ref / s["min"]
    result = {
        "config": dataclasses.asdict(cfg),
        "machine": machine_info(),
        "corpus": info,
        "bpc_full_sequence_float": bpc_full,
        "rows": rows,
        "targets": target_checks(rows, cfg),
        "prompt": PROMPT,
    }
    result["wall_s"] = time.perf_counter() - t_start
    md = render_markdown(result)
    result["files"] = write_results(cfg.out_dir, cfg.name, result, md)
    result["markdown"] = md
    return result


def target_checks(rows, cfg):
    rs = {r["method"]: r for r in rows}
    weights, caches = {r["weights"] for r in rows}, {r["cache"] for r in rows}
    if not set(WEIGHTS) <= weights or not {"float32", "int8"} <= caches:
        return []  # a partial run (--weights / --caches): no targets
    get = lambda w, c="float32": rs[f"{w} / {c} cache"]
    f32 = get("float32")["bpc"]
    rtn, awq = get("int4 RTN")["bpc"], get("int4 AWQ")["bpc"]
    rec = (rtn - awq) / (rtn - f32) if rtn > f32 else float("nan")
    out = [
        {
            "check": f"int4 AWQ (group {min(cfg.group, cfg.width)}) recovers >= 50% of RTN's bpc loss",
            "value": f"{100 * rec:.0f}%",
            "met": bool(rec >= TARGETS["awq_recovery"]),
        },
        {
            "check": "int4 AWQ+GPTQ bpc <= GPTQ",
            "value": f"{get('int4 AWQ+GPTQ')['bpc']:.4f} vs {get('int4 GPTQ')['bpc']:.4f}",
            "met": bool(get("int4 AWQ+GPTQ")["bpc"] <= get("int4 GPTQ")["bpc"]),
        },
    ]
    worst = max(
        100.0 * (get(w, "int8")["bpc"] / get(w)["bpc"] - 1.0)
        for w in weights
        if f"{w} / int8 cache" in rs
    )
    out.append(
        {
            "check": "int8 KV cache bpc within +0.5% of the float cache (worst weight row)",
            "value": f"{worst:+.3f}%",
            "met": bool(worst <= TARGETS["kv_int8_bpc_pct"]),
        }
    )
    ratio = get("float32", "int8")["bytes_ratio"]
    out.append(
        {
            "check": "int8 KV cache bytes <= 0.27x float32",
            "value": f"{ratio:.3f}x",
            "met": bool(ratio <= TARGETS["kv_int8_bytes_ratio"]),
        }
    )
    b = max(cfg.gen_batches)
    sp = get("int8 W8A8", "int8")[f"speedup_b{b}"]
    out.append(
        {
            "check": f"int8 weights + int8 cache tokens/s >= float32 at batch {b}",
            "value": f"{sp:.2f}x",
            "met": bool(sp >= 1.0),
        }
    )
    return out


def render_markdown(result) -> str:
    cfg, mi = result["config"], result["machine"]
    cols = [
        ("method", "weights / KV cache", None),
        ("bpc", "teacher-forced bpc", ".4f"),
        ("bpc_increase_pct", "Δ bpc (%)", "+.2f"),
        ("cache_bytes_per_token", "cache bytes / token", ",.0f"),
        ("bytes_ratio", "cache vs float32", ".3f"),
    ]
    for b in cfg["gen_batches"]:
        cols += [
            (f"tok_s_b{b}", f"tokens/s b={b}", ",.0f"),
            (f"speedup_b{b}", f"b={b} vs float32", ".2f"),
        ]
    group = min(cfg["group"], cfg["width"])
    samples = [f"- {r['method']}: `{r['sample']!r}`" for r in result["rows"]]
    parts = [
        f"# charlm decode: {'quick' if cfg['quick'] else 'default'} run",
        "",
        f"Character-level transformer (`experiments/charlm.py`: {cfg['layers']} layers, width "
        f"{cfg['width']}, {cfg['heads']} heads, context {cfg['ctx']}; {cfg['steps']} float training "
        f"steps) decoded one token per step with linen's `MultiHeadDotProductAttention(decode=True)` "
        f"cache, in one jitted `lax.scan`. bpc: teacher-forced through the decode path over the first "
        f"{cfg['eval_windows'] or 'all'} held-out windows of {cfg['ctx']} characters (the full-sequence "
        f"float model gives {result['bpc_full_sequence_float']:.4f} on the same windows). int4 rows: "
        f"groups of {group} input rows (attention output projection: groups of its head_dim, "
        f"{cfg['width'] // cfg['heads']}); AWQ, GPTQ calibrated on {cfg['calib_batches']} batches of "
        f"{cfg['calib_batch']} training windows. Cache bytes per token: keys and values of all layers "
        f"(codes + scales). tokens/s: greedy generation of {cfg['ctx']} tokens per call, the fastest of "
        f"{cfg['repeats']} interleaved samples of at least {cfg['min_seconds'] * 1e3:.0f} ms (medians in "
        f"the json), on {mi['cpu']} ({mi['cpu_count']} cores, 1-minute load "
        f"{mi['load_avg_1m']} at the start; the machine is shared). jax {mi['jax']}, flax {mi['flax']}, "
        f"git {mi['git']}, {mi['date_utc']} UTC.",
        "",
        markdown_table(result["rows"], cols),
        "",
        "## Targets",
        "",
        markdown_table(
            result["targets"],
            [
                ("check", "target", None),
                ("value", "value", None),
                ("met", "met", lambda v: "yes" if v else "**no**"),
            ],
        ),
        "",
        "Notes: the fp8 e4m3 cache is slow on this CPU because XLA:CPU converts float8 to "
        "float32 in software when the cache is read (every step reads the whole cache); on GPUs "
        "the conversion is native. int4 weights are dequantized at each step (weight-only), "
        "int8 W8A8 runs jq's integer dots (on an AVX2-only CPU XLA's int8 GEMM is about "
        "1.1x float32's, so int8 weights gain little there). Timings come from one run on a "
        "possibly shared machine (load above): read differences under about 20% as noise. "
        "`int4 AWQ, no clip` isolates the scale search: on this model (no strong activation "
        "outlier channels) most of AWQ's gain comes from the clip search.",
        "",
        f"## Greedy samples from the prompt {result['prompt']!r}",
        "",
        *samples,
        "",
        f"Total wall time: {result['wall_s']:.0f} s.",
    ]
    return "\n".join(parts)


def parse_args(argv=None) -> Config:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a tiny smoke run")
    for k in ("width", "layers", "heads", "steps", "repeats", "eval_windows", "group", "seed"):
        p.add_argument("--" + k.replace("_", "-"), type=int, default=None)
    p.add_argument("--weights", default=None, help=f"weight rows separated by ',' of {WEIGHTS}")
    p.add_argument("--caches", default=None, help="KV cache formats: float32,int8,e4m3")
    p.add_argument("--out", default=RESULTS_DIR)
    p.add_argument("--name", default=None)
    a = p.parse_args(argv)
    cfg = Config(quick=a.quick, out_dir=a.out)
    if a.quick:
        cfg.width, cfg.layers, cfg.heads, cfg.ctx, cfg.steps = 32, 1, 2, 24, 10
        cfg.calib_batches, cfg.calib_batch, cfg.eval_windows, cfg.eval_batch = 2, 8, 8, 8
        cfg.repeats, cfg.gen_batches, cfg.min_seconds = 3, (1,), 2e-3
    for k in ("width", "layers", "heads", "steps", "repeats", "eval_windows", "group", "seed"):
        v = getattr(a, k)
        if v is not None:
            setattr(cfg, k, v)
    if a.weights:
        cfg.weights = ("float32",) + tuple(w.strip() for w in a.weights.split(",") if w.strip())
        bad = [w for w in cfg.weights if w not in WEIGHTS]
        if bad:
            p.error(f"unknown weight rows {bad}; known: {WEIGHTS}")
    if a.caches:
        cfg.caches = tuple(c.strip() for c in a.caches.split(","))
        if "float32" not in cfg.caches:
            cfg.caches = ("float32",) + cfg.caches
    cfg.name = a.name or ("charlm_decode_quick" if a.quick else "charlm_decode")
    return cfg


def main(argv=None) -> None:
    result = run(parse_args(argv))
    print(result["markdown"])
    print("\nwrote " + ", ".join(result["files"]))


if __name__ == "__main__":
    main()
