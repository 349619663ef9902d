"""Rows of an activation store (written by experiments/analysis/activation_store.py) as training data: what a sparse
autoencoder (models/sae.py) trains on through the one trainer.

    data.name = "activations", data.store = DIR         DIR: store.json and shard_00000.npy, shard_00001.npy, ...

Every row [D] is one token's activation at the store's site; the examples are {"inputs": float32 [N, D],
"targets": zeros int32 [N, 1], "loss_mask": zeros [N, 1]} (an SAE has no next-token targets: its loss is its own,
models/sae.py). There is no evaluation split: experiments/analysis/sae_eval.py evaluates an SAE inside its model.
"""

import glob
import json
import os

import numpy as np

DESCRIPTION = "store.json"


def shard_paths(store: str) -> list[str]:
    return sorted(glob.glob(os.path.join(store, "shard_*.npy")))


def read(store: str) -> np.ndarray:
    """float32 [N, D]: every shard of the store in order."""
    paths = shard_paths(store)
    if not paths:
        raise FileNotFoundError(f"{store!r} holds no activation shards (write them with experiments.analysis.activation_store)")
    return np.concatenate([np.load(p) for p in paths])


def description(store: str) -> dict:
    """The store's store.json: the run, site, layer, split and width it was captured from."""
    with open(os.path.join(store, DESCRIPTION)) as f:
        return json.load(f)


def validate(config) -> list[str]:
    if not os.path.isfile(os.path.join(config.store, DESCRIPTION)) or not shard_paths(config.store):
        return [f"data.store={config.store!r} is not an activation store (a folder with {DESCRIPTION} and "
                "shard_*.npy, written by python -m experiments.analysis.activation_store)"]
    return []


def rows(x: np.ndarray) -> dict:
    """The trainer's examples of activation rows x [N, D]."""
    zeros = np.zeros((len(x), 1), np.int32)
    return {"inputs": x.astype(np.float32), "targets": zeros, "loss_mask": zeros.astype(np.float32)}
