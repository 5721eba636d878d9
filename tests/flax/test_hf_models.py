"""Hugging Face Flax models passed to jq directly (small random-init configs; ``-m hf``).

jq recognises a ``FlaxPreTrainedModel`` by duck typing and runs it through its
own wrapper, so the user passes only ``input_ids`` (or ``pixel_values``). Every
preset runs on GPT-2, BERT and ViT as shipped, with no axis given by hand; the
outputs stay ``ModelOutput`` dataclasses (dicts of their fields once exported).

Needs the ``hf`` extra (``pip install 'jq-quant[hf]'``: transformers<5, the
last line with Flax models). Flax T5 is left out: it calls ``jnp.clip(a_max=)``,
which jax 0.10 rejects. GPT-2's ``FlaxConv1D`` stores kernels (out, in): its
preset tests need per-output-channel axes resolved through the transpose.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jq
from jq import presets
from jq.quantize import QArray

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.hf

PRESETS = ["w8a8_static", "w8a8_dynamic", "w8_weight_only", "w4_weight_only", "fp8"]
# per-preset bound on max |logits - float logits| / max |float logits| (random init, 2 layers;
# int4 groups of 128 on N(0, 0.02) weights: 0.27 measured on ViT)
BOUND = {"w4_weight_only": 0.5, "fp8": 0.15}  # unrelated outputs: about 1 to 2


def _random_init(cls, cfg, shape, seed):
    """The model with HF's own initialisation drawn by numpy (N(0, 0.02) weights, zero biases,
    unit LayerNorm scales): HF's eager init costs seconds of CPU per model, this one nothing."""
    m = cls(cfg, input_shape=shape, _do_init=False)
    shapes = jax.eval_shape(lambda k: m.init_weights(k, shape), jax.random.key(0))
    rng = np.random.RandomState(seed)

    def draw(path, a):
        name = str(getattr(path[-1], "key", path[-1]))
        if name == "scale":
            return jnp.ones(a.shape, a.dtype)
        if name == "bias":
            return jnp.zeros(a.shape, a.dtype)
        return jnp.asarray(rng.normal(0, 0.02, a.shape), a.dtype)

    # (`m.params = ...` is refused for a model made with _do_init=False)
    m._params, m._is_initialized = jax.tree_util.tree_map_with_path(draw, shapes), True
    return m


def _gpt2():
    cfg = transformers.GPT2Config(vocab_size=100, n_positions=16, n_embd=128, n_layer=2, n_head=2)
    m = _random_init(transformers.FlaxGPT2LMHeadModel, cfg, (1, 8), 0)
    return m, jnp.asarray(np.random.RandomState(0).randint(0, 100, (2, 8)), jnp.int32)


def _bert():
    cfg = transformers.BertConfig(
        vocab_size=100,
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=256,
        max_position_embeddings=16,
    )
    m = _random_init(transformers.FlaxBertForMaskedLM, cfg, (1, 8), 1)
    return m, jnp.asarray(np.random.RandomState(1).randint(0, 100, (2, 8)), jnp.int32)


def _vit():
    cfg = transformers.ViTConfig(
        image_size=16,
        patch_size=8,
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=256,
        num_labels=5,
    )
    m = _random_init(transformers.FlaxViTForImageClassification, cfg, (1, 16, 16, 3), 2)
    return m, jax.random.normal(jax.random.key(2), (2, 3, 16, 16))


MAKERS = {"gpt2": _gpt2, "bert": _bert, "vit": _vit}
_MODELS: dict = {}


def model(name):
    """``(hf model, input, float output)``, made once per test session."""
    if name not in _MODELS:
        hf, x = MAKERS[name]()
        _MODELS[name] = hf, x, hf(x)
    return _MODELS[name]


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("name", ["gpt2", "bert", "vit"])
def test_every_preset_runs_as_shipped(name, preset):
    hf, x, ref = model(name)
    qm = jq.quantize_model(hf, None, [x], getattr(presets, preset)(), progress=False)
    out = qm(x)
    assert type(out) is type(ref)  # the model's own ModelOutput
    err = float(jnp.max(jnp.abs(out.logits - ref.logits)) / jnp.max(jnp.abs(ref.logits)))
    assert err < BOUND.get(preset, 0.1), err
    if name == "gpt2":  # the tied head under its own module's name (not transformer/wte)
        assert "lm_head/embedding" in [s.name for s in qm.variables.plan.sites]


def test_tied_heads_are_named_and_skipped():
    """GPT-2's ``wte.T`` head is ``lm_head``; BERT's ``word_embeddings.T`` decoder is
    ``cls/predictions/decoder``; ``skip=`` keeps either float."""
    for name, head in (("gpt2", "lm_head"), ("bert", "cls/predictions/decoder")):
        hf, x, _ = model(name)
        rows = jq.sites(hf, None, presets.w8_weight_only(skip=(head,)), x)
        tied = [r for r in rows if r["module"] == head]
        assert [(r["kind"], r["mode"], r["weight"]) for r in tied] == [("dot", "float", (100, 128))]


def test_hf_model_one_liner_save_load_export(tmp_path):
    """An HF model passed directly: quantize_model, save, load_model (the model object given
    again) and export, whose artifact returns the ModelOutput as a dict of its fields."""
    hf, ids, _ = model("bert")
    qm = jq.quantize_model(hf, None, [ids], presets.w8a8_dynamic(), progress=False)
    y = qm(ids)
    table = qm.variables.variables["bert/embeddings/word_embeddings/embedding"]
    assert isinstance(table, QArray)  # gather and tied decoder share one int8 table
    qm.save(tmp_path / "bert")
    back = jq.load_model(tmp_path / "bert", hf)
    np.testing.assert_array_equal(np.asarray(back(ids).logits), np.asarray(y.logits))
    f = jq.load_exported(qm.export(ids))
    out = f(ids)
    assert isinstance(out, dict) and out["hidden_states"] is None
    np.testing.assert_allclose(np.asarray(out["logits"]), np.asarray(y.logits), atol=1e-4)


def test_hf_through_its_own_wrapper_as_a_function():
    """``lambda p, ids: hf(ids, params=p)`` is the same model as `hf` itself."""
    hf, ids, _ = model("vit")
    fn = lambda p, x: hf(x, params=p)  # noqa: E731
    rules = presets.w8_weight_only()
    a = jq.convert(fn, hf.params, rules, args=(ids,))
    b = jq.convert(hf, None, rules, args=(ids,))
    assert [s.name for s in a.plan.sites] == [s.name for s in b.plan.sites]
    np.testing.assert_array_equal(
        np.asarray(jq.apply(fn, a, ids).logits), np.asarray(jq.apply(hf, b, ids).logits)
    )
