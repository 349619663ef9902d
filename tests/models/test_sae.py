"""Sparse autoencoders (models/sae.py) against a float64 NumPy reference: the forward pass and loss of every kind,
TopK's and BatchTopK's exact L0, JumpReLU's straight-through threshold gradient by its formula, the other gradients
by central differences of the reference, and the AuxK loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data import config_fields
from models import sae
from tests.conftest import slow

D, M, N = 6, 9, 5


def _setup(kind, **overrides):
    cfg = sae.SAEConfig(d_in=D, num_latents=M, kind=kind, k=3, aux_k=2, l1_coefficient=0.1, aux_coefficient=0.5,
                        l0_coefficient=0.2, epsilon=0.5, initial_threshold=0.3, **overrides)
    model = sae.SparseAutoencoder(cfg)
    x = jax.random.normal(jax.random.key(0), (N, D))
    params = jax.jit(model.init)(jax.random.key(1), x)["params"]
    params = {**params, "b_enc": 0.3 * jax.random.normal(jax.random.key(2), (M,)),
              "b_dec": 0.1 * jax.random.normal(jax.random.key(3), (D,))}
    return cfg, model, {k: np.asarray(v, np.float64) for k, v in params.items()}, np.asarray(x, np.float64)


def _reference(cfg, p, x, dead=None):
    """(loss, latents, x_hat) in float64: the scaled rows s x are encoded, decoded, compared, and x_hat scaled back."""
    x = cfg.input_scale * x
    z = (x - p["b_dec"]) @ p["w_enc"] + p["b_enc"]
    w_dec = p["v_dec"] / np.linalg.norm(p["v_dec"], axis=1, keepdims=True)
    relu = np.maximum(z, 0)
    if cfg.kind == "relu":
        f = relu
    elif cfg.kind == "topk":
        f = np.zeros_like(z)
        for n in range(len(z)):
            keep = np.argsort(-relu[n], kind="stable")[:cfg.k]
            f[n, keep] = relu[n, keep]
    elif cfg.kind == "batchtopk":
        keep = np.argsort(-relu.reshape(-1), kind="stable")[:cfg.k * len(z)]
        f = np.zeros(z.size)
        f[keep] = relu.reshape(-1)[keep]
        f = f.reshape(z.shape)
    else:
        f = z * (z > np.exp(p["log_theta"]))
    x_hat = f @ w_dec + p["b_dec"]
    loss = np.mean(np.sum((x - x_hat) ** 2, axis=1))
    if cfg.kind == "relu":
        loss += cfg.l1_coefficient * np.mean(np.sum(f * np.linalg.norm(w_dec, axis=1), axis=1))
    elif cfg.kind == "jumprelu":
        loss += cfg.l0_coefficient * np.mean(np.sum(z > np.exp(p["log_theta"]), axis=1))
    elif dead is not None and dead.any():
        aux = np.where(dead, relu, 0.0)
        f_aux = np.zeros_like(aux)
        for n in range(len(aux)):
            keep = np.argsort(-aux[n], kind="stable")[:cfg.aux_k]
            f_aux[n, keep] = aux[n, keep]
        error = x - x_hat  # OpenAI's normalized_mse(auxk_recons, e + b_dec): the residual's spread normalises
        normalised = np.sum((error - f_aux @ w_dec) ** 2) / np.sum((error - error.mean(0)) ** 2)
        variance = np.mean(np.sum((x - x.mean(0)) ** 2, axis=1))  # mse = variance x the main normalised MSE
        loss += cfg.aux_coefficient * normalised * variance
    return loss, f, x_hat / cfg.input_scale


def _loss(model, params, x, dead=None):
    return model.apply({"params": params}, jnp.asarray(x, jnp.float32), dead, method=model.loss)


@pytest.mark.parametrize("kind,scale", [(kind, 1.0) for kind in sae.KINDS] + [("topk", 2.5)])
def test_forward_and_loss_equal_the_numpy_reference(kind, scale):
    cfg, model, params, x = _setup(kind, input_scale=scale)
    dead = np.arange(M) % 3 == 0
    loss, stats = _loss(model, params, x, dead)
    want, f, x_hat = _reference(cfg, params, x, dead)
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    reconstruction = model.apply({"params": params}, jnp.asarray(x, jnp.float32), method=model.reconstruct)
    np.testing.assert_allclose(reconstruction, x_hat, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(stats["l0"], np.mean(np.sum(f != 0, axis=1)), rtol=1e-6)
    fvu = np.sum((x - x_hat) ** 2) / np.sum((x - x.mean(0)) ** 2)
    np.testing.assert_allclose(stats["normalised_mse"], fvu, rtol=1e-5)
    np.testing.assert_allclose(stats["explained_variance"], 1 - fvu, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["dead_fraction"], np.mean(np.all(f == 0, axis=0)), rtol=1e-6)


def test_topk_fires_exactly_k_per_row_and_batchtopk_k_per_row_on_average():
    for kind, check in (("topk", lambda f: (np.sum(f != 0, axis=1) == 3).all()), ("batchtopk",
                        lambda f: np.sum(f != 0) == 3 * N and len(set(np.sum(f != 0, axis=1))) > 1)):
        _, model, params, x = _setup(kind)
        params = {**params, "b_enc": np.full(M, 10.0)}  # every pre-activation positive: the mask alone decides
        f = np.asarray(model.apply({"params": params}, jnp.asarray(x, jnp.float32), method=model.encode))
        assert check(f), (kind, f != 0)


def test_decoder_directions_are_unit_norm():
    _, model, params, _ = _setup("relu")
    w_dec = model.apply({"params": params}, method=model.decoder)
    np.testing.assert_allclose(np.linalg.norm(w_dec, axis=1), 1.0, rtol=1e-6)


def test_jumprelu_threshold_gradient_is_the_rectangle_kernel_estimator():
    cfg, model, params, x = _setup("jumprelu")
    grads = jax.grad(lambda p: _loss(model, p, x)[0])(params)
    z = (x - params["b_dec"]) @ params["w_enc"] + params["b_enc"]
    theta, w_dec = np.exp(params["log_theta"]), params["v_dec"] / np.linalg.norm(params["v_dec"], axis=1, keepdims=True)
    _, _, x_hat = _reference(cfg, params, x)
    kernel = (np.abs((z - theta) / cfg.epsilon) < 0.5).astype(np.float64)
    assert kernel.any() and not kernel.all(), "the test needs pre-activations in and out of the window"
    d_f = 2.0 / N * (x_hat - x) @ w_dec.T  # d mse / d f
    d_theta = np.sum(d_f * -(theta / cfg.epsilon) * kernel, axis=0) + cfg.l0_coefficient / N * np.sum(
        -(1.0 / cfg.epsilon) * kernel, axis=0)
    np.testing.assert_allclose(grads["log_theta"], d_theta * theta, rtol=1e-4, atol=1e-6)


# JumpReLU's gradient path stays in the default suite through the threshold test above.
@pytest.mark.parametrize("kind", ["topk", slow("jumprelu"), slow("relu"), slow("batchtopk")])
def test_weight_gradients_equal_central_differences_of_the_reference(kind):
    cfg, model, params, x = _setup(kind)
    dead = None  # AuxK's residual is a constant to its gradient (next test)
    grads = jax.grad(lambda p: _loss(model, p, x, dead)[0])(params)
    rng = np.random.default_rng(0)
    for name in ("w_enc", "v_dec", "b_dec", "b_enc"):
        for index in [tuple(rng.integers(s) for s in params[name].shape) for _ in range(4)]:
            h = 1e-6

            def shifted(delta, name=name, index=index):
                p = {k: v.copy() for k, v in params.items()}
                p[name][index] += delta
                return _reference(cfg, p, x, dead)[0]

            numeric = (shifted(h) - shifted(-h)) / (2 * h)
            np.testing.assert_allclose(grads[name][index], numeric, rtol=2e-3, atol=2e-5, err_msg=f"{name}{index}")


@pytest.mark.parametrize("kind", ["topk", "batchtopk"])
def test_the_aux_loss_trains_only_the_dead_latents_encoders(kind):
    """The residual it reconstructs is held constant: the live latents' encoder columns get the gradient they get
    without it; the dead ones' get more."""
    _, model, params, x = _setup(kind)
    dead = np.arange(M) % 3 == 0
    with_aux, without = (jax.grad(lambda p, d=d: _loss(model, p, x, d)[0])(params)["w_enc"] for d in (dead, None))
    np.testing.assert_allclose(with_aux[:, ~dead], without[:, ~dead], rtol=1e-6, atol=1e-7)
    assert np.abs(np.asarray(with_aux - without)[:, dead]).max() > 1e-4


