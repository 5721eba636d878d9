"""One-off: reference ranges and qparams from ONNX Runtime's calibrators and PyTorch's observers.

Run with the reference venv (it has onnxruntime and torch; jq's own venv must not):

    /work/refvenv/bin/python experiments/make_calibration_fixtures.py

Writes ``tests/fixtures/calibration/reference.json``. The inputs are the seeded
batches of ``tests/fixtures/calibration/datasets.py``; every reference sees them
one batch at a time (one ``collect_data`` call per batch for ORT, so its
streaming histogram merge and its moving average are exercised), and for the
per-channel case the histogram calibrators (ORT and torch have no per-channel
histogram) see each channel's column on its own.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import warnings

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
FIX = os.path.join(HERE, "..", "tests", "fixtures", "calibration")
sys.path.insert(0, FIX)
import datasets  # noqa: E402

NUM_BINS = 2048
PERCENTILE = 99.9
EMA = 0.01


# -- ONNX Runtime ----------------------------------------------------------------------------
def _identity_model(path, ndim):
    import onnx
    from onnx import TensorProto, helper

    dims = [f"d{i}" for i in range(ndim)]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, dims)
    node = helper.make_node("Relu", ["x"], ["r"])  # a calibratable op; y = x - relu(-x) chain
    neg = helper.make_node("Neg", ["x"], ["n"])
    relu = helper.make_node("Relu", ["n"], ["rn"])
    sub = helper.make_node("Sub", ["r", "rn"], ["y"])  # y == x exactly
    graph = helper.make_graph([node, neg, relu, sub], "identity", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)


class _Batches:
    def __init__(self, *xs):
        self.items = [{"x": x} for x in reversed(xs)]

    def get_next(self):
        return self.items.pop() if self.items else None

    def __iter__(self):
        return self

    def __next__(self):
        item = self.get_next()
        if item is None:
            raise StopIteration
        return item


def ort_range(xs, method, one_call=False, **extra):
    """Range that ORT's calibrator picks for tensor ``x``.

    Fed one ``collect_data`` call per batch, or all batches in one call with
    `one_call` (ORT's per-channel min-max merge across calls fails: it applies
    Python's ``min`` to arrays).
    """
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

    with tempfile.TemporaryDirectory() as tmp:
        model = os.path.join(tmp, "m.onnx")
        _identity_model(model, xs[0].ndim)
        cal = create_calibrator(
            model,
            None,
            augmented_model_path=os.path.join(tmp, "aug.onnx"),
            calibrate_method=getattr(CalibrationMethod, method),
            extra_options=extra,
        )
        if one_call:
            cal.collect_data(_Batches(*xs))
        else:
            for x in xs:
                cal.collect_data(_Batches(x))
        data = cal.compute_data()
        td = data["x"]
        if method == "Distribution":
            return {"avg": float(td.avg), "std": float(td.std)}
        lo, hi = td.range_value
        return {
            "lo": np.asarray(lo, np.float64).tolist(),
            "hi": np.asarray(hi, np.float64).tolist(),
        }


def ort_scale_zp(lo, hi, qtype, symmetric):
    from onnx import TensorProto
    from onnxruntime.quantization.quant_utils import compute_scale_zp, get_qmin_qmax_for_qType

    qt = {"int8": TensorProto.INT8, "uint8": TensorProto.UINT8}[qtype]
    qmin, qmax = get_qmin_qmax_for_qType(qt, reduce_range=False, symmetric=symmetric)
    zp, scale = compute_scale_zp(np.float32(lo), np.float32(hi), qmin, qmax, symmetric=symmetric)
    return {"scale": float(np.ravel(scale)[0]), "zero_point": int(np.ravel(zp)[0])}


# -- PyTorch ---------------------------------------------------------------------------------
def torch_observers(xs, per_channel):
    import torch
    from torch.ao.quantization import observer as ob

    out = {}
    t = [torch.from_numpy(x) for x in xs]
    kinds = {
        "minmax_affine_uint8": (
            ob.MinMaxObserver,
            dict(dtype=torch.quint8, qscheme=torch.per_tensor_affine),
        ),
        "minmax_symmetric_int8": (
            ob.MinMaxObserver,
            dict(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric),
        ),
        "ema_affine_uint8": (
            ob.MovingAverageMinMaxObserver,
            dict(averaging_constant=EMA, dtype=torch.quint8, qscheme=torch.per_tensor_affine),
        ),
    }
    if per_channel:
        kinds = {
            "minmax_affine_uint8": (
                ob.PerChannelMinMaxObserver,
                dict(ch_axis=1, dtype=torch.quint8, qscheme=torch.per_channel_affine),
            ),
            "minmax_symmetric_int8": (
                ob.PerChannelMinMaxObserver,
                dict(ch_axis=1, dtype=torch.qint8, qscheme=torch.per_channel_symmetric),
            ),
            "ema_affine_uint8": (
                ob.MovingAveragePerChannelMinMaxObserver,
                dict(
                    ch_axis=1,
                    averaging_constant=EMA,
                    dtype=torch.quint8,
                    qscheme=torch.per_channel_affine,
                ),
            ),
        }
    for name, (cls, kw) in kinds.items():
        obs = cls(**kw)
        for x in t:
            obs(x)
        scale, zp = obs.calculate_qparams()
        out[name] = {
            "lo": obs.min_val.double().numpy().tolist(),
            "hi": obs.max_val.double().numpy().tolist(),
            "scale": scale.double().numpy().tolist(),
            "zero_point": zp.long().numpy().tolist(),
        }
    return out


def torch_histogram(xs):
    """HistogramObserver (L2 search, quint8 affine, 2048 bins): the range it picks."""
    import torch
    from torch.ao.quantization import observer as ob

    obs = ob.HistogramObserver(bins=NUM_BINS, dtype=torch.quint8, qscheme=torch.per_tensor_affine)
    for x in xs:
        obs(torch.from_numpy(x))
    if float(obs.max_val) == float(obs.min_val):
        lo, hi = float(obs.min_val), float(obs.max_val)
    else:
        new_min, new_max = obs._non_linear_param_search()
        lo, hi = float(new_min), float(new_max)
    return {"lo": lo, "hi": hi, "bin_width": float(obs.max_val - obs.min_val) / NUM_BINS}


def histogram_refs(xs):
    first_amax = float(np.abs(xs[0]).max())
    refs = {
        # ORT's signed histogram spans [-amax, amax] of the first batch; later batches add
        # bins of the same width
        "ort_bin_width": 2.0 * first_amax / NUM_BINS,
        # 255 levels: symmetric int8; 256: affine int8 / uint8
        "ort_entropy_255": ort_range(
            xs, "Entropy", num_bins=NUM_BINS, num_quantized_bins=255, symmetric=False
        ),
        "ort_entropy_256": ort_range(
            xs, "Entropy", num_bins=NUM_BINS, num_quantized_bins=256, symmetric=False
        ),
        "ort_percentile": ort_range(
            xs, "Percentile", num_bins=NUM_BINS, percentile=PERCENTILE, symmetric=False
        ),
        "ort_percentile_symmetric": ort_range(
            xs, "Percentile", num_bins=NUM_BINS, percentile=PERCENTILE, symmetric=True
        ),
        "ort_distribution": ort_range(xs, "Distribution", num_bins=NUM_BINS),
        "torch_histogram_uint8": torch_histogram(xs),
    }
    return refs


def main():
    warnings.filterwarnings("ignore")
    import onnxruntime
    import torch

    ref = {
        "versions": {
            "onnxruntime": onnxruntime.__version__,
            "torch": torch.__version__,
            "numpy": np.__version__,
        },
        "num_bins": NUM_BINS,
        "percentile": PERCENTILE,
        "averaging_constant": EMA,
        "cases": {},
    }
    for name, (seed, desc) in datasets.CASES.items():
        print("case", name, flush=True)
        xs = datasets.batches(name)
        per_channel = name == "per_channel"
        case = {"seed": seed, "description": desc, "shape": list(xs[0].shape), "batches": len(xs)}
        case["checksum"] = datasets.checksum(xs)
        case["ort_minmax"] = ort_range(xs, "MinMax", per_channel, per_channel=per_channel)
        case["ort_minmax_symmetric"] = ort_range(
            xs, "MinMax", per_channel, per_channel=per_channel, symmetric=True
        )
        case["ort_ema"] = ort_range(
            xs, "MinMax", per_channel=per_channel, moving_average=True, averaging_constant=EMA
        )
        if not per_channel:
            lo, hi = case["ort_minmax"]["lo"], case["ort_minmax"]["hi"]
            case["ort_qparams_uint8_affine"] = ort_scale_zp(lo, hi, "uint8", False)
            case["ort_qparams_int8_symmetric"] = ort_scale_zp(lo, hi, "int8", True)
        case["torch"] = torch_observers(xs, per_channel)
        if per_channel:
            case["channels"] = [
                histogram_refs([np.ascontiguousarray(x[:, c]) for x in xs])
                for c in range(xs[0].shape[1])
            ]
        else:
            case["histogram"] = histogram_refs(xs)
        ref["cases"][name] = case
    path = os.path.join(FIX, "reference.json")
    with open(path, "w") as f:
        json.dump(ref, f, indent=1, sort_keys=True)
    print("wrote", path)


if __name__ == "__main__":
    main()
