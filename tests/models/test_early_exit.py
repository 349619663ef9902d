"""Early exit (models/early_exit.py): exit logits against truncated transformers, threshold exits against a
layer-by-layer reference loop with frozen states, decoding against the full pass, CALM's depth-weighted loss, and
training through the trainer on a mesh."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import losses
from experiments.training import metrics_writer
from models import blocks, early_exit, transformer
from tests.conftest import assert_mesh_run_matches_one_device, decode_in_pieces, make_tiny_lm_config


def _model(**overrides):
    keys = dict(vocab_size=23, max_len=16, d_model=24, num_layers=4, d_mlp=40, num_heads=3, num_kv_heads=1,
                head_dim=8, exit_every=1)
    cfg = transformer.TransformerConfig(**{**keys, **overrides})
    model = transformer.Transformer(cfg)
    tokens = jax.random.randint(jax.random.key(0), (2, 11), 0, cfg.vocab_size)
    return cfg, model, nn.meta.unbox(jax.jit(model.init)(jax.random.key(1), tokens)["params"]), tokens


def _plain(cfg, params, segments):
    """A plain transformer made of the first `segments` segments' blocks, with the same embedding and head."""
    stacked = jax.tree.map(lambda *w: jnp.concatenate(w), *[params[f"segment_{j}"] for j in range(segments)])
    plain_cfg = dataclasses.replace(cfg, num_layers=segments * cfg.exit_every, exit_every=0, exit_threshold=0.0)
    plain = {**{k: v for k, v in params.items() if not k.startswith("segment_")}, "layers": stacked}
    return transformer.Transformer(plain_cfg), plain


@pytest.mark.slow  # the default suite keeps the threshold exits against the layer-by-layer loop, and decoding
def test_each_exit_gives_the_logits_of_the_transformer_truncated_there():
    cfg, model, params, tokens = _model(exit_every=2)
    final, written = model.apply({"params": params}, tokens, mutable=[early_exit.COLLECTION])
    (exit_logits,) = written[early_exit.COLLECTION]["logits"]
    for segments, got in ((1, exit_logits), (2, final)):
        plain, plain_params = _plain(cfg, params, segments)
        np.testing.assert_allclose(got, plain.apply({"params": plain_params}, tokens), rtol=1e-5, atol=1e-5)


def _reference(cfg, model, params, tokens, threshold):
    """Layer by layer: each block on the whole sequence, exited positions' states kept; after each layer but the last,
    positions whose max probability (float64) reaches the threshold exit."""
    head = lambda h: np.asarray(model.apply({"params": params}, h, method=lambda m, h: m.logits(m.final_norm(h))),  # noqa: E731
                                np.float64)
    x = model.apply({"params": params}, tokens, method=lambda m, t: m.embed_tokens(t))
    exited = np.zeros(tokens.shape, bool)
    used = np.full(tokens.shape, cfg.num_layers)
    for layer in range(cfg.num_layers):
        layer_params = jax.tree.map(lambda w: w[0], params[f"segment_{layer}"])
        y, _ = blocks.Block(cfg).apply({"params": layer_params}, x, None, 0)
        x = jnp.where(exited[..., None], x, y)
        if layer < cfg.num_layers - 1:
            logits = head(x)
            p = np.exp(logits - logits.max(-1, keepdims=True))
            leaving = (p.max(-1) / p.sum(-1) >= threshold) & ~exited
            used[leaving], exited = layer + 1, exited | leaving
    return head(x), used


@pytest.fixture(scope="module")
def exiting_model():
    """A 4-layer model with a threshold that stops some positions after each of the first three layers."""
    cfg, model, params, tokens = _model()
    confidences = []
    _, written = model.apply({"params": params}, tokens, mutable=[early_exit.COLLECTION])
    for logits in written[early_exit.COLLECTION]["logits"]:
        confidences.append(np.asarray(jax.nn.softmax(logits).max(-1)))
    threshold = float(np.quantile(np.concatenate([c.ravel() for c in confidences]), 0.75))
    cfg = dataclasses.replace(cfg, exit_threshold=threshold)
    return cfg, transformer.Transformer(cfg), params, tokens


def test_threshold_exits_equal_a_layer_by_layer_loop_with_frozen_states(exiting_model):
    cfg, model, params, tokens = exiting_model
    want_logits, want_used = _reference(cfg, model, params, tokens, cfg.exit_threshold)
    np.testing.assert_allclose(model.apply({"params": params}, tokens), want_logits, rtol=1e-5, atol=1e-5)
    used = np.asarray(model.apply({"params": params}, tokens, method=model.layers_used))
    np.testing.assert_array_equal(used, want_used)
    assert len(set(used.ravel().tolist())) >= 3, used  # several exit depths exercised
    _, written = model.apply({"params": params}, tokens, mutable=[early_exit.COLLECTION])
    assert len(written[early_exit.COLLECTION]["logits"]) == cfg.num_layers // cfg.exit_every - 1  # none after the last


