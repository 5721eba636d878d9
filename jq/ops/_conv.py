"""`conv_general_dilated`: the quantized convolution, as patches times the weight.

Integer convolutions go through the same exact integer dot as `dot_general`,
on every platform (XLA:CPU's int8 convolution is a slow loop, and XLA:GPU
rejects integer convolutions): the input is dilated and padded with its zero
point (so padding stands for a real 0, as in the float conv), its windows are
gathered by strided slices into patches ``(N, out..., taps * C)``, and the
patches are contracted with the weight reshaped to ``(taps * C, O)`` by
`jq.ops._kernels.int_core` (zero-point terms and long-window splits included).
With feature groups the group is a batch axis of that dot. An 8-bit input is
shifted once, before the patches, to the lhs type of the dot's form on the
platform (uint8 for the CPU's ``u8s8`` form, int8 elsewhere); the choice is
made by `jax.lax.platform_dependent`, so one exported module carries both.

fp16 / bf16 / fp8 `QArray`s use the native convolution in their format with
float32 accumulation; a float operand and a `QArray` (weight-only) dequantize
the `QArray` in the float operand's dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jq import lowering
from jq.ops._float_operands import Geometry, float_operands
from jq.ops._kernels import int_core, int_values
from jq.ops._operands import check_operand, check_spec_args, param_layout, result_dtype
from jq.ops.int8_dot import flip_top_bit
from jq.qparams import QParams, QuantSpec
from jq.quantize import QArray, dequantize


def _conv_dn(lhs_ndim, dimension_numbers):
    return jax.lax.conv_dimension_numbers((1,) * lhs_ndim, (1,) * lhs_ndim, dimension_numbers)


def _conv_geometry(a: dict, lhs, rhs) -> Geometry:
    cdn = _conv_dn(len(lhs.shape), a["dimension_numbers"])
    kw = dict(
        window_strides=a["window_strides"],
        padding=a["padding"],
        lhs_dilation=a["lhs_dilation"],
        rhs_dilation=a["rhs_dilation"],
        dimension_numbers=cdn,
    )

    def float_op(x, w):
        return jax.lax.conv_general_dilated(
            x,
            w,
            **kw,
            feature_group_count=a["feature_group_count"],
            batch_group_count=a["batch_group_count"],
            precision=a["precision"],
            preferred_element_type=jnp.float32,
        )

    def reach(side, ok):
        out_nd = len(cdn.out_spec)
        if side == "rhs":  # a bad weight reaches every output of its output feature
            shape = [1] * out_nd
            shape[cdn.out_spec[1]] = ok.shape[cdn.rhs_spec[0]]
            return jnp.reshape(~ok, shape)
        # a bad input pixel reaches the outputs whose window covers it: a max over the
        # conv's windows of the bad-pixel map (no float convolution in the module)
        lsp, rsp, osp = cdn
        nsp = len(lsp) - 2
        ksize = tuple(rhs.shape[ax] for ax in rsp[2:])
        strides = tuple(a["window_strides"])
        rdil = tuple(a["rhs_dilation"] or (1,) * nsp)
        ldil = tuple(a["lhs_dilation"] or (1,) * nsp)
        pads = a["padding"]
        if isinstance(pads, str):  # as jax.lax.conv_general_dilated resolves it
            eff = tuple((k - 1) * d + 1 for k, d in zip(ksize, rdil, strict=True))
            pads = jax.lax.padtype_to_pads(
                tuple(lhs.shape[ax] for ax in lsp[2:]), eff, strides, pads
            )
        win, st, pad, bdil, wdil = (
            [1] * out_nd,
            [1] * out_nd,
            [(0, 0)] * out_nd,
            [1] * out_nd,
            [1] * out_nd,
        )
        for i, ax in enumerate(lsp[2:]):
            win[ax], st[ax], pad[ax] = ksize[i], strides[i], tuple(pads[i])
            bdil[ax], wdil[ax] = ldil[i], rdil[i]
        bad = (~ok).astype(jnp.float32)
        groups = a["feature_group_count"]
        if groups > 1:  # `ok` per element: a bad input reaches its own group's outputs only
            f = lsp[1]
            bad = bad.reshape(bad.shape[:f] + (groups, -1) + bad.shape[f + 1 :]).max(axis=f + 1)
        bad = jax.lax.reduce_window(bad, 0.0, jax.lax.max, win, st, pad, bdil, wdil)
        perm = [0] * out_nd
        for j in range(out_nd):  # lhs layout -> output layout (same roles, other order)
            perm[osp[j]] = lsp[j]
        bad = jnp.transpose(bad, perm)
        if groups > 1:  # each group's map to its O / G output features
            bad = jnp.repeat(bad, rhs.shape[rsp[0]] // groups, axis=osp[1])
        return bad > 0.5

    lhs_contract = tuple(cdn.lhs_spec[1:])
    rhs_contract = (cdn.rhs_spec[1],) + tuple(cdn.rhs_spec[2:])
    # an input row is a pixel (its feature vector; each element when features are grouped,
    # so that a bad value spoils only its own group); a weight row, an output feature's kernel
    lhs_rows = (cdn.lhs_spec[1],) if a["feature_group_count"] == 1 else ()
    rows = {"lhs": lhs_rows, "rhs": rhs_contract}
    return Geometry({"lhs": lhs_contract, "rhs": rhs_contract}, rows, float_op, reach)


@float_operands(_conv_geometry)  # quantizes a float lhs / rhs with a spec (see there)
def conv_general_dilated(
    lhs,
    rhs,
    window_strides: Sequence[int],
    padding,
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers=None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision=None,
    preferred_element_type=None,
    *,
    lhs_spec: QuantSpec | None = None,
    lhs_qparams: QParams | None = None,
    rhs_spec: QuantSpec | None = None,
) -> jax.Array:
    """Quantized `jax.lax.conv_general_dilated`: same signature and layout.

    Integer path: ``conv(q_l, q_r)`` with int32 accumulation, then the scales
    folded on the output. The lhs scale may vary only along the batch axis
    (per tensor or per example); the rhs scale only along the output-feature
    axis. Zero points: padding and dilation holes take the input's zero point
    (they stand for a real 0, as in the float conv), and over each window::

        sum_win (q_l - Z_l)(q_r - Z_r) = sum_win q_l q_r - Z_r sum_win q_l
                                         - Z_l sum_win q_r + |win| Z_l Z_r

    computed as patches times the weight by the exact integer dot (see
    `jq.ops._conv`).

    Args:
      lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
        dimension_numbers, feature_group_count, batch_group_count, precision:
        as in `jax.lax.conv_general_dilated`.
      preferred_element_type: result dtype when floating; else float32.
      lhs_spec, lhs_qparams, rhs_spec: as in `dot_general`.

    Returns:
      The convolution in the layout `dimension_numbers` gives.

    Raises:
      ValueError: a scale on a contracted axis (input features, spatial axes),
        mismatched formats, or `batch_group_count > 1` with quantized operands.
    """
    lhs = check_operand(lhs, "lhs")
    rhs = check_operand(rhs, "rhs")
    cdn = _conv_dn(len(lhs.shape), dimension_numbers)
    check_spec_args("lhs", lhs, lhs_spec, lhs_qparams)
    check_spec_args("rhs", rhs, rhs_spec, None)
    kw = dict(
        window_strides=window_strides,
        padding=padding,
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=cdn,
        feature_group_count=feature_group_count,
        batch_group_count=batch_group_count,
    )
    lq, rq = isinstance(lhs, QArray), isinstance(rhs, QArray)
    if not lq and not rq:
        return jax.lax.conv_general_dilated(
            lhs, rhs, precision=precision, preferred_element_type=preferred_element_type, **kw
        )
    out_dtype = result_dtype(preferred_element_type)
    if batch_group_count != 1:
        raise ValueError(
            "conv_general_dilated: batch_group_count > 1 is not supported with QArrays"
        )
    out_spec = cdn.out_spec

    def check(q, allowed, name):
        channel, baxis, _ = param_layout(q, name)
        for a in channel + ((baxis,) if baxis is not None else ()):
            if a != allowed and q.shape[a] > 1:
                raise ValueError(
                    f"conv_general_dilated: `{name}` has a per-channel or per-block scale on axis "
                    f"{a}, which is contracted (or not supported) by the convolution; only axis "
                    f"{allowed} may carry a scale"
                )

    def fold(p, axis, target):
        nd = len(out_spec)
        shape = [1] * nd
        shape[target] = p.shape[axis]
        return jnp.reshape(jnp.moveaxis(p, axis, 0).reshape(p.shape[axis], -1)[:, 0], shape)

    if lq and rq:
        li, ri = lhs.fmt.is_integer, rhs.fmt.is_integer
        if li != ri:
            raise ValueError(
                f"cannot combine an lhs in format {lhs.format!r} with an rhs in format "
                f"{rhs.format!r}: both must be integer formats or both float formats"
            )
        check(lhs, cdn.lhs_spec[0], "lhs")
        check(rhs, cdn.rhs_spec[0], "rhs")
        scale = fold(lhs.scale.astype(jnp.float32), cdn.lhs_spec[0], out_spec[0]) * fold(
            rhs.scale.astype(jnp.float32), cdn.rhs_spec[0], out_spec[1]
        )
        if not li:
            acc = jax.lax.conv_general_dilated(
                lhs.value, rhs.value, precision=precision, preferred_element_type=jnp.float32, **kw
            )
            return (acc * scale).astype(out_dtype)
        vl, zl = int_values(lhs)
        vr, zr = int_values(rhs)
        # every platform: patches x weight through the exact integer dot (XLA:CPU's int8
        # convolution is a slow loop, and XLA:GPU rejects integer convolutions)
        # the input is shifted once, before the patches, to the lhs type of the form that
        # runs there: uint8 for the CPU's u8s8 form, int8 on GPU / TPU and other CPUs
        cpu_lhs = jnp.uint8 if lowering.current().cpu_form == "u8s8" else jnp.int8
        acc = jax.lax.platform_dependent(
            vl,
            vr,
            cpu=lambda vl, vr: _conv_patches(vl, zl, vr, zr, cdn, kw, feature_group_count, cpu_lhs),
            default=lambda vl, vr: _conv_patches(
                vl, zl, vr, zr, cdn, kw, feature_group_count, jnp.int8
            ),
        )
        return (acc * scale).astype(out_dtype)
    # weight-only (or activation-only): dequantize the QArray in the float operand's dtype
    if rq:
        check(rhs, cdn.rhs_spec[0], "rhs")
        w = dequantize(rhs, jnp.float32).astype(lhs.dtype)
        x = lhs
    else:
        check(lhs, cdn.lhs_spec[0], "lhs")
        x = dequantize(lhs, jnp.float32).astype(rhs.dtype)
        w = rhs
    acc = jax.lax.conv_general_dilated(
        x, w, precision=precision, preferred_element_type=jnp.float32, **kw
    )
    return acc.astype(out_dtype)


def _conv_patches(vl, zl, vr, zr, cdn, kw, groups: int, want) -> jax.Array:
    """Integer conv as patches x weight through the exact integer dot (float32, output layout).

    The input is dilated (``lhs_dilation``) and padded with its zero point
    (holes and padding stand for a real 0, as in the float conv), the window
    offsets are gathered by strided slices into ``(N, out..., taps * C)`` and
    contracted with the weight reshaped to ``(taps * C, O)``: one `int_core`
    dot, zero-point terms and long-window splits included. With feature groups
    the group is a batch axis of that dot: ``(G, N, out..., taps * C/G) x (G,
    taps * C/G, O/G)``. An 8-bit input is shifted once, before the patches, to
    `want` (the lhs type of the dot's form on this platform), not per tap.
    """
    lspec, rspec, ospec = cdn
    nsp = len(lspec) - 2
    perm = (lspec[0], *lspec[2:], lspec[1])
    x = jnp.transpose(vl, perm)  # N, spatial..., C
    w = jnp.transpose(vr, (*rspec[2:], rspec[1], rspec[0]))  # spatial..., C/G, O
    zl = None if zl is None else jnp.transpose(zl.astype(jnp.int32), perm)  # (N | 1, 1, ..., 1)
    if x.dtype in (jnp.int8, jnp.uint8) and x.dtype != want:
        x = flip_top_bit(x, want)  # x' = x + 128 (int8 -> uint8) or x - 128
        shift = 128 if want == jnp.uint8 else -128
        zl = jnp.full((1,) * x.ndim, shift, jnp.int32) if zl is None else zl + shift
    ksize = w.shape[:nsp]
    strides = tuple(kw["window_strides"])
    rdil = tuple(kw["rhs_dilation"] or (1,) * nsp)
    ldil = tuple(kw["lhs_dilation"] or (1,) * nsp)
    eff = tuple((k - 1) * d + 1 for k, d in zip(ksize, rdil, strict=True))
    pads = kw["padding"]
    if isinstance(pads, str):  # as jax.lax.conv_general_dilated resolves it
        pads = jax.lax.padtype_to_pads(x.shape[1:-1], eff, strides, pads)
    cfg = (
        [(0, 0, 0)]
        + [(lo, hi, d - 1) for (lo, hi), d in zip(pads, ldil, strict=True)]
        + [(0, 0, 0)]
    )
    if zl is None or zl.size == 1:
        padval = jnp.zeros((), x.dtype) if zl is None else zl.reshape(()).astype(x.dtype)
        x = jax.lax.pad(x, padval, cfg)
    else:  # a zero point per example: pad with 0, then put each example's zero point in
        real = jax.lax.pad(jnp.ones((1,) + x.shape[1:-1] + (1,), jnp.bool_), False, cfg)
        x = jnp.where(real, jax.lax.pad(x, jnp.zeros((), x.dtype), cfg), zl.astype(x.dtype))
    # quantize once: without the barrier XLA re-quantizes the float input per tap
    x = jax.lax.optimization_barrier(x)
    out_sp = tuple((x.shape[1 + i] - eff[i]) // strides[i] + 1 for i in range(nsp))
    taps = []
    for offs in np.ndindex(*ksize):
        start = (0,) + tuple(o * d for o, d in zip(offs, rdil, strict=True)) + (0,)
        limit = (
            (x.shape[0],)
            + tuple(
                st + (n - 1) * s + 1 for st, n, s in zip(start[1:-1], out_sp, strides, strict=True)
            )
            + (x.shape[-1],)
        )
        taps.append(jax.lax.slice(x, start, limit, (1,) + strides + (1,)))
    patches = jnp.concatenate(taps, axis=-1) if len(taps) > 1 else taps[0]  # (..., taps * C)
    n_out = w.shape[-1]
    zl2 = None if zl is None else zl.reshape(zl.shape[:1] + (1,) * (patches.ndim - 1))
    if groups == 1:
        w2 = w.reshape(-1, n_out)
        dn = (((patches.ndim - 1,), (0,)), ((), ()))
        zr2 = None if zr is None else zr.reshape(1, -1)
        acc = int_core(patches, zl2, w2, zr2, dn).astype(jnp.float32)  # N, out..., O
    else:
        cg, og, ntaps = x.shape[-1] // groups, n_out // groups, len(taps)
        p = patches.reshape(patches.shape[:-1] + (ntaps, groups, cg))
        p = jnp.moveaxis(p, -2, 0).reshape((groups,) + patches.shape[:-1] + (ntaps * cg,))
        w2 = w.reshape(ntaps, cg, groups, og).transpose(2, 0, 1, 3).reshape(groups, ntaps * cg, og)
        dn = (((p.ndim - 1,), (1,)), ((0,), (0,)))
        zl2 = None if zl2 is None else zl2[None]
        zr2 = None
        if zr is not None:
            zr2 = zr.reshape(groups, 1, og) if zr.size > 1 else zr.reshape(1, 1, 1)
        acc = int_core(p, zl2, w2, zr2, dn).astype(jnp.float32)  # G, N, out..., O/G
        acc = jnp.moveaxis(acc, 0, -2).reshape(acc.shape[1:-1] + (n_out,))
    # to the requested output layout
    cur = (ospec[0], *ospec[2:], ospec[1])
    return jnp.transpose(acc, np.argsort(cur))
