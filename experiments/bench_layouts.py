"""Static int8 over float32 on (out, in) kernels (HF GPT-2's Conv1D) and on Flax Dense (in, out).

One GPT-2 MLP block (``D -> 4D -> D``, gelu; D = 768 by default) is written twice with the
same weights: with ``nn.Dense`` kernels ``(K, N)``, and as Hugging Face's ``FlaxConv1D``
stores them, ``(N, K)`` read through ``dot_general(x, kernel.T)``. Both are quantized with
``jq.presets.w8a8_static()`` (no axis given by hand: ``axis="out"`` finds the output rows of
the Conv1D kernel), and ``jq.convert`` stores both kernels in the layout of this CPU's fast
integer dot (`jq.lowering.weight_layout`). The ``conv1d int8, model layout`` row keeps the
Conv1D kernels ``(N, K)`` as the model stores them (jq before the layout change) for
comparison. Every case is timed interleaved (`_common.interleaved_latency`); each int8
ratio is over the float32 model of the same layout (XLA's float32 dot on a transposed
kernel is itself slower at one row), and over the Dense float32 model, from medians of the
same run.

Usage::

    python experiments/bench_layouts.py [--d 768] [--batches 1 32] [--repeats 15] [--hf]
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402

import jq  # noqa: E402

# the module (jq.flax.convert is also the name of the function it exports)
_convert = importlib.import_module("jq.flax.convert")


class Conv1D(nn.Module):
    """HF GPT-2's FlaxConv1D: kernel (out, in), ``dot_general(x, kernel.T)``."""

    features: int

    @nn.compact
    def __call__(self, x):
        k = self.param("kernel", nn.initializers.normal(0.02), (self.features, x.shape[-1]))
        b = self.param("bias", nn.initializers.zeros, (self.features,))
        return jax.lax.dot_general(x, k.T, (((x.ndim - 1,), (0,)), ((), ()))) + b


class Mlp(nn.Module):
    d: int
    conv1d: bool

    @nn.compact
    def __call__(self, x):
        layer = Conv1D if self.conv1d else (lambda n, name: nn.Dense(n, name=name))
        return layer(self.d, name="c_proj")(nn.gelu(layer(4 * self.d, name="c_fc")(x)))


def _models(d: int):
    x = jax.random.normal(jax.random.key(0), (8, d))
    dense = Mlp(d, False)
    vd = dense.init(jax.random.key(1), x)
    vc = {"params": {n: dict(p) for n, p in vd["params"].items()}}
    for n in ("c_fc", "c_proj"):
        vc["params"][n]["kernel"] = vd["params"][n]["kernel"].T
    return dense, vd, Mlp(d, True), vc


def _quantized(model, v, calib, keep_layout: bool = False):
    rules = jq.presets.w8a8_static()
    stats = jq.calibrate(model, v, rules, calib, progress=False)
    if not keep_layout:
        return jq.convert(model, v, rules, stats)
    saved = _convert._storage_perms
    _convert._storage_perms = lambda *a: {}  # the model's own layout, as jq stored it before
    try:
        return jq.convert(model, v, rules, stats)
    finally:
        _convert._storage_perms = saved


def run(d: int, batches, repeats: int, progress: bool = True) -> list[dict]:
    dense, vd, conv, vc = _models(d)
    calib = [jax.random.normal(jax.random.key(i), (32, d)) for i in range(4)]
    qd = _quantized(dense, vd, calib)
    qc = _quantized(conv, vc, calib)
    qc_old = _quantized(conv, vc, calib, keep_layout=True)
    rows = []
    for b in batches:
        x = jax.random.normal(jax.random.key(7), (b, d))
        # a fresh jitted wrapper per case: jit caches traces per function object
        cases = {
            "dense f32": (jax.jit(lambda v, x: dense.apply(v, x)), (vd, x)),
            "dense int8": (jax.jit(lambda q, x: jq.apply(dense, q, x)), (qd, x)),
            "conv1d f32": (jax.jit(lambda v, x: conv.apply(v, x)), (vc, x)),
            "conv1d int8": (jax.jit(lambda q, x: jq.apply(conv, q, x)), (qc, x)),
            "conv1d int8 old": (jax.jit(lambda q, x: jq.apply(conv, q, x)), (qc_old, x)),
        }
        t = _common.interleaved_latency(cases, repeats, desc=f"batch {b}", progress=progress)
        med = {k: v["median"] for k, v in t.items()}
        for layout, f32, i8 in [
            ("Dense (in, out)", "dense f32", "dense int8"),
            (
                f"Conv1D (out, in), stored {jq.lowering.weight_layout().upper()} (weight_layout)",
                "conv1d f32",
                "conv1d int8",
            ),
            ("Conv1D (out, in), model layout (before)", "conv1d f32", "conv1d int8 old"),
        ]:
            rows.append(
                {
                    "layout": layout,
                    "batch": b,
                    "f32_ms": med[f32] * 1e3,
                    "int8_ms": med[i8] * 1e3,
                    "speedup": med[f32] / med[i8],
                    "vs_dense": med["dense f32"] / med[i8],
                }
            )
    return rows


