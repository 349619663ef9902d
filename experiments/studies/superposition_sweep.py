"""Many toy models of superposition (models/toy_superposition.py) in one compiled program: the shared
`trainer.train_step`, vmapped over members that differ in feature density, importance and seed, and scanned over
the steps. Every step draws fresh rows for every member (the paper's online data: batches of 1,024 for 10,000
steps, AdamW at 1e-3); a member's importance rides in its model state, its density in the data it is fed.

`scripts/studies/superposition_study.py` runs the paper's sweeps with it and measures the geometry of the result
(experiments/analysis/feature_geometry.py).
"""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from experiments.optim import optimizers
from experiments.training import train_state, trainer
from models import toy_superposition


def optimizer_config(lr: float = 1e-3, weight_decay: float = 0.01) -> ml_collections.ConfigDict:
    """AdamW at a constant `lr` (the paper's code: torch's AdamW, whose default weight decay is 0.01)."""
    opt = ml_collections.ConfigDict(dataclasses.asdict(optimizers.OptimizerConfig(lr=lr)))
    opt.adamw.weight_decay = weight_decay
    return opt


def init_states(model, example_rows, seeds, opt, steps: int, model_state=None):
    """The members' train states stacked on a leading axis: member k starts from seeds[k]; `model_state`, if given,
    is a function of k's index giving collections that replace its initial ones (a toy model's importance)."""
    tx = optimizers.build(opt, steps)

    def init(index, seed):
        state = nn.meta.unbox(train_state.init_state(model, tx, example_rows, jax.random.PRNGKey(seed)))
        return state.replace(model_state={**state.model_state, **(model_state(index) if model_state else {})})

    seeds = jnp.asarray(seeds, jnp.uint32)
    return jax.jit(jax.vmap(init))(jnp.arange(len(seeds)), seeds)


def train_members(states, make_rows, key, *, steps: int, schedule):
    """`steps` of the train step on every member at once; `make_rows(key)` gives the step's rows of every member
    [M, B, ...]. Returns (states, the members' sown losses [steps, M])."""
    step = jax.vmap(functools.partial(trainer.train_step, schedule=schedule))

    def body(states, key):
        states, metrics = step(states, jax.vmap(toy_superposition.rows)(make_rows(key)))
        return states, metrics["aux_loss"]

    return jax.lax.scan(body, states, jax.random.split(key, steps))


def _densities(densities):
    densities = jnp.asarray(densities, jnp.float32)
    return densities[:, None] if densities.ndim == 1 else densities


def feature_rows(key, densities, batch: int, num_features: int):
    """Every member's rows [M, batch, n] at its density."""
    keys = jax.random.split(key, densities.shape[0])
    return jax.vmap(lambda k, d: toy_superposition.sparse_features(k, batch, num_features, d))(keys, densities)


def train(cfg: toy_superposition.ToyConfig, densities, importances, seeds, *, steps: int = 10_000, batch: int = 1024,
          lr: float = 1e-3, data_seed: int = 0):
    """Trains one toy model per row of `densities` ([M] or [M, n]), `importances` [M, n] and `seeds` [M]; returns
    (W [M, m, n], b [M, n], losses [steps, M])."""
    densities = _densities(densities)
    importances = jnp.asarray(importances, jnp.float32)
    opt = optimizer_config(lr)
    states = init_states(toy_superposition.ToyModel(cfg), jnp.zeros((1, cfg.num_features)), seeds, opt, steps,
                         lambda k: {toy_superposition.IMPORTANCE: {"importance": importances[k]}})
    run = jax.jit(functools.partial(train_members, steps=steps, schedule=optimizers.learning_rate_schedule(opt, steps),
                                    make_rows=lambda key: feature_rows(key, densities, batch, cfg.num_features)))
    states, losses = run(states, key=jax.random.PRNGKey(data_seed))
    return np.asarray(states.params["w"]), np.asarray(states.params["b"]), np.asarray(losses)


def hidden_scale(w, densities, rows: int = 16384, seed: int = 2) -> np.ndarray:
    """[M]: 1 / the RMS of each member's hidden activations h = W x per dimension, from `rows` rows of its density
    (what puts every member's SAE inputs at E||h||^2 = m, as the SAE's data-decided input scale does)."""
    w = jnp.asarray(w)
    x = feature_rows(jax.random.PRNGKey(seed), _densities(densities), rows, w.shape[-1])
    h = jnp.einsum("mbn,mhn->mbh", x, w)
    return np.asarray(1.0 / jnp.sqrt(jnp.mean(jnp.sum(h * h, -1), -1) / w.shape[1]))


def train_saes(sae_cfg, w, densities, seeds, *, steps: int = 5000, batch: int = 1024, lr: float = 1e-3,
               data_seed: int = 3):
    """One sparse autoencoder (models/sae.py, `sae_cfg`) per toy model W [M, m, n], trained on its hidden
    activations h = W x (scaled by `hidden_scale`) at its density; returns the decoders [M, latents, m] (unit rows)."""
    from models import sae

    w = jnp.asarray(w)
    densities = _densities(densities)
    scale = jnp.asarray(hidden_scale(w, densities))
    opt = optimizer_config(lr, weight_decay=0.0)
    model = sae.SparseAutoencoder(sae_cfg)
    states = init_states(model, jnp.zeros((1, w.shape[1])), seeds, opt, steps)

    def make_rows(key):
        x = feature_rows(key, densities, batch, w.shape[-1])
        return jnp.einsum("mbn,mhn->mbh", x, w) * scale[:, None, None]

    run = jax.jit(functools.partial(train_members, steps=steps, schedule=optimizers.learning_rate_schedule(opt, steps),
                                    make_rows=make_rows))
    states, _ = run(states, key=jax.random.PRNGKey(data_seed))
    return np.asarray(jax.vmap(lambda p: model.apply({"params": p}, method=sae.SparseAutoencoder.decoder))(
        states.params))


def evaluate(cfg: toy_superposition.ToyConfig, w, b, densities, importances, *, rows: int = 16384, seed: int = 1):
    """Each member's loss [M] on `rows` fresh rows of its density (one fixed draw per member)."""
    model = toy_superposition.ToyModel(cfg)
    densities = _densities(densities)

    def one(w, b, density, importance, key):
        x = toy_superposition.sparse_features(key, rows, cfg.num_features, density)
        x_hat, _ = model.apply({"params": {"w": w, "b": b}}, x, method=toy_superposition.ToyModel.reconstruct)
        return jnp.mean(importance * jnp.square(x - x_hat))

    keys = jax.random.split(jax.random.PRNGKey(seed), len(densities))
    return np.asarray(jax.jit(jax.vmap(one))(jnp.asarray(w), jnp.asarray(b), densities,
                                             jnp.asarray(importances, jnp.float32), keys))


def best_of_seeds(losses, seeds_per_point: int) -> np.ndarray:
    """Indices of the lowest-loss member of each run of `seeds_per_point` consecutive members (the same point
    trained from different seeds): the paper's models, like ours, sometimes stop in a worse local minimum."""
    grouped = np.asarray(losses).reshape(-1, seeds_per_point)
    return np.arange(len(grouped)) * seeds_per_point + np.argmin(grouped, axis=1)
