"""The one-hop lookup diagnostic (data/prosqa_lookup.py): each question's answer is a fact of its context, the
other option is not, the right option's place is balanced, the graphs are the official distribution's."""

import numpy as np
import pytest

import data as datasets
from data import prosqa_official
from experiments.training import validation
from experiments.configs import prosqa_lookup as lookup_config


def facts_and_question(p):
    """Edges (subject, object) parsed from the context's sentences, and (subject, first option, second option)."""
    words = list(p.question)
    ask = len(words) - 1 - words[::-1].index("Is")
    edges, sentence = set(), []
    for w in words[:ask]:
        sentence.append(w)
        if w == ".":
            subject = sentence[1] if sentence[0] == "Every" else sentence[0]
            edges.add((subject, sentence[-2]))
            sentence = []
    q = words[ask + 1:]  # X a A or B ?
    return edges, (q[0], q[2], q[4])


@pytest.fixture(scope="module")
def problems():
    config = lookup_config.get_config("conv").data
    config.update(train_examples=300, eval_examples=100, test_examples=100)
    return config, datasets.reasoning_problems(config, seed=5)


def test_the_answer_is_a_fact_of_the_context_and_the_other_option_is_not(problems):
    _, splits = problems
    for p in splits["train"] + splits["test"]:
        edges, (subject, first, second) = facts_and_question(p)
        right = p.answer[-2]
        wrong = second if right == first else first
        assert (subject, right) in edges and (subject, wrong) not in edges and right != wrong
        assert p.answer[:-2] in (("Every", subject, "is", "a"), (subject, "is", "a")) and p.steps == ()
    firsts = [facts_and_question(p)[1][1] == p.answer[-2] for p in splits["train"]]
    assert np.mean(firsts) == 0.5


def test_the_graphs_are_the_official_distribution_and_the_splits_are_disjoint(problems):
    _, splits = problems
    sizes = [len({s for s, o in facts_and_question(p)[0]} | {o for s, o in facts_and_question(p)[0]})
             for p in splits["train"]]
    official = prosqa_official.statistics(prosqa_official.load("test"))
    assert np.mean(sizes) == pytest.approx(official["nodes"][0], rel=0.1)
    questions = {split: {p.question for p in ps} for split, ps in splits.items()}
    assert not questions["train"] & questions["test"] and not questions["train"] & questions["eval"]
    assert datasets.reasoning_problems(problems[0], seed=5)["test"][:3] == splits["test"][:3]


def test_steps_and_dead_ends_are_refused_in_one_line():
    config = lookup_config.get_config("conv")
    config.data.update(method="cot", branches=2)
    with pytest.raises(validation.ConfigError) as info:
        validation.validate(config, 1)
    assert "data.method='cot': a one-hop lookup has no steps" in str(info.value)
    assert "data.branches=2" in str(info.value)
    with pytest.raises(ValueError, match="'CA' is not one of"):
        lookup_config.get_config("CA")


def sentences(question):
    words = list(question)
    context = " ".join(words[:len(words) - 1 - words[::-1].index("Is")])
    return [s.strip() + " ." for s in context.split(" .") if s.strip()]


@pytest.mark.parametrize("facts", [1, 6])
def test_fewer_facts_keep_the_subjects_facts_and_one_into_the_wrong_option_in_the_graphs_order(facts):
    for seed in range(20):
        draw = lambda k: datasets.prosqa_lookup.problem(  # noqa: E731
            np.random.default_rng(seed), seed, min_hops=3, max_hops=6, branches=0, facts=k)
        whole, cut = draw(0), draw(facts)
        assert cut.answer == whole.answer and cut.question[-6:] == whole.question[-6:]
        kept, every = sentences(cut.question), sentences(whole.question)
        assert kept == [s for s in every if s in kept]  # a subsequence: the graph's order
        edges, (subject, first, second) = facts_and_question(cut)
        wrong = second if cut.answer[-2] == first else first
        own = {e for e in facts_and_question(whole)[0] if e[0] == subject}
        assert own <= edges and any(o == wrong for _, o in edges)
        assert len(kept) == max(facts, len(own) + 1)


def test_the_facts_option_reaches_the_generated_splits():
    config = lookup_config.get_config("conv").data
    config.update(train_examples=20, eval_examples=5, test_examples=5, facts=5)
    splits = datasets.reasoning_problems(config, seed=1)
    assert all(len(sentences(p.question)) >= 5 for ps in splits.values() for p in ps)
    assert max(len(p.question) for p in splits["train"]) < 60  # whole graphs: ~250 tokens


def test_every_model_and_curriculum_stage_config_validates_and_stages_grow_the_context():
    stages = {name: lookup_config.get_config(name) for name in list(lookup_config.MODELS) + list(lookup_config.STAGES)}
    for name, config in stages.items():
        validation.validate(config, 1)
        assert config.model.short_conv == (0 if name == "plain" else 4)
    facts = [stages[name].data.facts or float("inf") for name in lookup_config.STAGES]
    assert facts == sorted(facts) and facts[-1] == float("inf")  # the last stage: whole graphs
