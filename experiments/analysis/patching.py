"""Activation patching and ablation at a named site (experiments/analysis/activations.py's sites), for any family whose
layers sow them: the model runs on `tokens` with the site's activation at chosen layers and positions replaced,

    x_site <- where(mask, source, x_site)        mask: the chosen layers (and positions), source per layer:
        patching        the activation of another run (e.g. the clean input, patched into a corrupted run)
        zero ablation   0
        mean ablation   the activation's mean over the batch and positions of a reference run

through the "patches" collection the layers read (models/layers.sow_site). Metrics of the patched logits against
the unpatched: the logit difference between two tokens at a position, and the next-token loss.

`sweep` patches the clean run's site into the corrupted run at every (layer, position) in turn and reports the
metric there normalised as (m_patched - m_corrupted) / (m_clean - m_corrupted): 1 where the site carries all of
the clean run's difference, 0 where none. The command runs it on a run folder's model:

    python -m experiments.analysis.patching --workdir=RUN --clean="..." --corrupted="..." --right=X --wrong=Y
        [--site=residual]

prompts as text for a byte-level text run, as comma-separated token ids otherwise (same length); --right and
--wrong are tokens likewise (one character or one id) compared at the last position. Writes
WORKDIR/patching.json and WORKDIR/patching.png (the heatmap over layers and positions).
"""

import functools
import json
import os

from absl import app, flags, logging
import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import restore
from experiments.analysis import activations
from experiments.training import cli, plots


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


def sweep(model, variables, clean, corrupted, site: str, right: int, wrong: int):
    """(normalised [layers, T], clean metric, corrupted metric): the logit difference right - wrong at the last
    position after patching the clean `site` into the corrupted run at each (layer, position) alone."""
    clean_logits, clean_sown = activations.capture_tree(model, variables, clean)
    corrupted_logits = model.apply(variables, corrupted)
    metric = lambda logits: logit_difference(logits, -1, right, wrong)  # noqa: E731
    high, low = metric(clean_logits), metric(corrupted_logits)
    layers, length = len(activations.layer_paths(clean_sown)), clean.shape[1]

    @functools.partial(jax.jit, static_argnums=0)
    def one(layer, position):  # a traced position: one compilation per layer
        tree = patches(clean_sown, site, [layer])
        tree = jax.tree.map(lambda m: m & (jnp.arange(length)[:, None] == position) if m.dtype == bool else m, tree)
        return metric(patched_logits(model, variables, corrupted, tree))

    table = jnp.stack([jnp.stack([one(layer, t) for t in range(length)]) for layer in range(layers)])
    return (table - low) / (high - low), float(high), float(low)


def prompt_tokens(config, prompt: str) -> list[int]:
    """A prompt as tokens: text for a byte-level text run, comma-separated token ids otherwise."""
    if config.data.name == "text" and config.data.tokenizer == "byte":
        return list(prompt.encode())
    return [int(t) for t in prompt.split(",")]


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    args = flags.FLAGS
    try:
        config = restore.load_config(args.workdir)
        clean, corrupted = prompt_tokens(config, args.clean), prompt_tokens(config, args.corrupted)
        right, wrong = prompt_tokens(config, args.right), prompt_tokens(config, args.wrong)
        if len(clean) != len(corrupted) or len(right) != 1 or len(wrong) != 1:
            raise ValueError(f"--clean and --corrupted must be as long ({len(clean)} != {len(corrupted)} tokens) and "
                             "--right / --wrong one token each")
        model, variables = restore.load_variables(config, args.workdir)
        table, high, low = sweep(model, variables, jnp.asarray([clean]), jnp.asarray([corrupted]), args.site,
                                 right[0], wrong[0])
    except (FileNotFoundError, ValueError) as e:
        cli.fail(str(e))
    report = {"site": args.site, "clean": args.clean, "corrupted": args.corrupted, "clean_logit_difference": high,
              "corrupted_logit_difference": low, "normalised": np.asarray(table).tolist()}
    with open(os.path.join(args.workdir, "patching.json"), "w") as f:
        json.dump(report, f)
    _plot(np.asarray(table), clean, os.path.join(args.workdir, "patching.png"), config, args.site)
    print(f"logit difference clean {high:.3f}, corrupted {low:.3f}; most restoring (layer, position): "
          f"{np.unravel_index(np.argmax(table), table.shape)}")


def _plot(table, clean, path, config, site):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4, 0.35 * table.shape[1] + 2), 0.45 * table.shape[0] + 1.5))
    image = ax.imshow(table, cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto")
    text_run = config.data.name == "text" and config.data.tokenizer == "byte"
    ax.set_xticks(range(len(clean)), [repr(chr(t))[1:-1] if text_run else str(t) for t in clean], fontsize=7)
    ax.set(xlabel="position", ylabel="layer", title=f"patching {site}: share of the clean logit difference restored")
    fig.colorbar(image)
    plots.save_figure(fig, path, dpi=110)


if __name__ == "__main__":  # the flags exist only for the command
    flags.DEFINE_string("workdir", None, "A run folder.", required=True)
    flags.DEFINE_string("clean", None, "The clean prompt.", required=True)
    flags.DEFINE_string("corrupted", None, "The corrupted prompt (as many tokens).", required=True)
    flags.DEFINE_string("right", None, "The token the clean prompt predicts.", required=True)
    flags.DEFINE_string("wrong", None, "The token the corrupted prompt predicts.", required=True)
    flags.DEFINE_string("site", "residual", "residual, mixer_out, ffn_out or mlp_hidden.")
    app.run(main)