def run_hf(batches, repeats: int, seq: int = 64, progress: bool = True) -> list[dict]:
    """Rows for a random-init HF Flax GPT-2 (n_embd 256, 2 layers, transformers < 5), passed as
    ``hf.module`` with ``{"params": hf.params}``; the tied head ``transformer/wte`` is skipped."""
    from transformers import FlaxGPT2LMHeadModel, GPT2Config

    cfg = GPT2Config(vocab_size=256, n_positions=seq, n_embd=256, n_layer=2, n_head=4)
    hf = FlaxGPT2LMHeadModel(cfg, seed=0)
    m, v = hf.module, {"params": hf.params}

    def inputs(b, key):
        ids = jax.random.randint(jax.random.key(key), (b, seq), 0, cfg.vocab_size)
        pos = jnp.broadcast_to(jnp.arange(seq), (b, seq))
        return ids, jnp.ones((b, seq), jnp.int32), pos

    rules = jq.presets.w8a8_static(skip=("transformer/wte",))
    stats = jq.calibrate(m, v, rules, [inputs(4, i) for i in range(2)], progress=False)
    q = jq.convert(m, v, rules, stats)
    rows = []
    for b in batches:
        args = inputs(b, 9)
        cases = {
            "f32": (jax.jit(lambda v, *a: m.apply(v, *a)[0]), (v, *args)),
            "int8": (jax.jit(lambda q, *a: jq.apply(m, q, *a)[0]), (q, *args)),
        }
        t = _common.interleaved_latency(cases, repeats, desc=f"gpt2 batch {b}", progress=progress)
        f32, i8 = t["f32"]["median"], t["int8"]["median"]
        rows.append(
            {
                "layout": f"HF GPT-2 (Conv1D), {seq} tokens",
                "batch": b,
                "f32_ms": f32 * 1e3,
                "int8_ms": i8 * 1e3,
                "speedup": f32 / i8,
            }
        )
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--out", default=_common.RESULTS_DIR)
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--hf", action="store_true", help="add HF Flax GPT-2 rows (transformers<5)")
    a = ap.parse_args(argv)
    rows = run(a.d, a.batches, a.repeats, progress=not a.no_progress)
    if a.hf:
        rows += run_hf(a.batches, a.repeats, progress=not a.no_progress)
    info = _common.machine_info()
    table = _common.markdown_table(
        rows,
        [
            ("layout", "kernel layout", None),
            ("batch", "rows", None),
            ("f32_ms", "float32 ms", ".3f"),
            ("int8_ms", "static int8 ms", ".3f"),
            ("speedup", "int8 / float32 speed", ".2f"),
            ("vs_dense", "int8 / Dense float32 speed", ".2f"),
        ],
    )
    md = (
        f"GPT-2 MLP block {a.d} -> {4 * a.d} -> {a.d}, `jq.presets.w8a8_static()`, "
        f"{a.repeats} interleaved repeats (medians); {info['cpu']}, {info['cpu_count']} cores, "
        f"load {info['load_avg_1m']}, jax {info['jax']}, int8 form "
        f"{jq.lowering.current().cpu_form}.\n\n{table}\n"
    )
    print(md)
    _common.write_results(a.out, "layouts", {"machine": info, "rows": rows}, md)


if __name__ == "__main__":
    main()
