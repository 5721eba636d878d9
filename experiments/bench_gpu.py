"""Accelerator speed of jq against bf16, as ratios measured side by side in one run.

What a GPU user compares with is bf16. Every group (one model, one batch) times,
interleaved (`_common.interleaved_latency`: warm-up, then rounds that time each
case once, `block_until_ready`):

* ``bf16``: the linen model with bfloat16 parameters and inputs, `jax.jit`;
* ``jq static int8``: `jq.calibrate` + `jq.convert(target="gpu")` (weights
  int8 per channel, stored (N, K); activations int8 per tensor from min-max
  ranges; between layers bf16) and `jq.apply`;
* ``jq static int8 (K,N)``: the same with the model's (K, N) weight layout
  (MLP only; shows what the layout costs);
* ``jq dynamic int8``: activations quantized from their run-time range;
* ``jq fp8``: e4m3 weights per channel, static e4m3 activations;
* ``ref int8`` (MLP only): the same computation hand-written in plain JAX:
  int8 weights (N, K), int8 activations between layers, one epilogue per layer
  (rescale, bias, ReLU, requantize). ``jq / ref`` is what jq's structure costs.

Models: an MLP 4096 -> 4096 x4 -> 1024 (ReLU) at batch 1, 16, 256, 2048, 8192,
and one pre-LN transformer block (width 2048, 16 heads, MLP 4x, GELU) on
2048-token sequences at batch 1, 8, 64 (its dense layers quantized, the
attention itself in bf16). The QAT train step (MLP, batch 1024, SGD) is timed
for bf16, `jq.qat` fake quant, and ``forward="int8"`` / ``"fp8"``.

``--quick`` shrinks every size (for CPU smoke runs and the test suite).
``--budget`` seconds: groups that would start later are skipped and listed.

Run:  python experiments/bench_gpu.py [--quick] [--out experiments/results/bench_gpu.md]
Writes the markdown table (and a .json next to it) and prints the table.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import RESULTS_DIR, interleaved_latency, machine_info, markdown_table, write_results

import jq
from jq.calibration import MinMax

BF16 = jnp.bfloat16
NK = (((1,), (1,)), ((), ()))

FULL = {
    "mlp": dict(width=4096, depth=4, head=1024, batches=(256, 2048, 8192, 1, 16)),
    "block": dict(width=2048, heads=16, seq=2048, batches=(8, 1, 64)),
    "qat": dict(batch=1024),
}
QUICK = {
    "mlp": dict(width=64, depth=4, head=16, batches=(16, 1)),
    "block": dict(width=64, heads=4, seq=16, batches=(2,)),
    "qat": dict(batch=32),
}


class MLP(nn.Module):
    width: int
    depth: int
    head: int

    @nn.compact
    def __call__(self, x):
        for _ in range(self.depth):
            x = nn.relu(nn.Dense(self.width)(x))
        return nn.Dense(self.head)(x)


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(LN(x)), then + MLP(LN(.)) with GELU, width 4x."""

    width: int
    heads: int

    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm()(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads)(h, h)
        h = nn.LayerNorm()(x)
        h = nn.Dense(4 * self.width)(h)
        return x + nn.Dense(self.width)(nn.gelu(h))


def _rules(fmt: str, static: bool, pattern: str = r".*"):
    """Every parameter dot (Dense, DenseGeneral); the attention's activation dots stay bf16."""
    act = jq.QuantSpec(fmt, calibration=MinMax() if static else None)
    return [jq.Rule(pattern, weight=jq.QuantSpec(fmt, axis=-1), activation=act)]


def _bf16(tree):
    return jax.tree.map(
        lambda a: a.astype(BF16) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree
    )


def _jq_variants(model, variables, calib, with_kn: bool) -> dict:
    """``{name: QuantizedVariables}`` of the jq variants of one bf16 model."""
    out = {}
    stats8 = jq.calibrate(model, variables, _rules("int8", True), [calib], progress=False)
    out["jq static int8"] = jq.convert(model, variables, _rules("int8", True), stats8, target="gpu")
    if with_kn:
        out["jq static int8 (K,N)"] = jq.convert(model, variables, _rules("int8", True), stats8)
    out["jq dynamic int8"] = jq.convert(
        model, variables, _rules("int8", False), args=(calib,), target="gpu"
    )
    stats_fp8 = jq.calibrate(model, variables, _rules("e4m3", True), [calib], progress=False)
    out["jq fp8"] = jq.convert(model, variables, _rules("e4m3", True), stats_fp8, target="gpu")
    for name, q in out.items():
        if not q.plan.sites:
            raise RuntimeError(f"bench_gpu: {name}: no site was quantized")
    return out


