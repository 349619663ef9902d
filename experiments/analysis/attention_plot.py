"""Attention-pattern plots: every softmax-attention layer's weights P[h, query, key] on one prompt, one panel per
(layer, head), with the prompt's tokens on the axes.

    python -m experiments.analysis.attention_plot --workdir=RUN --prompt="ROMEO:\\nI" [--out=WORKDIR/attention.png]

The prompt is text for a byte-level text run, comma-separated token ids otherwise. Layers without softmax attention
(Mamba, linear attention, short convs) have no pattern and are left out.
"""

import os

from absl import app, flags, logging
import jax.numpy as jnp
import matplotlib
import numpy as np

from experiments import restore
from experiments.analysis import activations, patching
from experiments.training import cli, plots

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def patterns(model, variables, tokens) -> dict[int, np.ndarray]:
    """{layer (run order): P [H, T, T]} of the first row of `tokens`, for the layers that have one."""
    _, _, layers = activations.capture(model, variables, tokens)
    return {i: np.asarray(layer["attention_pattern"][0]) for i, layer in enumerate(layers) if "attention_pattern" in layer}


def plot(found: dict, labels: list[str], path: str) -> None:
    heads = max(p.shape[0] for p in found.values())
    size = 0.22 * len(labels) + 1.2
    fig, axes = plt.subplots(len(found), heads, figsize=(size * heads, size * len(found)), squeeze=False)
    for row, (layer, pattern) in zip(axes, found.items()):
        for head, ax in enumerate(row):
            ax.imshow(pattern[head], cmap="Blues", vmin=0, vmax=1)
            ax.set_title(f"layer {layer} head {head}", fontsize=8)
            ax.set_xticks(range(len(labels)), labels, fontsize=6)
            ax.set_yticks(range(len(labels)), labels, fontsize=6)
    plots.save_figure(fig, path, dpi=110)


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    args = flags.FLAGS
    try:
        config = restore.load_config(args.workdir)
        tokens = patching.prompt_tokens(config, args.prompt)
        model, variables = restore.load_variables(config, args.workdir)
        found = patterns(model, variables, jnp.asarray([tokens]))
        if not found:
            raise ValueError(f"--workdir={args.workdir!r}: model.name={config.model.name!r} has no softmax-attention "
                             "layer whose pattern can be captured")
    except (FileNotFoundError, ValueError) as e:
        cli.fail(str(e))
    text_run = config.data.name == "text" and config.data.tokenizer == "byte"
    labels = [repr(chr(t))[1:-1] if text_run else str(t) for t in tokens]
    out = args.out or os.path.join(args.workdir, "attention.png")
    plot(found, labels, out)
    print(out)


if __name__ == "__main__":  # the flags exist only for the command
    flags.DEFINE_string("workdir", None, "A run folder.", required=True)
    flags.DEFINE_string("prompt", None, "The prompt (text, or comma-separated token ids).", required=True)
    flags.DEFINE_string("out", "", "The PNG (default WORKDIR/attention.png).")
    app.run(main)
