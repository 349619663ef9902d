"""The logit lens (nostalgebraist 2020) of a language-model run: the residual stream after each layer read through
the final norm and the unembedding,

    logits_l = W_U norm(x_l),   l = 0 (the embeddings), 1, ..., L (the last layer: the model's own logits)

and, per layer, the next-token cross-entropy and accuracy over the run's evaluation batches (its loss mask).

    python -m experiments.analysis.logit_lens --workdir=RUN [--max_examples=256]

Writes WORKDIR/logit_lens.json and WORKDIR/logit_lens.png. Any family whose layers sow their residual stream
(experiments/analysis/activations.py): transformer, MoE, MLA, hybrids of Mamba-1 / Mamba-2 / attention / conv layers.
"""

import json
import os

from absl import app, flags, logging
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax

import data as datasets
from experiments import restore
from experiments.analysis import activations
from experiments.training import cli, plots

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def lens_metrics(model, variables, inputs, targets, loss_mask) -> dict[str, jax.Array]:
    """{"loss", "accuracy"}: float [L + 1] (masked means over the positions) of each layer's lens logits."""
    _, embed, per_layer = activations.capture(model, variables, inputs)
    losses, accuracies = [], []
    for x in [embed] + [layer["residual"] for layer in per_layer]:
        logits = model.apply(variables, x, method=model.lens_logits)
        per_token = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        hits = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
        weight = jnp.sum(loss_mask)
        losses.append(jnp.sum(per_token * loss_mask) / weight)
        accuracies.append(jnp.sum(hits * loss_mask) / weight)
    return {"loss": jnp.stack(losses), "accuracy": jnp.stack(accuracies)}


def lens_report(workdir: str, max_examples: int = 256, batch_size: int = 32) -> dict:
    """{"layers": [0..L], "loss", "accuracy"} over the first `max_examples` evaluation examples of the run."""
    config = restore.load_config(workdir)
    model, variables = restore.load_variables(config, workdir)
    evals = datasets.load(config.data, seed=config.seed).evals["eval"]
    count = min(max_examples, len(evals["inputs"]))
    metrics = jax.jit(lambda i, t, m: lens_metrics(model, variables, i, t, m))
    totals, weights = None, 0.0
    for start in range(0, count, batch_size):
        batch = {k: jnp.asarray(v[start:min(start + batch_size, count)]) for k, v in evals.items()}
        mask = batch.get("loss_mask", jnp.ones(batch["targets"].shape, jnp.float32))
        weight = float(jnp.sum(mask))
        out = metrics(batch["inputs"], batch["targets"], mask)
        totals = {k: np.asarray(v) * weight + (totals[k] if totals else 0.0) for k, v in out.items()}
        weights += weight
    loss, accuracy = totals["loss"] / weights, totals["accuracy"] / weights
    return {"layers": list(range(len(loss))), "loss": [float(x) for x in loss],
            "accuracy": [float(x) for x in accuracy], "examples": count}


def plot(report: dict, path: str) -> None:
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.5))
    ax_loss.plot(report["layers"], report["loss"], marker="o")
    ax_acc.plot(report["layers"], report["accuracy"], marker="o")
    ax_loss.set(xlabel="layer (0: embeddings)", ylabel="next-token loss (nats)", title="logit lens: loss")
    ax_acc.set(xlabel="layer (0: embeddings)", ylabel="next-token accuracy", title="logit lens: accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
    plots.save_figure(fig, path)


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    try:
        report = lens_report(_WORKDIR.value, _MAX_EXAMPLES.value)
    except (FileNotFoundError, ValueError) as e:
        cli.fail(str(e))
    with open(os.path.join(_WORKDIR.value, "logit_lens.json"), "w") as f:
        json.dump(report, f)
    plot(report, os.path.join(_WORKDIR.value, "logit_lens.png"))
    for layer, loss, accuracy in zip(report["layers"], report["loss"], report["accuracy"]):
        print(f"layer {layer}: loss {loss:.4f}, accuracy {accuracy:.4f}")


if __name__ == "__main__":  # the flags exist only for the command
    _WORKDIR = flags.DEFINE_string("workdir", None, "A language-model run folder (config.json and checkpoints/).",
                                   required=True)
    _MAX_EXAMPLES = flags.DEFINE_integer("max_examples", 256, "Evaluation examples read (the first ones).")
    app.run(main)
