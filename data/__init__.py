"""Datasets for the trainer: a name -> (loader, config dataclass) table, like `models.MODELS`.

A loader turns `config.data` (and the seed) into `Splits`: NumPy example dicts
{"inputs", "targets", "loss_mask"} of [N, L] arrays for training and for each evaluation set.
`data.pipeline` turns them into sharded, checkpointable grain batches.
"""

import dataclasses

import numpy as np

from data import algorithmic, recall, text


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
class TextConfig:
    """Every `config.data` key of language modelling on a text file (`data/text.py`)."""

    name: str = "text"
    path: str = "../shared/data/tinyshakespeare.txt"  # relative paths: from the repository root
    tokenizer: str = "byte"  # byte | sentencepiece
    spm_model: str = ""  # the SentencePiece model file, for tokenizer="sentencepiece"
    source: str = "grain"  # grain | seqio (the same tokens through a registered seqio Task)
    seq_len: int = 64
    stride: int = 0  # tokens between window starts; 0: seq_len (packed, no overlap)
    train_fraction: float = 0.9  # the first 90% of the characters train, the last 10% validate
    batch_size: int = 12
    eval_batch_size: int = 256


@dataclasses.dataclass(frozen=True)
class RecallConfig:
    """Every `config.data` key of multi-query associative recall (`data/recall.py`)."""

    name: str = "recall"
    seq_len: int = 64
    num_pairs: int = 8
    vocab_size: int = 256
    train_examples: int = 20_000
    test_examples: int = 1_000
    batch_size: int = 64
    eval_batch_size: int = 500


@dataclasses.dataclass(frozen=True)
class Splits:
    train: dict[str, np.ndarray]
    evals: dict[str, dict[str, np.ndarray]]  # evaluation-set name -> examples
    vocab_size: int
    seq_len: int
    chars_per_token: float | None = None  # text only: turns loss per token into bits per character


def _load_algorithmic(config, seed: int) -> Splits:
    train, test = algorithmic.train_test_split(config.p, config.op, config.train_fraction, seed)
    return Splits(train=train, evals={"eval": test}, vocab_size=config.p + 1, seq_len=3)


def _load_text(config, seed: int) -> Splits:
    del seed  # the split is by position, the order of batches by the pipeline's seed
    train_text, eval_text = text.split_text(text.read_corpus(config.path), config.train_fraction)
    if config.source == "seqio":
        from data import seqio_tasks  # optional: needs the [seqio] extra

        train_ids, eval_ids, vocab_size = seqio_tasks.token_streams(config)
    else:
        tokenizer = text.tokenizer(config.tokenizer, config.spm_model)
        train_ids, eval_ids, vocab_size = tokenizer.encode(train_text), tokenizer.encode(eval_text), tokenizer.vocab_size
    return Splits(train=text.pack(train_ids, config.seq_len, config.stride),
                  evals={"eval": text.pack(eval_ids, config.seq_len)},
                  vocab_size=vocab_size, seq_len=config.seq_len, chars_per_token=len(eval_text) / len(eval_ids))


def _load_recall(config, seed: int) -> Splits:
    make = lambda n, s: recall.examples(n, config.seq_len, config.num_pairs, config.vocab_size, s)  # noqa: E731
    return Splits(train=make(config.train_examples, seed), evals={"eval": make(config.test_examples, seed + 10_000)},
                  vocab_size=config.vocab_size, seq_len=config.seq_len)


DATASETS = {
    "algorithmic": (_load_algorithmic, AlgorithmicConfig, algorithmic.validate),
    "text": (_load_text, TextConfig, text.validate),
    "recall": (_load_recall, RecallConfig, recall.validate),
}


def load(data_config, seed: int) -> Splits:
    loader, _, _ = DATASETS[data_config.name]
    return loader(data_config, seed)
