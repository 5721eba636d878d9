"""Digits end to end: a float32 MLP and CNN, then every jq workflow on them, in one table.

Data: scikit-learn's bundled ``load_digits`` (1,797 8x8 grey images, 10
classes), pixels scaled to [0, 1], split once with
``train_test_split(X, y, test_size=0.3, random_state=0, stratify=y)``:
1,257 training and 540 test images (one test image is 0.185 points).

Models (flax.linen, trained in float32 with optax Adam inside `jax.jit`):

* ``mlp``: 64 -> Dense 256 -> ReLU -> Dense 256 -> ReLU -> Dense 10.
* ``cnn``: 8x8x1 -> Conv 32 3x3 -> ReLU -> Conv 64 3x3 stride 2 -> ReLU ->
  flatten (4x4x64) -> Dense 128 -> ReLU -> Dense 10.

Rows (every quantized row goes through jq's public API only: ``jq.Rule``,
``jq.calibrate``, ``jq.convert``, ``jq.apply``, ``jq.qat``):

* float32: the trained model, ``model.apply`` under `jax.jit`.
* dynamic int8: int8 weights per channel, activation ranges at run time.
* static int8 + {min-max, moving average, entropy, MSE, percentile}:
  activation ranges calibrated on 8 training batches of 128, int8 weights per
  channel (``axis=-1``, the output features).
* static int8, per-tensor weights (min-max): the same with one weight scale
  per tensor, against the per-channel row above it.
* weight-only int8 / int4: weights per channel, activations in float32.
* QAT int8 / QAT int4: fine-tuning of the float model with fake quantization
  (``jq.qat``; int8 activations with moving-average ranges, weights int8 or
  int4 per channel by min-max), then ``jq.convert``.
* float16 / bfloat16: weights and activations cast to the format, dots with
  float32 accumulation.

Columns: test accuracy, drop against float32 (percentage points; positive =
worse), model bytes (all variables as stored, scales and zero points
included), bits per quantized weight, and CPU latency of the jitted model at
batch 1 and batch 256: medians of interleaved repeats, with the speed-up
``latency(float32) / latency(row)`` measured in the same run.

Run::

    python experiments/digits.py           # short run (the README's main job): 75 s wall measured
                                           # on 2 cores (215-241 s while others loaded them to ~10)
    python experiments/digits.py --full    # longer training and more timing repeats

Writes ``experiments/results/digits.{json,md}`` (``digits_full.*`` with
``--full``) and the plots ``digits_bits.png`` / ``digits_calibration.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

import jq
import jq.calibration as cal

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (  # noqa: E402
    CALIBRATORS,
    RESULTS_DIR,
    Stopwatch,
    interleaved_latency,
    machine_info,
    markdown_table,
    tree_nbytes,
    write_results,
)

SPLIT = "train_test_split(X, y, test_size=0.3, random_state=0, stratify=y)"
TARGETS = {"static_int8_per_channel_points": 0.5, "qat_int4_points": 1.0}


# ---------------------------------------------------------------------------------------
# data and models
# ---------------------------------------------------------------------------------------
def load_data():
    """``(x_train, y_train, x_test, y_test)``: float32 pixels in [0, 1], int32 labels."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).astype(np.float32)
    y = y.astype(np.int32)
    xtr, xte, ytr, yte = train_test_split(X, y, test_size=0.3, random_state=0, stratify=y)
    return xtr, ytr, xte, yte


class MLP(nn.Module):
    width: int = 256

    @nn.compact
    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(self.width)(x))
        x = nn.relu(nn.Dense(self.width)(x))
        return nn.Dense(10)(x)


class CNN(nn.Module):
    channels: int = 32

    @nn.compact
    def __call__(self, x):
        x = x.reshape(x.shape[0], 8, 8, 1)
        x = nn.relu(nn.Conv(self.channels, (3, 3))(x))
        x = nn.relu(nn.Conv(2 * self.channels, (3, 3), strides=(2, 2))(x))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(4 * self.channels)(x))
        return nn.Dense(10)(x)


