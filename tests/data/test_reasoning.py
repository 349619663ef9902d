"""ProsQA / ProntoQA generators and the Coconut curriculum layout."""

import functools

import numpy as np
import pytest

import data as datasets
from data import pipeline, prontoqa, prosqa
from data import reasoning as R
from experiments.configs import base


def reachable(facts, start):
    """Concepts reachable from `start` along "every x is a y" facts (an independent graph search)."""
    edges = {}
    for x, y in facts:
        edges.setdefault(x, []).append(y)
    seen, frontier = {start}, [start]
    while frontier:
        for y in edges.get(frontier.pop(), []):
            if y not in seen:
                seen.add(y)
                frontier.append(y)
    return seen


def parse_prosqa(question):
    words = list(question)
    facts = [(words[i + 1], words[i + 4]) for i in range(len(words)) if words[i] == "every"]
    start = words[3]
    a, b = words[-5], words[-2]  # "is NAME a A or a B ?"
    return facts, start, (a, b)


def test_prosqa_answer_is_the_reachable_option_and_the_chain_is_a_path():
    gen = functools.partial(prosqa.problem, min_hops=2, max_hops=5, branches=4)
    splits = R.unique_splits(gen, {"train": 200}, seed=3)
    first_options = 0
    for p in splits["train"]:
        facts, start, options = parse_prosqa(p.question)
        reach = reachable(facts, start)
        (answer,) = p.answer
        assert answer in options and answer in reach
        assert [o for o in options if o != answer][0] not in reach
        first_options += options[0] == answer
        path = [start] + [s[4] for s in p.steps]  # "every x is a y ." steps chain from Tom's concept to A
        assert all((s[1], s[4]) in facts for s in p.steps) and path[-1] == answer
        assert all(s[1] == path[i] for i, s in enumerate(p.steps))
        assert 2 <= len(p.steps) <= 5
    assert first_options == 100  # balanced: the answer comes first in exactly half of the questions


def test_prontoqa_answer_follows_from_the_facts():
    gen = functools.partial(prontoqa.problem, min_hops=5, max_hops=5, branches=3)
    problems = R.unique_splits(gen, {"train": 200}, seed=1)["train"]
    trues = 0
    for p in problems:
        words = list(p.question)
        q = words.index("true")
        sentences = " ".join(words[:q]).split(" . ")
        isa = [tuple(s.split()[1::3][:2]) for s in sentences if s.startswith("every") and " is a " in s]
        props = {s.split()[1]: s for s in sentences if s.startswith("every") and " is a " not in s}
        start = words[3]
        reach = reachable(isa, start)
        has = [c for c in reach if c in props]
        assert len(has) == 1  # exactly one reachable concept states the property
        holds = " not " not in props[has[0]]
        asks_not = "not" in words[q:]
        truth = holds != asks_not
        assert p.answer == ("true" if truth else "false",)
        trues += truth
        assert len(p.steps) == 6
    assert trues == 100


def test_splits_are_disjoint_deterministic_and_seeded():
    config = base.get_config("coconut", "prosqa").data
    config.update(train_examples=300, eval_examples=50, test_examples=50)
    a, b = datasets.reasoning_problems(config, 0), datasets.reasoning_problems(config, 0)
    assert a == b
    questions = {name: {p.question for p in ps} for name, ps in a.items()}
    assert all(len(questions[n]) == len(a[n]) for n in a)
    assert not questions["train"] & questions["eval"] and not questions["train"] & questions["test"]
    assert not questions["eval"] & questions["test"]
    assert datasets.reasoning_problems(config, 1)["test"] != a["test"]


def test_curriculum_stage_layout_token_by_token():
    """Stage s: the first min(s, n) steps become s * c thoughts; the last stage drops every step."""
    p = R.Problem(question=("q1", "q2"), steps=(("s1", "."), ("s2", "."), ("s3", ".")), answer=("A",))
    c, last = 2, 4
    expect = {
        0: ["<bot>", "<eot>", "s1", ".", "s2", ".", "s3", "."],
        1: ["<bot>"] + ["<thought>"] * 2 + ["<eot>", "s2", ".", "s3", "."],
        2: ["<bot>"] + ["<thought>"] * 4 + ["<eot>", "s3", "."],
        3: ["<bot>"] + ["<thought>"] * 6 + ["<eot>"],
        4: ["<bot>"] + ["<thought>"] * 8 + ["<eot>"],
    }
    for stage, words in expect.items():
        rest, flags = R.stage_layout(p, "coconut", stage, last, c)
        assert rest == words + ["###", "A", "<eos>"]
        assert flags == [0] * (words.index("<eot>") + 1) + [1] * (len(rest) - words.index("<eot>") - 1)
    assert R.stage_layout(p, "cot", 3, last, c)[0] == ["s1", ".", "s2", ".", "s3", ".", "###", "A", "<eos>"]
    assert R.stage_layout(p, "nocot", 3, last, c)[0] == ["###", "A", "<eos>"]


