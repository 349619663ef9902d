"""The toy model of superposition (models/toy_superposition.py) against a float64 NumPy transcription of its loss and
gradients, and its sparse feature rows against their distribution."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import toy_superposition


def numpy_loss_and_grads(w, b, x, importance, output):
    """loss = mean I (x - x')^2 with x' = act(x W^T W + b), and its gradients by hand: with G = dloss/dpre,
    pre = H W + b, H = x W^T:  dW = H^T G + W G^T x,  db = sum_rows G."""
    w, b, x, importance = (np.asarray(a, np.float64) for a in (w, b, x, importance))
    h = x @ w.T
    pre = h @ w + b
    x_hat = np.maximum(pre, 0) if output == "relu" else pre
    loss = np.mean(importance * (x - x_hat) ** 2)
    g = 2 * importance * (x_hat - x) / x.size
    if output == "relu":
        g = g * (pre > 0)
    return loss, h.T @ g + w @ g.T @ x, g.sum(0)


@pytest.mark.parametrize("output", toy_superposition.OUTPUTS)
def test_loss_and_gradients_match_a_float64_transcription(output):
    n, m, rows = 7, 3, 5
    rng = np.random.default_rng(0)
    x = np.where(rng.random((rows, n)) < 0.5, rng.random((rows, n)), 0.0).astype(np.float32)
    w, b = rng.normal(size=(m, n)).astype(np.float32), rng.normal(0, 0.3, n).astype(np.float32)
    importance = (0.8 ** np.arange(n)).astype(np.float32)
    model = toy_superposition.ToyModel(toy_superposition.ToyConfig(num_features=n, num_hidden=m, output=output))

    def loss(params):
        _, sown = model.apply({"params": params, toy_superposition.IMPORTANCE: {"importance": importance}}, x,
                              mutable=["losses"])
        return sown["losses"]["reconstruction"][0]

    value, grads = jax.value_and_grad(loss)({"w": jnp.asarray(w), "b": jnp.asarray(b)})
    ref_loss, ref_dw, ref_db = numpy_loss_and_grads(w, b, x, importance, output)
    np.testing.assert_allclose(value, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(grads["w"], ref_dw, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(grads["b"], ref_db, rtol=1e-4, atol=1e-7)


def test_sparse_features_are_uniform_with_the_asked_density_per_feature():
    rows, density = 40_000, np.array([1.0, 0.3, 0.05], np.float32)
    x = np.asarray(toy_superposition.sparse_features(jax.random.PRNGKey(0), rows, 3, jnp.asarray(density)))
    present = x > 0
    sd = np.sqrt(density * (1 - density) / rows)
    np.testing.assert_array_less(np.abs(present.mean(0) - density), 5 * sd + 1e-9)
    for i in range(3):  # the present values are U[0, 1]: mean 1/2, variance 1/12, and spread over the whole interval
        values = x[present[:, i], i]
        assert abs(values.mean() - 0.5) < 5 * np.sqrt(1 / 12 / len(values))
        assert abs(values.var() - 1 / 12) < 5 * np.sqrt(1 / 180 / len(values))
        assert np.histogram(values, bins=4, range=(0, 1))[0].min() > 0.2 * len(values)


def test_importance_decays_geometrically_and_rows_have_no_next_token_targets():
    np.testing.assert_allclose(toy_superposition.importance_decay(4, 0.7), [1, 0.7, 0.49, 0.343], rtol=1e-6)
    batch = toy_superposition.rows(jnp.ones((3, 5)))
    assert batch["inputs"].shape == (3, 5) and float(batch["loss_mask"].sum()) == 0.0


def test_an_unknown_output_is_refused():
    model = toy_superposition.ToyModel(toy_superposition.ToyConfig(output="gelu"))
    with pytest.raises(ValueError, match="output='gelu': expected one of"):
        model.init(jax.random.PRNGKey(0), jnp.zeros((1, 20)))


def test_the_defaults_are_the_papers_first_experiment():
    """n = 20 features through m = 5 hidden dimensions, ReLU output (Elhage et al. 2022, section 2): a
    default model's W has that shape, b starts at zero and the importance at one."""
    assert toy_superposition.ToyConfig() == toy_superposition.ToyConfig(num_features=20, num_hidden=5, output="relu")
    variables = toy_superposition.ToyModel(toy_superposition.ToyConfig()).init(
        jax.random.PRNGKey(0), jnp.zeros((1, 20)), mutable=True)
    assert variables["params"]["w"].shape == (5, 20) and not np.any(variables["params"]["b"])
    np.testing.assert_array_equal(variables[toy_superposition.IMPORTANCE]["importance"], np.ones(20))