def make_model(name: str, size: int | None = None) -> nn.Module:
    if name == "mlp":
        return MLP(width=size or 256)
    if name == "cnn":
        return CNN(channels=size or 32)
    raise ValueError(f"unknown model {name!r}; expected 'mlp' or 'cnn'")


def _batches(x, y, batch_size, rng):
    perm = rng.permutation(len(x))
    for i in range(0, len(x) - batch_size + 1, batch_size):
        idx = perm[i : i + batch_size]
        yield x[idx], y[idx]


def _xent(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def train_float(
    model,
    xtr,
    ytr,
    epochs: int,
    seed: int,
    lr: float = 1e-3,
    batch_size: int = 32,
    desc: str = "train",
):
    """Adam on softmax cross-entropy; returns the float32 variables."""
    variables = model.init(jax.random.key(seed), xtr[:1])
    opt = optax.adam(lr)
    params, opt_state = variables["params"], None
    opt_state = opt.init(params)

    @jax.jit
    def step(params, opt_state, xb, yb):
        loss, g = jax.value_and_grad(lambda p: _xent(model.apply({"params": p}, xb), yb))(params)
        updates, opt_state = opt.update(g, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(seed)
    bar = tqdm(range(epochs), desc=desc, unit="epoch", leave=False)
    for _ in bar:
        for xb, yb in _batches(xtr, ytr, batch_size, rng):
            params, opt_state, loss = step(params, opt_state, xb, yb)
        bar.set_postfix(loss=f"{float(loss):.3f}")
    return {"params": params}


def train_qat(
    model,
    variables,
    rules,
    xtr,
    ytr,
    epochs: int,
    seed: int,
    lr: float,
    stats,
    batch_size: int = 32,
    desc: str = "qat",
):
    """Fine-tunes the float model with fake quantization (`jq.qat`); returns trained QAT variables."""
    q = jq.qat(model, rules, activations="ema", weights="minmax")
    qv = q.init(variables, xtr[:batch_size], stats=stats)
    opt = optax.adam(lr)
    trainable = {"params": qv["params"], "quant": qv["quant"]}
    opt_state = opt.init(trainable)

    @jax.jit
    def step(trainable, state, opt_state, xb, yb):
        def loss_fn(tr):
            out, new_state = q.apply({**tr, "state": state}, xb, update_stats=True)
            return _xent(out, yb), new_state

        (loss, state), g = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
        updates, opt_state = opt.update(g, opt_state, trainable)
        return optax.apply_updates(trainable, updates), state, opt_state, loss

    state = qv["state"]
    rng = np.random.default_rng(seed + 1)
    bar = tqdm(range(epochs), desc=desc, unit="epoch", leave=False)
    for _ in bar:
        for xb, yb in _batches(xtr, ytr, batch_size, rng):
            trainable, state, opt_state, loss = step(trainable, state, opt_state, xb, yb)
        bar.set_postfix(loss=f"{float(loss):.3f}")
    return {**trainable, "state": state}


# ---------------------------------------------------------------------------------------
# the rows
# ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Method:
    """One row: a name, its `jq.Rule` list, and how the quantized variables are made."""

    name: str
    kind: str  # float | dynamic | static | weight_only | qat | cast
    rules: tuple = ()
    group: str = ""


def act_spec(observer=None) -> jq.QuantSpec:
    """int8 activations: static with an observer, dynamic without."""
    return jq.QuantSpec("int8", calibration=observer)


def w_spec(fmt: str = "int8", per_channel: bool = True) -> jq.QuantSpec:
    return jq.QuantSpec(fmt, axis=-1 if per_channel else None)


def methods() -> list[Method]:
    """All rows, in table order."""
    R = jq.Rule
    out = [Method("float32", "float", group="float")]
    out.append(
        Method(
            "dynamic int8", "dynamic", (R(".*", weight=w_spec(), activation=act_spec()),), "int8"
        )
    )
    for cname, obs in CALIBRATORS.items():
        out.append(
            Method(
                f"static int8, {cname}",
                "static",
                (R(".*", weight=w_spec(), activation=act_spec(obs)),),
                "int8",
            )
        )
    out.append(
        Method(
            "static int8, min-max, per-tensor weights",
            "static",
            (R(".*", weight=w_spec(per_channel=False), activation=act_spec(cal.MinMax())),),
            "int8",
        )
    )
    out.append(
        Method("weight-only int8", "weight_only", (R(".*", weight=w_spec("int8")),), "weight-only")
    )
    out.append(
        Method("weight-only int4", "weight_only", (R(".*", weight=w_spec("int4")),), "weight-only")
    )
    # the presets' default execution on CPU: the same weights, each row's activation quantized
    # to int8 at run time at dots (integer dots); convolutions keep float activations
    for fmt in ("int8", "int4"):
        out.append(
            Method(
                f"weight-only {fmt}, int8 activations",
                "dynamic",
                (
                    R(
                        ".*",
                        ops=("dot",),
                        weight=w_spec(fmt),
                        activation=jq.QuantSpec("int8", axis=0),
                    ),
                    R(".*", ops=("conv", "embed"), weight=w_spec(fmt)),
                ),
                "weight-only",
            )
        )
    out.append(
        Method(
            "QAT int8",
            "qat",
            (R(".*", weight=w_spec("int8"), activation=act_spec(cal.MinMax())),),
            "qat",
        )
    )
    out.append(
        Method(
            "QAT int4 weights",
            "qat",
            (R(".*", weight=w_spec("int4"), activation=act_spec(cal.MinMax())),),
            "qat",
        )
    )
    e4m3 = "float8_e4m3fn"
    for label, act in (("dynamic", jq.QuantSpec(e4m3)), ("static, min-max", None)):
        act = act or jq.QuantSpec(e4m3, calibration=cal.MinMax())
        out.append(
            Method(
                f"fp8 e4m3, {label}",
                "static" if act.is_static else "dynamic",
                (R(".*", weight=jq.QuantSpec(e4m3, axis=-1), activation=act),),
                "fp8",
            )
        )
    for fmt in ("float16", "bfloat16"):
        out.append(
            Method(
                fmt,
                "cast",
                (R(".*", weight=jq.QuantSpec(fmt), activation=jq.QuantSpec(fmt)),),
                "float",
            )
        )
    return out


def _predict_fn(model, is_float: bool):
    if is_float:
        return jax.jit(lambda v, x: model.apply(v, x))
    return jax.jit(lambda q, x: jq.apply(model, q, x))


def accuracy(fn, variables, x, y, batch: int = 256) -> float:
    """Test accuracy, evaluated in padded batches of `batch` (one compiled shape)."""
    n = len(x)
    pad = (-n) % batch
    xp = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)])
    preds = [
        np.asarray(fn(variables, xp[i : i + batch])).argmax(-1) for i in range(0, len(xp), batch)
    ]
    return float((np.concatenate(preds)[:n] == y).mean())