def test_no_dead_latent_means_no_aux_loss_and_the_config_refuses_unknown_kinds():
    cfg, model, params, x = _setup("topk")
    loss, stats = _loss(model, params, x, np.zeros(M, bool))
    assert float(stats["penalty"]) == 0.0 and float(loss) == pytest.approx(float(stats["mse"]))
    assert config_fields.problems(sae.SAEConfig, {"kind": "l2", "k": 0}, "sae.") == [
        "sae.kind='l2' is not one of ['relu', 'topk', 'batchtopk', 'jumprelu']", "sae.k=0 must be >= 1"]


def test_the_encoder_starts_as_the_decoders_transpose():
    """OpenAI's and sparsify's initialisation: W_enc = W_dec^T (unit-norm latent directions both ways)."""
    _, model, _, x = _setup("topk")
    params = jax.jit(model.init)(jax.random.key(4), jnp.asarray(x, jnp.float32))["params"]
    w_dec = params["v_dec"] / np.linalg.norm(params["v_dec"], axis=1, keepdims=True)
    np.testing.assert_allclose(params["w_enc"], w_dec.T, rtol=1e-6)


def test_batchtopk_learns_a_threshold_in_training_and_uses_it_outside():
    """Training steps move the threshold as SAELens' running mean of the smallest kept activation; outside training
    a row's latents are those above it, the same alone as inside any batch."""
    cfg, model, params, x = _setup("batchtopk", threshold_rate=0.3)
    x32 = jnp.asarray(x, jnp.float32)
    variables = {"params": params, sae.STATE: jax.jit(model.init)(jax.random.key(1), x32)[sae.STATE]}
    theta = 0.0
    for step in range(3):
        batch = x32 * (1.0 + 0.5 * step)
        _, written = model.apply(variables, batch, mutable=[sae.STATE, "losses", "metrics"])
        kept = _reference(cfg, params, np.asarray(batch, np.float64))[1]
        theta = 0.7 * theta + 0.3 * kept[kept > 0].min()
        np.testing.assert_allclose(written[sae.STATE]["threshold"], theta, rtol=1e-5)
        variables = {"params": params, sae.STATE: written[sae.STATE]}
    f = np.asarray(model.apply(variables, x32, method=model.encode))
    z = np.maximum((cfg.input_scale * x - params["b_dec"]) @ params["w_enc"] + params["b_enc"], 0)
    np.testing.assert_allclose(f, z * (z > theta), rtol=1e-5, atol=1e-6)
    alone = np.asarray(model.apply(variables, x32[:1], method=model.encode))
    np.testing.assert_allclose(alone, f[:1], rtol=1e-6)
    assert 0 < np.sum(f != 0) != cfg.k * N  # the threshold, not the batch's k N, decides


