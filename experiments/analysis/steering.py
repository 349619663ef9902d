"""Steering (contrastive activation addition, Rimsky et al. 2024; Turner et al. 2023): a direction in the residual
stream after layer l, added at scale alpha at every position while the model runs or generates,

    v = mean over A's tokens of x_l  -  mean over B's tokens of x_l        (two sets of prompts, masks for padding)
    x_l <- x_l + alpha v

or any other direction (an SAE decoder row). It goes through the "steering" collection the layers read
(models/layers.sow_site), so the full pass, the KV-cached decode and the sampler all steer alike.
"""

import jax
import jax.numpy as jnp

from experiments.analysis import activations


def mean_difference(model, variables, layer: int, tokens_a, tokens_b, mask_a=None, mask_b=None, site="residual"):
    """v [D]: the mean of `site` after `layer` over the tokens of A minus that over B (masks: 1 where counted)."""
    def mean(tokens, mask):
        acts = activations.capture(model, variables, tokens)[2][layer][site]
        weights = jnp.ones(tokens.shape) if mask is None else jnp.asarray(mask, acts.dtype)
        return jnp.sum(acts * weights[..., None], axis=(0, 1)) / jnp.sum(weights)
    return mean(tokens_a, mask_a) - mean(tokens_b, mask_b)


def steering_tree(model, variables, tokens, layer: int, vector, alpha: float, site="residual") -> dict:
    """The "steering" collection: alpha * vector at `site` after `layer` (run order), zero at every other layer."""
    _, sown = jax.eval_shape(lambda t: activations.capture_tree(model, variables, t), tokens[:, :1])  # shapes only
    tree = {}
    for i, path in enumerate(activations.layer_paths(sown)):
        stack, member, unit = path
        units = activations.sites_at(sown, path)[site].shape[0]
        scope = tree.setdefault(stack, {}) if member is None else tree.setdefault(stack, {}).setdefault(member, {})
        scope.setdefault(site, jnp.zeros((units, vector.shape[-1]), vector.dtype))
        if i == layer:
            scope[site] = scope[site].at[unit].set(alpha * vector)
    return tree


def steered(variables: dict, tree: dict) -> dict:
    """The variables to pass to model.apply / decode / sampling.generate to steer."""
    return {**variables, "steering": tree}