def test_decoding_with_early_exit_equals_the_full_pass(exiting_model):
    """The exited tokens' later keys and values come from their frozen states, in the cache as in the full pass."""
    cfg, model, params, tokens = exiting_model
    got, _ = decode_in_pieces(model, params, tokens, model.init_cache(2, cfg.max_len), (5, 1, 1, 1, 1, 1, 1))
    np.testing.assert_allclose(got, model.apply({"params": params}, tokens), rtol=1e-4, atol=1e-4)


def _confidence_reference(criterion, logits):
    """float64: (the measure, whether larger is more confident) of CALM's three confidence measures."""
    z = np.asarray(logits, np.float64)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    ranked = -np.sort(-p, axis=-1)
    return {"max_prob": (ranked[..., 0], True), "softmax_diff": (ranked[..., 0] - ranked[..., 1], True),
            "entropy": (-(p * np.log(p)).sum(-1), False)}[criterion]


@pytest.mark.parametrize("criterion", early_exit.CRITERIA)
def test_each_confidence_measure_against_float64(criterion):
    """Thresholds at the measure's quartiles, on logits of several scales (peaked and flat rows), over a vocabulary
    that is not a power of two."""
    logits = jax.random.normal(jax.random.key(3), (3, 40, 37)) * jnp.array([0.3, 2.0, 6.0])[:, None, None]
    measure, larger_is_confident = _confidence_reference(criterion, logits)
    for threshold in np.quantile(measure, [0.25, 0.5, 0.75]):
        cfg = transformer.TransformerConfig(exit_every=1, exit_criterion=criterion, exit_threshold=float(threshold))
        want = measure >= threshold if larger_is_confident else measure <= threshold
        far = np.abs(measure - threshold) > 1e-5  # float32 against float64 at the threshold itself
        got = np.asarray(early_exit.confident(cfg, logits))
        np.testing.assert_array_equal(got[far], want[far])
        assert 0 < want.mean() < 1


def test_the_loss_weights_each_exit_by_its_depth():
    exits, final = [jnp.asarray(2.0), jnp.asarray(5.0)], jnp.asarray(3.0)
    np.testing.assert_allclose(losses.exit_weighted(final, exits), (1 * 2.0 + 2 * 5.0 + 3 * 3.0) / 6, rtol=1e-6)
    np.testing.assert_allclose(losses.exit_weighted(final, []), 3.0, rtol=1e-6)


@pytest.mark.slow
def test_trains_with_the_one_device_losses_on_a_2x2x2_mesh_and_logs_each_exit(tmp_path):
    def config():
        c = make_tiny_lm_config()
        c.model.update(exit_every=1)
        return c
    assert_mesh_run_matches_one_device(config, tmp_path)
    last = [e for e in metrics_writer.read(str(tmp_path / "mesh")) if e["split"] == "train"][-1]
    assert np.isfinite(last["exit_loss/1"]) and last["exit_loss/1"] != last["loss"]  # scored apart from the output


@pytest.mark.parametrize("overrides,message", [
    (dict(num_layers=3, exit_every=2), "model.num_layers=3 must be a multiple of model.exit_every=2"),
    (dict(exit_every=0, exit_threshold=0.5), "model.exit_threshold=0.5 needs model.exit_every > 0"),
    (dict(exit_threshold=1.5), "is a probability under exit_criterion='max_prob'"),
    (dict(exit_threshold=1.5, exit_criterion="softmax_diff"), "is a probability under exit_criterion='softmax_diff'"),
    (dict(name="mod"), "model.exit_every=1 is the transformer's"),
])
def test_bad_configs_are_one_line_errors(overrides, message):
    keys = dict(num_layers=4, exit_every=1)
    problems = early_exit.validate(transformer.TransformerConfig(**{**keys, **overrides}))
    assert any(message in p for p in problems), problems


@pytest.mark.parametrize("criterion", ["max_prob", "softmax_diff"])
def test_a_probability_threshold_of_exactly_1_is_valid(criterion):
    """1 is a probability (no token exits early unless it is certain): only thresholds above it are refused."""
    cfg = transformer.TransformerConfig(num_layers=4, exit_every=1, exit_criterion=criterion, exit_threshold=1.0)
    assert early_exit.validate(cfg) == []
