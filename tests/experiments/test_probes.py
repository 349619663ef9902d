"""Linear probes (experiments/analysis/probes.py) find planted linear structure, not structure that is absent, and read a
token's identity from the embeddings layer of a model."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from experiments.analysis import probes
from models import transformer


def test_a_probe_reads_planted_linear_classes_and_not_random_labels():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 16)) * rng.uniform(0.1, 10.0, size=16) + 3.0  # badly scaled features
    planted = np.argmax(x @ rng.normal(size=(16, 3)) - (3.0 * np.ones(16)) @ rng.normal(size=(16, 3)), axis=1)
    found = probes.fit(x, planted, 3)
    assert found["test_accuracy"] > 0.95 and found["train_accuracy"] > 0.95
    chance = probes.fit(x, rng.integers(0, 3, 600), 3)
    assert chance["test_accuracy"] < 0.5  # 1/3 by chance; memorising the training split does not carry over


def test_many_probes_at_once_are_the_separate_probes_and_an_mlp_probe_reads_what_a_linear_one_cannot():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(500, 6))
    xor = ((x[:, 0] > 0) ^ (x[:, 1] > 0)).astype(int)  # no linear separator
    linear_labels = np.stack([np.argmax(x @ rng.normal(size=(6, 3)), axis=1), xor], axis=1)
    many = probes.fit_many(x, linear_labels, 3, steps=150)
    for k in range(2):  # the vmapped fit is each probe fitted alone
        alone = probes.fit(x, linear_labels[:, k], 3, steps=150)
        np.testing.assert_allclose(many["weights"][k], alone["weights"], atol=1e-5)
        assert many["test_accuracy"][k] == alone["test_accuracy"]
    assert many["test_accuracy"][0] > 0.9 and many["test_accuracy"][1] < 0.7
    mlp = probes.fit_many(x, xor[:, None], 2, hidden=32, steps=300, lr=0.01)
    assert mlp["test_accuracy"][0] > 0.9 and mlp["w_in"].shape == (1, 6, 32)


def test_the_split_is_seeded_and_disjoint():
    train, test = probes.split(100, 0.25, seed=3)
    assert len(test) == 25 and not set(train) & set(test) and len(train) + len(test) == 100
    assert (probes.split(100, 0.25, seed=3)[1] == test).all() and not (probes.split(100, 0.25, seed=4)[1] == test).all()


@pytest.mark.slow  # three probes compiled; by default the planted structure
def test_probe_layers_reads_the_current_token_from_the_embeddings():
    cfg = transformer.TransformerConfig(vocab_size=4, max_len=16, d_model=16, num_layers=2, num_heads=2, d_mlp=32,
                                        positional="rope")
    model = transformer.Transformer(cfg)
    tokens = jax.random.randint(jax.random.key(0), (32, 16), 0, 4)
    variables = {"params": nn.meta.unbox(jax.jit(model.init)(jax.random.key(1), tokens)["params"])}
    results = probes.probe_layers(model, variables, tokens, tokens, np.ones(tokens.shape, bool), 4, steps=200)
    assert [r["layer"] for r in results] == [0, 1, 2]
    assert results[0]["test_accuracy"] == 1.0  # layer 0 is the token's own embedding


def test_text_properties_mark_line_starts_and_speaker_names_and_the_mask_balances():
    corpus = "First Citizen:\nBefore we proceed.\n\nAll:\nSpeak, speak.\n\nFirst Citizen:\nYou: are all resolved?\n"
    props = probes.text_properties(corpus)
    labels, eligible = props["speaker_name"]
    named = "".join(c if label else "." for c, label in zip(corpus, labels))
    assert named.replace(".", " ").split() == ["First", "Citizen:", "All:", "First", "Citizen:"]  # not "You:"
    assert eligible.sum() == sum(c.isupper() for c in corpus)
    starts, capitals = props["line_start"]
    assert [corpus[i] for i in np.flatnonzero(starts)] == ["B", "\n", "A", "S", "\n", "F", "Y"]
    assert [corpus[i] for i in np.flatnonzero(starts & capitals)] == ["B", "A", "S", "F", "Y"]
    mask = probes.balanced_mask(labels, eligible, seed=1)
    assert mask.sum() == 2 * min(np.sum(labels[eligible] == 1), np.sum(labels[eligible] == 0))
    assert np.sum(labels[mask] == 1) == np.sum(labels[mask] == 0) and not np.any(mask & ~eligible)
