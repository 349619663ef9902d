"""The DEQ stabilisers against closed forms, and the DEQ transformer LM: its output is the fixed point,
cached decoding equals the full pass, implicit gradients equal unrolled ones, and it trains."""

import dataclasses

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import models
from experiments.training import metrics_writer, trainer, validation
from experiments.configs import lm_shakespeare
from models import deq_stabilisers, deq_transformer
from tests.conftest import make_tiny_config, slow


def test_hutchinson_estimates_the_frobenius_norm_of_the_jacobian():
    a = jax.random.normal(jax.random.key(0), (23, 23)) / 5.0
    f = lambda z, scale: scale * jnp.tanh(a @ z)  # noqa: E731
    z = jax.random.normal(jax.random.key(1), (23,))
    exact = np.sum(np.asarray(jax.jacobian(f)(z, 1.5)) ** 2) / 23
    estimate = deq_stabilisers.jacobian_frobenius_sq(f, z, 1.5, rng=jax.random.key(2), samples=20_000)
    np.testing.assert_allclose(estimate, exact, rtol=0.03)
    gradient = jax.grad(lambda s: deq_stabilisers.jacobian_frobenius_sq(f, z, s, rng=jax.random.key(2), samples=4))(1.5)
    np.testing.assert_allclose(gradient, 2 / 1.5 * deq_stabilisers.jacobian_frobenius_sq(
        f, z, 1.5, rng=jax.random.key(2), samples=4), rtol=1e-5)  # quadratic in the scale


def test_spectral_normalise_divides_each_kernel_by_its_operator_norm():
    rng = np.random.default_rng(0)
    params = {"query": rng.normal(size=(24, 3, 8)), "mlp": {"wi": {"kernel": rng.normal(size=(24, 40)),
                                                                  "bias": rng.normal(size=40)}}}
    normalised = deq_stabilisers.spectral_normalise(jax.tree.map(jnp.asarray, params), iterations=300)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(normalised["query"]).reshape(24, 24), 2), 1.0, rtol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(normalised["mlp"]["wi"]["kernel"]), 2), 1.0, rtol=1e-4)
    np.testing.assert_array_equal(normalised["mlp"]["wi"]["bias"], jnp.asarray(params["mlp"]["wi"]["bias"]))


def test_weight_normalise_is_the_identity_at_initialisation_and_sets_column_norms_to_the_gains():
    rng = np.random.default_rng(1)
    params = {"out": jnp.asarray(rng.normal(size=(3, 8, 24))), "wo": {"kernel": jnp.asarray(rng.normal(size=(40, 24)))},
              "scale": jnp.ones(24)}
    gains = deq_stabilisers.column_norms(params)
    chex.assert_shape([gains["out"], gains["wo/kernel"]], (24,))
    same = deq_stabilisers.weight_normalise(params, gains)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), same, params)
    new_gains = jax.tree.map(lambda g: 2.0 + 0 * g, gains)
    scaled = deq_stabilisers.weight_normalise(jax.tree.map(lambda w: 7.0 * w, params), new_gains)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(scaled["out"]).reshape(24, 24), axis=0), 2.0, rtol=1e-6)
    np.testing.assert_array_equal(scaled["scale"], 7.0 * params["scale"])


def _model(**overrides):
    cfg = deq_transformer.DEQConfig(vocab_size=13, max_len=16, d_model=32, num_heads=4, num_kv_heads=2, d_mlp=64,
                                    **overrides)
    model = deq_transformer.DEQTransformer(cfg)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 13, (2, 11)), jnp.int32)
    variables = jax.jit(model.init)(jax.random.key(0), tokens)
    return cfg, model, {k: v for k, v in variables.items() if k != "metrics"}, tokens


@pytest.mark.parametrize("weight_normalisation,backward", [("none", "unroll"), ("spectral", "implicit"),
                                                            ("weight", "phantom")])
