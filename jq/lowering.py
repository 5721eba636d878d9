"""Which integer form jq lowers an 8-bit dot to, per backend and per CPU.

An exact int8 dot ``sum_k a[m, k] b[k, n]`` (int32 accumulation) can be handed
to XLA in several equivalent forms. Which one is fast depends on the hardware,
and on one accelerator the plain form is even wrong, so jq chooses per backend,
in this module only:

=============  ===========================================================  ==========================
form           what XLA sees                                                 chosen for
=============  ===========================================================  ==========================
``u8s8``       ``u8 x s8 -> s32`` (int8 lhs shifted by +128, corrected with  x86 with AVX-512 VNNI,
               ``128 * sum_k b``); M padded to >= 2 by a row of ones that    AVX-VNNI or AMX-INT8
               also yields the weight sums
``s8s8``       ``s8 x s8 -> s32``; M padded to >= 2 (a matrix-vector         x86 without VNNI (AVX2),
               integer dot takes XLA:CPU's slow generic loop)                aarch64, other CPUs
``s8s8_padk``  ``s8 x s8 -> s32`` with the contraction zero-padded to a      GPU and TPU (every
               multiple of ``k_multiple`` (default 4) and tiny free          non-CPU platform)
               dimensions padded to 16
=============  ===========================================================  ==========================

Why (measured, see README "Speed" and ``shared/design.md``):

* XLA:CPU's fast int8 kernels (YNNPACK / oneDNN, built on ``vpdpbusd``) take
  only ``u8 x s8``. On a VNNI Xeon that form runs a static-int8 MLP at
  2.3-3.7x float32; ``s8 x s8`` reaches about 1.5x.
* Without VNNI the same ``u8 x s8`` kernels are 3-7x *slower* than float32,
  while ``s8 x s8`` with M padded to 2 measured 1.75x / 2.23x / 1.34x float32
  at batch 1 / 32 / 256 (AVX2-only x86, 2 threads, jax 0.10.2).
* XLA:GPU (jax 0.11.2, H200) computes ``s8 x s8 -> s32`` wrongly when the
  contraction size is 3; zero-padding the contraction to a multiple of 4 made
  every shape of a 48-shape sweep exact. A tiny ``s32[12, 5]`` dot failed to
  compile ("Couldn't find output tile sizes"): free dimensions below 16 are
  padded.

The CPU's features are read once, without a benchmark: ``/proc/cpuinfo`` on
Linux, else numpy's ``__cpu_features__``. The choice is made when a function
is *traced* (it becomes a parameter of the dot primitive), so an exported
module's ``cpu`` branch carries the form of the machine that exported it;
every non-CPU branch always carries ``s8s8_padk``.

Override, in order of precedence:

* ``with jq.ops.int8_lowering(cpu="s8s8"): ...`` (a context manager; applies to
  functions traced inside it, so re-jit or call ``jax.clear_caches()`` for a
  function that was already compiled);
* the environment variable ``JQ_INT8_CPU_FORM`` (``auto``, ``u8s8``,
  ``s8s8`` or ``s8s8_padk``), read at each trace.

Any form may run on any CPU (they are all exact), which is how the test
suite proves the accelerator form bit-exact without an accelerator.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import os
import platform

import jax

__all__ = [
    "CPU_FORMS",
    "ENV_VAR",
    "CpuFeatures",
    "Lowering",
    "cpu_features",
    "current",
    "int8_lowering",
    "lowering_info",
    "weight_layout",
]

ENV_VAR = "JQ_INT8_CPU_FORM"

CPU_FORMS = {
    "u8s8": "u8 x s8 -> s32 (VNNI form), M padded to 2 by a row of ones giving the weight sums",
    "s8s8": "s8 x s8 -> s32, M padded to 2",
    "s8s8_padk": "s8 x s8 -> s32, contraction zero-padded to a multiple of k_multiple, "
    "free dimensions below 16 padded (the accelerator form)",
}

DEFAULT_K_MULTIPLE = 4
ACCEL_MIN_FREE = 16

# What to expect on each hardware class, from measurements quoted in the README
# (experiments/bench_ops.py and shared/design.md). Ratios are int8 over float32
# of the same engine, static int8 MLP 784-1024x3-10 at batch 1 / 32 / 256.
_EXPECT = {
    "x86-vnni": (
        "measured on a 2-core AVX-512-VNNI Xeon (jax 0.10.2): static int8 MLP "
        "2.3x / 3.7x / 3.5x float32 at batch 1 / 32 / 256; matrix-vector 1.9-2.6x"
    ),
    "x86-avx-vnni": (
        "AVX-VNNI / AMX: the u8 x s8 form reaches XLA:CPU's VNNI kernels; not measured by jq "
        "on this class (expect at least the AVX-512 VNNI figures); run experiments/bench_ops.py"
    ),
    "x86-avx2": (
        "AVX2 without VNNI: XLA:CPU's u8 x s8 kernels are 3-7x slower than float32 here, so "
        "jq uses s8 x s8 with M padded to 2; that form measured 1.75x / 2.23x / 1.34x float32 "
        "at batch 1 / 32 / 256 on an AVX2-only x86 (2 threads, jax 0.10.2)"
    ),
    "aarch64": (
        "aarch64: s8 x s8 with M padded to 2 (XLA:CPU's int8 dot on Arm uses the dot-product "
        "instructions where present); not measured by jq: run experiments/bench_ops.py, and "
        "keep float32 where int8 is not faster"
    ),
    "other": "no measurement for this CPU: run experiments/bench_ops.py before relying on int8 speed",
}

_NO_GAIN = (
    "weight-only int8 / int4 with float activations (presets' activations='float') converts "
    "the weights to float in every call on CPU: it saves memory, not time (about 0.1x float32 "
    "when decoding); the default activations='int8' quantizes each token's activation and runs "
    "the integer dot instead. The uint8 affine dynamic form is slower than symmetric int8 at "
    "batch 1"
)


@dataclasses.dataclass(frozen=True)
class CpuFeatures:
    """What the host CPU can do for 8-bit dots, read once without a benchmark."""

    arch: str  # "x86_64", "aarch64", ...
    flags: frozenset  # lower-case feature names (cpuinfo spelling)
    source: str  # "/proc/cpuinfo", "numpy", or "none"

    @property
    def x86(self) -> bool:
        return self.arch in ("x86_64", "amd64", "i386", "i686")

    @property
    def vnni(self) -> bool:
        """Any x86 int8 dot-product extension: AVX-512 VNNI, AVX-VNNI or AMX-INT8."""
        return bool(self.flags & {"avx512_vnni", "avx_vnni", "amx_int8"})

    @property
    def kind(self) -> str:
        if self.x86:
            if "avx512_vnni" in self.flags:
                return "x86-vnni"
            if self.vnni:
                return "x86-avx-vnni"
            if "avx2" in self.flags:
                return "x86-avx2"
            return "other"
        if self.arch in ("aarch64", "arm64"):
            return "aarch64"
        return "other"


# numpy's __cpu_features__ names -> the /proc/cpuinfo spelling used above
_NUMPY_NAMES = {
    "AVX2": "avx2",
    "AVX512F": "avx512f",
    "AVX512VNNI": "avx512_vnni",
    "AVX512_VNNI": "avx512_vnni",
    "AVXVNNI": "avx_vnni",
    "AVX_VNNI": "avx_vnni",
    "AMX_INT8": "amx_int8",
    "ASIMDDP": "asimddp",
    "I8MM": "i8mm",
}


def _parse_cpuinfo(text: str) -> frozenset:
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            return frozenset(value.split())
    return frozenset()


def _numpy_flags() -> frozenset:
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as feats
    except ImportError:  # numpy < 2
        try:
            from numpy.core._multiarray_umath import __cpu_features__ as feats
        except ImportError:
            return frozenset()
    return frozenset(_NUMPY_NAMES[k] for k, on in feats.items() if on and k in _NUMPY_NAMES)


@functools.cache
def cpu_features() -> CpuFeatures:
    """The host CPU's architecture and its int8-relevant feature flags (cached)."""
    arch = platform.machine().lower()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            flags = _parse_cpuinfo(f.read())
        if flags:
            return CpuFeatures(arch, flags, "/proc/cpuinfo")
    except OSError:
        pass
    flags = _numpy_flags()
    return CpuFeatures(arch, flags, "numpy" if flags else "none")


