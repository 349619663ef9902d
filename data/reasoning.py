"""Reasoning problems as token rows for chain of thought and Coconut (Hao et al. 2024), with the curriculum.

A problem is a question, the reasoning steps (sentences), and the answer, all words of a fixed vocabulary.
Its row depends on the method and the curriculum stage s (c = thoughts per step, S = the last stage):

    nocot     question  ### answer <eos>
    cot       question  step_1 ... step_n  ### answer <eos>
    coconut   question  <bot> <thought> x k <eot>  step_{m+1} ... step_n  ### answer <eos>
              stage s < S:  m = min(s, n) steps replaced by k = m * c thoughts
              stage S:      every step removed, k = S * c thoughts (the same for every problem)

Questions are left-padded to the longest question of the dataset, so `<bot>` sits at one position in
every row (the model's `bot_position`); rows are right-padded to one length over all stages. `<pad>`
keys are masked out of attention by the Coconut model. Rows become next-token examples:
inputs = row[:-1], targets = row[1:], loss_mask = 1 on steps, `###`, answer and `<eos>` (never on the
question, `<bot>`, thoughts or `<eot>`).
"""

import dataclasses
import functools

import numpy as np

SPECIALS = ("<pad>", "<bot>", "<thought>", "<eot>", "<eos>", "###")
PAD, BOT, THOUGHT, EOT, EOS, ANSWER = range(len(SPECIALS))
METHODS = ("nocot", "cot", "coconut")


@dataclasses.dataclass(frozen=True)
class Problem:
    question: tuple[str, ...]
    steps: tuple[tuple[str, ...], ...]
    answer: tuple[str, ...]


class Vocabulary:
    """Word <-> id; the special tokens first (ids 0-5), then `words` in their given order."""

    def __init__(self, words):
        self.words = list(SPECIALS) + [w for w in dict.fromkeys(words) if w not in SPECIALS]
        self.ids = {w: i for i, w in enumerate(self.words)}

    def __len__(self):
        return len(self.words)

    def encode(self, words) -> list[int]:
        return [self.ids[w] for w in words]

    def decode(self, ids) -> list[str]:
        return [self.words[i] for i in ids]


def stage_layout(problem: Problem, method: str, stage: int, last_stage: int, thoughts_per_step: int):
    """(words after the question, 0/1 loss flag per word) of `problem` at curriculum `stage`."""
    answer = [SPECIALS[ANSWER], *problem.answer, SPECIALS[EOS]]
    if method == "nocot":
        steps, thoughts = [], None
    elif method == "cot":
        steps, thoughts = [w for s in problem.steps for w in s], None
    else:
        skipped = len(problem.steps) if stage >= last_stage else min(stage, len(problem.steps))
        k = (last_stage if stage >= last_stage else skipped) * thoughts_per_step
        steps, thoughts = [w for s in problem.steps[skipped:] for w in s], k
    prefix = [] if thoughts is None else [SPECIALS[BOT], *[SPECIALS[THOUGHT]] * thoughts, SPECIALS[EOT]]
    return prefix + steps + answer, [0] * len(prefix) + [1] * (len(steps) + len(answer))


@dataclasses.dataclass(frozen=True)
class Geometry:
    """The static shape every row of a dataset shares: where `<bot>` sits and how long a row is."""

    question_len: int  # the longest question: rows start with it, left-padded; `<bot>` follows it
    row_len: int  # inputs and targets are row_len - 1 long

    @property
    def bot_position(self) -> int:
        return self.question_len


def geometry(problems, method: str, last_stage: int, thoughts_per_step: int) -> Geometry:
    question_len = max(len(p.question) for p in problems)
    rest = max(len(stage_layout(p, method, s, last_stage, thoughts_per_step)[0])
               for p in problems for s in range(last_stage + 1))
    return Geometry(question_len, question_len + rest)


def examples(problems, vocab: Vocabulary, geo: Geometry, method: str, stage: int, last_stage: int,
             thoughts_per_step: int) -> dict[str, np.ndarray]:
    """{"inputs", "targets", "loss_mask"}: [N, row_len - 1] arrays of `problems` at `stage`."""
    rows = np.full((len(problems), geo.row_len), PAD, np.int32)
    flags = np.zeros((len(problems), geo.row_len), np.float32)
    for i, p in enumerate(problems):
        rest, rest_flags = stage_layout(p, method, stage, last_stage, thoughts_per_step)
        q = len(p.question)
        rows[i, geo.question_len - q:geo.question_len] = vocab.encode(p.question)
        rows[i, geo.question_len:geo.question_len + len(rest)] = vocab.encode(rest)
        flags[i, geo.question_len:geo.question_len + len(rest)] = rest_flags
    return {"inputs": rows[:, :-1], "targets": rows[:, 1:], "loss_mask": flags[:, 1:]}


def prompts(problems, vocab: Vocabulary, geo: Geometry, method: str) -> np.ndarray:
    """int32[N, question_len (+1 with `<bot>` for coconut)]: the left-padded questions generation starts from."""
    rows = np.full((len(problems), geo.question_len), PAD, np.int32)
    for i, p in enumerate(problems):
        rows[i, geo.question_len - len(p.question):] = vocab.encode(p.question)
    if method == "coconut":
        rows = np.concatenate([rows, np.full((len(problems), 1), BOT, np.int32)], axis=1)
    return rows


def score(generated: np.ndarray, problems, vocab: Vocabulary) -> dict[str, float]:
    """Accuracy of greedy continuations int32[N, T] (the words between `###` and `<eos>` must equal the
    answer) and the mean number of tokens generated up to and including `<eos>`."""
    correct, lengths = 0, []
    for row, p in zip(np.asarray(generated), problems):
        row = list(row)
        end = row.index(EOS) + 1 if EOS in row else len(row)
        lengths.append(end)
        words = vocab.decode(row[:end])
        if SPECIALS[ANSWER] in words:
            start = len(words) - words[::-1].index(SPECIALS[ANSWER])
            correct += tuple(w for w in words[start:] if w != SPECIALS[EOS]) == p.answer
    return {"accuracy": correct / max(len(problems), 1), "tokens": float(np.mean(lengths)) if lengths else 0.0}


def generated_splits(problem, config, seed: int, **options) -> dict[str, list[Problem]]:
    """The train / eval / test splits of `config`'s sizes drawn by a generator's `problem(rng, i, min_hops=,
    max_hops=, branches=, **options)` (unique_splits: disjoint, deterministic in the seed)."""
    generate = functools.partial(problem, min_hops=config.min_hops, max_hops=config.max_hops,
                                 branches=config.branches, **options)
    sizes = {"train": config.train_examples, "eval": config.eval_examples, "test": config.test_examples}
    return unique_splits(generate, sizes, seed)


def unique_splits(generate_one, sizes: dict[str, int], seed: int) -> dict[str, list[Problem]]:
    """Named splits of distinct problems (no question in two splits), deterministic in `seed`.

    `generate_one(rng, i)` draws the split's i-th problem (its answer may alternate with i, so that answers
    are balanced); a duplicate of an earlier question is drawn again."""
    rng = np.random.default_rng(seed)
    seen, splits = set(), {}
    for name, size in sizes.items():
        problems = []
        for _ in range(100 * size + 1000):
            if len(problems) == size:
                break
            p = generate_one(rng, len(problems))
            if p.question not in seen:
                seen.add(p.question)
                problems.append(p)
        if len(problems) < size:
            raise ValueError(f"only {len(problems)} distinct problems for the {name} split of {size}; "
                             "ask for fewer examples or allow more hops / concepts")
        splits[name] = problems
    return splits
