"""Grokfast (Lee et al. 2024, "Grokfast: Accelerated Grokking by Amplifying Slow Gradients") as an
optax gradient transformation: an exponential moving average low-pass filters the gradients and
its slow component is amplified before the optimizer sees them.

    mu_t = alpha mu_{t-1} + (1 - alpha) g_t          (mu_0 = g_0, the paper's initialisation)
    g'_t = g_t + lambda mu_t

Chained in front of the optimizer by `optimizer.grokfast.lamb > 0` (`experiments/optim/optimizers.py`); the
paper's setting for modular arithmetic is alpha 0.98, lambda 2.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax


class GrokfastState(NamedTuple):
    ema: optax.Updates
    count: jax.Array


def grokfast_ema(alpha: float = 0.98, lamb: float = 2.0) -> optax.GradientTransformation:
    def init(params):
        return GrokfastState(ema=jax.tree.map(jnp.zeros_like, params), count=jnp.zeros((), jnp.int32))

    def update(grads, state, params=None):
        del params
        first = state.count == 0
        ema = jax.tree.map(lambda m, g: jnp.where(first, g, alpha * m + (1 - alpha) * g), state.ema, grads)
        amplified = jax.tree.map(lambda g, m: g + lamb * m, grads, ema)
        return amplified, GrokfastState(ema=ema, count=state.count + 1)

    return optax.GradientTransformation(init, update)
