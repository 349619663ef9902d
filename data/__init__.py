"""Datasets for the trainer: a name -> (loader, config dataclass) table, like `models.MODELS`.

A loader turns `config.data` (and the seed) into `Splits`: NumPy example dicts
{"inputs", "targets", "loss_mask"} of [N, L] arrays for training (one per curriculum stage where the
data has a curriculum) and for each evaluation set. `data.pipeline` turns them into sharded,
checkpointable grain batches.
"""

import dataclasses
import functools
import hashlib
import os

from collections.abc import Callable

import grain
import numpy as np

from data import (activation_rows, algorithmic, othello, pairs, pipeline, prontoqa, prosqa, prosqa_dag, prosqa_lookup,
                  reasoning, recall, text, token_store, verifier_rows)
from data import command_check as _command_check
from data.config_fields import field


@dataclasses.dataclass(frozen=True)
class AlgorithmicConfig:
    """Every `config.data` key of the modular-arithmetic tasks."""

    name: str = "algorithmic"
    p: int = field(113, min=2)  # a prime (checked in data/algorithmic.py)
    op: str = field("a+b", choices=tuple(algorithmic.OPERATIONS))
    train_fraction: float = field(0.3, above=0, below=1)
    terms: int = field(2, min=2)  # k > 2: chains x_1 o ... o x_k with their partial results as the response
    op_token: bool = False  # `=` is the operation's own token (one vocabulary for every op: merging runs on two)
    batch_size: int = -1  # global batch; -1: the whole train split every step (full batch)
    eval_batch_size: int = -1  # -1: each evaluation set in one batch
    rejected: str = field("", choices=("", "random"))  # preference pairs: each example also carries a wrong answer,
    # c + r mod p with r uniform in 1..p-1 ("rejected_inputs" / "rejected_targets" / "rejected_loss_mask")


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """Every `config.data` key of language modelling on a text file (`data/text.py`)."""

    name: str = "text"
    path: str = "data/files/tinyshakespeare.txt"  # relative paths: from the repository root
    tokenizer: str = field("byte", choices=("byte", "sentencepiece", "hf"))
    spm_model: str = ""  # the SentencePiece model file, for tokenizer="sentencepiece"
    tokenizer_file: str = ""  # a Hugging Face tokenizer.json (or the folder holding it), for tokenizer="hf"
    source: str = field("grain", choices=("grain", "seqio"))  # seqio: the same tokens through a registered Task
    seq_len: int = field(64, min=1)
    stride: int = field(0, min=0)  # tokens between window starts; 0: seq_len (packed, no overlap)
    train_fraction: float = field(0.9, above=0, below=1)  # the first 90% of the characters train, the rest validate
    batch_size: int = 12
    eval_batch_size: int = 256


@dataclasses.dataclass(frozen=True)
class PairsConfig:
    """Every `config.data` key of prompt / response lines (`data/pairs.py`): SFT, and preference pairs."""

    name: str = "pairs"
    path: str = ""  # a JSON-lines file: {"prompt", "response"[, "rejected"]} per line
    eval_path: str = ""  # the eval split's file; "": the last eval_fraction of path's lines
    eval_fraction: float = field(0.1, above=0, below=1)
    tokenizer: str = field("byte", choices=("byte", "sentencepiece", "hf"))
    spm_model: str = ""  # the SentencePiece model file, for tokenizer="sentencepiece"
    tokenizer_file: str = ""  # a Hugging Face tokenizer.json (or its folder), for tokenizer="hf"
    seq_len: int = field(0, min=0)  # 0: the longest row
    pad_id: int = field(0, min=0)  # the token padding fills (never scored)
    left_pad_prompts: bool = False  # every response at one position (GRPO); else right padding only
    batch_size: int = 16
    eval_batch_size: int = -1


