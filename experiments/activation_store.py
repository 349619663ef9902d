"""An activation store on disk: one site of one layer of a run, captured batch by batch over a token dataset
(experiments/activations.py), for SAEs and probes to read without rerunning the model.

    python -m experiments.activation_store --workdir=RUN --out=DIR [--site=residual] [--layer=-1] [--split=train]
        [--batches=64] [--batch_size=32]

DIR holds `shard_00000.npy`, ... (float32 [tokens of the batch, D], one per batch, each written to a temporary
name and renamed, so a shard is whole or absent) and `store.json` (the run, site, layer, split, width). A rerun
writes only the shards that are missing: an interrupted capture resumes where it stopped. `read(DIR)` returns the
shards in order as one array.
"""

import glob
import json
import os

from absl import app, flags, logging
import jax
import numpy as np

import data as datasets
from experiments import activations, cli, restore


def shard_path(out: str, index: int) -> str:
    return os.path.join(out, f"shard_{index:05d}.npy")


def _save_atomically(path: str, array: np.ndarray) -> None:
    temporary = path + ".tmp.npy"
    np.save(temporary, array)
    os.replace(temporary, path)


def write(workdir: str, out: str, site: str = "residual", layer: int = -1, split: str = "train", batches: int = 64,
          batch_size: int = 32) -> dict:
    """Captures `site` after `layer` (run order; -1: the last) for the first `batches` batches of the run's
    `split` ("train" or an evaluation set's name) and writes the missing shards; returns the store's description."""
    config = restore.load_config(workdir)
    splits = datasets.load(config.data, seed=config.seed)
    examples = splits.train if split == "train" else splits.evals.get(split)
    if examples is None:
        raise ValueError(f"--split={split!r} is not 'train' or one of {sorted(splits.evals)}")
    model, variables = restore.load_variables(config, workdir)
    capture = jax.jit(lambda tokens: activations.capture(model, variables, tokens)[2][layer][site])
    os.makedirs(out, exist_ok=True)
    count = min(batches, -(-len(examples["inputs"]) // batch_size))
    for index in range(count):
        if os.path.exists(shard_path(out, index)):
            continue
        tokens = examples["inputs"][index * batch_size:(index + 1) * batch_size]
        acts = np.asarray(capture(tokens), np.float32)
        _save_atomically(shard_path(out, index), acts.reshape(-1, acts.shape[-1]))
    description = {"workdir": os.path.abspath(workdir), "site": site, "layer": layer, "split": split,
                   "batch_size": batch_size, "shards": count, "width": int(np.load(shard_path(out, 0)).shape[-1])}
    with open(os.path.join(out, "store.json"), "w") as f:
        json.dump(description, f)
    return description


def read(out: str) -> np.ndarray:
    """float32 [N, D]: every shard of the store in order."""
    paths = sorted(glob.glob(os.path.join(out, "shard_*.npy")))
    if not paths:
        raise FileNotFoundError(f"{out} holds no activation shards (write them with experiments.activation_store)")
    return np.concatenate([np.load(p) for p in paths])


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    args = flags.FLAGS
    try:
        description = write(args.workdir, args.out, args.site, args.layer, args.split, args.batches, args.batch_size)
    except (FileNotFoundError, ValueError, KeyError, IndexError) as e:
        cli.fail(str(e))
    print(json.dumps(description))


if __name__ == "__main__":  # the flags exist only for the command
    flags.DEFINE_string("workdir", None, "A run folder (config.json and checkpoints/).", required=True)
    flags.DEFINE_string("out", None, "The store's folder.", required=True)
    flags.DEFINE_string("site", "residual", "residual, mixer_out or ffn_out.")
    flags.DEFINE_integer("layer", -1, "The layer, in run order (-1: the last).")
    flags.DEFINE_string("split", "train", "train, or an evaluation set's name (eval).")
    flags.DEFINE_integer("batches", 64, "Batches captured (the first ones).")
    flags.DEFINE_integer("batch_size", 32, "Examples per batch.")
    app.run(main)
