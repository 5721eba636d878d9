"""Hugging Face Flax GPT-2, briefly trained as a character LM, through jq as shipped.

Issue 22's acceptance on a real model people bring: GPT-2 stores its Conv1D kernels
``(out, in)``, reads them through ``kernel.T`` and ties its head to ``wte``. The model is
passed to jq directly (duck typing, no axis given by hand). Rows: float32, every preset,
int4 round-to-nearest and GPTQ int4 with the same spec; held-out bits per character on
the Python standard library corpus of `experiments/charlm.py`.

    python experiments/hf_gpt2_charlm.py            # ~5 min on 2 cores
    python experiments/hf_gpt2_charlm.py --steps 40 --eval-windows 16   # smoke
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import machine_info, markdown_table, write_results  # noqa: E402
from charlm import _nll, _windows, bits_per_char, eval_windows, load_corpus  # noqa: E402

import jq  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def build(vocab: int, ctx: int, width: int, layers: int, heads: int, seed: int):
    import transformers  # the `hf` extra

    cfg = transformers.GPT2Config(
        vocab_size=vocab,
        n_positions=ctx,
        n_embd=width,
        n_layer=layers,
        n_head=heads,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return transformers.FlaxGPT2LMHeadModel(cfg, seed=seed, _do_init=True)


def train(hf, ids, steps, batch, ctx, lr, seed):
    params = hf.params
    opt = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(optax.warmup_cosine_decay_schedule(0.0, lr, steps // 10, steps, lr * 0.05)),
    )
    opt_state = opt.init(params)

    @jax.jit
    def step(params, opt_state, xb, yb):
        loss, g = jax.value_and_grad(
            lambda p: _nll(hf(xb, params=p, train=False).logits, yb).mean()
        )(params)
        updates, opt_state = opt.update(g, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(seed)
    for _ in range(steps):
        xb, yb = _windows(ids, rng, batch, ctx)
        params, opt_state, loss = step(params, opt_state, xb, yb)
    hf.params = params
    return float(loss)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--ctx", type=int, default=64)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--group", type=int, default=32, help="int4 group size (RTN and GPTQ)")
    ap.add_argument("--eval-windows", type=int, default=512)
    ap.add_argument("--out", default=RESULTS)
    a = ap.parse_args(argv)
    t0 = time.time()
    train_ids, test_ids, vocab, info = load_corpus()
    hf = build(len(vocab), a.ctx, a.width, a.layers, a.heads, seed=0)
    final_loss = train(hf, train_ids, a.steps, a.batch, a.ctx, 3e-3, seed=0)
    x, y = eval_windows(test_ids, a.ctx)
    x, y = x[: a.eval_windows], y[: a.eval_windows]
    rng = np.random.default_rng(1)
    calib = [_windows(train_ids, rng, 16, a.ctx)[0] for _ in range(8)]

    f32 = jax.jit(lambda p, xb: hf(xb, params=p).logits)
    rows = [{"method": "float32", "bpc": bits_per_char(f32, hf.params, x, y)}]
    int4 = jq.QuantSpec("int4", axis="out", group_size=a.group)
    w4 = [jq.Rule(".*", ops=("dot",), weight=int4, skip=("lm_head",))]
    cases = [
        ("w8a8_static", jq.presets.w8a8_static()),
        ("w8a8_dynamic", jq.presets.w8a8_dynamic()),
        ("w8a8_dynamic per token", jq.presets.w8a8_dynamic(per_token=True)),
        ("w8_weight_only", jq.presets.w8_weight_only()),
        ("w4_weight_only", jq.presets.w4_weight_only()),
        ("fp8", jq.presets.fp8()),
        (f"int4 g{a.group} RTN (head float)", w4),
    ]
    for name, rules in cases:
        qm = jq.quantize_model(hf, None, calib, rules, progress=False)
        fn = jax.jit(lambda v, xb, qm=qm: qm.apply(xb).logits)
        rows.append({"method": name, "bpc": bits_per_char(fn, None, x, y)})
    qv = jq.gptq(hf, None, w4, calib, progress=False)
    g = jax.jit(lambda q, xb: jq.apply(hf, q, xb).logits)
    rows.append({"method": f"int4 g{a.group} GPTQ (head float)", "bpc": bits_per_char(g, qv, x, y)})
    base = rows[0]["bpc"]
    for r in rows:
        r["delta_pct"] = 100.0 * (r["bpc"] - base) / base
    rtn, gq = rows[-2]["bpc"], rows[-1]["bpc"]
    recovered = 100.0 * (rtn - gq) / (rtn - base) if rtn > base else float("nan")
    table = markdown_table(
        rows,
        [
            ("method", "method", None),
            ("bpc", "held-out bpc", ".4f"),
            ("delta_pct", "Δ bpc (%)", "+.2f"),
        ],
    )
    m = machine_info()
    md = (
        "# HF Flax GPT-2 char-LM through jq as shipped (`python experiments/hf_gpt2_charlm.py`)\n\n"
        f"`FlaxGPT2LMHeadModel` (Conv1D kernels (out, in), head tied to `wte`), {a.layers} "
        f"layers, width {a.width}, {a.heads} heads, context {a.ctx}, vocabulary {len(vocab)}; "
        f"trained {a.steps} steps of {a.batch}x{a.ctx} characters (AdamW 3e-3, final train "
        f"loss {final_loss / np.log(2):.3f} bpc) on {info['train_chars']:,} characters of the "
        f"Python standard library; held-out bpc on {len(x)} windows. Passed to jq directly, "
        "no axis given by hand. Calibration: 8 batches of 16 training windows.\n\n"
        f"{table}\n\nGPTQ recovers **{recovered:.0f} %** of round-to-nearest's bpc loss "
        f"(same int4 spec, groups of {a.group} along the contraction, head float).\n\n"
        f"Machine: {m.get('cpu', '?')}; jax {jax.__version__}; wall time "
        f"{time.time() - t0:.0f} s.\n"
    )
    write_results(a.out, "hf_gpt2_charlm", {"rows": rows, "gptq_recovered_pct": recovered}, md)
    print(md)


if __name__ == "__main__":
    main()