@dataclasses.dataclass(frozen=True)
class RecallConfig:
    """Every `config.data` key of multi-query associative recall (`data/recall.py`)."""

    name: str = "recall"
    seq_len: int = field(64, min=3)
    num_pairs: int = field(8, min=1)
    vocab_size: int = field(256, min=4)
    train_examples: int = field(20_000, min=1)
    test_examples: int = field(1_000, min=1)
    batch_size: int = 64
    eval_batch_size: int = -1  # -1: the test set in one batch


@dataclasses.dataclass(frozen=True)
class OthelloConfig:
    """Every `config.data` key of Othello games of random legal moves (`data/othello.py`)."""

    name: str = "othello"
    size: int = field(6, min=4)  # the board's side, even
    train_games: int = field(100_000, min=1)
    test_games: int = field(2_000, min=1)
    batch_size: int = 128
    eval_batch_size: int = -1  # -1: the test games in one batch


@dataclasses.dataclass(frozen=True)
class ReasoningConfig:
    """Every `config.data` key of the ProsQA- and ProntoQA-style tasks (`data/reasoning.py`)."""

    name: str = "prosqa"  # prosqa | prontoqa | prosqa_official | prosqa_lookup
    method: str = field("coconut", choices=reasoning.METHODS)  # the model's `thoughts` decides latent or pause
    curriculum: bool = True  # False: train on the last stage (every step a thought) from the start
    last_stage: int = field(4, min=0)  # S: stage S replaces every step by S * thoughts_per_step thoughts
    thoughts_per_step: int = field(1, min=1)  # c
    epochs_per_stage: int = field(3, min=1)  # epochs of every stage before the last, which runs to train.steps
    min_hops: int = field(3, min=1)
    max_hops: int = field(4, min=1)
    branches: int = field(3, min=0)  # dead ends (ProsQA) / the distractor chain's length (ProntoQA)
    train_examples: int = field(4_000, min=1)
    eval_examples: int = field(500, min=1)
    test_examples: int = field(500, min=1)
    batch_size: int = 64
    eval_batch_size: int = -1  # -1: each evaluation set in one batch
    rejected: str = field("", choices=("", "derailed"))  # preference pairs: each example also carries a rejected
    # response, "rejected_inputs" / "rejected_targets" / "rejected_loss_mask" (ProntoQA only: data/prontoqa.py)


@dataclasses.dataclass(frozen=True)
class ProsQAOfficialConfig(ReasoningConfig):
    """ProsQA as the paper: training problems of the official distribution (data/prosqa_dag.py), evaluation on
    the official validation and test splits; the paper's 6 stages of c = 1 thought."""

    name: str = "prosqa_official"
    last_stage: int = 6
    min_hops: int = 3
    max_hops: int = 6
    branches: int = 0
    train_examples: int = 17_886
    eval_examples: int = 300
    test_examples: int = 500


@dataclasses.dataclass(frozen=True)
class ProsQALookupConfig(ProsQAOfficialConfig):
    """One-hop lookups on official-distribution ProsQA graphs (data/prosqa_lookup.py): can a model find a fact in
    its context? No steps, so no curriculum; every split generated."""

    name: str = "prosqa_lookup"
    method: str = field("nocot", choices=reasoning.METHODS)
    last_stage: int = 0
    eval_examples: int = 500
    facts: int = field(0, min=0)  # 0: every fact of the graph; k: X's facts and others up to k in all


@dataclasses.dataclass(frozen=True)
class ProntoQAConfig(ReasoningConfig):
    name: str = "prontoqa"
    last_stage: int = 6
    min_hops: int = 5
    max_hops: int = 5


@dataclasses.dataclass(frozen=True)
class TokensConfig:
    """Every `config.data` key of language modelling on prepared token stores (`data/token_store.py`)."""

    name: str = "tokens"
    stores: str = ""  # folders written by `python -m data.prepare`, comma-separated (relative: from the repository)
    weights: str = ""  # one sampling weight per store, comma-separated; "": equal
    seq_len: int = field(256, min=1)
    packing: str = field("concat_then_split", choices=tuple(token_store.PACKINGS))
    eval_fraction: float = field(0.01, above=0, below=1)  # of each store's documents, held out by a fixed hash
    eval_tokens: int = field(65_536, min=1)  # each store's evaluation set: its first held-out documents, this many tokens
    batch_size: int = field(32, min=1)
    eval_batch_size: int = 64
    streams: int = field(0, min=0)  # independent reading streams (0: one per process); fixed: the same batches on any
    #                                 number of processes that divides it (token_store.train_batches)
    workers: int = field(0, min=0)  # grain worker processes reading and packing the rows (0: this process's threads)


