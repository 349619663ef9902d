"""A trained sparse autoencoder evaluated inside the model it reads (Gao et al. 2024, section 4):

    python -m experiments.analysis.sae_eval --workdir=SAE_RUN [--split=eval] [--batches=16] [--batch_size=64]

on the language model's `split` (its store's run, site, layer and position, data/activation_rows.description):

    L0                   active latents per row                      normalised MSE   sum ||x - x_hat||^2 / sum ||x - mean x||^2
    explained variance   1 - normalised MSE                          dead / dense     latents firing on no row / on > 10% of rows
    loss recovered       (CE_zero - CE_sae) / (CE_zero - CE_clean)   CE: the model's masked next-token loss, clean,
                         with x_hat spliced in for x at the site (at the store's position, or every one), and with
                         the site zero-ablated there; 1: the SAE loses nothing, 0: no better than deleting the site

Writes `sae_eval.json` in the SAE's folder and prints it.
"""

import json
import os

from typing import Any, NamedTuple

from absl import app, flags, logging
import jax
import jax.numpy as jnp
import numpy as np

import data as datasets
from data import activation_rows as store_format
from experiments import losses, restore
from experiments.analysis import activation_store, activations, patching
from experiments.training import cli

DENSE = 0.1  # a latent firing on more than this fraction of rows is dense


def replaced(sown: dict, layer: int, site: str, value) -> dict:
    """`sown` with `site` after `layer` (run order) set to `value` [B, T, ...]."""
    stack, member, unit = activations.layer_paths(sown)[layer]
    scope = dict(sown[stack]) if member is None else dict(sown[stack][member])
    scope[site] = (scope[site][0].at[unit].set(value),)
    tree = dict(sown)
    tree[stack] = scope if member is None else {**sown[stack], member: scope}
    return tree


def spliced_logits(model, variables, tokens, sown, layer: int, site: str, value, position=None):
    """The model's logits with `site` after `layer` replaced by `value` at `position` (None: every position)."""
    source = replaced(sown, layer, site, value)
    tree = patching.patches(sown, site, [layer], None if position is None else [position], source=source)
    return patching.patched_logits(model, variables, tokens, tree)


def batch_sums(model, variables, examples, layer: int, site: str, reconstruct, position=None) -> dict:
    """Sums over one batch of LM examples: the masked CE clean / spliced / zero-ablated and their counts, and of the
    rows at the site: squared error, squared deviation from the rows' mean, count; `reconstruct`: x [N, D] ->
    (x_hat, latents f [N, M])."""
    tokens = jnp.asarray(examples["inputs"])
    logits, sown = activations.capture_tree(model, variables, tokens)
    layer = layer % len(activations.layer_paths(sown))
    path = activations.layer_paths(sown)[layer]
    x = activations.sites_at(sown, path)[site][path[2]]
    rows = x if position is None else x[:, position]
    x_hat, f = reconstruct(rows.reshape(-1, rows.shape[-1]))
    x_hat = x_hat.reshape(rows.shape)
    value = x_hat if position is None else x.at[:, position].set(x_hat)
    ce = lambda lg: losses.masked_sums(lg, examples["targets"], examples["loss_mask"])  # noqa: E731
    flat = rows.reshape(-1, rows.shape[-1])
    return {"clean": ce(logits), "sae": ce(spliced_logits(model, variables, tokens, sown, layer, site, value, position)),
            "zero": ce(spliced_logits(model, variables, tokens, sown, layer, site, jnp.zeros_like(x), position)),
            "squared_error": jnp.sum(jnp.square(flat - x_hat.reshape(flat.shape))), "row_sum": jnp.sum(flat, axis=0),
            "row_square_sum": jnp.sum(jnp.square(flat)), "rows": flat.shape[0], "active": jnp.sum(f != 0),
            "fired": jnp.sum(f != 0, axis=0)}


