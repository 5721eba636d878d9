"""Greedy LLM decoding on CPU: a GPT-2-small-shaped linen decoder, float and quantized.

The model is a plain linen decoder (pre-LayerNorm blocks, linen's
``MultiHeadDotProductAttention(decode=True)`` with its KV cache, a GELU MLP,
an untied output head), of GPT-2 small's shape by default: 12 layers, width
768, 12 heads, MLP 3072, vocabulary 50257, random weights (speed only; the
accuracy of each mode is measured on trained models in ``charlm.md`` /
``digits.md``). One generation call is a jitted ``lax.scan`` of `tokens`
greedy steps (batch 1 and 8, one token per sequence per step).

Rows (weights x KV cache, each cache float or int8 `jq.kv_cache_rule`):

* float32; bf16 (weights, activations and cache in bfloat16, plain XLA);
* W8A8 dynamic: `jq.presets.w8a8_dynamic()` (per-tensor activation scale);
* W8 weight-only: `jq.presets.w8_weight_only()` (per-channel int8 weights;
  jq's default CPU execution: each token's activation quantized to int8 at run
  time, integer dot);
* W4 weight-only g128: `jq.presets.w4_weight_only(128)` (int4 packed two per
  byte, one scale per 128 input rows);
* quantized weights are stored in `jq.lowering.weight_layout("cpu")`'s layout
  (``jq.convert(..., target="cpu")``);
* anchor: PyTorch's ``torch.ao.quantization.quantize_dynamic`` (int8 Linear
  layers) on the same architecture and the same step (PyTorch float32 too),
  when torch is installed.

Columns: tokens/s (batch x tokens / seconds per call; median of `repeats`
interleaved repeats: every repeat times each row once, in turn), the ratio to
float32 of the same run, weight bytes read per step (every dot's weight and
scales; embedding tables are gathered, not read) and KV cache bytes per token
(keys and values of all layers, codes and scales).

Run::

    python experiments/bench_decode.py           # GPT-2 small shape, 128 tokens, batch 1 and 8
    python experiments/bench_decode.py --quick   # a smoke run (tiny model, 4 tokens)

Writes ``experiments/results/decode.{md,json}`` (``decode_quick.*`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import jq

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import RESULTS_DIR, machine_info  # noqa: E402


@dataclasses.dataclass
class Config:
    layers: int = 12
    width: int = 768
    heads: int = 12
    vocab: int = 50257
    tokens: int = 128
    batches: tuple = (1, 8)
    repeats: int = 3
    torch: bool = True
    rows: tuple = ()  # substrings: run only the rows whose name contains one (float32 always runs)
    name: str = "decode"
    out: str = RESULTS_DIR


BASE = "float32, float KV cache"
TARGETS = {"W8 weight-only": 2.0, "W4 weight-only g128": 2.5, "W8A8 dynamic": 2.0}
QUICK = dict(layers=2, width=128, heads=2, vocab=256, tokens=4, repeats=3, name="decode_quick")


class Block(nn.Module):
    width: int
    heads: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm(dtype=self.dtype, name="ln1")(x)
        h = nn.MultiHeadDotProductAttention(
            num_heads=self.heads, dtype=self.dtype, decode=True, name="attn"
        )(h, h)
        x = x + h
        h = nn.LayerNorm(dtype=self.dtype, name="ln2")(x)
        h = nn.Dense(4 * self.width, dtype=self.dtype, name="fc")(h)
        h = nn.Dense(self.width, dtype=self.dtype, name="proj")(nn.gelu(h))
        return x + h


class Decoder(nn.Module):
    """One decode step: ``(tokens (B, 1), positions (B, 1)) -> logits (B, 1, vocab)``."""

    layers: int
    width: int
    heads: int
    vocab: int
    ctx: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, tok, pos):
        x = nn.Embed(self.vocab, self.width, dtype=self.dtype, name="wte")(tok)
        x = x + nn.Embed(self.ctx, self.width, dtype=self.dtype, name="wpe")(pos)
        for i in range(self.layers):
            x = Block(self.width, self.heads, self.dtype, name=f"h{i}")(x)
        x = nn.LayerNorm(dtype=self.dtype, name="ln_f")(x)
        return nn.Dense(self.vocab, use_bias=False, dtype=self.dtype, name="head")(x)


def weight_rows():
    """``{name: rules or None}``; None: plain Flax (float32 / bf16)."""
    return {
        "float32": None,
        "bf16": None,
        "W8A8 dynamic": jq.presets.w8a8_dynamic(),
        "W8 weight-only": jq.presets.w8_weight_only(),
        # linen's attention output kernel is (heads, head_dim, width): its groups run along
        # head_dim (64 in GPT-2 small), the preset's groups of 128 along every other kernel's K
        "W4 weight-only g128": [
            jq.Rule(r".*attn/out", ops=("dot",), weight=_W4_OUT, activation=_per_token()),
            *jq.presets.w4_weight_only(128),
        ],
    }


_W4_OUT = jq.QuantSpec("int4", axis=-1, block_axis=1, block_size=64)


def _per_token():
    return jq.presets.w8_weight_only()[0].activation


def _tok(batch):
    return jnp.zeros((batch, 1), jnp.int32)


def build(model, params, rules, kv: str, batch: int):
    """``(state, step)`` with ``step(state, tok, pos) -> (logits, state)``."""
    full = jnp.zeros((batch, model.ctx), jnp.int32)  # linen sizes the cache from init's input
    shapes = jax.eval_shape(model.init, jax.random.key(0), full, full)["cache"]
    cache = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)  # linen's fresh cache
    kv_rules = [jq.kv_cache_rule("int8")] if kv == "int8" else []
    if rules is None and not kv_rules:
        # the weights travel in the scan's carry as in the jq rows (closed over, they would be
        # compile-time constants that XLA may lay out ahead of time)
        def fstep(st, tok, pos):
            logits, upd = model.apply(st, tok, pos, mutable=["cache"])
            return logits, {**st, **upd}

        return {"params": params, "cache": cache}, fstep
    rules = list(rules or []) + kv_rules
    qv = jq.convert(
        model,
        {"params": params, "cache": cache},
        rules,
        args=(_tok(batch), _tok(batch)),
        model_kwargs={"mutable": ["cache"]},
        target="cpu",
    )
    if kv_rules:
        qv = jq.kv_cache(model, qv, rules)

    def qstep(st, tok, pos):
        logits, upd = jq.apply(model, st, tok, pos, mutable=["cache"])
        return logits, jq.with_cache(st, upd)

    return qv, qstep


def generator(step, tokens: int):
    """Jitted greedy generation ``(state, first (B,)) -> tokens (B, tokens)``."""

    @jax.jit
    def run(state, first):
        b = first.shape[0]

        def body(carry, t):
            st, prev = carry
            logits, st = step(st, prev[:, None], jnp.full((b, 1), t, jnp.int32))
            nxt = jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)
            return (st, nxt), nxt

        _, toks = jax.lax.scan(body, (state, first), jnp.arange(tokens))
        return toks.T

    return run


def weight_bytes(tree) -> int:
    """Bytes of the dot weights (QArray codes + scales, or float kernels); embeddings excluded."""
    total = 0
    if isinstance(tree, jq.QuantizedVariables):
        items = tree.variables.items()
    else:
        items = [
            ("/".join(str(getattr(k, "key", k)) for k in p), v)
            for p, v in jax.tree_util.tree_leaves_with_path(tree, is_leaf=_is_q)
        ]
    for path, v in items:
        if not path.endswith("kernel"):
            continue
        if isinstance(v, jq.QArray):
            total += int(v.value.nbytes) + int(np.asarray(v.scale).nbytes)
            total += 0 if v.zero_point is None else int(np.asarray(v.zero_point).nbytes)
        else:
            total += int(v.nbytes)
    return total


def _is_q(x):
    return isinstance(x, jq.QArray)


def cache_bytes_per_token(state, batch: int, ctx: int) -> float:
    if isinstance(state, jq.QuantizedVariables):
        b = jq.kv_cache_bytes(state)
    else:
        b = sum(
            int(x.nbytes)
            for p, x in jax.tree_util.tree_leaves_with_path(state["cache"])
            if str(getattr(p[-1], "key", "")) in ("cached_key", "cached_value")
        )
    return b / (batch * ctx)


# ---------------------------------------------------------------------------------------
# PyTorch anchor: the same architecture and step, float32 and quantize_dynamic int8
# ---------------------------------------------------------------------------------------
def torch_cases(cfg: Config, batch: int):
    """``{name: (fn, (), weight bytes)}`` or {} without torch."""
    try:
        import torch
    except ImportError:
        return {}
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    w, h, ctx = cfg.width, cfg.heads, cfg.tokens
    hd = w // h

    class TBlock(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.ln1, self.ln2 = torch.nn.LayerNorm(w), torch.nn.LayerNorm(w)
            self.q, self.k, self.v = (torch.nn.Linear(w, w) for _ in range(3))
            self.o = torch.nn.Linear(w, w)
            self.fc, self.proj = torch.nn.Linear(w, 4 * w), torch.nn.Linear(4 * w, w)

        def forward(self, x, kc, vc, t):
            b = x.shape[0]
            y = self.ln1(x)
            q = self.q(y).view(b, h, hd)
            kc[:, t] = self.k(y).view(b, h, hd)
            vc[:, t] = self.v(y).view(b, h, hd)
            att = torch.einsum("bhd,bthd->bht", q, kc[:, : t + 1]) / hd**0.5
            y = torch.einsum("bht,bthd->bhd", att.softmax(-1), vc[:, : t + 1]).reshape(b, w)
            x = x + self.o(y)
            return x + self.proj(torch.nn.functional.gelu(self.fc(self.ln2(x))))

    class TModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.wte, self.wpe = torch.nn.Embedding(cfg.vocab, w), torch.nn.Embedding(ctx, w)
            self.blocks = torch.nn.ModuleList(TBlock() for _ in range(cfg.layers))
            self.ln_f = torch.nn.LayerNorm(w)
            self.head = torch.nn.Linear(w, cfg.vocab, bias=False)

        @torch.no_grad()
        def generate(self, first):
            b = first.shape[0]
            caches = [(torch.zeros(b, ctx, h, hd), torch.zeros(b, ctx, h, hd)) for _ in self.blocks]
            tok, out = first, []
            for t in range(ctx):
                x = self.wte(tok) + self.wpe.weight[t]
                for blk, (kc, vc) in zip(self.blocks, caches, strict=True):
                    x = blk(x, kc, vc, t)
                tok = self.head(self.ln_f(x)).argmax(-1)
                out.append(tok)
            return torch.stack(out, 1)

    m = TModel().eval()
    qm = torch.ao.quantization.quantize_dynamic(m, {torch.nn.Linear}, dtype=torch.qint8)
    first = torch.zeros(batch, dtype=torch.long)
    n_lin = sum(p.numel() for n, p in m.named_parameters() if "weight" in n and "ln" not in n)
    n_lin -= m.wte.weight.numel() + m.wpe.weight.numel()
    return {
        f"PyTorch {torch.__version__} float32": (lambda: m.generate(first), (), 4 * n_lin),
        f"PyTorch {torch.__version__} quantize_dynamic int8": (
            lambda: qm.generate(first),
            (),
            n_lin,
        ),
    }


# ---------------------------------------------------------------------------------------
def _time(fn, args) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - t0


def run(cfg: Config) -> dict:
    t_start = time.perf_counter()
    model = Decoder(cfg.layers, cfg.width, cfg.heads, cfg.vocab, cfg.tokens)
    params = model.init(jax.random.key(0), _tok(1), _tok(1))["params"]
    params_bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    model_bf16 = model.clone(dtype=jnp.bfloat16)
    rows = []
    for batch in cfg.batches:
        cases, meta = {}, {}
        first = jnp.zeros((batch,), jnp.int32)
        for wname, rules in weight_rows().items():
            for kv in ("float", "int8"):
                name = f"{wname}, {kv} KV cache"
                if cfg.rows and name != BASE and not any(r in name for r in cfg.rows):
                    continue
                m, p = (model_bf16, params_bf16) if wname == "bf16" else (model, params)
                t0 = time.perf_counter()
                try:
                    state, step = build(m, p, rules, kv, batch)
                    gen = generator(step, cfg.tokens)
                    toks = np.asarray(gen(state, first))
                except Exception as e:  # a row that cannot run here is reported, not hidden
                    meta[name] = {"error": f"{type(e).__name__}: {e}"[:300]}
                    print(f"batch {batch}: {name} failed: {meta[name]['error']}", flush=True)
                    continue
                meta[name] = {
                    "compile_s": time.perf_counter() - t0,
                    "weight_bytes": weight_bytes(state if rules is not None else p),
                    "cache_bytes_per_token": cache_bytes_per_token(state, batch, cfg.tokens),
                    "first_tokens": toks[0, :8].tolist(),
                }
                cases[name] = (gen, (state, first))
                print(f"batch {batch}: built {name} ({meta[name]['compile_s']:.1f} s)", flush=True)
        if cfg.torch:
            for name, (fn, args, wb) in torch_cases(cfg, batch).items():
                fn()  # warm up
                cases[name] = (fn, args)
                meta[name] = {
                    "weight_bytes": wb,
                    "cache_bytes_per_token": 2 * 4 * cfg.width * cfg.layers,
                }
        samples = {n: [] for n in cases}
        for _ in range(cfg.repeats):  # interleaved: each repeat times every row once
            for n, (fn, args) in cases.items():
                samples[n].append(_time(fn, args))
        base = float(np.median(samples[BASE]))
        for n in cases:
            med = float(np.median(samples[n]))
            rows.append(
                {
                    "batch": batch,
                    "row": n,
                    "seconds_per_call": med,
                    "min_s": min(samples[n]),
                    "max_s": max(samples[n]),
                    "tokens_per_s": batch * cfg.tokens / med,
                    "vs_float32": base / med,
                    **meta[n],
                }
            )
        for n, m_ in meta.items():
            if "error" in m_:
                rows.append({"batch": batch, "row": n, **m_})
    info = machine_info()
    low = jq.ops.lowering_info()["cpu"]
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:
        info["torch"] = None
    return {
        "config": dataclasses.asdict(cfg),
        "machine": info,
        "lowering": {k: low[k] for k in ("kind", "int8_flags", "form")},
        "weight_layout": jq.lowering.weight_layout("cpu"),
        "rows": rows,
        "wall_s": time.perf_counter() - t_start,
    }


def render_markdown(res: dict) -> str:
    cfg, mi, lo = res["config"], res["machine"], res["lowering"]
    lines = [
        "# Greedy decoding on CPU (experiments/bench_decode.py)",
        "",
        f"Decoder of {cfg['layers']} layers, width {cfg['width']}, {cfg['heads']} heads, MLP "
        f"{4 * cfg['width']}, vocabulary {cfg['vocab']} (random weights, untied head); greedy "
        f"generation of {cfg['tokens']} tokens in one jitted `lax.scan`.",
        "",
        f"Machine: {mi['cpu']}, {mi['cpu_count']} cores; CPU class `{lo['kind']}`, int8 flags "
        f"{', '.join(lo['int8_flags']) or 'none'}, jq's int8 form `{lo['form']}`, quantized "
        f"weights stored `{res['weight_layout']}` (`jq.lowering.weight_layout('cpu')`). "
        f"jax {mi['jax']}, flax {mi['flax']}, torch {mi.get('torch')}; load average "
        f"{mi['load_avg_1m']} at the end; {mi['date_utc']} UTC, git {mi['git']}.",
        "",
        f"Median of {cfg['repeats']} interleaved repeats (each times every row once, one "
        "generation call each); the ratio is float32's median time over the row's, same run.",
        "",
        "| batch | weights, KV cache | tokens/s | vs float32 | weight bytes / step | "
        "KV cache bytes / token | time per call (s) [range] |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        if "error" in r:
            lines.append(f"| {r['batch']} | {r['row']} | failed: {r['error']} | | | | |")
            continue
        lines.append(
            f"| {r['batch']} | {r['row']} | {r['tokens_per_s']:.1f} | {r['vs_float32']:.2f}x | "
            f"{r['weight_bytes'] / 1e6:.1f} MB | {r['cache_bytes_per_token'] / 1e3:.1f} kB | "
            f"{r['seconds_per_call']:.2f} [{r['min_s']:.2f}-{r['max_s']:.2f}] |"
        )
    lines += ["", "Targets (issue 24; batch 1, float KV cache, tokens/s over float32):", ""]
    lines += ["| row | target | measured | met |", "|---|---|---|---|"]
    for row, want in TARGETS.items():
        got = [
            r["vs_float32"]
            for r in res["rows"]
            if r["batch"] == 1 and r["row"] == f"{row}, float KV cache" and "error" not in r
        ]
        if got:
            lines.append(
                f"| {row} | >= {want:.1f}x | {got[0]:.2f}x | {'yes' if got[0] >= want else 'no'} |"
            )
    if not any(r["row"].startswith("PyTorch") for r in res["rows"]):
        lines += ["", "PyTorch anchor rows: not run (`--no-torch`, or torch is not installed)."]
    lines += ["", f"Whole run: {res['wall_s']:.0f} s.", ""]
    return "\n".join(lines)


def parse_args(argv=None) -> Config:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny model, 4 tokens (smoke test)")
    ap.add_argument("--tokens", type=int)
    ap.add_argument("--repeats", type=int)
    ap.add_argument("--batches", type=int, nargs="+")
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch anchor rows")
    ap.add_argument("--rows", nargs="+", help="only the rows whose name contains one of these")
    ap.add_argument("--out", default=RESULTS_DIR)
    a = ap.parse_args(argv)
    cfg = Config(**QUICK) if a.quick else Config()
    for k in ("tokens", "repeats"):
        if getattr(a, k) is not None:
            setattr(cfg, k, getattr(a, k))
    if a.batches:
        cfg.batches = tuple(a.batches)
    cfg.torch = not a.no_torch
    cfg.rows = tuple(a.rows or ())
    cfg.out = a.out
    return cfg


def main(argv=None) -> None:
    cfg = parse_args(argv)
    os.makedirs(cfg.out, exist_ok=True)
    res = None
    for b in cfg.batches:  # the files are rewritten after each batch size
        part = run(dataclasses.replace(cfg, batches=(b,)))
        if res is None:
            res = part
        else:
            res["rows"] += part["rows"]
            res["wall_s"] += part["wall_s"]
            res["machine"] = part["machine"]
        res["config"]["batches"] = cfg.batches
        text = render_markdown(res)
        with open(os.path.join(cfg.out, f"{cfg.name}.md"), "w") as f:
            f.write(text)
        with open(os.path.join(cfg.out, f"{cfg.name}.json"), "w") as f:
            json.dump(res, f, indent=1, default=str)
    print(text)


if __name__ == "__main__":
    main()
