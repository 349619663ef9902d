"""Activation patching and ablation at a named site (experiments/activations.py's sites), for any family whose
layers sow them: the model runs on `tokens` with the site's activation at chosen layers and positions replaced,

    x_site <- where(mask, source, x_site)        mask: the chosen layers (and positions), source per layer:
        patching        the activation of another run (e.g. the clean input, patched into a corrupted run)
        zero ablation   0
        mean ablation   the activation's mean over the batch and positions of a reference run

through the "patches" collection the layers read (models/layers.sow_site). Metrics of the patched logits against
the unpatched: the logit difference between two tokens at a position, and the next-token loss.
"""

import jax
import jax.numpy as jnp
import optax

from experiments import activations


def patches(sown: dict, sites, layers, positions=None, source=None) -> dict:
    """The "patches" collection: at every stack of the sown tree, {site: {"value", "mask"}} for each of `sites` (a
    name or several), values from `source` (default `sown`), mask True at the model's `layers` (indices in run
    order) and `positions` (None: all)."""
    source = sown if source is None else source
    sites = (sites,) if isinstance(sites, str) else tuple(sites)
    paths = activations.layer_paths(sown)
    chosen = {paths[i] for i in layers}
    tree, patched = {}, set()
    for path in paths:
        stack, member, unit = path
        scope = tree.setdefault(stack, {}) if member is None else tree.setdefault(stack, {}).setdefault(member, {})
        for site in sites:
            values = activations.sites_at(source, path)
            if site not in values:  # e.g. a Mamba layer has no ffn_out
                continue
            if site not in scope:
                scope[site] = {"value": values[site], "mask": jnp.zeros((*values[site].shape[:-1], 1), bool)}
            if path in chosen:
                mask = _position_mask(values[site].shape[1:-1], positions)
                scope[site]["mask"] = scope[site]["mask"].at[unit].set(mask)
                patched.add(site)
    if missing := [s for s in sites if s not in patched]:
        raise ValueError(f"site(s) {missing} are not in layers {sorted(set(layers))}; the sites are "
                         f"{sorted({s for p in paths for s in activations.sites_at(source, p)})}")
    return tree


def _position_mask(shape, positions):
    """bool[B, T, 1]: True at `positions` (None: every position)."""
    if positions is None:
        return jnp.ones((*shape, 1), bool)
    chosen = jnp.zeros(shape[-1], bool).at[jnp.asarray(positions)].set(True)
    return jnp.broadcast_to(chosen[:, None], (*shape, 1))


def zeros_like(sown: dict) -> dict:
    return jax.tree.map(jnp.zeros_like, sown)


def means_like(sown: dict) -> dict:
    """Each activation replaced by its mean over the batch and positions (mean ablation's values)."""
    return jax.tree.map(lambda a: jnp.broadcast_to(jnp.mean(a, axis=(1, 2), keepdims=True), a.shape), sown)


def patched_logits(model, variables, tokens, patch_tree: dict):
    return model.apply({**variables, "patches": patch_tree}, tokens)


def logit_difference(logits, position: int, right: int, wrong: int):
    """Mean over the batch of logit[right] - logit[wrong] at `position`."""
    return jnp.mean(logits[:, position, right] - logits[:, position, wrong])


def next_token_loss(logits, tokens):
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]))
