"""Feature dashboards (experiments/analysis/sae_dashboard.py) and the Fourier reading of latents
(experiments/analysis/progress_measures.frequency_shares): the top contexts are the largest activations, the direct logit
effect of an mlp_hidden direction is what steering the last layer's MLP by it does to a norm-free model's logits,
and a planted single-frequency map is all at its frequency."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from experiments.analysis import progress_measures, sae_dashboard, steering
from models import transformer


def test_top_contexts_are_the_largest_activations_with_their_shading():
    rng = np.random.default_rng(0)
    acts = np.maximum(rng.normal(size=(5, 30, 3)), 0)
    tokens = rng.integers(0, 9, size=(5, 30))
    found = sae_dashboard.top_contexts(acts, tokens, 1, 4, None)
    order = np.argsort(-acts[..., 1], axis=None)[:4]
    assert [(n, t) for n, t, _ in found] == [tuple(int(i) for i in np.unravel_index(f, (5, 30))) for f in order]
    n, t, context = found[0]
    assert len(context) == min(t + 1, sae_dashboard.WINDOW)
    assert context[-1] == (tokens[n, t], pytest.approx(acts[n, t, 1]))
    assert [v for _, v in context] == pytest.approx(list(acts[n, t + 1 - len(context):t + 1, 1]))
    one_position = sae_dashboard.top_contexts(acts[:, :1], tokens[:, :3], 0, 2, -1)  # a store at position -1
    assert all(t == 2 and len(c) == 3 and c[0][1] == 0 and c[1][1] == 0 for _, t, c in one_position)


@pytest.mark.slow  # the default suite's budget
def test_the_logit_effect_of_an_mlp_hidden_direction_is_steering_the_last_mlp():
    cfg = transformer.TransformerConfig(vocab_size=11, max_len=8, d_model=16, num_layers=2, num_heads=2, d_mlp=24,
                                        norm="none", activation="relu", mlp_bias=True)
    model = transformer.Transformer(cfg)
    tokens = jax.random.randint(jax.random.key(0), (2, 5), 0, 11)
    variables = {"params": nn.meta.unbox(jax.jit(model.init)(jax.random.key(1), tokens)["params"])}
    direction = jax.random.normal(jax.random.key(2), (24,))
    effect = sae_dashboard.logit_effects(model, variables, 1, "mlp_hidden", direction[None])[0]
    tree = steering.steering_tree(model, variables, tokens, 1, direction, 1.0, site="mlp_hidden")
    shift = model.apply(steering.steered(variables, tree), tokens) - model.apply(variables, tokens)
    np.testing.assert_allclose(shift, np.broadcast_to(effect, shift.shape), rtol=1e-4, atol=1e-4)


def test_frequency_shares_of_planted_maps():
    p = 13
    a, b = np.meshgrid(np.arange(p), np.arange(p), indexing="ij")
    w = 2 * np.pi / p
    maps = np.stack([np.cos(w * 3 * (a + b)) + 2.0, np.sin(w * 5 * a) + np.cos(w * 2 * b), 0 * a], -1)
    shares = progress_measures.frequency_shares(maps.astype(float))
    np.testing.assert_allclose(shares[0], np.eye(6)[2], atol=1e-12)
    np.testing.assert_allclose(shares[1], 0.5 * np.eye(6)[4] + 0.5 * np.eye(6)[1], atol=1e-12)
    np.testing.assert_array_equal(shares[2], 0)
