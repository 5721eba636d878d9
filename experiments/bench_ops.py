"""CPU speed of jq's integer ops, as ratios to float32 jit measured side by side.

Each group of cases (one float32 baseline plus the int8 variants of the same
shape) is timed *interleaved*: every repeat times each case once, in turn, as
the mean of `--calls` back-to-back calls of the jitted function. The table
gives the median over `--repeats` repeats (at least 5), the range (min - max)
and the ratio ``median(float32) / median(case)`` from the same run.

Every jq row names the integer form it was compiled with (`jq.lowering`):
``u8s8`` (chosen on x86 with VNNI / AMX), ``s8s8`` (chosen on other CPUs) and
``s8s8_padk`` (the GPU / TPU form, here run on the CPU). The form jq picks on
this machine is marked "(auto)"; the others are compiled with
`jq.ops.int8_lowering` so that all are compared in one run.

Run:  python experiments/bench_ops.py [--repeats 7] [--calls 20]
Writes experiments/results/ops.md (or --out) and prints the same markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np

import jq
from jq import lowering, ops
from jq.ops import int8_dot

DENSE = (((1,), (0,)), ((), ()))
NK = (((1,), (1,)), ((), ()))  # weight stored (N, K)
MLP_SIZES = (784, 1024, 1024, 1024, 10)


def _compiled(f, args, form: str | None = None):
    """`f` jitted and compiled now, in `form` (None: jq's automatic choice).

    Each call traces a new wrapper of `f`: `jax.jit` caches traces per Python
    function, so compiling `f` itself again would reuse the form of its first
    trace whatever `jq.ops.int8_lowering` says (the previous release's table
    compared one form with itself this way)."""

    def fresh(*a):
        return f(*a)

    if form is None:
        return jax.jit(fresh).lower(*args).compile()
    with ops.int8_lowering(cpu=form):
        return jax.jit(fresh).lower(*args).compile()


def _form_cases(label: str, f, args) -> dict:
    """One case per integer form; jq's automatic choice on this machine is marked."""
    auto = lowering.current().cpu_form
    return {
        f"{label} [{form}{' (auto)' if form == auto else ''}]": (_compiled(f, args, form), args)
        for form in lowering.CPU_FORMS
    }


def _time_group(cases: dict, repeats: int, calls: int) -> dict[str, list[float]]:
    """Interleaved timing: seconds per call, one sample per repeat per case."""
    for f, args in cases.values():  # compile and warm up
        jax.block_until_ready(f(*args))
        jax.block_until_ready(f(*args))
    samples = {name: [] for name in cases}
    for _ in range(repeats):
        for name, (f, args) in cases.items():
            t0 = time.perf_counter()
            for _ in range(calls):
                out = f(*args)
            jax.block_until_ready(out)
            samples[name].append((time.perf_counter() - t0) / calls)
    return samples


def _rows(group: str, samples: dict, baseline: str) -> list[tuple]:
    base = float(np.median(samples[baseline]))
    base_min = min(samples[baseline])
    rows = []
    for name, s in samples.items():
        med = float(np.median(s))
        rows.append((group, name, med, min(s), max(s), base / med, base_min / min(s)))
    return rows


def _ints(rng, shape, dtype):
    info = np.iinfo(dtype)
    lo = max(info.min, -127)
    return jnp.asarray(rng.integers(lo, info.max + 1, shape), dtype)


def dot_cases(rng, m, k, n):
    a8, u8 = _ints(rng, (m, k), np.int8), _ints(rng, (m, k), np.uint8)
    b8 = _ints(rng, (k, n), np.int8)
    af, bf = a8.astype(jnp.float32), b8.astype(jnp.float32)
    lax_int = jax.jit(
        lambda a, b: jax.lax.dot_general(a, b, DENSE, preferred_element_type=jnp.int32)
    )
    prim = lambda a, b: int8_dot.int8_dot_general(a, b, DENSE)  # noqa: E731
    return {
        "float32 jit": (jax.jit(lambda a, b: a @ b), (af, bf)),
        "int8 x int8 -> int32, lax.dot_general": (lax_int, (a8, b8)),
        "uint8 x int8 -> int32, lax.dot_general (widened to s32)": (lax_int, (u8, b8)),
        **_form_cases("int8 x int8 -> int32, jq primitive", prim, (a8, b8)),
    }


def matvec_cases(rng, k, n):
    a8 = _ints(rng, (1, k), np.int8)
    b8 = _ints(rng, (k, n), np.int8)
    bt = jnp.asarray(np.asarray(b8).T.copy())
    af, bf = a8.astype(jnp.float32), b8.astype(jnp.float32)
    lax_int = jax.jit(
        lambda a, b: jax.lax.dot_general(a, b, DENSE, preferred_element_type=jnp.int32)
    )
    return {
        "float32 jit": (jax.jit(lambda a, b: a @ b), (af, bf)),
        "int8 M=1, lax.dot_general (XLA loop)": (lax_int, (a8, b8)),
        **_form_cases(
            "int8 M=1, jq, weight (N, K)",
            lambda a, b: int8_dot.int8_dot_general(a, b, NK),
            (a8, bt),
        ),
        **_form_cases(
            "int8 M=1, jq, weight (K, N)",
            lambda a, b: int8_dot.int8_dot_general(a, b, DENSE),
            (a8, b8),
        ),
    }


def conv_cases(rng):
    x = jnp.asarray(rng.normal(size=(8, 32, 32, 64)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 3, 64, 64)) / 24, jnp.float32)
    cdn = ("NHWC", "HWIO", "NHWC")
    spec = jq.QuantSpec("int8")
    qp = jq.qparams_from_range(float(x.min()), float(x.max()), spec)
    qw = jq.quantize(w, None, jq.QuantSpec("int8", axis=-1))

    def f32(x, w):
        return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=cdn)

    def static(x, qw):
        return ops.conv_general_dilated(
            x, qw, (1, 1), "SAME", dimension_numbers=cdn, lhs_spec=spec, lhs_qparams=qp
        )

    return {
        "float32 jit": (jax.jit(f32), (x, w)),
        **_form_cases("jq static int8 conv (patches x int8 dot)", static, (x, qw)),
    }


