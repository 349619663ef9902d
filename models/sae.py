"""Sparse autoencoders on activations x [N, D] (issue 22): ReLU with an L1 penalty, TopK (Gao et al. 2024, with the
AuxK loss), BatchTopK (Bussmann et al. 2024) and JumpReLU (Rajamanoharan et al. 2024).

    z     = W_enc (s x - b_dec) + b_enc                      pre-activations [N, M]; s = `input_scale` (the data's
                                                              sqrt(D / E||x||^2) by default: E||s x||^2 = D)
    f     = sigma(z)                                          latents, by `kind`:
              relu       max(z, 0)
              topk       max(z, 0) at each row's k largest, 0 elsewhere
              batchtopk  max(z, 0) at the batch's k N largest (k per row on average), 0 elsewhere, in training;
                         outside it max(z, 0) where it exceeds the threshold theta (SAELens: a running mean of
                         the smallest activation each training batch kept, theta <- (1 - r) theta + r min, r =
                         `threshold_rate`), so a row's latents do not depend on the batch it is evaluated in
              jumprelu   z H(z - theta),  theta = exp(log_theta) > 0 per latent
    x_hat = (W_dec f + b_dec) / s,   W_dec's columns unit-norm by construction: W_dec = V / ||V||_columns;
                                      W_enc starts as W_dec^T (tied at initialisation, as OpenAI's and sparsify's),
                                      b_dec at the geometric median of (up to 32,768 of) the scaled training rows
                                      (OpenAI's; `b_dec_init`), argmin_b sum_n ||s x_n - b||, by Weiszfeld's
                                      iteration b <- sum_n w_n s x_n / sum_n w_n, w_n = 1 / ||s x_n - b||
    loss  = mean_n ||s (x - x_hat)||^2 + penalty             (so the coefficients mean the same at every site)
              relu       l1_coefficient * mean_n sum_i f_i ||W_dec,i||    (the decoder-norm-weighted L1; the
                         norms are 1 here, so it is plain L1, but a decoder cannot shrink to cheat it)
              topk, batchtopk   aux_coefficient * AuxK * V: the residual e = s (x - x_hat) reconstructed by the
                         k_aux largest pre-activations of the latents marked dead (`dead` [M]), as a normalised MSE
                         AuxK = sum_n ||e - W_dec f_aux||^2 / sum_n ||e - mean e||^2 (Gao et al., OpenAI's code:
                         both their terms are normalised MSEs), times V = mean_n ||s x - mean s x||^2, which puts it
                         in the main term's units (mse = V * its normalised MSE) with Gao's ratio between the two
              jumprelu   l0_coefficient * mean_n sum_i H(z_i - theta_i)

JumpReLU's step H has no useful gradient; its straight-through estimator uses a rectangle kernel of width epsilon,
K(u) = 1 if |u| < 1/2: with respect to theta,

    d/d theta [z H(z - theta)] = -(theta / epsilon) K((z - theta) / epsilon),   d/d theta H(z - theta) = -(1 / epsilon) K(...)

and nothing flows to z through H (z H(z - theta) passes dL/df H to z, as for a ReLU).
Metrics (`metrics`): L0 (active latents per row), normalised MSE  sum ||x - x_hat||^2 / sum ||x - mean x||^2,
explained variance 1 - normalised MSE, and the fraction of latents that never fire in the batch.

Trained by the one trainer (`model.name = "sae"`, `data.name = "activations"`: rows of an activation store,
data/activation_rows.py): `__call__(x [B, D])` sows the loss into "losses" and the metrics into "metrics", so the
trainer's whole objective is the SAE's (the rows have no next-token targets: the returned logits [B, 1, 1] and
the data's loss mask are zero, so the logged cross-entropy `loss` is 0 and `aux_loss` is the SAE's loss). The
model state "sae_state" counts the rows since each latent last fired; a latent is dead, for AuxK, after
`dead_after` rows without firing (Gao et al.: 10M tokens).
"""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from data.config_fields import field
from models import lm