def test_examples_left_pad_questions_and_shift_targets():
    vocab = R.Vocabulary(["q1", "q2", "q3", "s1", ".", "A"])
    short = R.Problem(("q1",), (("s1", "."),), ("A",))
    long = R.Problem(("q1", "q2", "q3"), (("s1", "."),), ("A",))
    geo = R.geometry([short, long], "coconut", last_stage=1, thoughts_per_step=1)
    assert geo.bot_position == 3
    ex = R.examples([short, long], vocab, geo, "coconut", stage=1, last_stage=1, thoughts_per_step=1)
    rows = [vocab.decode(r) for r in ex["inputs"]]
    assert rows[0][:5] == ["<pad>", "<pad>", "q1", "<bot>", "<thought>"]
    assert rows[1][:5] == ["q1", "q2", "q3", "<bot>", "<thought>"]
    np.testing.assert_array_equal(ex["targets"][:, :-1], ex["inputs"][:, 1:])
    # loss on ###, A, <eos> only: the targets at the masked positions
    assert [vocab.decode(t[m > 0]) for t, m in zip(ex["targets"], ex["loss_mask"])] == [["###", "A", "<eos>"]] * 2


def test_score_reads_the_answer_between_marker_and_eos():
    vocab = R.Vocabulary(["A", "B", "x"])
    problems = [R.Problem(("x",), (), ("A",))] * 3
    ids = lambda words: vocab.encode(words)  # noqa: E731
    generated = np.array([ids(["x", "###", "A", "<eos>", "B"]), ids(["###", "B", "<eos>", "A", "A"]),
                          ids(["x", "x", "x", "x", "x"])])
    result = R.score(generated, problems, vocab)
    assert result["accuracy"] == pytest.approx(1 / 3)
    assert result["tokens"] == pytest.approx((4 + 3 + 5) / 3)


@pytest.mark.parametrize("name", ["prosqa", "prontoqa"])
def test_loader_fills_the_model_layout_and_a_curriculum_of_stages(name):
    config = base.get_config("coconut", name)
    config.data.update(train_examples=64, eval_examples=8, test_examples=8, last_stage=3, thoughts_per_step=2)
    splits = datasets.load(config.data, seed=0)
    assert len(splits.stages) == 4 and splits.model_keys["max_thoughts"] == 6
    bot = splits.model_keys["bot_position"]
    for stage, examples in enumerate(splits.stages):
        assert (examples["inputs"][:, bot] == R.BOT).all()
        thoughts = (examples["inputs"] == R.THOUGHT).sum(1)
        assert thoughts.max() == (6 if stage == 3 else 2 * stage)
    assert (splits.evals["eval"]["inputs"] == R.THOUGHT).sum(1).min() == 6  # evaluation: the last stage
    flat = config.data.copy_and_resolve_references()
    flat.curriculum = False
    assert datasets.load(flat, seed=0).stages == ()


def test_staged_pipeline_runs_each_stage_for_its_epochs():
    stages = [{"inputs": np.full((10, 2), k), "targets": np.zeros((10, 2)), "loss_mask": np.ones((10, 2))}
              for k in range(3)]
    dataset, starts = pipeline.staged(stages, epochs_per_stage=2, batch_size=4, seed=0)
    assert starts == [0, 4, 8]
    assert [int(dataset[i]["inputs"][0, 0]) for i in range(12)] == [0] * 4 + [1] * 4 + [2] * 4
    assert [pipeline.stage_of(starts, s) for s in (0, 3, 4, 7, 8, 1000)] == [0, 0, 1, 1, 2, 2]


def test_score_against_hand_scored_generations():
    """The words between the last `###` and `<eos>` must equal the answer; tokens count up to `<eos>`."""
    vocab = R.Vocabulary(["tom", "is", "a", "wumpus", "yumpus", "."])
    problem = R.Problem(question=("q",), steps=(), answer=("wumpus",))

    def row(*words):
        ids = vocab.encode(words)
        return ids + [R.PAD] * (8 - len(ids))

    generated = np.array([
        row("###", "wumpus", "<eos>"),                      # right: 3 tokens
        row("tom", "is", "a", "###", "yumpus", "<eos>"),    # wrong answer: 6 tokens
        row("###", "yumpus", "###", "wumpus", "<eos>"),     # the last ### counts: right, 5 tokens
        row("wumpus", "<eos>"),                             # no ###: wrong, 2 tokens
        row("###", "wumpus", "wumpus", "<eos>"),            # an extra word: wrong, 4 tokens
        row("tom", "is", "a", ".", ".", ".", "###", "wumpus"),  # no <eos> in the budget: right, 8 tokens
    ])
    result = R.score(generated, [problem] * len(generated), vocab)
    assert result["accuracy"] == 3 / 6
    assert result["tokens"] == (3 + 6 + 5 + 2 + 4 + 8) / 6
