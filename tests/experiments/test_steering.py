"""Steering (experiments/analysis/steering.py): the mean-difference vector by NumPy, the steered last layer read through the
lens, and the KV-cached decode and the sampler steered like the full pass."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.analysis import activations, steering
from models import sampling, transformer

TOL = dict(rtol=1e-5, atol=1e-5)
pytestmark = pytest.mark.slow  # the default suite's budget; the sites' mechanism is covered there by patching


@pytest.fixture(scope="module")
def setup():
    cfg = transformer.TransformerConfig(vocab_size=11, max_len=16, d_model=16, num_layers=3, num_heads=2, d_mlp=32)
    model = transformer.Transformer(cfg)
    tokens = jax.random.randint(jax.random.key(0), (2, 9), 0, 11)
    variables = {"params": nn.meta.unbox(jax.jit(model.init)(jax.random.key(1), tokens)["params"])}
    return model, variables, tokens


def test_the_mean_difference_is_the_masked_means_difference(setup):
    model, variables, tokens = setup
    other = (tokens + 3) % 11
    mask = np.ones(tokens.shape)
    mask[:, :4] = 0  # left padding, say
    got = steering.mean_difference(model, variables, 1, tokens, other, mask_a=mask)
    a = np.asarray(activations.capture(model, variables, tokens)[2][1]["residual"])
    b = np.asarray(activations.capture(model, variables, other)[2][1]["residual"])
    want = (a * mask[..., None]).sum((0, 1)) / mask.sum() - b.mean((0, 1))
    np.testing.assert_allclose(got, want, **TOL)


def test_steering_the_last_layer_is_the_lens_of_the_shifted_residual(setup):
    model, variables, tokens = setup
    vector = jax.random.normal(jax.random.key(2), (16,))
    tree = steering.steering_tree(model, variables, tokens, 2, vector, alpha=3.0)
    last = activations.capture(model, variables, tokens)[2][-1]["residual"]
    want = model.apply(variables, last + 3.0 * vector, method=model.lens_logits)
    np.testing.assert_allclose(model.apply(steering.steered(variables, tree), tokens), want, **TOL)
    zero = steering.steering_tree(model, variables, tokens, 2, vector, alpha=0.0)
    np.testing.assert_allclose(model.apply(steering.steered(variables, zero), tokens), model.apply(variables, tokens),
                               **TOL)


def test_cached_decoding_and_the_sampler_steer_like_the_full_pass(setup):
    model, variables, tokens = setup
    vector = jax.random.normal(jax.random.key(3), (16,))
    steer = steering.steered(variables, steering.steering_tree(model, variables, tokens, 1, vector, alpha=2.0))
    full = model.apply(steer, tokens)
    assert np.abs(np.asarray(full - model.apply(variables, tokens))).max() > 1e-2
    decode = jax.jit(lambda t, c, s: model.apply(steer, t, c, s, method=model.decode))
    cache, pieces, start = model.init_cache(2, 16), [], 0
    for size in (5, 1, 3):
        logits, cache = decode(tokens[:, start:start + size], cache, start)
        pieces.append(logits)
        start += size
    np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), full, **TOL)
    generated = sampling.generate(model, steer, tokens[:, :4], model.init_cache(2, 16), jax.random.key(0),
                                  num_tokens=3, temperature=0.0)
    row = tokens[:, :4]
    for _ in range(3):  # greedy: the argmax of the steered full pass, token by token
        row = jnp.concatenate([row, jnp.argmax(model.apply(steer, row)[:, -1], axis=-1)[:, None]], axis=1)
    np.testing.assert_array_equal(np.asarray(generated)[:, -3:], np.asarray(row)[:, -3:])


def test_the_sampler_command_steers_by_two_texts(tmp_path):
    import os
    import subprocess
    import sys

    from experiments.training import trainer
    from tests.conftest import make_tiny_lm_config

    trainer.train_and_evaluate(make_tiny_lm_config(steps=2), str(tmp_path), devices=jax.devices()[:1], verbose=False)
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

    def sample(*steer):
        out = subprocess.run([sys.executable, "-m", "experiments.sample", f"--workdir={tmp_path}", "--prompt=RO",
                              "--num_tokens=8", "--temperature=0", *steer], cwd=repo, capture_output=True, text=True,
                             env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300)
        assert out.returncode == 0, out.stderr
        return out.stdout

    texts = ["--steer_layer=1", "--steer_toward=KING:", "--steer_away=the th"]
    assert sample(*texts, "--steer_alpha=0") == sample()
    assert sample(*texts, "--steer_alpha=30") != sample()
