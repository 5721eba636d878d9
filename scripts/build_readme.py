"""Rebuilds README.md from its hand-written parts and the result files in experiments/results.

The README quotes tables that experiments write; rebuilding after a rerun keeps them true:
    python scripts/build_readme.py
Hand-written text lives in docs/readme/*.md; result sections are cut from experiments/results.
"""

import json
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
R = os.path.join(ROOT, "experiments", "results")
D = os.path.join(ROOT, "docs", "readme")


def read(*p):
    with open(os.path.join(*p)) as f:
        return f.read()


def between(text, start, end=None):
    i = text.index(start) + len(start)
    j = text.index(end, i) if end else len(text)
    return text[i:j]


def demote(md, levels=1):
    """Turns '# x' into '## x' etc. (outside code fences)."""
    out, fence = [], False
    for line in md.splitlines():
        if line.startswith("```"):
            fence = not fence
        if not fence and re.match(r"^#+ ", line):
            line = "#" * levels + line
        out.append(line)
    return "\n".join(out)


def section_until(text, heading_prefix):
    """Text up to (not including) the first line starting with heading_prefix."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if i and line.startswith(heading_prefix):
            return "\n".join(lines[:i])
    return text


def _ratios(ops_md: str, form: str) -> str:
    """The static int8 MLP ratios ``b1 / b32 / b256`` of `form` in a bench_ops table."""
    out = []
    for b in (1, 32, 256):
        m = re.search(
            rf"^\| jq static int8 \([^|]*\[{form}[^\]]*\] \| MLP [^|]*batch {b} \|[^|]*\| ([\d.]+x)",
            ops_md,
            re.M,
        )
        out.append(m.group(1) if m else "?")
    return " / ".join(out)


def _machine(ops_md: str) -> tuple[str, str, str]:
    """(cpu, CPU kind, jq's automatic form) of a bench_ops table."""
    kind = re.search(r"CPU kind `([^`]+)`", ops_md).group(1)
    cpu = re.search(r"^jax [^,]+, ([^;]+);", ops_md, re.M).group(1)
    auto = re.search(r"jq's automatic CPU form here: `([^`]+)`", ops_md).group(1)
    return cpu, kind, auto


def expect_table(ops_md: str, ops_avx2_md: str) -> str:
    """The per-hardware table of docs/readme/hardware.md; measured rows come from ops.md
    (a VNNI machine) and ops_avx2.md (an AVX2-only machine)."""
    cpu, kind, auto = _machine(ops_md)
    cpu2, kind2, auto2 = _machine(ops_avx2_md)
    rows = [
        "| hardware | form | static int8 MLP vs float32, b1 / b32 / b256 | source |",
        "|---|---|---|---|",
        f"| {cpu} (CPU kind `{kind}`) | `{auto}` (jq's choice here) | **{_ratios(ops_md, auto)}** "
        "| `experiments/results/ops.md` (its forced-form rows ran `u8s8` too: see below) |",
        f"| {cpu2} (CPU kind `{kind2}`) | `{auto2}` (jq's choice here) | "
        f"**{_ratios(ops_avx2_md, auto2)}** | `experiments/results/ops_avx2.md` |",
    ]
    for form in ("u8s8", "s8s8", "s8s8_padk"):
        if form != auto2:
            rows.append(
                f"| same AVX2 machine, form forced | `{form}` | {_ratios(ops_avx2_md, form)} "
                "| same run |"
            )
    rows += [
        "| x86 with AVX-VNNI or AMX | `u8s8` | not measured; the VNNI kernels apply | run "
        "`experiments/bench_ops.py` |",
        "| aarch64 | `s8s8` | not measured | run `experiments/bench_ops.py`; keep float32 where "
        "int8 is not faster |",
        "| NVIDIA GPU | `s8s8_padk` | exactness fixed (K padding, convs as patches); speed "
        "against bf16: `experiments/bench_gpu.py` | `bash scripts/device_check.sh` |",
    ]
    return "\n".join(rows)


def decode_table(decode_json: str) -> str:
    """Decoding rows of the "What to expect" section: tokens/s over float32 (float KV cache)."""
    res = json.loads(decode_json)
    rows = [r for r in res["rows"] if "error" not in r and r["row"].endswith("float KV cache")]
    batches = sorted({r["batch"] for r in rows})
    by = {(r["row"].split(",")[0], r["batch"]): r["vs_float32"] for r in rows}
    names = list(dict.fromkeys(r["row"].split(",")[0] for r in rows))
    torch = [r for r in res["rows"] if r["row"].startswith("PyTorch") and "error" not in r]
    for r in torch:
        by[(r["row"], r["batch"])] = r["vs_float32"]
    names += list(dict.fromkeys(r["row"] for r in torch))
    cfg, mi = res["config"], res["machine"]
    head = " / ".join(f"batch {b}" for b in batches)
    out = [
        f"| mode (decoder {cfg['layers']} x {cfg['width']}, {cfg['tokens']} greedy tokens) "
        f"| tokens/s over jq float32, {head} |",
        "|---|---|",
    ]
    for n in names:
        vals = " / ".join(f"{by[(n, b)]:.2f}x" if (n, b) in by else "-" for b in batches)
        out.append(f"| {n} | {vals} |")
    out.append(
        f"\n{mi['cpu']}, {mi['cpu_count']} cores, jax {mi['jax']}, torch {mi.get('torch')} "
        f"(`experiments/results/decode.md`, load average {mi['load_avg_1m']})."
    )
    return "\n".join(out)


def main():
    digits = read(R, "digits.md")
    charlm = read(R, "charlm.md")
    parts = [
        read(D, "intro.md"),
        "## Results on real data\n\n"
        "`bash scripts/demo.sh` runs `experiments/digits.py` (short run, about a minute on 2 "
        "quiet cores; `--full` for the long one, results in `experiments/results/digits_full.md`). "
        "It trains a float32 MLP and CNN on scikit-learn's bundled digits, runs every step of the "
        "workflow, prints the table below, writes it as JSON and markdown, and finally exports the "
        "static-int8 MLP for cpu / cuda / tpu, reloads the file in a fresh process that imports only "
        "jax and jq, and checks its predictions.\n\n"
        + demote(digits.split("\n", 1)[1].replace("# digits: short run", ""), 1).strip()
        + "\n\n![accuracy against bits per weight](experiments/results/digits_bits.png)\n\n"
        "### Character-level transformer on the Python standard library\n\n"
        "`python experiments/charlm.py` (about 11 minutes on 2 shared cores). Before this release "
        "the entropy row was +90.85 % (the KL search clipped softmax outputs to [0, 0.126]); "
        "the one-sided search now gives them [0, 1].\n\n"
        + demote(charlm.split("\n", 1)[1], 2).strip(),
        read(D, "core.md").replace(
            "{first_run}",
            between(read(R, "first_run.md"), "\n\n", "\n\nMachine:").split("\n\n", 1)[1]
            + "\n\n"
            + "Machine:"
            + between(read(R, "first_run.md"), "\n\nMachine:").rstrip(),
        ),
        read(D, "byom.md"),
        read(D, "checks.md"),
        demote(section_until(read(R, "calibration.md"), "### Agreement"), 0).strip()
        + "\n\n"
        + "\n".join(
            read(R, "calibration.md")
            .split("### Agreement with ONNX Runtime and PyTorch")[1]
            .split("Deliberate differences:")[0]
            .splitlines()
        )
        .strip()
        .join(["### Agreement with ONNX Runtime and PyTorch\n\n", "\n"])
        + "\nDeliberate differences (symmetric int8 scale `amax/127` like ONNX Runtime, not torch's "
        "`amax/127.5`; the exact entropy variant; streaming re-binning) are listed in "
        "[experiments/results/calibration.md](experiments/results/calibration.md).\n\n### Speed\n"
        + between(read(R, "calibration.md"), "<!-- bench:start -->", "<!-- bench:end -->"),
        read(D, "hardware.md")
        .replace("{expect_table}", expect_table(read(R, "ops.md"), read(R, "ops_avx2.md")))
        .replace("{decode_table}", decode_table(read(R, "decode.json")))
        + "\n\n### Benchmark\n\n"
        "`python experiments/bench_ops.py` (targets for static int8 on the MLP with the form jq "
        "chooses: on a VNNI CPU at least 3.5x over float32 at batch 32 and 256 and 1.4x at "
        "batch 1; on an AVX2-only CPU at least 1.5x / 2.0x / 1.3x). On an AVX2-only CPU "
        "(`python experiments/bench_ops.py --out experiments/results/ops_avx2.md`):\n\n"
        + demote(read(R, "ops_avx2.md").split("\n", 1)[1], 2).strip()
        + "\n\nOn an AVX-512 VNNI CPU (the previous run; its forced-form rows are the `u8s8` "
        "form, see above):\n\n"
        + demote(section_until(read(R, "ops.md").split("\n", 1)[1], "Notes:"), 2).strip(),
        demote(section_until(read(R, "precision.md"), "# Results"), 0).strip()
        + "\n\nExample (`experiments/precision.py`; full tables in "
        "[experiments/results/precision.md](experiments/results/precision.md)):\n\n"
        + between(read(R, "precision.md"), "## Example (README)\n").strip(),
        "## GPTQ and SmoothQuant\n\n"
        "`jq.gptq` collects each matched weight's input Hessian `H = 2 X X^T` through the same "
        "traced-model mechanism (streaming, float32), processes sites in dataflow order so each "
        "one sees the already-quantized layers before it (the paper's sequential setting), and "
        "quantizes with GPTQ's Cholesky-based error compensation (lazy blocks of 128, "
        "`percdamp=0.01`, optional `act_order`, `group_size` via a block spec). The result is "
        "ordinary `QuantizedVariables`. `jq.smoothquant` folds the smoothing factors into the "
        "preceding LayerNorm / RMSNorm parameters where it can (sites that share a norm share one "
        "factor; `fold=True`, the default), and otherwise stores per-site factors that `jq.apply` "
        "multiplies into the activation before quantizing it. The W8A8 + SmoothQuant rows below "
        "were measured before folding existed, with the runtime multiply on every site "
        "(`fold=False` reproduces them); `python experiments/bench_gptq.py` reruns them.\n\n"
        + demote(read(R, "gptq.md").split("\n", 1)[1].split("Warm `")[0], 1).strip(),
        read(D, "llm.md").strip() + "\n\n### Decoding the character-level transformer\n\n"
        "`python experiments/charlm_decode.py` (training cached in /tmp after the first run).\n\n"
        + demote(read(R, "charlm_decode.md").split("\n", 1)[1], 2).strip()
        + "\n\n### Decoding speed: a GPT-2-small-shaped decoder\n\n"
        "`python experiments/bench_decode.py` (a few minutes on an idle machine; `--quick` for a "
        "smoke run).\n\n" + demote(read(R, "decode.md").split("\n", 1)[1], 2).strip(),
        between(
            read(R, "deploy.md"),
            "---8<--- README section starts here",
            "---8<--- README section ends here",
        ).strip(),
        demote(read(R, "sharding.md"), 0).strip(),
        read(D, "tail.md"),
    ]
    text = "\n\n".join(p.strip("\n") for p in parts) + "\n"
    with open(os.path.join(ROOT, "README.md"), "w") as f:
        f.write(text)
    print(f"README.md: {len(text.splitlines())} lines")


if __name__ == "__main__":
    main()
