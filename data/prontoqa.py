"""ProntoQA-style problems (Saparov & He 2023), 5 hops by default: true or false, "max is (not) P"?

One problem with h hops over invented concepts c_0 .. c_h and a property P:

    max is a c_0 .   every c_i is a c_{i+1} .  (i < h)   every c_h is [not] P .
    distractors: a chain d_1 -> ... -> d_b of `branches` other concepts whose end has the opposite property,
                 "every d_j is a d_{j+1} . every d_b is [the opposite] P .", unreachable from max

The facts are shuffled; the question "true or false : max is [not] P ?" has the answer "true" or "false",
alternating with the problem's index (balanced). The chain of thought: "max is a c_1 ." ... "max is a c_h .",
then "max is [not] P .".
"""

import itertools

from data import prosqa, reasoning

PROPERTIES = ("bitter", "sweet", "red", "blue", "small", "large", "hot", "cold", "shiny", "dull",
              "fast", "slow", "loud", "quiet", "sour", "bright")
VOCABULARY = reasoning.Vocabulary(("every", "is", "a", "not", ".", "?", "true", "false", "or", ":")
                                  + prosqa.NAMES + prosqa.CONCEPTS + PROPERTIES)


def problem(rng, index: int, *, min_hops: int, max_hops: int, branches: int) -> reasoning.Problem:
    hops = int(rng.integers(min_hops, max_hops + 1))
    picked = [prosqa.CONCEPTS[i] for i in rng.choice(len(prosqa.CONCEPTS), hops + 1 + branches, replace=False)]
    chain, distractors = picked[:hops + 1], picked[hops + 1:]
    prop = PROPERTIES[int(rng.integers(len(PROPERTIES)))]
    has_prop = bool(rng.random() < 0.5)  # whether the chain's end has P
    answer_true = index % 2 == 0
    asks_not = has_prop != answer_true  # "max is not P" is true iff max lacks P
    negation = () if has_prop else ("not",)
    name = prosqa.NAMES[int(rng.integers(len(prosqa.NAMES)))]
    facts = [("every", x, "is", "a", y, ".") for x, y in zip(chain, chain[1:])]
    facts.append(("every", chain[-1], "is", *negation, prop, "."))
    facts += [("every", x, "is", "a", y, ".") for x, y in zip(distractors, distractors[1:])]
    if distractors:
        facts.append(("every", distractors[-1], "is", *(("not",) if has_prop else ()), prop, "."))
    facts = [facts[i] for i in rng.permutation(len(facts))]
    question = (name, "is", "a", chain[0], ".", *itertools.chain(*facts),
                "true", "or", "false", ":", name, "is", *(("not",) if asks_not else ()), prop, "?")
    steps = tuple((name, "is", "a", c, ".") for c in chain[1:]) + ((name, "is", *negation, prop, "."),)
    return reasoning.Problem(question=question, steps=steps, answer=("true" if answer_true else "false",))


validate = prosqa.validate