@dataclasses.dataclass(frozen=True)
class ActivationsConfig:
    """Every `config.data` key of training on an activation store's rows (`data/activation_rows.py`)."""

    name: str = "activations"
    store: str = ""  # the store's folder (python -m experiments.analysis.activation_store --out=DIR)
    batch_size: int = 1024
    eval_batch_size: int = -1  # unused: an SAE is evaluated in its model by experiments/analysis/sae_eval.py


@dataclasses.dataclass(frozen=True)
class VerifierConfig:
    """Every `config.data` key of a verifier's labelled solutions (`data/verifier_rows.py`)."""

    name: str = "verifier"
    path: str = ""  # the labelled solutions (python -m experiments.test_time.label --out=FILE)
    labels: str = field("checker", choices=verifier_rows.LABELS)  # the exact checker's, or Math-Shepherd's rollouts'
    reward: str = field("process", choices=verifier_rows.REWARDS)  # a label at every step (PRM) or at the end (ORM)
    eval_fraction: float = field(0.1, above=0, below=1)  # of the problems
    batch_size: int = field(64, min=1)
    eval_batch_size: int = 256


@dataclasses.dataclass(frozen=True)
class Splits:
    train: dict[str, np.ndarray]  # with a curriculum: the first stage's examples
    evals: dict[str, dict[str, np.ndarray]]  # evaluation-set name -> examples
    vocab_size: int
    seq_len: int
    chars_per_token: float | None = None  # text only: turns loss per token into bits per character
    stages: tuple[dict[str, np.ndarray], ...] = ()  # curriculum: each stage's training examples, in order
    epochs_per_stage: int = 0  # every stage but the last runs this many epochs
    model_keys: dict = dataclasses.field(default_factory=dict)  # config.model values the data decides
    # Training batches read lazily instead of from `train` (prepared token stores), as a function of
    # (batch_size, seed, process_index, process_count); `train` then holds the stream's first rows, for tools.
    stream: Callable | None = None

    def train_batches(self, *, batch_size: int, seed: int, drop_remainder: bool, process_index: int = 0,
                      process_count: int = 1) -> tuple[grain.MapDataset | grain.IterDataset, list[int]]:
        """(step s -> this process's slice of global training batch s, the first step of every curriculum stage)."""
        process = dict(process_index=process_index, process_count=process_count)
        if self.stream is not None:
            return self.stream(batch_size=batch_size, seed=seed, **process), [0]
        if self.stages:
            return pipeline.staged(self.stages, epochs_per_stage=self.epochs_per_stage, batch_size=batch_size,
                                   seed=seed, **process)
        return pipeline.batched(self.train, batch_size=batch_size, seed=seed, drop_remainder=drop_remainder,
                                **process), [0]


def _load_algorithmic(config, seed: int) -> Splits:
    train, test = algorithmic.train_test_split(config.p, config.op, config.train_fraction, seed, config.terms,
                                               config.op_token)
    if config.rejected:
        train, test = (algorithmic.with_wrong_answers(examples, config.p, (seed, i)) for i, examples in enumerate((train, test)))
    return Splits(train=train, evals={"eval": test}, vocab_size=algorithmic.vocab_size(config.p, config.op_token),
                  seq_len=2 * config.terms - 1)