# ---------------------------------------------------------------------------------------
# the hand-written plain-JAX int8 reference
# ---------------------------------------------------------------------------------------
def reference_int8(params, calib):
    """Plain-JAX static int8 MLP: int8 (N, K) weights, int8 activations between layers.

    Per layer ``acc = x_q . W_q^T`` (s8 x s8 -> s32), then one epilogue:
    ``y = relu(acc * (s_x s_w) + b)`` and ``x_q' = clip(round(y / s_x'), -127, 127)``
    (int8). Activation scales are the per-tensor max |x| of the calibration batch.
    Returns ``(fn, args)`` with ``fn(args, x)`` giving the float32 output.
    """
    layers = params["params"]
    names = sorted(layers, key=lambda n: int(n.split("_")[1]))
    ws, bs, sws, sxs = [], [], [], []
    h = calib.astype(jnp.float32)
    for i, name in enumerate(names):
        w = layers[name]["kernel"].astype(jnp.float32)  # (K, N)
        b = layers[name]["bias"].astype(jnp.float32)
        sw = jnp.maximum(jnp.max(jnp.abs(w), axis=0), 1e-12) / 127.0
        ws.append(jnp.clip(jnp.round(w / sw), -127, 127).astype(jnp.int8).T)  # (N, K)
        bs.append(b)
        sws.append(sw)
        sxs.append(jnp.maximum(jnp.max(jnp.abs(h)), 1e-12) / 127.0)
        h = h @ w + b
        if i < len(names) - 1:
            h = jax.nn.relu(h)

    def quant(x, s):
        return jnp.clip(jnp.round(x.astype(jnp.float32) / s), -127, 127).astype(jnp.int8)

    def fn(args, x):
        ws, bs, sws, sxs = args
        xq = quant(x, sxs[0])
        for i in range(len(ws)):
            acc = jax.lax.dot_general(xq, ws[i], NK, preferred_element_type=jnp.int32)
            y = acc.astype(jnp.float32) * (sxs[i] * sws[i]) + bs[i]
            if i == len(ws) - 1:
                return y
            xq = quant(jax.nn.relu(y), sxs[i + 1])  # fused with the line above by XLA

    return jax.jit(fn), (ws, bs, sws, sxs)


# ---------------------------------------------------------------------------------------
# groups
# ---------------------------------------------------------------------------------------
def _apply_fn(model):
    return jax.jit(lambda q, x: jq.apply(model, q, x))


def _errors(cases, base: str) -> dict:
    ref = np.asarray(cases[base][0](*cases[base][1]), np.float32)
    scale = float(np.abs(ref).max()) or 1.0
    return {
        n: float(np.abs(np.asarray(f(*a), np.float32) - ref).max() / scale)
        for n, (f, a) in cases.items()
        if n != base
    }


def _group_rows(group: str, lat: dict, errs: dict, base="bf16", ref=None) -> list[dict]:
    b = lat[base]["median"]
    rows = []
    for name, r in lat.items():
        row = {
            "group": group,
            "case": name,
            "ms": r["median"] * 1e3,
            "range": f"{r['min'] * 1e3:.3g}-{r['max'] * 1e3:.3g}",
            "vs_bf16": b / r["median"],
            "err": errs.get(name),
        }
        if ref is not None and name.startswith("jq static int8") and ref in lat:
            row["jq_over_ref"] = lat[ref]["median"] / r["median"]
        rows.append(row)
    return rows


def _batch_groups(model, calib, inputs, repeats, deadline, skipped, with_ref) -> list[dict]:
    """Times bf16 and the jq variants (and the reference) of `model` on each input.

    `inputs`: ``[(group name, make_x), ...]``; a group starting after `deadline` is skipped.
    """
    variables = _bf16(model.init(jax.random.key(0), calib[:1]))
    variants = _jq_variants(model, variables, calib, with_kn=with_ref)
    ref = reference_int8(variables, calib) if with_ref else None
    plain, apply = jax.jit(model.apply), _apply_fn(model)
    rows = []
    for name, make_x in inputs:
        if time.perf_counter() > deadline:
            skipped.append(name)
            continue
        x = make_x()
        cases = {"bf16": (plain, (variables, x))}
        cases.update({n: (apply, (q, x)) for n, q in variants.items()})
        if ref is not None:
            cases["ref int8"] = (ref[0], (ref[1], x))
        lat = interleaved_latency(cases, repeats, desc=name, progress=False)
        rows += _group_rows(name, lat, _errors(cases, "bf16"), ref=ref and "ref int8")
        print(f"[bench_gpu] {name} done", flush=True)
    return rows


def mlp_groups(cfg, rng, repeats, deadline, skipped) -> list[dict]:
    c = cfg["mlp"]
    w = c["width"]
    inputs = [
        (f"MLP {w}x{c['depth']} +{c['head']}, batch {b}", lambda b=b: _normal(rng, (b, w)))
        for b in c["batches"]
    ]
    model = MLP(w, c["depth"], c["head"])
    return _batch_groups(model, _normal(rng, (256, w)), inputs, repeats, deadline, skipped, True)