def run_model(model_name: str, cfg, data, sw: Stopwatch) -> dict:
    """Trains one model, builds every row, measures accuracy, size and latency."""
    xtr, ytr, xte, yte = data
    model = make_model(model_name, cfg.size)
    with sw(f"{model_name}/train"):
        variables = train_float(
            model, xtr, ytr, cfg.epochs[model_name], cfg.seed, desc=f"{model_name} train"
        )
    calib = [xtr[i : i + 128] for i in range(0, 128 * cfg.calib_batches, 128)]
    n_weights = sum(int(np.size(w)) for w in jax.tree_util.tree_leaves(variables["params"]))
    f32_bytes = tree_nbytes(variables)

    rows, fns, ranges = [], {}, {}
    minmax_stats = {}
    stats_by_observer = {}
    ms = [m for m in methods() if cfg.only is None or m.name in cfg.only or m.kind == "float"]
    bar = tqdm(ms, desc=f"{model_name} rows", unit="row", leave=False)
    for m in bar:
        bar.set_postfix_str(m.name)
        t0 = time.perf_counter()
        row = {"model": model_name, "method": m.name, "kind": m.kind, "group": m.group}
        if m.kind == "float":
            qv, fn = variables, _predict_fn(model, True)
            row.update(bytes=f32_bytes, bits_per_weight=32.0)
        else:
            rules = list(m.rules)
            stats = None
            if m.kind in ("static", "qat"):
                obs = rules[0].activation.calibration
                if obs not in stats_by_observer:
                    # activation statistics do not depend on the weight spec: rows with the
                    # same observer (per-tensor weights, QAT initial ranges) share one run
                    with sw(f"{model_name}/calibrate"):
                        stats_by_observer[obs] = jq.calibrate(
                            model, variables, rules, calib, progress=False
                        )
                    ranges[m.name] = {
                        k: (float(np.min(lo)), float(np.max(hi)))
                        for k, (lo, hi) in stats_by_observer[obs].ranges().items()
                    }
                stats = stats_by_observer[obs]
                if m.name == "static int8, min-max":
                    minmax_stats = stats
            if m.kind == "qat":
                with sw(f"{model_name}/qat"):
                    trained = train_qat(
                        model,
                        variables,
                        rules,
                        xtr,
                        ytr,
                        cfg.qat_epochs,
                        cfg.seed,
                        cfg.qat_lr,
                        stats,
                        desc=f"{model_name} {m.name}",
                    )
                qv = jq.convert(model, trained, rules)
            elif m.kind == "static":
                qv = jq.convert(model, variables, rules, stats)
            else:
                qv = jq.convert(model, variables, rules, args=(xtr[:1],))
            nb = qv.nbytes()
            row.update(
                bytes=nb["total_after"], bits_per_weight=8.0 * nb["quantized"] / (nb["float"] / 4.0)
            )
            fn = _predict_fn(model, False)
        with sw(f"{model_name}/evaluate"):
            row["accuracy"] = accuracy(fn, qv, xte, yte)
        row["build_s"] = time.perf_counter() - t0
        fns[m.name] = (fn, qv)
        rows.append(row)
    base = rows[0]["accuracy"]
    for r in rows:
        r["drop_points"] = 100.0 * (base - r["accuracy"])

    # latency: every row at batch 1 and at batch 256, interleaved within each batch size
    with sw(f"{model_name}/latency"):
        for b in (1, 256):
            xb = jnp.asarray(np.resize(xte, (b,) + xte.shape[1:]))
            cases = {name: (fn, (qv, xb)) for name, (fn, qv) in fns.items()}
            lat = interleaved_latency(cases, cfg.repeats, desc=f"{model_name} latency b{b}")
            f32 = lat["float32"]["median"]
            for r in rows:
                s = lat[r["method"]]
                r[f"latency_b{b}_us"] = 1e6 * s["median"]
                r[f"latency_b{b}_range_us"] = (1e6 * s["min"], 1e6 * s["max"])
                r[f"speedup_b{b}"] = f32 / s["median"]
    deploy = None
    if cfg.deploy and model_name == cfg.models[0] and "static int8, min-max" in fns:
        # deployment: export the static-int8 model for cpu/cuda/tpu, reload the artifact in a fresh
        # process that imports only jax and jq, and check its predictions on the test set
        from deploy_check import round_trip

        os.makedirs(cfg.out_dir, exist_ok=True)
        with sw(f"{model_name}/deploy"):
            deploy = round_trip(
                model,
                fns["static int8, min-max"][1],
                jnp.asarray(xte),
                os.path.join(cfg.out_dir, f"{cfg.name}_{model_name}.jqx"),
                platforms=("cpu", "cuda", "tpu"),
            )
        if not deploy["ok"]:
            raise RuntimeError(f"deploy round trip failed: {deploy}")
    hist = (
        _histogram_data(model, variables, calib, minmax_stats, ranges)
        if model_name == "mlp"
        else None
    )
    return {
        "rows": rows,
        "ranges": ranges,
        "n_weights": n_weights,
        "histogram": hist,
        "deploy": deploy,
    }