def _auto_cpu_form(feat: CpuFeatures) -> tuple[str, str]:
    if feat.x86 and feat.vnni:
        have = sorted(feat.flags & {"avx512_vnni", "avx_vnni", "amx_int8"})
        return "u8s8", f"x86 with {', '.join(have)}: XLA:CPU's VNNI kernels take u8 x s8"
    if feat.x86:
        return "s8s8", "x86 without VNNI: XLA:CPU's u8 x s8 is slower than float32 here"
    return "s8s8", f"{feat.arch or 'unknown'} CPU: the signed form, with M padded to 2"


@dataclasses.dataclass(frozen=True)
class Lowering:
    """The forms a dot traced now will use."""

    cpu_form: str  # one of CPU_FORMS
    k_multiple: int  # contraction multiple of the accelerator form
    source: str  # "override", "env" or "auto"
    reason: str


_override: contextvars.ContextVar = contextvars.ContextVar("jq_int8_lowering", default=None)


def _check_form(form, where: str) -> str:
    if form not in CPU_FORMS:
        raise ValueError(
            f"{where}: unknown integer form {form!r}; expected one of "
            f"{', '.join(repr(f) for f in CPU_FORMS)}"
        )
    return form


def _check_k_multiple(k) -> int:
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"int8_lowering: k_multiple must be a positive int, got {k!r}")
    return k