def block_groups(cfg, rng, repeats, deadline, skipped) -> list[dict]:
    c = cfg["block"]
    shape = (c["seq"], c["width"])
    inputs = [
        (
            f"block w{c['width']} h{c['heads']} seq {c['seq']}, batch {b}",
            lambda b=b: _normal(rng, (b, *shape)),
        )
        for b in c["batches"]
    ]
    model = Block(c["width"], c["heads"])
    return _batch_groups(
        model, _normal(rng, (1, *shape)), inputs, repeats, deadline, skipped, False
    )


def _normal(rng, shape):
    return jnp.asarray(rng.normal(size=shape), BF16)


def qat_group(cfg, rng, repeats, deadline, skipped) -> list[dict]:
    c, m = cfg["qat"], cfg["mlp"]
    name = f"QAT step, MLP {m['width']}x{m['depth']} +{m['head']}, batch {c['batch']}"
    if time.perf_counter() > deadline:
        skipped.append(name)
        return []
    model = MLP(m["width"], m["depth"], m["head"])
    x, y = _normal(rng, (c["batch"], m["width"])), _normal(rng, (c["batch"], m["head"]))
    variables = _bf16(model.init(jax.random.key(0), x[:1]))
    opt = optax.sgd(1e-3)

    def stepper(forward_fn, params_of, with_params):
        def step(state, x, y):
            params, opt_state = state

            def loss(p):
                out = forward_fn(with_params(p), x).astype(jnp.float32)
                return jnp.mean(jnp.square(out - y.astype(jnp.float32)))

            g = jax.grad(loss)(params)
            upd, opt_state = opt.update(g, opt_state, params)
            return optax.apply_updates(params, upd), opt_state

        p0 = params_of
        return jax.jit(step), ((p0, opt.init(p0)), x, y)

    cases = {"bf16": stepper(model.apply, variables, lambda p: p)}
    for label, fmt, forward in (
        ("jq.qat fake quant int8", "int8", "fake"),
        ("jq.qat forward int8", "int8", "int8"),
        ("jq.qat forward fp8", "e4m3", "fp8"),
    ):
        q = jq.qat(model, _rules(fmt, True), forward=forward)
        qv = q.init(variables, x)
        cases[label] = stepper(q.apply, qv["params"], lambda p, qv=qv: {**qv, "params": p})
    lat = interleaved_latency(cases, repeats, desc=name, progress=False)
    print(f"[bench_gpu] {name} done", flush=True)
    return _group_rows(name, lat, {})


COLUMNS = [
    ("group", "group", None),
    ("case", "case", None),
    ("ms", "median ms", ".4g"),
    ("range", "range ms", None),
    ("vs_bf16", "speed vs bf16", ".2f"),
    ("jq_over_ref", "jq speed / ref", ".2f"),
    ("err", "max err / max bf16", ".3g"),
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes (CPU smoke run)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--budget", type=float, default=200.0, help="seconds; later groups skipped")
    p.add_argument("--groups", default="mlp,qat,block")
    p.add_argument("--batches", default=None, help="MLP batch sizes, comma-separated")
    p.add_argument("--out", default=os.path.join(RESULTS_DIR, "bench_gpu.md"))
    return p.parse_args(argv)


def run(args) -> dict:
    cfg = QUICK if args.quick else FULL
    if args.batches:
        cfg = {**cfg, "mlp": {**cfg["mlp"], "batches": tuple(map(int, args.batches.split(",")))}}
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    deadline = t0 + args.budget
    rows, skipped = [], []
    fns = {"mlp": mlp_groups, "qat": qat_group, "block": block_groups}
    for g in args.groups.split(","):
        if g not in fns:
            raise SystemExit(f"bench_gpu: unknown group {g!r}; expected one of {', '.join(fns)}")
        if time.perf_counter() > deadline:
            skipped.append(g)
            continue
        rows += fns[g](cfg, rng, args.repeats, deadline, skipped)
    info = machine_info()
    dev = jax.devices()[0]
    head = (
        f"# jq on {dev.device_kind} ({jax.default_backend()}), speed vs bf16\n\n"
        f"jax {jax.__version__}; host CPU {info['cpu']}; {'quick sizes; ' if args.quick else ''}"
        f"median of {args.repeats} interleaved rounds; ratios from this one run; "
        f"{time.perf_counter() - t0:.0f} s in all.\n\n"
        "`speed vs bf16` = bf16 time / case time (above 1: faster than bf16); "
        "`jq speed / ref` = ref int8 time / jq time (1: jq costs nothing over the hand-written "
        "int8 MLP); errors are max |y - y_bf16| / max |y_bf16| on the timed batch.\n\n"
    )
    md = head + markdown_table(rows, COLUMNS)
    if skipped:
        md += f"\n\nSkipped (over the {args.budget:.0f} s budget): {', '.join(skipped)}\n"
    out_dir, fname = os.path.split(os.path.abspath(args.out))
    payload = {"machine": info, "device": dev.device_kind, "quick": args.quick, "rows": rows}
    payload["skipped"] = skipped
    write_results(out_dir, os.path.splitext(fname)[0], payload, md)
    print(md, flush=True)
    return payload


if __name__ == "__main__":
    run(parse_args())