def _histogram_data(model, variables, calib, stats, ranges):
    """Input of the last Dense layer over the calibration batches (for the calibration plot)."""
    if not stats:
        return None
    site = sorted(stats.ranges())[-1]  # "Dense_2/kernel": input of the output layer
    layer = site.split("/")[0]
    vals = []
    for xb in calib:
        _, inter = model.apply(variables, xb, capture_intermediates=True)
        prev = f"Dense_{int(layer.split('_')[1]) - 1}"
        vals.append(np.asarray(nn.relu(inter["intermediates"][prev]["__call__"][0])).ravel())
    return {
        "site": site,
        "values": np.concatenate(vals),
        "ranges": {
            k: v[site]
            for k, v in ranges.items()
            if site in v and "per-tensor" not in k and "QAT" not in k
        },
    }


# ---------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------
COLUMNS = [
    ("method", "method", None),
    ("accuracy", "test acc. (%)", lambda v: f"{100 * v:.2f}"),
    ("drop_points", "drop (points)", "+.2f"),
    ("bytes", "model bytes", ","),
    ("bits_per_weight", "bits / weight", ".2f"),
    ("latency_b1_us", "b=1 latency (µs)", ".1f"),
    ("speedup_b1", "b=1 speed-up", ".2f"),
    ("latency_b256_us", "b=256 latency (µs)", ".1f"),
    ("speedup_b256", "b=256 speed-up", ".2f"),
]


