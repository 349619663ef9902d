"""Toy models of superposition (Elhage et al. 2022): n sparse features squeezed through m < n hidden dimensions.

    x_i  = u_i with probability p = 1 - S (the feature density), else 0;   u_i ~ U[0, 1], independent
    h    = W x                                        W [m, n]: column W_i is feature i's direction (m-dimensional)
    x'   = ReLU(W^T h + b)   (relu)   or   W^T h + b   (linear, the baseline)
    loss = mean over rows and features of  I_i (x_i - x'_i)^2                  I_i: feature i's importance

W starts Xavier-normal, b at 0 (the paper's code). The importance vector is a model-state variable ("importance"),
not a parameter: every member of a vmapped sweep carries its own, and training never changes it.

Trained by the one train step (experiments/training/trainer.train_step) like the sparse autoencoder: `__call__`
sows the loss into "losses" and returns zero logits [B, 1, 1], and the rows carry zero next-token loss masks.
What is measured of a trained W (the geometry of its columns) lives in experiments/analysis/feature_geometry.py.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

IMPORTANCE = "importance"
OUTPUTS = ("relu", "linear")


@dataclasses.dataclass(frozen=True)
class ToyConfig:
    num_features: int = 20  # n
    num_hidden: int = 5  # m
    output: str = "relu"  # relu | linear


class ToyModel(nn.Module):
    cfg: ToyConfig

    def setup(self):
        cfg = self.cfg
        if cfg.output not in OUTPUTS:
            raise ValueError(f"output={cfg.output!r}: expected one of {OUTPUTS}")
        self.w = self.param("w", nn.initializers.xavier_normal(), (cfg.num_hidden, cfg.num_features))
        self.b = self.param("b", nn.initializers.zeros, (cfg.num_features,))
        if self.has_variable(IMPORTANCE, "importance") or self.is_mutable_collection(IMPORTANCE):  # not to reconstruct
            self.importance = self.variable(IMPORTANCE, "importance", jnp.ones, (cfg.num_features,), jnp.float32)

    def reconstruct(self, x):
        """(x' [B, n], h [B, m]) of rows x [B, n]."""
        h = x @ self.w.T
        out = h @ self.w + self.b
        return (nn.relu(out) if self.cfg.output == "relu" else out), h

    def __call__(self, x):
        x_hat, _ = self.reconstruct(x)
        loss = jnp.mean(self.importance.value * jnp.square(x - x_hat))
        self.sow("losses", "reconstruction", loss)
        return jnp.zeros((x.shape[0], 1, 1), jnp.float32)


def importance_decay(num_features: int, rate: float) -> np.ndarray:
    """I_i = rate ** i (the paper's 0.9 or 0.7), float32 [n]."""
    return (rate ** np.arange(num_features)).astype(np.float32)


def sparse_features(key, batch: int, num_features: int, density) -> jax.Array:
    """Rows [batch, n]: each feature U[0, 1] with probability `density` (a scalar or [n]), else 0. One uniform u per
    entry decides both: present where u < density, with value u / density, which given u < density is U[0, 1]."""
    u = jax.random.uniform(key, (batch, num_features))
    return jnp.where(u < density, u / density, 0.0)


def rows(x) -> dict:
    """The train step's batch of feature rows x [B, n]: no next-token targets (the loss is the model's own)."""
    zeros = jnp.zeros((x.shape[0], 1), jnp.int32)
    return {"inputs": x, "targets": zeros, "loss_mask": zeros.astype(jnp.float32)}
