"""The language-modelling corpus as seqio Tasks (the optional `[seqio]` extra; it pulls TensorFlow).

Importing this module registers `tinyshakespeare_bytes` (seqio's ByteVocabulary) and
`tinyshakespeare_spm` (SentencePiece, `experiments/configs/lm_shakespeare.SPM_MODEL`) over
`data/files/tinyshakespeare.txt`; `task_for` registers the same for any `config.data`.
Each split is one example, {"targets": every token of the split}: the first `train_fraction` of the
characters is "train", the rest "validation", as in `data/text.py`. The trainer
(`config.data.source = "seqio"`) reads the tokens from the Task, then packs and batches them with the
same grain pipeline as the grain path, so both give the same batches.
"""

import functools
import hashlib
import os

import seqio
import tensorflow as tf

from data import text

DEFAULT_CORPUS = "data/files/tinyshakespeare.txt"
DEFAULT_SPM_MODEL = "runs/spm/tinyshakespeare_1024.model"


def _split_fn(split, shuffle_files, seed=None, *, path, train_fraction):
    del shuffle_files, seed  # one example per split
    train, validation = text.split_text(text.read_corpus(path), train_fraction)
    return tf.data.Dataset.from_tensors({"text": train if split == "train" else validation})


def vocabulary(tokenizer: str, spm_model: str = "") -> seqio.Vocabulary:
    if tokenizer == "byte":
        return seqio.ByteVocabulary()
    return seqio.SentencePieceVocabulary(text.resolve_path(spm_model))


def register(name: str, path: str, train_fraction: float, tokenizer: str, spm_model: str = "") -> seqio.Task:
    """Registers (or replaces) Task `name`: the text file's train / validation splits, tokenized."""
    if name in seqio.TaskRegistry.names():
        seqio.TaskRegistry.remove(name)
    source = seqio.FunctionDataSource(
        functools.partial(_split_fn, path=path, train_fraction=train_fraction), splits=("train", "validation"))
    return seqio.TaskRegistry.add(
        name, source=source,
        preprocessors=[functools.partial(seqio.preprocessors.rekey, key_map={"targets": "text"}),
                       seqio.preprocessors.tokenize],
        output_features={"targets": seqio.Feature(vocabulary(tokenizer, spm_model), add_eos=False, dtype=tf.int32)})


def task_for(data_config) -> seqio.Task:
    """The Task of a `config.data` (name derived from its corpus, split and vocabulary)."""
    key = f"{text.resolve_path(data_config.path)}|{data_config.train_fraction}|{data_config.tokenizer}|" \
          f"{data_config.spm_model}"
    stem = os.path.splitext(os.path.basename(data_config.path))[0]
    name = f"{stem}_{data_config.tokenizer}_{hashlib.sha1(key.encode()).hexdigest()[:8]}"
    return register(name, data_config.path, data_config.train_fraction, data_config.tokenizer, data_config.spm_model)


def split_tokens(task: seqio.Task, split: str):
    """Every token of a split as int32[N], in the ids of `data/text.py`'s tokenizers."""
    (example,) = list(task.get_dataset(sequence_length=None, split=split, shuffle=False).as_numpy_iterator())
    ids = example["targets"].astype("int32")
    vocab = task.output_features["targets"].vocabulary
    if isinstance(vocab, seqio.ByteVocabulary):
        ids = ids - vocab._num_special_tokens  # seqio reserves pad, eos, unk below the 256 bytes
    return ids


def token_streams(data_config):
    """(train ids, validation ids, vocabulary size) of `config.data` read through its seqio Task."""
    task = task_for(data_config)
    vocab_size = 256 if data_config.tokenizer == "byte" else task.output_features["targets"].vocabulary.vocab_size
    return split_tokens(task, "train"), split_tokens(task, "validation"), vocab_size


register("tinyshakespeare_bytes", DEFAULT_CORPUS, 0.9, "byte")
register("tinyshakespeare_spm", DEFAULT_CORPUS, 0.9, "sentencepiece", DEFAULT_SPM_MODEL)
