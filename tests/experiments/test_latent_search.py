"""Latent-search probing (experiments/analysis/latent_search.py): the graph's node sets and heights on a hand-made DAG, the
masses and values of hand-made distributions, and the thoughts' distributions against the naive thought loop."""

import jax
import numpy as np
import pytest

from data import prosqa_dag, prosqa_official, reasoning
from experiments.analysis import latent_search
from tests.models import test_coconut

# Sally -> a, b;  a -> c, d;  b -> d;  c -> T (the target);  d -> N (the negative target)
A, B, C, D, T, N = "wumpus", "yumpus", "zumpus", "tumpus", "rempus", "gorpus"
FACTS = [f"Sally is a {A}.", f"Sally is a {B}.", f"Every {A} is a {C}.", f"Every {A} is a {D}.", f"Every {B} is a {D}.",
         f"Every {C} is a {T}.", f"Every {D} is a {N}."]
PROBLEM = prosqa_official.problem(dict(question=" ".join(FACTS) + f" Is Sally a {N} or {T}?", steps=[],
                                       answer=f"Sally is a {T}."))


def test_node_sets_and_heights_of_a_hand_made_graph():
    graph = prosqa_official.graph(PROBLEM)
    first, second = latent_search.node_sets(graph, 1), latent_search.node_sets(graph, 2)
    assert (first["frontier"], first["correct"], first["reachable"]) == ({A, B}, {A}, {A, B})
    assert (second["frontier"], second["correct"], second["reachable"]) == ({C, D}, {C}, {A, B, C, D})
    assert first["height"] == {T: 0, N: 0, C: 1, D: 1, A: 2, B: 2, "Sally": 3}


def test_masses_and_values_of_hand_made_distributions():
    vocab = prosqa_dag.VOCABULARY
    probs = np.zeros((1, 2, len(vocab)), np.float32)
    probs[0, 0, [vocab.ids[A], vocab.ids[B], vocab.ids["Every"]]] = 0.6, 0.2, 0.2
    probs[0, 1, [vocab.ids[C], vocab.ids[T]]] = 0.5, 0.5
    result = latent_search.analyse([PROBLEM], probs, vocab)
    assert result["mass"]["thought_1"] == pytest.approx(dict(frontier=0.8, reachable=0.8, correct=0.6, graph=0.8))
    assert result["mass"]["thought_2"] == pytest.approx(dict(frontier=0.5, reachable=0.5, correct=0.5, graph=1.0))
    values = {(r["thought"], r["height"], r["kind"]): r["mean"] for r in result["value_by_height"]}
    assert values == pytest.approx({(1, 2, "correct"): 0.75, (1, 2, "other"): 0.25, (2, 1, "correct"): 1.0,
                                    (2, 1, "other"): 0.0})


def test_thought_distributions_are_the_head_on_the_hidden_states_the_loop_feeds_back():
    K, bot = test_coconut.K, test_coconut.BOT_AT
    model, variables = test_coconut.make_model(), test_coconut.init_variables()
    prompts = np.asarray(test_coconut.make_tokens())[:, :bot + 1]  # rows 0 and 1 left-padded
    got = latent_search.thought_distributions(model, variables, prompts, K, bot)
    rows = np.full((3, test_coconut.LENGTH), reasoning.PAD, np.int32)
    rows[:, :bot + 1], rows[:, bot + 1:bot + 1 + K], rows[:, bot + 1 + K] = prompts, reasoning.THOUGHT, reasoning.EOT
    naive = test_coconut.naive_logits(model, variables, rows)  # every thought recomputed from the whole prefix
    expected = jax.nn.softmax(naive[:, bot:bot + K], axis=-1)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert got.shape == (3, K, test_coconut.VOCAB)