KINDS = ("relu", "topk", "batchtopk", "jumprelu")
STATE = "sae_state"


@dataclasses.dataclass(frozen=True)
class SAEConfig:
    name: str = "sae"
    d_in: int = field(-1, min=-1)  # D, the activation width (-1: from the data)
    num_latents: int = field(512, min=1)  # M
    kind: str = field("topk", choices=KINDS)
    k: int = field(32, min=1)  # topk / batchtopk: active latents per row
    l1_coefficient: float = field(1e-3, min=0)  # relu
    aux_k: int = field(256, min=1)  # topk / batchtopk: dead latents the AuxK loss uses
    aux_coefficient: float = field(1 / 32, min=0)  # Gao et al.'s alpha
    l0_coefficient: float = field(1e-3, min=0)  # jumprelu
    epsilon: float = field(1e-3, above=0)  # jumprelu: the rectangle kernel's width
    initial_threshold: float = field(1e-3, above=0)  # jumprelu: theta at initialisation
    dead_after: int = field(100_000, min=1)  # rows without firing before a latent counts as dead (AuxK)
    threshold_rate: float = field(0.01, above=0, max=1)  # batchtopk: r of the inference threshold's running mean
    b_dec_init: str = field("geometric_median", choices=("geometric_median", "zeros"))  # at a fresh start
    input_scale: float = field(1.0, min=-1)  # s; -1: from the data, sqrt(D / E||x||^2)


def validate(m) -> list[str]:
    """Problems with a `config.model` of name "sae" beyond each key's range."""
    found = []
    if m.input_scale != -1 and m.input_scale <= 0:
        found.append(f"model.input_scale={m.input_scale} must be positive, or -1 (from the data)")
    if m.kind in ("topk", "batchtopk") and m.k > m.num_latents:
        found.append(f"model.k={m.k} exceeds model.num_latents={m.num_latents}; choose k <= num_latents")
    return found


MEDIAN_ROWS = 32_768  # OpenAI's sample for the geometric median


def geometric_median(x, iterations: int = 200, tol: float = 1e-9):
    """argmin_b sum_n ||x_n - b|| of rows x [N, D] in float64, by Weiszfeld's iteration from the mean (a row
    the estimate lands on is weighted by 1 / 1e-12 instead of infinity)."""
    x = np.asarray(x, np.float64)
    b = x.mean(axis=0)
    for _ in range(iterations):
        weights = 1.0 / np.maximum(np.linalg.norm(x - b, axis=1), 1e-12)
        new = weights @ x / weights.sum()
        if np.linalg.norm(new - b) <= tol * (1.0 + np.linalg.norm(b)):
            return new
        b = new
    return b


def _rectangle(u):
    return (jnp.abs(u) < 0.5).astype(u.dtype)