def target_checks(rows: list[dict]) -> list[dict]:
    """The issue's targets, checked per model: static int8 per channel <= 0.5 point, QAT int4 <= 1 point."""
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        rs = {r["method"]: r for r in rows if r["model"] == model}
        for cname in CALIBRATORS:
            r = rs.get(f"static int8, {cname}")
            if r is not None:
                lim = TARGETS["static_int8_per_channel_points"]
                out.append(
                    {
                        "model": model,
                        "check": f"static int8 per-channel ({cname}) drop <= {lim} point",
                        "value": r["drop_points"],
                        "met": r["drop_points"] <= lim,
                    }
                )
        for name in ("fp8 e4m3, dynamic", "fp8 e4m3, static, min-max"):
            r = rs.get(name)
            if r is not None:
                lim = TARGETS["static_int8_per_channel_points"]  # fp8 W8A8: the int8 bound
                out.append(
                    {
                        "model": model,
                        "check": f"{name} drop <= {lim} point",
                        "value": r["drop_points"],
                        "met": r["drop_points"] <= lim,
                    }
                )
        r = rs.get("QAT int4 weights")
        if r is not None:
            lim = TARGETS["qat_int4_points"]
            out.append(
                {
                    "model": model,
                    "check": f"QAT int4 weights drop <= {lim} point",
                    "value": r["drop_points"],
                    "met": r["drop_points"] <= lim,
                }
            )
    return out


def render_markdown(result: dict) -> str:
    cfg = result["config"]
    mi = result["machine"]
    parts = [
        f"# digits: {'full' if cfg['full'] else 'short'} run",
        "",
        f"scikit-learn `load_digits`, split `{SPLIT}` (1,257 train / 540 test; one test image = 0.185 "
        f"points). Float training: {cfg['epochs']} epochs (Adam 1e-3, batch 32); QAT fine-tuning: "
        f"{cfg['qat_epochs']} epochs (Adam {cfg['qat_lr']:g}); calibration: {cfg['calib_batches']} "
        f"training batches of 128. Latency: jitted model on {mi['cpu']} ({mi['cpu_count']} cores), "
        f"1-minute load average {mi['load_avg_1m']} at the start (the machine may be shared), "
        f"median of {cfg['repeats']} interleaved repeats; speed-up = float32 latency / row latency, "
        f"same run. Model bytes count every variable as stored (int4 packed two per byte, "
        f"scales included). jax {mi['jax']}, flax {mi['flax']}, git {mi['git']}, {mi['date_utc']} UTC.",
        "",
    ]
    for model in dict.fromkeys(r["model"] for r in result["rows"]):
        rows = [r for r in result["rows"] if r["model"] == model]
        parts += [
            f"## {model} ({result['models'][model]['n_weights']:,} parameters)",
            "",
            markdown_table(rows, COLUMNS),
            "",
        ]
    checks = result["targets"]
    if checks:
        parts += [
            "## Targets",
            "",
            markdown_table(
                checks,
                [
                    ("model", "model", None),
                    ("check", "target", None),
                    ("value", "drop (points)", "+.2f"),
                    ("met", "met", lambda v: "yes" if v else "**no**"),
                ],
            ),
            "",
        ]
    parts.append(f"Total wall time: {result['wall_s']:.0f} s.")
    return "\n".join(parts)