def summarise(totals: dict) -> dict:
    """The metrics of summed `batch_sums`."""
    mean_loss = {k: float(totals[k]["loss"] / max(float(totals[k]["count"]), 1.0)) for k in ("clean", "sae", "zero")}
    accuracy = {k: float(totals[k]["correct"] / max(float(totals[k]["count"]), 1.0)) for k in ("clean", "sae", "zero")}
    rows = float(totals["rows"])
    variance = float(totals["row_square_sum"]) - float(np.sum(np.square(totals["row_sum"]))) / rows
    normalised = float(totals["squared_error"]) / variance
    frequency = np.asarray(totals["fired"]) / rows
    gap = mean_loss["zero"] - mean_loss["clean"]
    return {"l0": float(totals["active"]) / rows, "normalised_mse": normalised, "explained_variance": 1.0 - normalised,
            "dead_fraction": float(np.mean(frequency == 0)), "dense_fraction": float(np.mean(frequency > DENSE)),
            "loss_clean": mean_loss["clean"], "loss_spliced": mean_loss["sae"], "loss_zero_ablated": mean_loss["zero"],
            "loss_recovered": (mean_loss["zero"] - mean_loss["sae"]) / gap if gap else float("nan"), "rows": int(rows),
            "accuracy_clean": accuracy["clean"], "accuracy_spliced": accuracy["sae"], "accuracy_zero_ablated": accuracy["zero"]}


def evaluate(model, variables, examples: dict, layer: int, site: str, reconstruct, position=None, batch_size=64,
             batches=16) -> dict:
    """`summarise` over the first `batches` batches of `examples`."""
    step = jax.jit(lambda batch: batch_sums(model, variables, batch, layer, site, reconstruct, position))
    totals = None
    for start in range(0, min(len(examples["inputs"]), batch_size * batches), batch_size):
        sums = step({k: v[start:start + batch_size] for k, v in examples.items()})
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    return summarise(jax.device_get(totals))


def sae_reconstruct(sae_model, sae_variables):
    """x [N, D] -> (x_hat, f) of a trained SAE."""
    def reconstruct(x):
        f = sae_model.apply(sae_variables, x, method=sae_model.encode)
        return sae_model.apply(sae_variables, f, method=sae_model.decode), f
    return reconstruct


class SAERun(NamedTuple):
    """A trained SAE with the model it reads: its store's description (run, site, layer, position) and the
    language model's config, examples of a split and variables."""

    config: Any
    model: Any
    variables: dict
    store: dict
    lm_config: Any
    lm: Any
    lm_variables: dict
    examples: dict


def load_run(sae_workdir: str, split: str = "eval") -> SAERun:
    sae_config = restore.load_config(sae_workdir)
    store = store_format.description(sae_config.data.store)
    lm_config = restore.load_config(store["workdir"])
    examples = activation_store.examples_of(datasets.load(lm_config.data, seed=lm_config.seed), split)
    return SAERun(sae_config, *restore.load_variables(sae_config, sae_workdir), store, lm_config,
                  *restore.load_variables(lm_config, store["workdir"]), examples)


def evaluate_run(sae_workdir: str, split: str = "eval", batches: int = 16, batch_size: int = 64) -> dict:
    """Evaluates the SAE run in `sae_workdir` on its language model's `split`; writes sae_eval.json there."""
    run = load_run(sae_workdir, split)
    store = run.store
    result = evaluate(run.lm, run.lm_variables, run.examples, store["layer"], store["site"],
                      sae_reconstruct(run.model, run.variables), store.get("position"), batch_size, batches)
    result.update(split=split, site=store["site"], layer=store["layer"], kind=run.config.model.kind)
    with open(os.path.join(sae_workdir, "sae_eval.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    args = flags.FLAGS
    try:
        result = evaluate_run(args.workdir, args.split, args.batches, args.batch_size)
    except (FileNotFoundError, ValueError, KeyError) as e:
        cli.fail(str(e))
    print(json.dumps(result))


if __name__ == "__main__":  # the flags exist only for the command
    flags.DEFINE_string("workdir", None, "An SAE's run folder (trained with experiments/configs/sae.py).", required=True)
    flags.DEFINE_string("split", "eval", "The language model's split: train, eval, or several comma-separated.")
    flags.DEFINE_integer("batches", 16, "Batches of the split evaluated (the first ones).")
    flags.DEFINE_integer("batch_size", 64, "Examples per batch.")
    app.run(main)