def test_the_cell_reads_its_parameters_normalised_as_configured_and_only_implicit_has_probes(weight_normalisation,
                                                                                          backward):
    """The parameters the fixed-point map uses: the cell's own ("none"), spectrally normalised, or weight
    normalised with the stored gains; the adjoint solve's probes exist only for the implicit backward."""
    _, model, variables, tokens = _model(weight_normalisation=weight_normalisation, backward=backward)
    if weight_normalisation == "weight":  # gains away from their initial ||V||, where the map is the identity
        gains = jax.tree.map(lambda g: 2.0 * g, variables["params"]["weight_norm"]["gains"])
        variables = {**variables, "params": {**variables["params"], "weight_norm": {"gains": gains}}}
    x = model.apply(variables, tokens, method=lambda m, t: m.injection_norm(m.embed_tokens(t)))
    used = model.apply(variables, x, None, 0, method=model._cell_params)
    raw = nn.meta.unbox(variables["params"]["cell"])
    expected = {"none": lambda: raw, "spectral": lambda: deq_stabilisers.spectral_normalise(raw),
                "weight": lambda: deq_stabilisers.weight_normalise(raw, variables["params"]["weight_norm"]["gains"])}
    chex.assert_trees_all_close(used, expected[weight_normalisation](), rtol=1e-5)
    if weight_normalisation != "none":
        assert not np.allclose(jax.tree.leaves(used)[0], jax.tree.leaves(raw)[0])
    assert ("probes" in variables) == (backward == "implicit")


@pytest.mark.parametrize("weight_normalisation", [slow("none"), "spectral", slow("weight")])
def test_output_is_the_fixed_point_of_plain_iteration(weight_normalisation):
    cfg, model, variables, tokens = _model(tol=1e-6, max_iter=100, weight_normalisation=weight_normalisation)
    logits, written = model.apply(variables, tokens, mutable=["metrics"])
    assert float(written["metrics"]["forward_converged"][0]) == 1.0
    x = model.apply(variables, tokens, method=lambda m, t: m.injection_norm(m.embed_tokens(t)))
    params = model.apply(variables, x, None, 0, method=model._cell_params)
    # plain iteration, long enough to converge without acceleration
    z = jax.jit(lambda x: jax.lax.fori_loop(0, 300, lambda _, z: model._f(z, params, x, None, None, 0),
                                            jnp.zeros_like(x)))(x)
    np.testing.assert_allclose(logits, model.apply(variables, z, method=lambda m, z: m.logits(m.final_norm(z))),
                               atol=1e-4)


@pytest.mark.slow  # 16 s here; by default the DEQ forward, solvers and gradients
def test_cached_decoding_equals_the_full_pass():
    cfg, model, variables, tokens = _model(tol=1e-7, max_iter=100)
    full = model.apply(variables, tokens)
    cache = model.init_cache(2, 16)
    logits, cache = model.apply(variables, tokens[:, :6], cache, 0, method=model.decode)
    pieces = [logits]
    for t in range(6, 11):
        logits, cache = model.apply(variables, tokens[:, t:t + 1], cache, t, method=model.decode)
        pieces.append(logits)
    np.testing.assert_allclose(jnp.concatenate(pieces, 1), full, atol=2e-4)


@pytest.mark.slow  # by default: tests/models/test_deq.py (implicit gradients vs closed form, finite differences)
def test_implicit_gradients_equal_unrolled_ones_and_the_probe_reports_the_adjoint_solve():
    targets = jnp.asarray(np.random.default_rng(3).integers(0, 13, (2, 11)), jnp.int32)

    def gradient(**overrides):
        cfg, model, variables, tokens = _model(tol=1e-7, max_iter=120, backward_max_iter=120, **overrides)
        probes = variables.get("probes", {})

        def loss(params, probes):
            logits = model.apply({**variables, "params": params, "probes": probes}, tokens)
            return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1))
        return jax.grad(loss, argnums=(0, 1))(variables["params"], probes)

    implicit, probe = gradient(backward="implicit", solver="anderson")
    unrolled, _ = gradient(backward="unroll")
    flat_i, flat_u = (np.concatenate([np.ravel(x) for x in jax.tree.leaves(g)]) for g in (implicit, unrolled))
    assert np.linalg.norm(flat_i - flat_u) <= 2e-3 * np.linalg.norm(flat_u)
    assert 1 <= probe["backward_iterations"] < 120 and probe["backward_residual"] <= 1e-7


