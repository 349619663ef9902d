"""A run folder's loss on its own evaluation sets, without training: for runs written rather than trained (compressed,
merged, imported) and for any checkpoint of a trained one.

    python -m experiments.evaluation.loss_eval --workdir=RUN [--step=N]

Every example of each evaluation set the run's data config makes is scored once, as the trainer's evaluation scores
it (`experiments.losses.masked_sums`: the masked mean cross-entropy, accuracy, perplexity; bits per character for
text). Prints one line per set and writes WORKDIR/loss_eval.json.
"""

import json
import os

import jax
import jax.numpy as jnp

from experiments import losses
from experiments.training import trainer


def evaluate(workdir: str, step: int | None = None, batch_size: int = 64) -> dict:
    """{set name: {"loss", "accuracy", "perplexity"[, "bits_per_char"]}} of the run's newest (or `step`) weights."""
    import data as datasets
    from experiments import restore

    config = restore.load_config(workdir)
    model, variables = restore.load_variables(config, workdir, step)
    return scorer(model, datasets.load(config.data, config.seed), batch_size)(variables)


def scorer(model, splits, batch_size: int = 64):
    """variables -> `evaluate`'s results on `splits` (data.load's), compiled once for every set of weights given."""
    score = jax.jit(lambda variables, batch: losses.masked_sums(model.apply(variables, batch["inputs"]),
                                                                batch["targets"], batch["loss_mask"]))

    def results(variables) -> dict:
        found = {}
        for name, examples in splits.evals.items():
            totals = None
            for start in range(0, len(examples["inputs"]), batch_size):
                batch = {k: jnp.asarray(examples[k][start:start + batch_size])
                         for k in ("inputs", "targets", "loss_mask")}
                sums = score(variables, batch)  # the weights an argument, not constants of the program
                totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
            found[name] = trainer.metrics_from_sums(totals, splits.chars_per_token)
        return found

    return results


def main(argv):
    from absl import flags

    from experiments.training import cli

    del argv
    f = flags.FLAGS
    try:
        results = evaluate(f.workdir, f.step)
    except FileNotFoundError as error:
        cli.fail(str(error))
    for name, metrics in results.items():
        print(f"{name}: " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    with open(os.path.join(f.workdir, "loss_eval.json"), "w") as file:
        json.dump(results, file, indent=1)


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("workdir", None, "The run folder.", required=True)
    flags.DEFINE_integer("step", None, "The checkpoint step (default: the newest intact one).")
    app.run(main)