def test_the_geometric_median_minimises_the_summed_distances():
    """Weiszfeld's fixed point, on skewed rows with outliers (mean and median far apart): the subgradient
    sum_n (b - x_n) / ||b - x_n|| vanishes, and no perturbation nor the mean does better."""
    rng = np.random.default_rng(5)
    x = np.concatenate([rng.normal(size=(300, 7)), 40.0 + rng.normal(size=(20, 7))])  # 6% outliers
    b = sae.geometric_median(x)
    total = lambda m: np.sum(np.linalg.norm(x - m, axis=1))  # noqa: E731
    unit = (b - x) / np.linalg.norm(b - x, axis=1, keepdims=True)
    assert np.linalg.norm(unit.sum(0)) < 1e-6 * len(x)
    assert total(b) < total(x.mean(0)) - 100
    assert all(total(b) <= total(b + 1e-3 * rng.normal(size=7)) for _ in range(20))
    assert np.linalg.norm(b) < 0.5 < np.linalg.norm(x.mean(0))  # the outliers barely move it


def test_a_fresh_sae_starts_b_dec_at_the_scaled_rows_geometric_median():
    rng = np.random.default_rng(6)
    rows = {"inputs": rng.normal(size=(50, D)).astype(np.float32) + 3.0}
    cfg = sae.SAEConfig(d_in=D, num_latents=M, input_scale=0.5)
    got = sae.SparseAutoencoder.initial_from_data(cfg, rows)["b_dec"]
    np.testing.assert_allclose(got, sae.geometric_median(0.5 * rows["inputs"]), rtol=1e-6)
    assert sae.SparseAutoencoder.initial_from_data(sae.SAEConfig(d_in=D, b_dec_init="zeros"), rows) == {}