def test_bad_deq_keys_are_named():
    config = lm_shakespeare.get_config("deq")
    config.model.update(solver="newton", max_iter=0)
    with pytest.raises(validation.ConfigError) as info:
        validation.validate(config, 8)
    assert "model.solver='newton' is not one of" in str(info.value) and "model.max_iter=0 must be >= 1" in str(info.value)
    config.model.update(solver=lm_shakespeare.get_config("deq").model.solver, max_iter=12, jacobian_frequency=1.5)
    with pytest.raises(validation.ConfigError, match=r"model.jacobian_frequency=1.5 must lie in \[0, 1\]"):
        validation.validate(config, 8)
    config.model.jacobian_frequency = 1.0  # every step: the largest fraction, accepted
    validation.validate(config, 1)


@pytest.mark.slow
def test_deq_trains_in_the_trainer_and_logs_solver_statistics(tmp_path):
    config = make_tiny_config(steps=4)
    config.model = lm_shakespeare.get_config("deq").model
    config.model.update(d_model=32, num_heads=4, d_mlp=64, norm="rmsnorm", jacobian_weight=0.5, tie_embeddings=False,
                        vocab_size=0, max_len=0)
    config.train.update(eval_every=4, checkpoint_every=4)
    trainer.train_and_evaluate(config, str(tmp_path), verbose=False)
    train = [e for e in metrics_writer.read(str(tmp_path)) if e["split"] == "train"]
    assert len(train) == 4
    for event in train:  # each solve stops at its tolerance or at its iteration cap, never elsewhere
        assert event["forward_residual"] <= config.model.tol or event["forward_iterations"] == config.model.max_iter
        assert event["backward_residual"] <= config.model.tol or \
            event["backward_iterations"] == config.model.backward_max_iter
        assert event["forward_iterations"] >= 2 and event["forward_residual"] > 0  # it did iterate
        assert event["jacobian_frobenius_sq"] > 0 and event["aux_loss"] == pytest.approx(
            0.5 * event["jacobian_frobenius_sq"], rel=1e-5)
    assert train[-1]["loss"] < train[0]["loss"]


@pytest.mark.slow
@pytest.mark.optimised  # compiled-memory figures: measured with the optimisations the other tests turn off
def test_implicit_backward_memory_is_flat_in_max_iter_and_unrolling_grows():
    def temp_bytes(backward, max_iter):
        _, model, variables, tokens = _model(backward=backward, max_iter=max_iter, backward_max_iter=max_iter)
        grad = jax.jit(jax.grad(lambda v: jnp.sum(model.apply(v, tokens) ** 2)))
        return grad.lower(variables).compile().memory_analysis().temp_size_in_bytes

    implicit = [temp_bytes("implicit", n) for n in (4, 16)]
    unroll = [temp_bytes("unroll", n) for n in (4, 16)]
    assert implicit[0] == implicit[1]
    assert unroll[1] > 2.5 * unroll[0] and unroll[0] > implicit[0]


@pytest.mark.parametrize("backward,uses", [("implicit", (7 + 5 + 3) / 3), ("unroll", 7.0), ("phantom", 7 / 3 + 4)])
def test_active_parameters_count_the_cell_per_use_in_a_training_step(backward, uses):
    """N active (experiments/studies/scaling.py's C = 6 N D) = the cell's parameters times its uses per step + the rest."""
    config = ml_collections.ConfigDict(dataclasses.asdict(deq_transformer.DEQConfig(
        vocab_size=23, max_len=16, d_model=32, num_heads=2, d_mlp=64, max_iter=7, backward_max_iter=5,
        phantom_steps=4, backward=backward)))
    shapes = jax.eval_shape(models.build(config).init, jax.random.key(0), jnp.zeros((1, 16), jnp.int32))
    params = nn.meta.unbox(shapes["params"])
    cell = sum(x.size for x in jax.tree.leaves(params["cell"]))
    total = sum(x.size for x in jax.tree.leaves(params))
    assert models.parameter_count(config, 16, active=True) == int(total - cell + cell * uses)
