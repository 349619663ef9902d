"""Loss by evaluation length and by position for a trained language-model run: how it behaves past its training context.

    python -m experiments.evaluation.length_eval --workdir=runs/lm [--factors=1,2,4,8] [--max_windows=64]

L is the run's training context (`data.seq_len`). For each factor f the run's own validation tokens (its tokenizer,
its split) are cut into consecutive windows of f L tokens, as the trainer cuts them into windows of L, and the model
(built with max_len = f L, everything else as trained) scores every next token. Reported, per factor:

    loss(f)           mean cross-entropy over the windows' tokens (f = 1: the trainer's evaluation loss)
    loss(f, bucket b) mean over the positions b L .. (b + 1) L - 1 of the windows: flat past b = 0 when the model
                      extrapolates, climbing when it does not

Writes WORKDIR/length_eval.json and WORKDIR/length_eval.png (loss against position, one line per factor). Learned
positions have no embedding past their table: a factor that needs one is a one-line error before anything compiles.
"""

import json
import os
import sys

from absl import app, flags, logging
import jax
import matplotlib
import numpy as np
import optax

import data as datasets
import models
from data import text
from experiments import restore
from experiments.training import cli, plots

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def validation_stream(config) -> np.ndarray:
    """The run's validation tokens in order: the trainer's windows of L + 1 tokens (one token of overlap) joined."""
    windows = datasets.load(config.data, seed=config.seed).evals["eval"]
    return np.concatenate([windows["inputs"].reshape(-1), windows["targets"][-1, -1:]])


def check_lengths(config, factors) -> None:
    """ValueError (one line) for a factor that learned positions or a bad value cannot evaluate."""
    seq_len = config.data.seq_len
    for factor in factors:
        if factor < 1:
            raise ValueError(f"--factors={factor} must be >= 1 (multiples of the training context {seq_len})")
        if config.model.get("positional") == "learned" and factor * seq_len > config.model.max_len:
            raise ValueError(f"--factors={factor} asks for {factor * seq_len} tokens, past the learned position table "
                             f"(model.max_len={config.model.max_len}); use factors <= {config.model.max_len // seq_len}")


def token_losses(config, variables, stream, length: int, max_windows: int) -> np.ndarray:
    """float [windows, length]: cross-entropy of each next token in consecutive windows of `length` tokens."""
    windows = text.pack(stream, length)
    count = min(len(windows["inputs"]), max_windows)
    if count == 0:
        raise ValueError(f"the validation split ({len(stream)} tokens) holds no window of {length} tokens")
    model_config = config.model.copy_and_resolve_references()
    with model_config.unlocked():
        model_config.max_len = max(length, config.model.max_len)
    model = models.build(model_config)

    @jax.jit
    def losses(inputs, targets):
        return optax.softmax_cross_entropy_with_integer_labels(model.apply(variables, inputs), targets)

    rows = [losses(windows["inputs"][i:i + 8], windows["targets"][i:i + 8]) for i in range(0, count, 8)]
    return np.concatenate([np.asarray(r) for r in rows])[:count]


def length_report(workdir: str, factors, max_windows: int = 64, model_overrides=None) -> dict:
    """{"seq_len", "factors": {f: {"loss", "windows", "by_bucket": [loss of positions bL..(b+1)L-1]}}, "curves"};
    model_overrides: config.model keys changed for the evaluation (e.g. a RoPE scaling applied without training)."""
    config = restore.load_config(workdir)
    if model_overrides:
        config.model.update(**model_overrides)
    if config.data.name != "text":
        raise ValueError(f"the run in {workdir!r} trained on data.name={config.data.name!r}; length evaluation needs "
                         "a text run")
    check_lengths(config, factors)
    _, variables = restore.load_variables(config, workdir)
    stream, seq_len = validation_stream(config), config.data.seq_len
    report = {"seq_len": seq_len, "factors": {}, "curves": {}}
    for factor in factors:
        per_token = token_losses(config, variables, stream, factor * seq_len, max_windows)
        by_position = per_token.mean(axis=0)
        report["factors"][str(factor)] = {
            "loss": float(per_token.mean()), "windows": len(per_token),
            "by_bucket": [float(b) for b in by_position.reshape(factor, seq_len).mean(axis=1)]}
        report["curves"][str(factor)] = [float(x) for x in by_position]
    return report


def plot(report: dict, path: str) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    for factor, curve in report["curves"].items():
        ax.plot(np.arange(1, len(curve) + 1), curve, label=f"{factor}x ({report['factors'][factor]['loss']:.3f})",
                lw=1)
    ax.axvline(report["seq_len"], color="gray", ls="--", lw=0.8, label="training context")
    ax.set(xlabel="position", ylabel="loss (nats)", xscale="log", title="loss by position and evaluation length")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    plots.save_figure(fig, path)


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    try:
        factors = [int(f) for f in _FACTORS.value]
    except ValueError:
        cli.fail(f"--factors={','.join(_FACTORS.value)} must be integers (multiples of the training context)")
    try:
        report = length_report(_WORKDIR.value, factors, _MAX_WINDOWS.value)
    except (FileNotFoundError, ValueError) as e:
        cli.fail(str(e))
    with open(os.path.join(_WORKDIR.value, "length_eval.json"), "w") as f:
        json.dump(report, f)
    plot(report, os.path.join(_WORKDIR.value, "length_eval.png"))
    for factor, row in report["factors"].items():
        buckets = " ".join(f"{b:.3f}" for b in row["by_bucket"])
        print(f"{factor}x ({int(factor) * report['seq_len']} tokens, {row['windows']} windows): loss {row['loss']:.4f}"
              f"  by context-length bucket: {buckets}", file=sys.stdout)


if __name__ == "__main__":  # the flags exist only for the command (studies import the functions above)
    _WORKDIR = flags.DEFINE_string("workdir", None, "A language-model run folder (holds config.json and checkpoints/).",
                                   required=True)
    _FACTORS = flags.DEFINE_list("factors", ["1", "2", "4", "8"], "Evaluation lengths, in multiples of the training "
                                 "context.")
    _MAX_WINDOWS = flags.DEFINE_integer("max_windows", 64, "At most this many windows per length (the first ones).")
    app.run(main)
