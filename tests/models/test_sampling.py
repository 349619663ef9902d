"""Sampling: top-k / top-p filters against NumPy, and cached generation against a loop that reruns
the whole sequence through the full forward pass for every token."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import sampling, transformer
from tests.conftest import slow


def _numpy_filter(logits, top_k, top_p):
    out = logits.copy()
    for row in out:
        order = np.argsort(-row, kind="stable")
        keep = np.zeros(len(row), bool)
        if top_k:
            keep[order[:top_k]] = True
        else:
            keep[:] = True
        weights = np.where(keep, np.exp(row - row.max()), 0.0)  # top-p acts on the top-k renormalised
        probs = weights / weights.sum()
        mass = 0.0
        nucleus = np.zeros(len(row), bool)
        for i in order:
            if keep[i] and mass < top_p:
                nucleus[i] = True
            mass += probs[i]
        row[~(keep & nucleus)] = -np.inf
    return out


class FilterTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_filter_logits_matches_numpy(self):
        for top_k, top_p in [(0, 1.0), (5, 1.0), (0, 0.5), (7, 0.9), (1, 1.0)]:
            logits = np.random.default_rng(top_k).standard_normal((3, 31)).astype(np.float32) * 2
            filtered = self.variant(sampling.filter_logits, static_argnames=("top_k", "top_p"))
            got = np.asarray(filtered(jnp.asarray(logits), top_k=top_k, top_p=top_p))
            np.testing.assert_array_equal(got, _numpy_filter(logits, top_k, top_p))


def _model(positional):
    cfg = transformer.TransformerConfig(vocab_size=23, max_len=24, d_model=32, num_layers=2, num_heads=4,
                                        num_kv_heads=2, d_mlp=48, positional=positional)
    model = transformer.Transformer(cfg)
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    params = jax.tree.map(lambda p: p * 3.0, params)  # sharper distributions: greedy paths are unambiguous
    return cfg, model, params


@pytest.mark.parametrize("positional", ["rope", slow("learned")])
def test_greedy_generation_equals_rerunning_the_full_forward_pass(positional):
    cfg, model, params = _model(positional)
    prompt = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 5)), jnp.int32)
    num_tokens = 9
    cache = model.init_cache(2, 5 + num_tokens)
    got = sampling.generate(model, {"params": params}, prompt, cache, jax.random.key(0), num_tokens=num_tokens, temperature=0.0)
    chex.assert_shape(got, (2, num_tokens))
    forward = jax.jit(lambda tokens: model.apply({"params": params}, tokens))  # one length, one compile
    sequence = jnp.zeros((2, 5 + num_tokens), jnp.int32).at[:, :5].set(prompt)
    for t in range(5, 5 + num_tokens):  # causal: position t - 1 does not see the zeros after it
        sequence = sequence.at[:, t].set(jnp.argmax(forward(sequence)[:, t - 1], axis=-1).astype(jnp.int32))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(sequence[:, 5:]))


@pytest.mark.slow
def test_sampling_is_seeded_and_top_k_1_is_greedy():
    cfg, model, params = _model("rope")
    prompt = jnp.asarray([[1, 2, 3]], jnp.int32)
    run = lambda seed, **kw: np.asarray(sampling.generate(  # noqa: E731
        model, {"params": params}, prompt, model.init_cache(1, 15), jax.random.key(seed), num_tokens=12, **kw))
    assert not np.array_equal(run(0, temperature=2.0), run(1, temperature=2.0))
    np.testing.assert_array_equal(run(3, top_k=1), run(0, temperature=0.0))
    sampled = run(4, top_k=3, temperature=5.0)  # hot, so the three candidates all get drawn
    logits = model.apply({"params": params}, jnp.concatenate([prompt, jnp.asarray(sampled)], axis=1))
    top3 = np.argsort(np.asarray(logits[0, 2:-1]), axis=-1)[:, -3:]  # the full pass's top 3 before each token
    assert all(token in allowed for token, allowed in zip(sampled[0], top3))
    assert len(set(sampled[0].tolist())) > 3 or not np.array_equal(sampled, run(0, temperature=0.0))


def test_every_emitted_token_is_an_independent_uniform_draw_when_the_logits_are_flat():
    """A model with every parameter 0 has logits 0: each of the tokens `generate` emits (the first, from the prompt's
    pass, and each later one) must be uniform over the vocabulary and independent of the others. A step that reused
    another's random key would emit the same token in every row at both steps."""
    cfg, model, params = _model("rope")
    params = jax.tree.map(jnp.zeros_like, params)
    rows, num_tokens = 512, 6
    prompt = jnp.zeros((rows, 3), jnp.int32)
    got = np.asarray(sampling.generate(model, {"params": params}, prompt, model.init_cache(rows, 3 + num_tokens),
                                       jax.random.key(7), num_tokens=num_tokens, temperature=1.0))
    expected = rows / cfg.vocab_size
    for step in range(num_tokens):
        counts = np.bincount(got[:, step], minlength=cfg.vocab_size)
        chi2 = np.sum((counts - expected) ** 2 / expected)  # 22 degrees of freedom: mean 22, sd 6.6
        assert chi2 < 60, (step, counts)
        for later in range(step + 1, num_tokens):
            assert np.mean(got[:, step] == got[:, later]) < 0.12, (step, later)  # 1/23 = 0.043 if independent
