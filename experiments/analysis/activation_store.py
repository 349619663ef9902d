"""An activation store on disk: one site of one layer of a run, captured batch by batch over a token dataset
(experiments/analysis/activations.py), for SAEs and probes to read without rerunning the model.

    python -m experiments.analysis.activation_store --workdir=RUN --out=DIR [--site=residual] [--layer=-1] [--split=train]
        [--position=all] [--batches=64] [--batch_size=32]

DIR holds `shard_00000.npy`, ... (float32 [rows of the batch, D], one per batch, each written to a temporary
name and renamed, so a shard is whole or absent) and `store.json` (the run, site, layer, split, width). A rerun
writes only the shards that are missing: an interrupted capture resumes where it stopped. Rows are every token of
the batch, or one position of each example (`--position`, e.g. -1: a grokking model's answer position); the
splits are the run's ("train", "eval", ...: several, comma-separated, are concatenated in order).
`data.activation_rows.read(DIR)` returns the shards in order as one array; `data.name = "activations"` trains on them.
"""

import json
import os

from absl import app, flags, logging
import jax
import numpy as np

import data as datasets
from data import activation_rows as store_format
from experiments import restore
from experiments.analysis import activations
from experiments.training import cli

read = store_format.read


def shard_path(out: str, index: int) -> str:
    return os.path.join(out, f"shard_{index:05d}.npy")


def _save_atomically(path: str, array: np.ndarray) -> None:
    temporary = path + ".tmp.npy"
    np.save(temporary, array)
    os.replace(temporary, path)


def examples_of(splits: datasets.Splits, split: str) -> dict:
    """The examples of `split`: "train", an evaluation set's name, or several comma-separated, concatenated."""
    parts = []
    for name in split.split(","):
        examples = splits.train if name == "train" else splits.evals.get(name)
        if examples is None:
            raise ValueError(f"--split={name!r} is not 'train' or one of {sorted(splits.evals)}")
        parts.append(examples)
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def write(workdir: str, out: str, site: str = "residual", layer: int = -1, split: str = "train", batches: int = 64,
          batch_size: int = 32, position: int | None = None) -> dict:
    """Captures `site` after `layer` (run order; -1: the last) at every position (or one `position`) for the first
    `batches` batches of the run's `split` and writes the missing shards; returns the store's description."""
    config = restore.load_config(workdir)
    examples = examples_of(datasets.load(config.data, seed=config.seed), split)
    model, variables = restore.load_variables(config, workdir)
    picked = (lambda a: a) if position is None else (lambda a: a[:, position])

    @jax.jit
    def capture(tokens):
        layers = activations.capture(model, variables, tokens)[2]
        if site not in layers[layer]:
            raise ValueError(f"--site={site!r} is not one of {sorted(layers[layer])} at layer {layer}")
        return picked(layers[layer][site])

    os.makedirs(out, exist_ok=True)
    count = min(batches, -(-len(examples["inputs"]) // batch_size))
    for index in range(count):
        if os.path.exists(shard_path(out, index)):
            continue
        tokens = examples["inputs"][index * batch_size:(index + 1) * batch_size]
        acts = np.asarray(capture(tokens), np.float32)
        _save_atomically(shard_path(out, index), acts.reshape(-1, acts.shape[-1]))
    description = {"workdir": os.path.abspath(workdir), "site": site, "layer": layer, "split": split,
                   "position": position, "batch_size": batch_size, "shards": count,
                   "width": int(np.load(shard_path(out, 0)).shape[-1])}
    with open(os.path.join(out, store_format.DESCRIPTION), "w") as f:
        json.dump(description, f)
    return description


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    args = flags.FLAGS
    try:
        position = None if args.position == "all" else int(args.position)
        description = write(args.workdir, args.out, args.site, args.layer, args.split, args.batches, args.batch_size,
                            position)
    except (FileNotFoundError, ValueError, KeyError, IndexError) as e:
        cli.fail(str(e))
    print(json.dumps(description))


if __name__ == "__main__":  # the flags exist only for the command
    flags.DEFINE_string("workdir", None, "A run folder (config.json and checkpoints/).", required=True)
    flags.DEFINE_string("out", None, "The store's folder.", required=True)
    flags.DEFINE_string("site", "residual", "residual, mixer_out, ffn_out or mlp_hidden.")
    flags.DEFINE_string("position", "all", "all, or one position of every example (e.g. -1: the last).")
    flags.DEFINE_integer("layer", -1, "The layer, in run order (-1: the last).")
    flags.DEFINE_string("split", "train", "train, an evaluation set's name (eval), or several comma-separated.")
    flags.DEFINE_integer("batches", 64, "Batches captured (the first ones).")
    flags.DEFINE_integer("batch_size", 32, "Examples per batch.")
    app.run(main)