def _load_text(config, seed: int) -> Splits:
    del seed  # the split is by position, the order of batches by the pipeline's seed
    train_text, eval_text = text.split_text(text.read_corpus(config.path), config.train_fraction)
    if config.source == "seqio":
        from data import seqio_tasks  # optional: needs the [seqio] extra

        train_ids, eval_ids, vocab_size = seqio_tasks.token_streams(config)
    else:
        tokenizer = text.tokenizer_for(config)
        train_ids, eval_ids, vocab_size = tokenizer.encode(train_text), tokenizer.encode(eval_text), tokenizer.vocab_size
    return Splits(train=text.pack(train_ids, config.seq_len, config.stride),
                  evals={"eval": text.pack(eval_ids, config.seq_len)},
                  vocab_size=vocab_size, seq_len=config.seq_len, chars_per_token=len(eval_text) / len(eval_ids))


def _load_pairs(config, seed: int) -> Splits:
    del seed  # the split is by position, the order of batches by the pipeline's seed
    tokenizer = text.tokenizer_for(config)
    train, evals, seq_len = pairs.load(config, tokenizer)
    return Splits(train=train, evals={"eval": evals}, vocab_size=tokenizer.vocab_size, seq_len=seq_len)


def _load_recall(config, seed: int) -> Splits:
    make = lambda n, s: recall.examples(n, config.seq_len, config.num_pairs, config.vocab_size, s)  # noqa: E731
    return Splits(train=make(config.train_examples, seed), evals={"eval": make(config.test_examples, seed + 10_000)},
                  vocab_size=config.vocab_size, seq_len=config.seq_len)


def _load_othello(config, seed: int) -> Splits:
    return Splits(train=othello.examples(config.train_games, config.size, seed),
                  evals={"eval": othello.examples(config.test_games, config.size, seed + 10_000)},
                  vocab_size=othello.vocab_size(config.size), seq_len=othello.game_length(config.size))


def _load_tokens(config, seed: int) -> Splits:
    vocab_size = token_store.read_manifest(token_store.stores_of(config)[0])["vocab_size"]
    return Splits(train=token_store.sample_rows(config, seed), evals=token_store.eval_examples(config),
                  vocab_size=vocab_size, seq_len=config.seq_len,
                  stream=functools.partial(token_store.train_batches, config))


def _load_activations(config, seed: int) -> Splits:
    del seed  # the pipeline shuffles
    x = activation_rows.read(config.store)
    scale = float(np.sqrt(x.shape[1] / np.mean(np.sum(np.square(x, dtype=np.float64), axis=1))))
    return Splits(train=activation_rows.rows(x), evals={}, vocab_size=1, seq_len=x.shape[1],
                  model_keys={"d_in": x.shape[1], "input_scale": scale})


def _load_verifier(config, seed: int) -> Splits:
    del seed  # the pipeline shuffles
    solutions = verifier_rows.read(config.path)
    train, held_out = verifier_rows.split(solutions, config.eval_fraction)
    examples = lambda s: verifier_rows.rows(s, config.labels, config.reward)  # noqa: E731
    return Splits(train=examples(train), evals={"eval": examples(held_out)},
                  vocab_size=int(solutions["policy_vocab"]) + 2, seq_len=solutions["tokens"].shape[1])


GENERATORS = {"prosqa": prosqa, "prontoqa": prontoqa, "prosqa_official": prosqa_dag, "prosqa_lookup": prosqa_lookup}


def reasoning_problems(config, seed: int) -> dict[str, list[reasoning.Problem]]:
    """The train / eval / test problems of a reasoning config: disjoint, deterministic in the seed."""
    module = GENERATORS[config.name]
    if hasattr(module, "splits"):  # its own splits (the official evaluation sets)
        return module.splits(config, seed)
    return reasoning.generated_splits(module.problem, config, seed)


def reasoning_geometry(config, problems) -> reasoning.Geometry:
    return reasoning.geometry([p for ps in problems.values() for p in ps], config.method, config.last_stage,
                              config.thoughts_per_step)


def rejected_problems(config, problems, seed: int) -> dict[str, list[reasoning.Problem]]:
    """Each split's rejected responses (`data.rejected`), one per problem, deterministic in the seed."""
    rng = np.random.default_rng((seed, 1))
    return {split: [prontoqa.derailed(p, rng) for p in ps] for split, ps in problems.items()}


