"""README claims about compilation, each shown here: `QuantizedModel.apply` is jitted once
per input signature and cached; calibration compiles one step per batch signature, kept for
later calls with the same model and rules."""

import flax.linen as nn
import jax
import numpy as np

import jq

CALLS = []


class Counting(nn.Module):
    @nn.compact
    def __call__(self, x):
        CALLS.append(1)  # runs once per trace of the model
        return nn.Dense(3)(nn.relu(nn.Dense(5)(x)))


def _traces(f):
    CALLS.clear()
    f()
    return len(CALLS)


def test_quantized_model_apply_traces_once_per_input_signature():
    m = Counting()
    x = np.random.RandomState(0).randn(2, 4).astype(np.float32)
    v = m.init(jax.random.key(0), x)
    qm = jq.quantize_model(m, v, [x], jq.presets.w8a8_dynamic())
    assert _traces(lambda: qm.apply(x)) >= 1
    assert _traces(lambda: qm.apply(x + 1.0)) == 0  # same signature: cached
    assert _traces(lambda: qm.apply(np.ones((3, 4), np.float32))) >= 1  # a new one traces


def test_calibration_compiles_one_step_per_batch_signature_and_keeps_it():
    m = Counting()
    xs = [np.random.RandomState(s).randn(2, 4).astype(np.float32) for s in range(3)]
    v = m.init(jax.random.key(1), xs[0])
    rules = jq.presets.w8a8_static()
    first = _traces(lambda: jq.calibrate(m, v, rules, xs[:1], progress=False))
    # more batches of the same signature, then the same call again: no new step
    again = _traces(lambda: jq.calibrate(m, v, rules, xs, progress=False))
    assert again < first
    assert _traces(lambda: jq.calibrate(m, v, rules, xs, progress=False)) == again
