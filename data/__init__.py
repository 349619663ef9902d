"""Datasets for the trainer: a name -> (loader, config dataclass) table, like `models.MODELS`.

A loader turns `config.data` (and the seed) into `Splits`: NumPy example dicts
{"inputs", "targets", "loss_mask"} of [N, L] arrays for training and for each evaluation set.
`data.pipeline` turns them into sharded, checkpointable grain batches.
"""

import dataclasses

import numpy as np

from data import algorithmic


@dataclasses.dataclass(frozen=True)
class AlgorithmicConfig:
    """Every `config.data` key of the modular-arithmetic tasks."""

    name: str = "algorithmic"
    p: int = 113
    op: str = "a+b"
    train_fraction: float = 0.3
    batch_size: int = -1  # global batch; -1: the whole train split every step (full batch)
    eval_batch_size: int = -1  # -1: each evaluation set in one batch


@dataclasses.dataclass(frozen=True)
class Splits:
    train: dict[str, np.ndarray]
    evals: dict[str, dict[str, np.ndarray]]  # evaluation-set name -> examples
    vocab_size: int
    seq_len: int


def _load_algorithmic(config, seed: int) -> Splits:
    train, test = algorithmic.train_test_split(config.p, config.op, config.train_fraction, seed)
    return Splits(train=train, evals={"eval": test}, vocab_size=config.p + 1, seq_len=3)


DATASETS = {
    "algorithmic": (_load_algorithmic, AlgorithmicConfig, algorithmic.validate),
}


def load(data_config, seed: int) -> Splits:
    loader, _, _ = DATASETS[data_config.name]
    return loader(data_config, seed)
