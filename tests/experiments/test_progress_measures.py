"""Progress measures on planted structure: the spectrum finds planted frequencies; the key-frequency
part of logits built from known components is recovered exactly, and the losses follow."""

import numpy as np
import pytest

from experiments.analysis import progress_measures as pm

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


@pytest.mark.slow
def test_progress_measures_script_end_to_end(tmp_path):
    """scripts/studies/progress_measures_study.py over the checkpoints of a tiny grokking run: a row per checkpoint whose
    test loss is the cross-entropy over the answer tokens of the restored model on the held-out pairs."""
    import json
    import os
    import subprocess
    import sys

    import jax

    from data import algorithmic
    from experiments import restore
    from experiments.training import trainer
    from tests.conftest import make_tiny_config

    config = make_tiny_config(steps=6)
    config.train.update(checkpoint_every=2, keep_checkpoints=5)
    trainer.train_and_evaluate(config, str(tmp_path), devices=jax.devices()[:1], verbose=False)
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    subprocess.run([sys.executable, "scripts/studies/progress_measures_study.py", f"--workdir={tmp_path}", "--key_frequencies=2"],
                   cwd=repo, env={**os.environ, "JAX_PLATFORMS": "cpu"}, check=True, capture_output=True, timeout=300)
    result = json.loads((tmp_path / "progress_measures.json").read_text())
    assert [r["step"] for r in result["checkpoints"]] == [2, 4, 6] and len(result["key_frequencies"]) == 2
    assert (tmp_path / "progress_measures.png").stat().st_size > 0

    model, variables = restore.load_variables(restore.load_config(str(tmp_path)), str(tmp_path), 6)
    _, test = algorithmic.train_test_split(13, "a+b", 0.5, 0)
    logits = np.asarray(model.apply(variables, test["inputs"])[:, -1, :13], np.float64)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected = -np.mean(log_probs[np.arange(len(logits)), test["targets"][:, -1]])
    np.testing.assert_allclose(result["checkpoints"][-1]["test_loss"], expected, rtol=1e-4)