def _load_reasoning(config, seed: int) -> Splits:
    problems = reasoning_problems(config, seed)
    rejected = rejected_problems(config, problems, seed) if config.rejected else {}
    vocab, geo = GENERATORS[config.name].VOCABULARY, reasoning_geometry(config, {**problems, **{
        f"rejected_{k}": v for k, v in rejected.items()}})
    layout_one = functools.partial(reasoning.examples, vocab=vocab, geo=geo, method=config.method,
                                   last_stage=config.last_stage, thoughts_per_step=config.thoughts_per_step)

    def layout(split, stage):
        examples = layout_one(problems[split], stage=stage)
        if rejected:
            examples.update({f"rejected_{k}": v for k, v in layout_one(rejected[split], stage=stage).items()})
        return examples

    last = config.last_stage if config.method == "coconut" else 0
    first = 0 if config.curriculum else last
    stages = tuple(layout("train", stage=s) for s in range(first, last + 1))
    model_keys = dict(bot_position=geo.bot_position, max_thoughts=last * config.thoughts_per_step,
                      thought_token=reasoning.THOUGHT, pad_token=reasoning.PAD, eot_token=reasoning.EOT)
    return Splits(train=stages[0], evals={"eval": layout("eval", stage=last)}, vocab_size=len(vocab),
                  seq_len=geo.row_len - 1, stages=stages if len(stages) > 1 else (),
                  epochs_per_stage=config.epochs_per_stage, model_keys=model_keys)


DATASETS = {
    "algorithmic": (_load_algorithmic, AlgorithmicConfig, algorithmic.validate),
    "text": (_load_text, TextConfig, text.validate),
    "pairs": (_load_pairs, PairsConfig, pairs.validate),
    "recall": (_load_recall, RecallConfig, recall.validate),
    "othello": (_load_othello, OthelloConfig, othello.validate),
    "prosqa": (_load_reasoning, ReasoningConfig, prosqa.validate),
    "prontoqa": (_load_reasoning, ProntoQAConfig, prontoqa.validate),
    "prosqa_official": (_load_reasoning, ProsQAOfficialConfig, prosqa_dag.validate),
    "prosqa_lookup": (_load_reasoning, ProsQALookupConfig, prosqa_lookup.validate),
    "activations": (_load_activations, ActivationsConfig, activation_rows.validate),
    "tokens": (_load_tokens, TokensConfig, token_store.validate),
    "verifier": (_load_verifier, VerifierConfig, verifier_rows.validate),
}


def sha256_of_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def identity(data_config, splits: Splits) -> dict:
    """What a run trains and evaluates on, for the resume check (experiments/training/run_record.py): the SHA-256 of
    every token array (any dataset), and for text the file (path, bytes, SHA-256) and the tokenizer model."""
    digest = hashlib.sha256()
    for name, examples in [("train", splits.train), *enumerate(splits.stages), *sorted(splits.evals.items())]:
        for key in sorted(examples):
            array = np.ascontiguousarray(examples[key])
            digest.update(f"{name}/{key}{array.dtype}{array.shape}".encode())
            digest.update(array.tobytes())
    found = {"tokens_sha256": digest.hexdigest()}
    if data_config.name == "pairs" and data_config.tokenizer != "byte":
        found["tokenizer_sha256"] = sha256_of_file(text.tokenizer_file(data_config))
    if data_config.name == "tokens":
        found.update(token_store.identity(data_config))
    if data_config.name == "text":
        path = text.resolve_path(data_config.path)
        found.update(file=path, file_bytes=os.path.getsize(path), file_sha256=sha256_of_file(path))
        if data_config.tokenizer != "byte":
            found["tokenizer_sha256"] = sha256_of_file(text.tokenizer_file(data_config))
    return found


def load(data_config, seed: int) -> Splits:
    loader, _, _ = DATASETS[data_config.name]
    return loader(data_config, seed)

_command_check.refuse_library_module(__name__, __path__[0])  # `python -m` on a module that is not a command
