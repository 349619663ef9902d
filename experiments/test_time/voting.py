"""Choosing one answer among N sampled solutions (Lightman et al. 2023; Wang et al. 2023, self-consistency).

A solution's steps have verifier scores p_1 .. p_K in [0, 1] (a process reward model's probability that step k is
right; an outcome model scores the last alone). A solution's score aggregates them:

    min       min_k p_k              (Lightman et al.: the weakest step)
    product   prod_k p_k             (the probability that every step is right, steps independent)
    last      p_K                    (Snell et al.'s choice for their PRM)

and among solutions i with answers a_i and scores s_i:

    best_of_n        a_{argmax_i s_i}
    majority_vote    argmax_a  #{i : a_i = a}                 (self-consistency)
    weighted_vote    argmax_a  sum_{i : a_i = a} s_i
Ties go to the answer seen first.
"""

import numpy as np

AGGREGATIONS = ("min", "product", "last")


def aggregate(step_scores, how: str) -> float:
    """One solution's score from its steps' scores (module doc); an empty path scores 1 (nothing wrong yet)."""
    if how not in AGGREGATIONS:
        raise ValueError(f"how={how!r}: one of {', '.join(AGGREGATIONS)}")
    scores = np.asarray(step_scores, np.float64)
    if scores.size == 0:
        return 1.0
    return float({"min": np.min, "product": np.prod, "last": lambda s: s[-1]}[how](scores))


def best_of_n(answers, scores):
    """The answer of the highest-scoring solution."""
    return answers[int(np.argmax(np.asarray(scores)))]


def weighted_vote(answers, scores):
    """The answer whose solutions' scores sum highest."""
    totals = {}
    for answer, score in zip(answers, scores):
        totals[answer] = totals.get(answer, 0.0) + float(score)
    return max(totals, key=totals.get)  # dicts keep first-seen order: ties go to the first


def majority_vote(answers):
    """The most frequent answer."""
    return weighted_vote(answers, np.ones(len(answers)))