@contextlib.contextmanager
def int8_lowering(cpu: str | None = None, k_multiple: int | None = None):
    """Overrides the integer form for functions traced inside the block.

    Args:
      cpu: the CPU form (``"u8s8"``, ``"s8s8"``, ``"s8s8_padk"``), or None for
        the automatic choice. Every form is exact on every CPU; only speed differs.
      k_multiple: the contraction multiple of the ``s8s8_padk`` form (on
        accelerators, and on CPU when that form is chosen); default 4.

    A function already traced keeps the form it was traced with: `jax.jit`
    caches traces per Python function, so ``jax.jit(f)`` inside the block
    reuses a trace of `f` made outside it (or under another form). Trace a new
    function object to get the block's form, e.g. ``jax.jit(lambda *a: f(*a))``.
    """
    prev = _override.get() or {}
    new = dict(prev)
    if cpu is not None:
        new["cpu"] = _check_form(cpu, "int8_lowering")
    if k_multiple is not None:
        new["k_multiple"] = _check_k_multiple(k_multiple)
    token = _override.set(new)
    try:
        yield
    finally:
        _override.reset(token)


def current() -> Lowering:
    """The forms that a dot traced now will use (override, then env, then auto)."""
    ov = _override.get() or {}
    k = ov.get("k_multiple", DEFAULT_K_MULTIPLE)
    if "cpu" in ov:
        return Lowering(ov["cpu"], k, "override", "set by jq.ops.int8_lowering")
    env = os.environ.get(ENV_VAR, "").strip().lower()
    if env and env != "auto":
        return Lowering(
            _check_form(env, f"environment variable {ENV_VAR}"), k, "env", f"set by {ENV_VAR}={env}"
        )
    form, reason = _auto_cpu_form(cpu_features())
    return Lowering(form, k, "auto", reason)


