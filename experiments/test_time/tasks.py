"""The reasoning tasks whose every step can be checked, as step problems' prompts, steps and answers.

A row of a task's split is a prompt (its tokens up to the first loss-masked target, as GRPO reads it) and the
reference response (the masked targets). A response splits into steps and ends in an answer:

    algorithmic   chained arithmetic `x_1 .. x_k = s_1 .. s_{k-1}` (data/algorithmic.py, terms > 2): every token
                  is a step (a running result), the answer is the last
    prosqa, prontoqa, prosqa_official (chain-of-thought rows, data/reasoning.py): a step ends at "." (a sentence),
                  the last step is `### answer <eos>`, the answer what `###` and `<eos>` enclose

The exact checker (`step_labels`) marks step k right when the response through it equals the reference's prefix
of the same length and ends where the reference's step k ends: each task writes one right chain, so a step after
a wrong one is wrong (the labels GRPO's process reward uses).
"""

import dataclasses

import numpy as np

from data.config_fields import ConfigError

REASONING = ("prosqa", "prontoqa", "prosqa_official")


@dataclasses.dataclass(frozen=True)
class StepTask:
    step_ends: frozenset | None  # the tokens that end a step (None: every token does)
    finish_ids: frozenset  # the tokens that end a response
    answer_marker: int | None  # the token the answer follows (None: the answer is the last token)

    def steps(self, response) -> list[tuple[int, ...]]:
        """The response cut after each step's last token (a trailing unfinished step included)."""
        steps, current = [], []
        for token in response:
            current.append(int(token))
            if self.step_ends is None or token in self.step_ends or token in self.finish_ids:
                steps.append(tuple(current))
                current = []
        return steps + ([tuple(current)] if current else [])

    def answer(self, response) -> tuple[int, ...]:
        response = [int(t) for t in response]
        if self.answer_marker is None:
            return tuple(response[-1:])
        if self.answer_marker not in response:
            return ()
        after = response[response.index(self.answer_marker) + 1:]
        return tuple(t for t in after if t not in self.finish_ids)

    def correct(self, response, reference) -> bool:
        """Whether the response's answer is the reference's (and it has one)."""
        answer = self.answer(response)
        return bool(answer) and answer == self.answer(reference)

    def step_labels(self, response, reference) -> list[bool]:
        """Step k of the response right: the steps through k equal the reference's first k."""
        mine, theirs = self.steps(response), self.steps(reference)
        labels, right = [], True
        for k, step in enumerate(mine):
            right = right and k < len(theirs) and step == theirs[k]
            labels.append(right)
        return labels


def of_config(config) -> StepTask:
    """The step task of a run's data (module doc); a one-line ConfigError for data without checkable steps."""
    data = config.data
    if data.name == "algorithmic" and data.get("terms", 2) > 2:
        return StepTask(step_ends=None, finish_ids=frozenset(), answer_marker=None)
    if data.name in REASONING and data.method == "cot":
        import data as datasets
        from data import reasoning

        vocab = datasets.GENERATORS[data.name].VOCABULARY
        return StepTask(step_ends=frozenset({vocab.ids["."]}), finish_ids=frozenset({reasoning.EOS}),
                        answer_marker=reasoning.ANSWER)
    raise ConfigError(f"data.name={data.name!r}: test-time search needs steps a program checks: data.name="
                      f"'algorithmic' with data.terms > 2, or one of {', '.join(REASONING)} with data.method='cot'")


def problems(examples: dict) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(prompt, reference response) of every row of a split's examples."""
    from experiments.objectives import grpo

    prompt_len = grpo.prompt_length(examples)
    rows = []
    for inputs, targets, mask in zip(examples["inputs"], examples["targets"], examples["loss_mask"]):
        reference = tuple(int(t) for t, m in zip(targets, mask) if m > 0)
        rows.append((tuple(int(t) for t in inputs[:prompt_len]), reference))
    return rows


def step_mask(task: StepTask, response) -> np.ndarray:
    """1 at each step's last token of `response`, else 0: where a process reward model is read."""
    mask = np.zeros(len(response), np.float32)
    position = -1
    for step in task.steps(response):
        position += len(step)
        mask[position] = 1.0
    return mask
