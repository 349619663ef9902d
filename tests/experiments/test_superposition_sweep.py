"""The geometry of toy-model features (experiments/analysis/feature_geometry.py) on arrangements whose answers follow
from their angles and on random W against loops, and the vmapped sweep (experiments/studies/superposition_sweep.py):
each member trains with its own importance and density, and its evaluation matches NumPy."""

import jax
import numpy as np
import pytest

from experiments.analysis import feature_geometry as geometry
from experiments.studies import superposition_sweep as sweep
from models import sae, toy_superposition


def polygon(k: int) -> np.ndarray:
    """W [2, k]: k unit features evenly around a circle."""
    angles = 2 * np.pi * np.arange(k) / k
    return np.stack([np.cos(angles), np.sin(angles)])


def tetrahedron() -> np.ndarray:
    w = np.array([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]], np.float64).T
    return w / np.sqrt(3)


def test_regular_arrangements_have_the_dimensionality_their_angles_give():
    # D = 1 / sum_j cos^2(angle between i and j): the expected values come from the angles, not from the paper.
    cases = {"antipodal pair": (np.array([[1.0, -1.0]]), 1),
             "triangle": (polygon(3), 2), "pentagon": (polygon(5), 4), "tetrahedron": (tetrahedron(), 3),
             "dedicated dimension": (np.eye(3), 0)}
    for name, (w, partners) in cases.items():
        unit = w / np.linalg.norm(w, axis=0)
        expected = 1 / np.sum((unit.T @ unit) ** 2, axis=1)
        np.testing.assert_allclose(geometry.dimensionality(w), expected, rtol=1e-12)
        assert {geometry.plateau(d) for d in geometry.dimensionality(w)} == {name}
        np.testing.assert_array_equal(geometry.partners(w), partners)
        assert geometry.dimensions_per_feature(w) == pytest.approx(w.shape[0] / w.shape[1])
    assert geometry.plateau(0.6) is None


def test_random_w_metrics_match_loops():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(3, 6))
    w[:, 2] = 0.0  # an unrepresented feature
    norms = [np.sqrt(sum(w[a, i] ** 2 for a in range(3))) for i in range(6)]
    for i in range(6):
        unit = w[:, i] / norms[i] if norms[i] else np.zeros(3)
        overlaps = [float(unit @ w[:, j]) ** 2 for j in range(6)]
        assert geometry.interference(w)[i] == pytest.approx(sum(overlaps) - overlaps[i], abs=1e-12)
        assert geometry.dimensionality(w)[i] == pytest.approx(norms[i] ** 2 / sum(overlaps) if norms[i] else 0.0)
    decoder = rng.normal(size=(4, 3))
    assert geometry.best_cosines(decoder, w)[2] == 0.0  # an unrepresented feature has no direction to match
    for i in range(6):
        if norms[i]:
            best = max(decoder[r] @ w[:, i] / np.linalg.norm(decoder[r]) / norms[i] for r in range(4))
            assert geometry.best_cosines(decoder, w)[i] == pytest.approx(best)


def test_the_extra_features_phase():
    assert geometry.extra_feature_phase(np.array([[1.0, 0.05]])) == "not represented"
    assert geometry.extra_feature_phase(np.array([[0.05, 1.0]])) == "dedicated dimension"
    assert geometry.extra_feature_phase(np.array([[1.0, -1.0]])) == "superposition"
    assert geometry.extra_feature_phase(polygon(3)) == "superposition"


def test_each_member_trains_with_its_own_importance_and_density():
    """n = 2 dense features through m = 1 dimension: where the second feature matters 10x it takes the dimension,
    where it matters 0.1x it is dropped; at density 0.02 and equal importance both share the dimension antipodally.
    Each point trains from 3 seeds and keeps the lowest evaluated loss, as the study does (a seed can stop in a worse
    minimum). Swapping members' importances or densities would change which point is which."""
    cfg = toy_superposition.ToyConfig(num_features=2, num_hidden=1)
    densities = np.repeat([1.0, 1.0, 0.02], 3)
    importances = np.repeat([[1.0, 10.0], [1.0, 0.1], [1.0, 1.0]], 3, axis=0)
    w, b, losses = sweep.train(cfg, densities, importances, np.arange(9), steps=1500, batch=512)
    assert np.all(losses[-100:].mean(0) < losses[:10].mean(0))
    evaluated = sweep.evaluate(cfg, w, b, densities, importances, rows=4096, seed=5)
    keep = sweep.best_of_seeds(evaluated, 3)
    assert [geometry.extra_feature_phase(w[k]) for k in keep] == [
        "dedicated dimension", "not represented", "superposition"]

    keys = jax.random.split(jax.random.PRNGKey(5), 9)
    for k in range(9):  # the same rows, the loss in float64
        x = np.asarray(toy_superposition.sparse_features(keys[k], 4096, 2, densities[k]), np.float64)
        x_hat = np.maximum(x @ w[k].T.astype(np.float64) @ w[k] + b[k], 0)
        assert evaluated[k] == pytest.approx(np.mean(importances[k] * (x - x_hat) ** 2), rel=1e-5)
    np.testing.assert_array_equal(sweep.best_of_seeds([3.0, 1.0, 2.0, 0.5, 0.7, 0.9], 3), [1, 3])


def test_sae_on_the_hidden_layer_recovers_the_features_of_a_sparse_toy_model():
    """A toy model of 6 features in m = 3 dimensions at density 0.03 represents at least 4 of them, so some share
    dimensions; a TopK SAE (k = 1) on its hidden layer finds every represented feature's direction (cosine > 0.9)."""
    n, m = 6, 3
    w, _, _ = sweep.train(toy_superposition.ToyConfig(num_features=n, num_hidden=m), [0.03], np.ones((1, n)), [0],
                          steps=1500, batch=512)
    decoder = sweep.train_saes(sae.SAEConfig(d_in=m, num_latents=12, kind="topk", k=1, aux_k=4), w, [0.03], [0],
                               steps=1500, batch=512)
    assert decoder.shape == (1, 12, m)
    np.testing.assert_allclose(np.linalg.norm(decoder[0], axis=1), 1.0, rtol=1e-5)
    represented = geometry.norms(w[0]) > 0.5
    assert represented.sum() >= 4
    assert np.all(geometry.best_cosines(decoder[0], w[0])[represented] > 0.9)