def lowering_info() -> dict:
    """What jq does with an int8 dot here, and what to expect.

    Returns a dict with the CPU's features, the chosen CPU form and why, the
    accelerator form, the default backend, the JAX version, and a plain-words
    expectation (``expectation``) plus the cases where int8 does not beat float
    on CPU (``no_gain``).
    """
    feat = cpu_features()
    low = current()
    return {
        "jax": jax.__version__,
        "default_backend": jax.default_backend(),
        "cpu": {
            "arch": feat.arch,
            "kind": feat.kind,
            "int8_flags": sorted(
                feat.flags
                & {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm"}
            ),
            "features_from": feat.source,
            "form": low.cpu_form,
            "form_means": CPU_FORMS[low.cpu_form],
            "chosen_by": low.source,
            "reason": low.reason,
            "expectation": _EXPECT[feat.kind],
            "no_gain": _NO_GAIN,
        },
        "accelerator": {
            "form": "s8s8_padk",
            "form_means": CPU_FORMS["s8s8_padk"],
            "k_multiple": low.k_multiple,
            "min_free": ACCEL_MIN_FREE,
            "integer_conv": "patches x the 8-bit dot (no native integer convolution)",
        },
    }


#: `weight_layout` targets: None is the CPU jq runs on.
TARGETS = (None, "cpu", "gpu", "tpu")

# The layout of a 2-D quantized weight that the fast 8-bit dot wants, per CPU class, and what
# it rests on (jq.ops.int8_dot's CPU forms, weight (N, K) = free axis first, K contiguous).
_CPU_LAYOUT = {
    "x86-vnni": (
        "nk",
        "measured (2-core AVX-512 VNNI EPYC, jax 0.10.2, u8s8): the matrix-vector products of "
        "decoding run 1.2-1.5x faster with (N, K) at GPT-2-small widths (768 x 768 to 3072), "
        "1.7x at 4096^2; at M = 256 the layouts tie",
    ),
    "x86-avx2": (
        "nk",
        "measured (AVX2-only x86, jax 0.10.2, s8s8; experiments/results/ops_avx2.md): the "
        "hand-written s8 x s8 MLP with (N, K) and M padded to 2 is the fastest int8 program",
    ),
    "x86-avx-vnni": ("nk", "unmeasured: assumed like AVX-512 VNNI (same u8s8 kernels)"),
    "aarch64": ("kn", "unmeasured: the model's layout until someone runs bench_ops there"),
    "other": ("kn", "unmeasured"),
}


def weight_layout(target: str | None = None) -> str:
    """The layout a quantized 2-D weight is stored in for `target`'s fast 8-bit dot.

    ``"kn"``: contracting axes first, ``(K, N)``; ``"nk"``: free axes first,
    contraction last and contiguous, ``(N, K)``. `jq.convert` stores every
    weight it can move in this layout, whatever the model's own (an HF GPT-2
    ``Conv1D`` kernel is ``(N, K)``, a Flax Dense ``(K, N)``), so that no call
    transposes an int8 weight.

    * ``None`` / ``"cpu"``: per CPU class of this host (`cpu_features`): ``"nk"`` on
      x86 with AVX-512 VNNI (measured: an int8 matrix-vector product, the shape of
      LLM decoding, is 1.2-1.7x faster read as (N, K); large batches tie), on
      AVX2-only x86 (measured: the fastest hand-written s8 x s8 program stores
      (N, K)) and on AVX-VNNI / AMX (assumed like AVX-512 VNNI: unmeasured);
      ``"kn"`` on aarch64 and other CPUs (unmeasured). The reasons are in
      ``_CPU_LAYOUT``; `lowering_info` reports the one in force.
    * ``"gpu"`` / ``"tpu"``: ``"nk"``, the K-contiguous operand of integer
      (IMMA) and fp8 GEMMs.

    Raises:
      ValueError: an unknown target.
    """
    if target not in TARGETS:
        raise ValueError(
            f"jq.lowering.weight_layout: target must be one of "
            f"{', '.join(map(repr, TARGETS))}, got {target!r}"
        )
    if target in ("gpu", "tpu"):
        return "nk"
    return _CPU_LAYOUT[cpu_features().kind][0]