def mlp_cases(rng, batch):
    ws = [
        jnp.asarray(rng.normal(size=(a, b)) / np.sqrt(a), jnp.float32)
        for a, b in zip(MLP_SIZES[:-1], MLP_SIZES[1:], strict=True)
    ]
    bs = [jnp.asarray(rng.normal(size=(b,)) * 0.1, jnp.float32) for b in MLP_SIZES[1:]]
    x = jnp.asarray(rng.normal(size=(batch, MLP_SIZES[0])), jnp.float32)
    calib = jnp.asarray(rng.normal(size=(256, MLP_SIZES[0])), jnp.float32)

    def f32(params, x):
        for i, (w, b) in enumerate(params):
            x = x @ w + b
            if i < len(params) - 1:
                x = jax.nn.relu(x)
        return x

    wspec = jq.QuantSpec("int8", axis=-1)  # per output channel
    aspec = jq.QuantSpec("int8")  # per tensor
    uspec = jq.QuantSpec("uint8", scheme="affine")
    qparams = [(jq.quantize(w, None, wspec), b) for w, b in zip(ws, bs, strict=True)]
    qparams_nk = [
        (jq.quantize(w.T, None, jq.QuantSpec("int8", axis=0)), b)
        for w, b in zip(ws, bs, strict=True)
    ]
    # static activation ranges from a calibration batch (min-max per layer input)
    act_qp, h = [], calib
    for i, (w, b) in enumerate(zip(ws, bs, strict=True)):
        act_qp.append(jq.qparams_from_range(h.min(), h.max(), aspec))
        h = h @ w + b
        if i < len(ws) - 1:
            h = jax.nn.relu(h)

    def quantized(params, x, spec, static):
        for i, (w, b) in enumerate(params):
            qp = act_qp[i] if static else None
            x = ops.dot_general(x, w, DENSE, lhs_spec=spec, lhs_qparams=qp) + b
            if i < len(params) - 1:
                x = jax.nn.relu(x)
        return x

    def static_nk(params, x):  # weights stored (N, K), as convert(target="gpu") stores them
        for i, (w, b) in enumerate(params):
            x = ops.dot_general(x, w, NK, lhs_spec=aspec, lhs_qparams=act_qp[i]) + b
            if i < len(params) - 1:
                x = jax.nn.relu(x)
        return x

    # the same math written by hand, the limit jq's glue is measured against: int8 codes from
    # the static scale, one raw 8-bit dot with the weight (N, K) and M padded to 2, one float
    # epilogue (scales, bias, ReLU); u8 x s8 (VNNI) uses weight sums computed once, offline.
    # No NaN-row bookkeeping.
    hand_params = []
    for (q, b), a in zip(qparams, act_qp, strict=True):
        w = jnp.asarray(np.asarray(q.value).T.copy())  # (N, K) int8
        wsum = jnp.asarray(128 * np.asarray(q.value, np.int32).sum(axis=0))
        s = jnp.asarray(np.asarray(q.scale).reshape(-1) * float(np.asarray(a.scale).reshape(())))
        hand_params.append(
            (w, wsum, s, b, jnp.float32(1.0 / float(np.asarray(a.scale).reshape(()))))
        )

    def hand_written(form):
        def run(params, x):
            for i, (w, wsum, s, b, inv) in enumerate(params):
                xq = jnp.clip(jnp.round(x * inv), -127, 127)
                m = xq.shape[0]
                if m == 1:  # XLA:CPU's M = 1 integer dot is a slow loop
                    xq = jnp.pad(xq, ((0, 1), (0, 0)))
                if form == "u8s8":  # the mixed dot that jax.lax.dot_general cannot express
                    acc = int8_dot._raw_dot((xq + 128).astype(jnp.uint8), w, NK)[:m] - wsum
                else:
                    acc = jax.lax.dot_general(
                        xq.astype(jnp.int8), w, NK, preferred_element_type=jnp.int32
                    )[:m]
                x = acc.astype(jnp.float32) * s + b
                if i < len(params) - 1:
                    x = jax.nn.relu(x)
            return x

        return run

    auto = lowering.current().cpu_form
    hand_rows = {
        f"hand-written int8 {form}, weight (N, K), M padded to 2"
        f"{' [auto]' if form == auto else ''}": (
            jax.jit(hand_written(form)),
            (hand_params, x),
        )
        for form in ("u8s8", "s8s8")
    }

    def weight_only(params, x):
        for i, (w, b) in enumerate(params):
            x = ops.dot_general(x, w, DENSE) + b
            if i < len(params) - 1:
                x = jax.nn.relu(x)
        return x

    fp = list(zip(ws, bs, strict=True))
    cases = {
        "float32 jit": (jax.jit(f32), (fp, x)),
        **_form_cases(
            "jq static int8 (act per tensor, weight per channel)",
            lambda p, x: quantized(p, x, aspec, True),
            (qparams, x),
        ),
        "jq static int8, weights stored (N, K) [auto]": (
            _compiled(static_nk, (qparams_nk, x)),
            (qparams_nk, x),
        ),
        **hand_rows,
        **_form_cases(
            "jq dynamic int8 (symmetric, per tensor)",
            lambda p, x: quantized(p, x, aspec, False),
            (qparams, x),
        ),
        "jq dynamic uint8 (affine, per tensor) [auto]": (
            _compiled(lambda p, x: quantized(p, x, uspec, False), (qparams, x)),
            (qparams, x),
        ),
        "jq weight-only int8 (float32 activations)": (jax.jit(weight_only), (qparams, x)),
    }
    # accuracy of each quantized variant against float32 on the same input
    ref = np.asarray(cases["float32 jit"][0](fp, x))
    errs = {}
    for name, (f, args) in cases.items():
        y = np.asarray(f(*args))
        errs[name] = float(np.abs(y - ref).max() / np.abs(ref).max())
    return cases, errs


