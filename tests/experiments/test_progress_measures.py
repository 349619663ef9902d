"""Progress measures on planted structure: the spectrum finds planted frequencies; the key-frequency
part of logits built from known components is recovered exactly, and the losses follow."""

import numpy as np

from experiments import progress_measures as pm

P = 17


def test_embedding_spectrum_finds_the_planted_frequencies():
    rng = np.random.default_rng(0)
    x = np.arange(P)
    embedding = 0.05 * rng.normal(size=(P, 24))
    for k, column in ((3, 0), (7, 5)):
        embedding[:, column] += np.cos(2 * np.pi * k * x / P)
        embedding[:, column + 1] += np.sin(2 * np.pi * k * x / P)
    spectrum = pm.embedding_spectrum(embedding)
    assert spectrum.shape == (8,)
    assert pm.key_frequencies(embedding, count=2) == [3, 7]
    # a rotation of the columns leaves the spectrum unchanged
    q, _ = np.linalg.qr(rng.normal(size=(24, 24)))
    np.testing.assert_allclose(pm.embedding_spectrum(embedding @ q), spectrum, rtol=1e-10)


def test_restricted_and_excluded_losses_separate_the_key_frequency_circuit():
    rng = np.random.default_rng(1)
    a, b, c = np.meshgrid(np.arange(P), np.arange(P), np.arange(P), indexing="ij")
    circuit = sum(4.0 * np.cos(2 * np.pi * k * (a + b - c) / P) for k in (2, 5))
    memorised = 0.3 * rng.normal(size=(P, P, P))
    logits = circuit + memorised
    part = pm.key_frequency_part(logits, [2, 5])
    noise_part = pm.key_frequency_part(memorised, [2, 5])
    np.testing.assert_allclose(part, circuit + noise_part, atol=1e-9)  # linear, exact on the circuit
    np.testing.assert_allclose(pm.key_frequency_part(circuit, [2, 5]), circuit, atol=1e-9)
    pairs = np.stack(np.meshgrid(np.arange(P), np.arange(P), indexing="ij"), -1).reshape(-1, 2)
    restricted, excluded = pm.restricted_and_excluded_loss(logits, [2, 5], pairs[:100])
    full = pm._cross_entropy(logits, pairs[:, 0], pairs[:, 1])
    assert restricted < full + 0.1  # the circuit alone still solves the task
    assert excluded > np.log(P) - 0.5  # without it, the training pairs are near chance