def _theta_cotangent(d_theta, theta):
    return jnp.sum(d_theta, axis=tuple(range(d_theta.ndim - theta.ndim)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def jump_relu(z, theta, epsilon: float):
    return z * (z > theta)


def _jump_relu_forward(z, theta, epsilon):
    return jump_relu(z, theta, epsilon), (z, theta)


def _jump_relu_backward(epsilon, saved, g):
    z, theta = saved
    d_theta = -(theta / epsilon) * _rectangle((z - theta) / epsilon) * g
    return g * (z > theta), _theta_cotangent(d_theta, theta)


jump_relu.defvjp(_jump_relu_forward, _jump_relu_backward)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def step(z, theta, epsilon: float):
    return (z > theta).astype(z.dtype)


def _step_forward(z, theta, epsilon):
    return step(z, theta, epsilon), (z, theta)


def _step_backward(epsilon, saved, g):
    z, theta = saved
    d_theta = -(1.0 / epsilon) * _rectangle((z - theta) / epsilon) * g
    return jnp.zeros_like(z), _theta_cotangent(d_theta, theta)


step.defvjp(_step_forward, _step_backward)


def top_k_mask(values, k: int):
    """1 at each row's k largest values (ties broken by position), 0 elsewhere."""
    _, index = jax.lax.top_k(values, k)
    return jnp.put_along_axis(jnp.zeros_like(values), index, 1.0, axis=-1, inplace=False)  # O(N k), not O(N k M)


def batch_top_k_mask(values, k: int):
    """1 at the k * rows largest values of the whole batch, 0 elsewhere."""
    flat = values.reshape(-1)
    return top_k_mask(flat[None], k * values.shape[0])[0].reshape(values.shape)


class SparseAutoencoder(nn.Module, lm.Capabilities):
    cfg: SAEConfig

    @staticmethod
    def example_inputs(cfg, batch: int) -> jax.ShapeDtypeStruct:
        """Rows of activations, float32 [batch, d_in]."""
        return jax.ShapeDtypeStruct((batch, cfg.d_in), jnp.float32)

    @staticmethod
    def initial_from_data(cfg, train: dict) -> dict:
        """b_dec at the geometric median of the scaled training rows (`b_dec_init`)."""
        if cfg.b_dec_init != "geometric_median":
            return {}
        rows = np.asarray(train["inputs"][:MEDIAN_ROWS], np.float64) * cfg.input_scale
        return {"b_dec": geometric_median(rows).astype(np.float32)}
    plot_keys = ("aux_loss", "normalised_mse", "l0")  # the trainer's curves.png (an SAE's loss is all aux_loss)

    def setup(self):
        cfg = self.cfg
        self.v_dec = self.param("v_dec", nn.initializers.lecun_normal(), (cfg.num_latents, cfg.d_in))
        tied = lambda key, shape: (self.v_dec / jnp.linalg.norm(self.v_dec, axis=-1, keepdims=True)).T  # noqa: E731
        self.w_enc = self.param("w_enc", tied, (cfg.d_in, cfg.num_latents))
        self.b_enc = self.param("b_enc", nn.initializers.zeros, (cfg.num_latents,))
        self.b_dec = self.param("b_dec", nn.initializers.zeros, (cfg.d_in,))
        if self.has_variable(STATE, "rows_since_fired") or self.is_mutable_collection(STATE):  # the trainer's
            self.rows_since_fired = self.variable(STATE, "rows_since_fired", jnp.zeros, (cfg.num_latents,),
                                                  jnp.float32)
            if cfg.kind == "batchtopk":
                self.threshold = self.variable(STATE, "threshold", jnp.zeros, (), jnp.float32)
        if cfg.kind == "jumprelu":
            self.log_theta = self.param("log_theta", nn.initializers.constant(jnp.log(cfg.initial_threshold)),
                                        (cfg.num_latents,))

    def decoder(self):
        """W_dec [M, D] with unit-norm rows (the latents' directions)."""
        return self.v_dec / jnp.linalg.norm(self.v_dec, axis=-1, keepdims=True)

    def pre_activations(self, x):
        return (self.cfg.input_scale * x - self.b_dec) @ self.w_enc + self.b_enc

    def encode(self, x, training: bool = False):
        """x [N, D] -> latents f [N, M]; BatchTopK keeps the batch's k N largest in training or while it has no
        threshold (no state), and those above its threshold otherwise."""
        cfg, z = self.cfg, self.pre_activations(x)
        if cfg.kind == "jumprelu":
            return jump_relu(z, jnp.exp(self.log_theta), cfg.epsilon)
        f = jax.nn.relu(z)
        if cfg.kind == "topk":
            return f * jax.lax.stop_gradient(top_k_mask(f, cfg.k))
        if cfg.kind == "batchtopk" and (training or getattr(self, "threshold", None) is None):
            return f * jax.lax.stop_gradient(batch_top_k_mask(f, cfg.k))
        if cfg.kind == "batchtopk":
            return f * (f > self.threshold.value)
        return f

    def decode(self, f):
        return (f @ self.decoder() + self.b_dec) / self.cfg.input_scale

    def reconstruct(self, x):
        """x [N, D] -> x_hat [N, D]."""
        return self.decode(self.encode(x))

    def __call__(self, x):
        """The trainer's step: sows the loss (AuxK over the latents dead by the state) and the metrics, and, when
        the state is mutable (training), counts rows since each latent fired; returns zero logits [B, 1, 1]."""
        rows_since = getattr(self, "rows_since_fired", None)
        dead = None if rows_since is None else rows_since.value >= self.cfg.dead_after
        training = self.is_mutable_collection(STATE) and not self.is_initializing()
        loss, stats, f = self._loss_and_latents(x, dead, training)
        self.sow("losses", "sae", loss)
        for name, value in stats.items():
            self.sow("metrics", name, value)
        if rows_since is not None and training:
            rows_since.value = jnp.where(jnp.any(f != 0, axis=0), 0.0, rows_since.value + x.shape[0])
            if self.cfg.kind == "batchtopk":  # the running mean of the smallest activation kept
                smallest = jnp.min(jnp.where(f > 0, f, jnp.inf))
                rate, old = self.cfg.threshold_rate, self.threshold.value
                self.threshold.value = jnp.where(jnp.isfinite(smallest), (1 - rate) * old + rate * smallest, old)
        return jnp.zeros((x.shape[0], 1, 1), jnp.float32)

    def loss(self, x, dead=None):
        """(loss, {"mse", "penalty", "l0", "normalised_mse", "explained_variance", "dead_fraction"}) as in
        training; `dead`: bool [M], the latents the AuxK loss may use (topk / batchtopk; None: none)."""
        return self._loss_and_latents(x, dead, training=True)[:2]

    def _loss_and_latents(self, x, dead, training: bool):
        cfg = self.cfg
        f = self.encode(x, training)
        x_hat = self.decode(f)
        mse = jnp.mean(jnp.sum(jnp.square(cfg.input_scale * (x - x_hat)), axis=-1))
        if cfg.kind == "relu":
            penalty = cfg.l1_coefficient * jnp.mean(jnp.sum(f * jnp.linalg.norm(self.decoder(), axis=-1), axis=-1))
        elif cfg.kind == "jumprelu":
            z = self.pre_activations(x)
            penalty = cfg.l0_coefficient * jnp.mean(jnp.sum(step(z, jnp.exp(self.log_theta), cfg.epsilon), axis=-1))
        else:
            penalty = cfg.aux_coefficient * self.aux_k_loss(x, x_hat, dead)
        return mse + penalty, dict(mse=mse, penalty=penalty, **metrics(x, x_hat, f)), f

    def aux_k_loss(self, x, x_hat, dead):
        """V sum_n ||e - W_dec f_aux||^2 / sum_n ||e - mean e||^2, e = s (x - x_hat) (no gradient into x_hat),
        f_aux = ReLU of the k_aux largest pre-activations among the dead latents, V = mean_n ||s x - mean s x||^2;
        0 when none is dead."""
        if dead is None:
            return jnp.zeros(())
        z = jnp.where(dead, jax.nn.relu(self.pre_activations(x)), 0.0)
        k = min(self.cfg.aux_k, self.cfg.num_latents)
        f_aux = z * jax.lax.stop_gradient(top_k_mask(z, k))
        s = self.cfg.input_scale
        error = s * (x - jax.lax.stop_gradient(x_hat))
        normalised = jnp.sum(jnp.square(error - f_aux @ self.decoder())) / jnp.maximum(spread(error), 1e-12)
        return jnp.where(jnp.any(dead), normalised * spread(s * x) / x.shape[0], 0.0)


def spread(v):
    """sum_n ||v_n - mean v||^2 over the rows of v [N, D]: the denominator of a normalised MSE."""
    return jnp.sum(jnp.square(v - jnp.mean(v, axis=0)))


def metrics(x, x_hat, f) -> dict:
    residual = jnp.sum(jnp.square(x - x_hat))
    normalised = residual / spread(x)
    return dict(l0=jnp.mean(jnp.sum(f != 0, axis=-1)), normalised_mse=normalised, explained_variance=1.0 - normalised,
                dead_fraction=jnp.mean(jnp.all(f == 0, axis=0)))
