"""Coconut's cached latent loop against a naive loop that reruns the whole prefix for every thought."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data import reasoning as R
from experiments.training import validation
from experiments.configs import base
from models import coconut
from tests.conftest import slow

BOT_AT, K, LENGTH, VOCAB = 5, 4, 15, 24


CONV = dict(short_conv=4)  # a short conv before each attention (models/short_conv.py)


def make_model(thoughts="latent", **overrides):
    keys = dict(vocab_size=VOCAB, max_len=LENGTH, d_model=32, num_layers=2, num_heads=3, num_kv_heads=1,
                head_dim=8, d_mlp=48, bot_position=BOT_AT, max_thoughts=K, thought_token=R.THOUGHT,
                pad_token=R.PAD, eot_token=R.EOT, thoughts=thoughts)
    cfg = coconut.CoconutConfig(**{**keys, **overrides})
    return coconut.Coconut(cfg)


@functools.lru_cache
def forward(thoughts="latent", **overrides):
    """The jitted full forward pass (cached latent loop) of make_model(thoughts)."""
    return jax.jit(make_model(thoughts, **overrides).apply)


@functools.lru_cache
def init_variables(seed=0, backbone=()):
    """backbone: model overrides as a tuple of items (CONV's: the convs get random kernels, zero at init)."""
    variables = jax.jit(make_model(**dict(backbone)).init)(jax.random.PRNGKey(seed), make_tokens())
    keys = iter(jax.random.split(jax.random.PRNGKey(seed + 100), 64))
    return jax.tree_util.tree_map_with_path(
        lambda p, x: 0.3 * jax.random.normal(next(keys), x.shape) if "short_conv" in jax.tree_util.keystr(p) else x,
        variables)


def make_tokens(seed=0):
    """3 rows: left padding, and 4, 2 and 3 thoughts after <bot> (so <eot> and steps fall inside the loop)."""
    tokens = np.random.default_rng(seed).integers(6, VOCAB, (3, LENGTH)).astype(np.int32)
    tokens[:, BOT_AT] = R.BOT
    tokens[0, :2] = R.PAD
    tokens[1, :1] = R.PAD
    tokens[:, -2:] = R.PAD  # right padding
    for row, k in enumerate((4, 2, 3)):
        tokens[row, BOT_AT + 1:BOT_AT + 1 + k] = R.THOUGHT
        tokens[row, BOT_AT + 1 + k] = R.EOT
    return jnp.asarray(tokens)


def naive_logits(model, variables, tokens, latent=True, offsets=None):
    """For every thought position in order: a full uncached pass, then its input := the previous hidden
    (+ offsets[:, t], to differentiate with respect to the thoughts)."""
    columns = tuple(int(t) for t in np.nonzero(np.any(np.asarray(tokens) == R.THOUGHT, axis=0))[0])
    return _naive_logits(model, variables, tokens, latent, offsets, columns)


@functools.partial(jax.jit, static_argnums=(0, 3, 5))
def _naive_logits(model, variables, tokens, latent, offsets, columns):
    key_mask = tokens != R.PAD
    full = lambda x: model.apply(variables, x, None, 0, key_mask, method=coconut.Coconut.run)[0]  # noqa: E731
    x = model.apply(variables, tokens, method=coconut.Coconut.embed)
    offsets = jnp.zeros_like(x) if offsets is None else offsets
    for t in columns:  # the positions where some row has a thought
        if latent:
            is_thought = (tokens[:, t] == R.THOUGHT)[:, None]
            x = x.at[:, t].set(jnp.where(is_thought, full(x)[:, t - 1] + offsets[:, t], x[:, t]))
    return model.apply(variables, full(x), method=coconut.Coconut.logits)


@pytest.mark.parametrize("thoughts,backbone", [("latent", {}), slow("pause", {}), slow("latent", CONV)])
def test_cached_loop_equals_naive_loop_values_and_gradients(thoughts, backbone):
    """With short convs: their state cached through the loop against the whole row's convs in the naive passes."""
    model, tokens, variables = make_model(thoughts, **backbone), make_tokens(), init_variables(0, tuple(backbone.items()))
    weights = jax.random.normal(jax.random.PRNGKey(1), (3, LENGTH, VOCAB))
    objective = lambda logits: jnp.sum(weights * jax.nn.log_softmax(logits))  # noqa: E731

    cached = forward(thoughts, **backbone)(variables, tokens)
    naive = naive_logits(model, variables, tokens, thoughts == "latent")
    valid = np.asarray(tokens != R.PAD)[:, :, None]  # a padded query sees no key; its output is arbitrary
    np.testing.assert_allclose(np.where(valid, cached, 0), np.where(valid, naive, 0), atol=2e-5, rtol=2e-5)

    masked = lambda logits: objective(jnp.where(valid, logits, 0.0))  # noqa: E731
    grads = jax.jit(jax.grad(lambda v: masked(model.apply(v, tokens))))(variables)
    naive_grads = jax.grad(lambda v: masked(naive_logits(model, v, tokens, thoughts == "latent")))(variables)
    chex.assert_trees_all_close(grads, naive_grads, atol=2e-5, rtol=2e-4)


@pytest.mark.slow
def test_latent_thoughts_change_the_answer_and_receive_gradients():
    """The thoughts change the logits after them, and the loss after the thoughts reaches every thought."""
    model, tokens, variables = make_model(), make_tokens(), init_variables()
    latent, pause = forward("latent")(variables, tokens), forward("pause")(variables, tokens)
    after = BOT_AT + 1 + K
    assert float(jnp.max(jnp.abs(latent[:, after:] - pause[:, after:]))) > 1e-3
    np.testing.assert_allclose(latent[:, :BOT_AT + 1], pause[:, :BOT_AT + 1], atol=1e-5)  # same up to <bot>

    def answer_loss(offsets):  # the loss after the thoughts, as a function of the thoughts fed back
        return jnp.sum(naive_logits(model, variables, tokens, True, offsets)[:, after:-2] ** 2)

    grads = jax.grad(answer_loss)(jnp.zeros((3, LENGTH, 32)))
    for row, k in enumerate((4, 2, 3)):
        for t in range(BOT_AT + 1, BOT_AT + 1 + k):
            assert float(jnp.linalg.norm(grads[row, t])) > 1e-6, (row, t)
        assert float(jnp.linalg.norm(grads[row, BOT_AT + 1 + k])) == 0.0  # <eot> is a token, not a thought


def test_no_thoughts_is_a_plain_masked_transformer_pass():
    tokens, variables = make_tokens(), init_variables()
    pause = forward("pause")(variables, tokens)  # the thought loop with every token embedded
    np.testing.assert_allclose(forward(max_thoughts=0)(variables, tokens), pause, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("backbone", [{}, slow(CONV)])
def test_left_padding_is_invisible(backbone):
    """A row's logits do not depend on how much left padding precedes it (RoPE is relative; pads are masked out
    of attention and enter the short convs as zeros)."""
    tokens, variables = np.asarray(make_tokens()), init_variables(0, tuple(backbone.items()))
    shifted = np.full_like(tokens, R.PAD)
    shifted[:, 1:] = tokens[:, :-1]  # one more pad on the left: <bot> moves, so rebuild the model's position
    a = forward(**backbone)(variables, jnp.asarray(tokens))[:, :-1]
    b = forward(bot_position=BOT_AT + 1, **backbone)(variables, jnp.asarray(shifted))[:, 1:]
    valid = (tokens[:, :-1] != R.PAD)[:, :, None]
    np.testing.assert_allclose(np.where(valid, a, 0), np.where(valid, b, 0), atol=3e-5, rtol=3e-5)


@pytest.mark.parametrize("thoughts,backbone", [("latent", {}), ("pause", {}), slow("latent", CONV)])
def test_batched_generation_equals_greedy_full_passes(thoughts, backbone):
    """generate = at every step, argmax of the full (cached-loop) forward pass over the row so far, up to a row's
    first generated <pad> (a full pass takes <pad> in a row for padding: masked, and zero into the short convs)."""
    model, tokens, variables = make_model(thoughts, **backbone), make_tokens(1), init_variables(2, tuple(backbone.items()))
    prompt = tokens[:, :BOT_AT + 1]
    num_tokens = LENGTH - (BOT_AT + 1 + K + 1)
    generated = np.asarray(coconut.generate(model, variables, prompt, num_thoughts=K, num_tokens=num_tokens))
    row = np.concatenate([np.asarray(prompt), np.full((3, K), R.THOUGHT), np.full((3, 1), R.EOT)], axis=1)
    compared = 0
    for i in range(num_tokens):
        padded = np.concatenate([row, np.full((3, LENGTH - row.shape[1]), R.PAD)], axis=1).astype(np.int32)
        logits = forward(thoughts, **backbone)(variables, jnp.asarray(padded))[:, row.shape[1] - 1]
        defined = ~np.any(generated[:, :i] == R.PAD, axis=1)
        compared += int(defined.sum())
        np.testing.assert_array_equal(generated[defined, i], np.argmax(logits, axis=-1)[defined])
        row = np.concatenate([row, generated[:, i:i + 1]], axis=1)
    assert compared >= num_tokens, compared


def test_unfilled_layout_keys_and_bad_values_are_refused():
    """Layout keys the data did not fill in, a thought segment past the row and bad values: one line each,
    at the config boundary (before anything is built)."""
    config = base.get_config("coconut", "prosqa")
    with pytest.raises(validation.ConfigError, match="model.bot_position=-1 was not filled in"):
        validation.validate_resolved(config)
    config.model.update(max_len=LENGTH, bot_position=BOT_AT, max_thoughts=LENGTH, thought_token=R.THOUGHT,
                        pad_token=R.PAD, eot_token=R.EOT)
    with pytest.raises(validation.ConfigError, match="exceeds the row length model.max_len=%d" % LENGTH):
        validation.validate_resolved(config)
    config.model.bot_position = 0  # a thought segment right at the start is checked too
    with pytest.raises(validation.ConfigError, match="model.bot_position=0 \\+ model.max_thoughts"):
        validation.validate_resolved(config)
    config.model.update(bot_position=BOT_AT, max_thoughts=LENGTH - BOT_AT - 1)  # exactly fits
    validation.validate_resolved(config)
    config.model.max_thoughts = LENGTH
    config.model.update(thoughts="words", attention_impl="pallas")
    with pytest.raises(validation.ConfigError) as info:
        validation.validate(config, 8)
    assert "model.thoughts='words' is not one of" in str(info.value) and "model.attention_impl='pallas'" in str(info.value)
