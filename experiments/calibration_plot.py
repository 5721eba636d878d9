"""Histogram of a real hidden activation with the range each calibration method picks.

Trains a small MLP (64 -> 128 -> 64 -> 10, ReLU) on scikit-learn's digits for a
few hundred Adam steps, streams the training set's second hidden activation
(post-ReLU, the input of the last Dense) through each observer in batches of
128, and draws the histogram (log scale) with each observer's range.

    /work/venv/bin/python experiments/calibration_plot.py

Writes ``experiments/results/calibration_ranges.png`` and prints the ranges and
the int8 / uint8 quantization error (MSE on the activation) of each.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
from sklearn.datasets import load_digits

import jq
import jq.calibration as cal

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def init_mlp(key, sizes):
    params = []
    for k, (m, n) in zip(jax.random.split(key, len(sizes) - 1), zip(sizes[:-1], sizes[1:])):
        params.append((jax.random.normal(k, (m, n)) * np.sqrt(2.0 / m), jnp.zeros(n)))
    return params


def forward(params, x):
    acts = []
    for i, (w, b) in enumerate(params):
        x = x @ w + b
        if i < len(params) - 1:
            x = jax.nn.relu(x)
            acts.append(x)
    return x, acts


def train(x, y, steps=400, seed=0):
    params = init_mlp(jax.random.key(seed), [64, 128, 64, 10])
    opt = optax.adam(3e-3)
    state = opt.init(params)

    @jax.jit
    def step(params, state, xb, yb):
        def loss(p):
            logits, _ = forward(p, xb)
            return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

        value, grads = jax.value_and_grad(loss)(params)
        updates, state = opt.update(grads, state)
        return optax.apply_updates(params, updates), state, value

    rng = np.random.default_rng(seed)
    for _ in range(steps):
        idx = rng.choice(len(x), 128, replace=False)
        params, state, _ = step(params, state, x[idx], y[idx])
    return params


def main():
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target
    n_train = 1400
    params = train(x[:n_train], y[:n_train])
    logits, _ = forward(params, x[n_train:])
    acc = float(np.mean(np.argmax(logits, -1) == y[n_train:]))
    _, acts = jax.jit(forward)(params, x[:n_train])
    act = np.asarray(acts[1])  # (1400, 64) post-ReLU hidden activation
    batches = [act[i : i + 128] for i in range(0, len(act) - 127, 128)]

    observers = {
        "min-max": cal.MinMax(),
        "moving avg (c=0.01)": cal.MovingAverageMinMax(0.01),
        "percentile 99.9": cal.Histogram(method="percentile", percentile=99.9),
        "percentile 99.99": cal.Histogram(method="percentile", percentile=99.99),
        "entropy (int8)": cal.Histogram(method="entropy"),
        "MSE (uint8)": cal.Histogram(method="mse", dtype="uint8"),
    }
    spec = jq.QuantSpec("uint8", scheme="affine")
    data = np.concatenate(batches).ravel()
    ranges = {}
    print(f"digits MLP test accuracy {acc:.3f}; activation {act.shape}, {len(batches)} batches")
    print("| method | lo | hi | uint8 affine MSE |")
    print("|---|---|---|---|")
    for name, obs in observers.items():
        state = obs.init(batches[0])
        update = jax.jit(obs.update)
        for b in batches:
            state = update(state, b)
        lo, hi = (float(v) for v in obs.range(state))
        qp = jq.qparams_from_range(lo, hi, spec)
        err = float(np.mean((np.asarray(jq.fake_quant(data, qp, spec)) - data) ** 2))
        ranges[name] = (lo, hi, err)
        print(f"| {name} | {lo:.4f} | {hi:.4f} | {err:.3e} |")

    fig, ax = plt.subplots(figsize=(8, 4.2), dpi=110)
    ax.hist(data, bins=400, color="0.6", log=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for (name, (_lo, hi, err)), color in zip(ranges.items(), colors):
        ax.axvline(hi, color=color, lw=1.5, label=f"{name}: hi={hi:.2f}, MSE={err:.1e}")
    ax.set_xlabel("activation value (digits MLP, hidden layer 2, post-ReLU)")
    ax.set_ylabel("count (log)")
    ax.set_title("Upper end of the range each jq.calibration observer picks")
    ax.legend(fontsize=7.5, loc="upper center")
    fig.tight_layout()
    os.makedirs(OUT, exist_ok=True)
    path = os.path.join(OUT, "calibration_ranges.png")
    fig.savefig(path)
    print("wrote", path)


if __name__ == "__main__":
    main()