def _lowering_line() -> str:
    info = ops.lowering_info()
    c = info["cpu"]
    return (
        f"CPU kind `{c['kind']}` (int8 flags: {', '.join(c['int8_flags']) or 'none'}, read from "
        f"{c['features_from']}); jq's automatic CPU form here: `{c['form']}` ({c['reason']}); "
        f"accelerators: `{info['accelerator']['form']}` (K multiple "
        f"{info['accelerator']['k_multiple']})."
    )


def _cpu_line() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown CPU"
    model = next(
        (ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "?"
    )
    flags = next((ln for ln in out.splitlines() if ln.startswith("Flags")), "")
    isa = [
        f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f" {f}" in flags
    ]
    return f"{model}, {os.cpu_count()} cores, {' '.join(isa)}"


NOTES = """\
Notes:

- Lowering. `jq.ops` emits every int8 product through the primitive in
  `jq/ops/int8_dot.py`, in the form `jq.lowering` chooses per backend and CPU:
  `u8s8` (a mixed `u8 x s8 -> s32` `stablehlo.dot_general`, which XLA:CPU hands
  to its VNNI kernels, a `__ynn_fusion` in the compiled HLO) on x86 with
  AVX-512 VNNI, AVX-VNNI or AMX; `s8s8` on other CPUs (XLA:CPU's `u8 x s8` is
  3-7x slower than float32 without VNNI); `s8s8_padk` (contraction zero-padded
  to a multiple of 4, tiny free dimensions to 16) on GPU and TPU. Rows tagged
  with a form were compiled in that form with `jq.ops.int8_lowering`; "(auto)"
  marks the one jq picks on this machine. `jax.lax.dot_general` cannot express
  the `u8s8` form: it widens a uint8 x int8 dot to s32 x s32 (row "widened to
  s32").
- In the CPU forms the activation is shifted to the form's lhs type (a top-bit
  flip) when needed and `128 * sum_k w` corrects it; the weight sums come from
  one extra row of ones in the same dot (an XLA:CPU column reduction of an int8
  matrix costs more than the dot). The same row pads M = 1 to M = 2, which
  avoids XLA's slow matrix-vector loop for integers.
- Static and dynamic modes differ only in how the activation scale is found
  (given, or one abs-max reduction at run time); affine uint8 activations
  need a min and a max (one variadic reduction) and zero-point terms.
- "jq weight-only int8 (float32 activations)" is `jq.ops.dot_general` with a
  float activation and an int8 weight: XLA:CPU converts the weights to float32
  inside every call, so it saves memory, not time. The presets'
  `w8_weight_only()` / `w4_weight_only()` do not run this by default: their
  dots quantize each token's activation to int8 (`activations="int8"`), the
  "jq dynamic int8" rows' execution with one scale per row.
- "hand-written" rows: the same static int8 math written directly against one
  raw 8-bit dot (`u8 x s8` with the weight sums `128 * sum_k w` computed once,
  offline, or `s8 x s8`), the weight stored (N, K), M padded to 2, one float
  epilogue and no NaN-row bookkeeping: the limit that jq's glue is measured
  against. Compare it with "jq static int8, weights stored (N, K)", the layout
  `jq.convert(..., target="cpu")` stores on x86 (`jq.lowering.weight_layout`).
- Dynamic affine uint8 activations were markedly slower than symmetric int8 at
  batch 1 in the previous release: their range went through checks staged
  under jit (`checkify`), which take a jitted function off JAX's fast dispatch
  path. Traced checks are now opt-in (`jq.value_checks`).
- Convolutions: on every platform an int8 conv (grouped and lhs-dilated ones
  too) is lowered as patches (strided slices of the quantized input) times the
  weight through the integer dot: XLA:CPU's own int8 convolution is slower than
  float32, and XLA:GPU rejects integer convolutions. The gain here is small
  because building the patches moves 9x the input.
- XLA repacks the int8 weights on every call (ONNX Runtime and fbgemm pack
  once); that is included in these times.
- The machine is shared: every group is timed interleaved with its float32
  baseline, so the ratios are the comparable figures; absolute times vary with
  the load.
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument(
        "--out", default=os.path.join(os.path.dirname(__file__), "results", "ops.md")
    )
    parser.add_argument(
        "--quick", action="store_true", help="MLP groups only (what scripts/device_check.sh runs)"
    )
    args = parser.parse_args()
    print(_lowering_line(), flush=True)
    if args.repeats < 5:
        parser.error("--repeats must be at least 5")
    rng = np.random.default_rng(0)
    rows, notes = [], []
    load0 = os.getloadavg()[0]

    if not args.quick:
        s = _time_group(dot_cases(rng, 256, 1024, 1024), args.repeats, args.calls)
        rows += _rows("dot 256x1024x1024", s, "float32 jit")
        s = _time_group(matvec_cases(rng, 4096, 4096), args.repeats, max(3, args.calls // 4))
        rows += _rows("matrix-vector 1x4096x4096", s, "float32 jit")
        s = _time_group(conv_cases(rng), args.repeats, max(3, args.calls // 4))
        rows += _rows("conv 8x32x32x64 -> 64, 3x3 SAME", s, "float32 jit")
    for batch in (1, 32, 256):
        cases, errs = mlp_cases(rng, batch)
        s = _time_group(cases, args.repeats, args.calls)
        rows += _rows(f"MLP 784-1024-1024-1024-10, batch {batch}", s, "float32 jit")
        notes.append(
            f"batch {batch}: max |y - y_f32| / max |y_f32|: "
            + ", ".join(
                f"{re.sub(r' [(][^)]*[)]', '', k)} {v:.4f}"
                for k, v in errs.items()
                if "float32" not in k
            )
        )

    head = (
        f"jax {jax.__version__}, {_cpu_line()}; median of {args.repeats} interleaved repeats "
        f"(each the mean of {args.calls} calls; matrix-vector and conv: {max(3, args.calls // 4)}), "
        "range = min-max over repeats; ratio = median float32 / median case, same run "
        "(and the ratio of the minima, less sensitive to other load on the machine). "
        f"1-minute load average {load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end "
        f"(the machine is shared)."
    )
    lines = [
        "| case | shape | time (ms), median [range] | vs float32 (medians) | (minima) |",
        "|---|---|---|---|---|",
    ]
    for group, name, med, lo, hi, ratio, ratio_min in rows:
        lines.append(
            f"| {name} | {group} | {med * 1e3:.3f} [{lo * 1e3:.3f}-{hi * 1e3:.3f}] "
            f"| {ratio:.2f}x | {ratio_min:.2f}x |"
        )
    table = "\n".join(lines)
    text = "\n".join(
        [
            "# jq.ops CPU benchmark",
            "",
            head,
            "",
            _lowering_line(),
            "",
            table,
            "",
            "Accuracy (same inputs):",
            "",
        ]
        + [f"- {n}" for n in notes]
        + ["", NOTES]
    )
    print(text)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        fh.write(text)


if __name__ == "__main__":
    main()
