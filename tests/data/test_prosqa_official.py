"""The official ProsQA splits through the loader, the text-read graph statistics against the records' own graph
fields, and the generator drawn to the official distribution (data/prosqa_official.py, data/prosqa_dag.py)."""

import collections
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from data import prosqa_dag, prosqa_official, reasoning

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def official():
    return {split: prosqa_official.read(prosqa_official.path(split)) for split in prosqa_official.SPLITS}


@pytest.fixture(scope="module")
def generated():
    return prosqa_dag.records(1000, seed=3)


def assert_consistent(record):
    """The text (question, steps, answer) says what the record's graph fields say, and the steps are a shortest
    root -> target path that starts with the person's fact; the negative target is out of the root's reach."""
    symbols = record["idx_to_symbol"]
    edges = [(symbols[u], symbols[v]) for u, v in record["edges"]]
    p = prosqa_official.problem(record)
    g = prosqa_official.graph(p)
    root, target = symbols[record["root"]], symbols[record["target"]]
    assert sorted(g["edges"]) == sorted(edges)
    assert (g["root"], g["target"], g["neg_target"]) == (root, target, symbols[record["neg_target"]])
    assert prosqa_official.problem_statistics(p)["nodes"] == len(symbols)
    path = [root] + [step[-2] for step in p.steps]  # each step "... is a Y ."
    assert p.steps[0][:-2] == (root, "is", "a") and path[-1] == target
    assert all(pair in edges for pair in zip(path, path[1:])), "every step is a fact of the question"
    assert prosqa_official.shortest_paths(edges, root, target)[0] == len(p.steps)
    assert prosqa_official.shortest_paths(edges, root, g["neg_target"]) == (None, 0)
    assert p.answer == (root, "is", "a", target, ".")


def test_the_official_splits_load_and_their_text_matches_their_graphs(official):
    assert {split: len(records) for split, records in official.items()} == {"test": 500, "valid": 300}
    for records in official.values():
        for record in records:
            assert_consistent(record)


def test_the_official_test_set_scores_through_the_reasoning_pipeline(official):
    problems = [prosqa_official.problem(r) for r in official["test"]]
    vocab = prosqa_official.vocabulary(problems)
    geo = reasoning.geometry(problems, "cot", 0, 1)
    rows = reasoning.examples(problems, vocab, geo, "cot", 0, 0, 1)
    assert reasoning.prompts(problems, vocab, geo, "cot").shape == (500, geo.question_len)
    continuations = [vocab.encode([w for s in p.steps for w in s] + ["###", *p.answer, "<eos>"]) for p in problems]
    right = np.full((500, max(map(len, continuations))), reasoning.PAD, np.int32)
    for i, c in enumerate(continuations):
        right[i, :len(c)] = c
    assert reasoning.score(right, problems, vocab)["accuracy"] == 1.0
    wrong = right.copy()
    for i, p in enumerate(problems):  # the other option in place of the answer's concept
        g = prosqa_official.graph(p)
        wrong[i][wrong[i] == vocab.ids[g["target"]]] = vocab.ids[g["neg_target"]]
    assert reasoning.score(wrong, problems, vocab)["accuracy"] == 0.0
    assert rows["inputs"].shape == (500, geo.row_len - 1)


def test_a_missing_file_is_one_line_naming_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="prosqa_test.json does not exist"):
        prosqa_official.load("test", str(tmp_path))
    with pytest.raises(ValueError, match="'train' is not one of"):
        prosqa_official.path("train")


def test_generated_problems_are_consistent_and_their_statistics_match_the_official_within_10_percent(
        official, generated):
    for record in generated:
        assert_consistent(record)
    ours = prosqa_official.statistics([prosqa_official.problem(r) for r in generated])
    theirs = prosqa_official.statistics([prosqa_official.problem(r) for r in official["test"]])
    for key in prosqa_official.PER_PROBLEM:
        assert ours[key][0] == pytest.approx(theirs[key][0], rel=0.1), (key, ours[key], theirs[key])
    assert (ours["concepts"], ours["person_names"]) == (theirs["concepts"], theirs["person_names"])


def test_the_generator_is_deterministic_in_its_seed_and_writes_the_official_schema(tmp_path, generated):
    assert prosqa_dag.records(5, seed=3) == generated[:5]
    assert prosqa_dag.records(5, seed=4) != generated[:5]
    out = tmp_path / "problems.json"
    subprocess.run([sys.executable, "-m", "data.prosqa_dag", f"--out={out}", "--num=5", "--seed=3"], cwd=REPO,
                   check=True, capture_output=True)
    assert prosqa_official.read(str(out)) == json.loads(json.dumps(generated[:5]))


def test_the_path_in_the_steps_is_uniform_over_the_shortest_paths():
    """s->a->c->t, s->b->c->t, s->a->d->t: each 1/3 (picking a uniform parent backwards would give 1/4, 1/4, 1/2)."""
    edges = [("s", "a"), ("s", "b"), ("a", "c"), ("b", "c"), ("a", "d"), ("c", "t"), ("d", "t")]
    rng = np.random.default_rng(0)
    counts = collections.Counter(tuple(prosqa_dag.shortest_path(edges, "s", "t", rng)) for _ in range(3000))
    assert prosqa_official.shortest_paths(edges, "s", "t") == (3, 3)
    assert set(counts) == {("s", "a", "c", "t"), ("s", "b", "c", "t"), ("s", "a", "d", "t")}
    for path, count in counts.items():
        assert count / 3000 == pytest.approx(1 / 3, abs=0.04), (path, count)


def _official_data_config(**overrides):
    from experiments.configs import coconut_prosqa_official
    config = coconut_prosqa_official.get_config("cot").data
    config.update(train_examples=40, **overrides)
    return config


def test_the_official_config_trains_on_generated_problems_and_evaluates_on_the_official_splits():
    import data as datasets

    config = _official_data_config()
    assert not prosqa_dag.validate(config)
    problems = datasets.reasoning_problems(config, 0)
    assert problems["eval"] == prosqa_official.load("valid") and problems["test"] == prosqa_official.load("test")
    official_questions = {p.question for p in problems["eval"] + problems["test"]}
    assert len(problems["train"]) == 40 and not official_questions & {p.question for p in problems["train"]}
    assert datasets.reasoning_problems(config, 0)["train"] == problems["train"]
    assert datasets.reasoning_problems(config, 1)["train"] != problems["train"]
    splits = datasets.load(config, 0)  # every official word is in the generator's vocabulary
    assert splits.vocab_size == len(prosqa_dag.VOCABULARY) and set(splits.evals) == {"eval"}


@pytest.mark.parametrize("overrides, message", [
    (dict(min_hops=2), "data.min_hops=2, data.max_hops=6: the official distribution has 3-6 hops"),
    (dict(branches=1), "data.branches=1: the official distribution has no dead-end count"),
    (dict(test_examples=501), "data.test_examples=501: the official test split has 500 problems"),
])
def test_bad_official_keys_are_refused_in_one_line(overrides, message):
    problems = prosqa_dag.validate(_official_data_config(**overrides))
    assert len(problems) == 1 and problems[0].startswith(message), problems