def _short(method: str) -> str:
    return (
        method.replace("static int8, ", "static ")
        .replace(", per-tensor weights", " (per-tensor w)")
        .replace("percentile 99.99", "pct 99.99")
        .replace(" weights", "")
    )


def make_plots(result: dict, out_dir: str, name: str) -> list[str]:
    """``<name>_bits.png`` (accuracy vs bits per weight) and ``<name>_calibration.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    paths = []
    models = list(dict.fromkeys(r["model"] for r in result["rows"]))
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 4.8), squeeze=False)
    markers = {"float": "o", "int8": "s", "weight-only": "^", "qat": "D", "fp8": "v"}
    colors = {"float": "C0", "int8": "C1", "weight-only": "C2", "qat": "C3", "fp8": "C4"}
    for ax, model in zip(axes[0], models):
        rows = [r for r in result["rows"] if r["model"] == model]
        points: dict = {}
        for r in rows:
            # one label per nominal width (4 / 8 / 16 / 32 bits) and accuracy
            key = (round(r["bits_per_weight"]), round(100 * r["accuracy"], 3))
            points.setdefault(key, []).append(r)
            ax.scatter(
                r["bits_per_weight"],
                100 * r["accuracy"],
                marker=markers.get(r["group"], "o"),
                color=colors.get(r["group"], "C0"),
                s=40,
                alpha=0.8,
            )
        for (_, acc), rs in points.items():
            ax.annotate(
                "\n".join(_short(r["method"]) for r in rs),
                (max(r["bits_per_weight"] for r in rs), acc),
                fontsize=7,
                xytext=(6, -3),
                textcoords="offset points",
                va="top",
            )
        ax.set_xscale("log", base=2)
        ax.set_xticks([4, 8, 16, 32], ["4", "8", "16", "32"])
        ax.set_xlabel("bits per weight (scales included)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"digits {model}: accuracy vs bits per weight")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    p = os.path.join(out_dir, f"{name}_bits.png")
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)

    hist = result["models"].get("mlp", {}).get("histogram")
    if hist is not None:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        v = np.asarray(hist["values"])
        ax.hist(v, bins=200, color="0.6", log=True)
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for i, (k, (lo, hi)) in enumerate(hist["ranges"].items()):
            ax.axvline(
                max(abs(lo), abs(hi)),
                color=colors[i % len(colors)],
                lw=1.5,
                ls=["-", "--", ":", "-."][i % 4],
                label=f"{k.replace('static int8, ', '')}: {hi:.3g}",
            )
        ax.set_xlabel("activation value (input of the output layer, after ReLU)")
        ax.set_ylabel("count (log)")
        ax.set_title(
            f"digits mlp, site {hist['site']}: calibration histogram and the chosen int8 range"
        )
        ax.legend(fontsize=8)
        fig.tight_layout()
        p = os.path.join(out_dir, f"{name}_calibration.png")
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    return paths


# ---------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------
@dataclasses.dataclass
class Config:
    full: bool = False
    models: tuple[str, ...] = ("mlp", "cnn")
    epochs: dict = dataclasses.field(default_factory=lambda: {"mlp": 30, "cnn": 15})
    qat_epochs: int = 4
    qat_lr: float = 1e-4
    calib_batches: int = 8
    repeats: int = 15
    seed: int = 0
    size: int | None = None
    only: tuple[str, ...] | None = None
    out_dir: str = RESULTS_DIR
    name: str = "digits"
    plots: bool = True
    deploy: bool = True


def parse_args(argv=None) -> Config:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--full", action="store_true", help="longer training and more timing repeats")
    p.add_argument("--models", default="mlp,cnn", help="comma-separated subset of mlp,cnn")
    p.add_argument("--epochs", type=int, default=None, help="float training epochs (both models)")
    p.add_argument("--qat-epochs", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None, help="interleaved timing repeats")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--size", type=int, default=None, help="MLP width / CNN channels (default 256 / 32)"
    )
    p.add_argument("--out", default=RESULTS_DIR, help="output directory")
    p.add_argument("--name", default=None, help="output file stem (default digits / digits_full)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument(
        "--no-deploy", action="store_true", help="skip the export / fresh-process reload check"
    )
    a = p.parse_args(argv)
    cfg = Config(
        full=a.full,
        seed=a.seed,
        size=a.size,
        out_dir=a.out,
        plots=not a.no_plots,
        deploy=not a.no_deploy,
    )
    cfg.models = tuple(s.strip() for s in a.models.split(",") if s.strip())
    for m in cfg.models:
        make_model(m)  # validates the name
    if a.full:
        cfg.epochs, cfg.qat_epochs, cfg.repeats, cfg.calib_batches = (
            {"mlp": 100, "cnn": 60},
            15,
            41,
            9,
        )
    if a.epochs is not None:
        cfg.epochs = dict.fromkeys(cfg.models, a.epochs)
    if a.qat_epochs is not None:
        cfg.qat_epochs = a.qat_epochs
    if a.repeats is not None:
        cfg.repeats = a.repeats
    cfg.name = a.name or ("digits_full" if a.full else "digits")
    return cfg


def run(cfg: Config) -> dict:
    """Runs the experiment; writes JSON, markdown and plots; returns the result dict."""
    sw = Stopwatch()
    data = load_data()
    result = {
        "config": {**dataclasses.asdict(cfg), "split": SPLIT},
        "machine": machine_info(),
        "models": {},
        "rows": [],
    }
    for m in cfg.models:
        out = run_model(m, cfg, data, sw)
        result["rows"] += out["rows"]
        if out["deploy"] is not None:
            result["deploy"] = out["deploy"]
        result["models"][m] = {
            "n_weights": out["n_weights"],
            "ranges": out["ranges"],
            "histogram": out["histogram"],
        }
    result["targets"] = target_checks(result["rows"])
    result["phases_s"] = sw.times
    result["wall_s"] = sw.total()
    md = render_markdown(result)
    if cfg.plots:
        result["plots"] = make_plots(result, cfg.out_dir, cfg.name)
    payload = {k: v for k, v in result.items() if k != "models"}
    payload["models"] = {
        m: {"n_weights": d["n_weights"], "calibrated_ranges": d["ranges"]}
        for m, d in result["models"].items()
    }
    result["files"] = write_results(cfg.out_dir, cfg.name, payload, md)
    result["markdown"] = md
    return result


def main(argv=None) -> None:
    cfg = parse_args(argv)
    result = run(cfg)
    print(result["markdown"])
    d = result.get("deploy")
    if d is not None:
        print(
            f"\ndeploy: exported the static-int8 {cfg.models[0]} for cpu/cuda/tpu "
            f"({d['artifact_bytes']:,} bytes), reloaded it in a fresh process (flax imported: "
            f"{d['flax_imported']}): bit-identical {d['bit_identical']}, "
            f"prediction agreement {d['pred_agreement']:.4f}"
        )
    print("\nwrote " + ", ".join(result["files"] + tuple(result.get("plots", []))))


if __name__ == "__main__":
    main()
