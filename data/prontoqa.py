"""ProntoQA-style problems (Saparov & He 2023), 5 hops by default: true or false, "max is (not) P"?

One problem with h hops over invented concepts c_0 .. c_h and a property P:

    max is a c_0 .   every c_i is a c_{i+1} .  (i < h)   every c_h is [not] P .
    distractors: a chain d_1 -> ... -> d_b of `branches` other concepts whose end has the opposite property,
                 "every d_j is a d_{j+1} . every d_b is [the opposite] P .", unreachable from max

The facts are shuffled; the question "true or false : max is [not] P ?" has the answer "true" or "false",
alternating with the problem's index (balanced). The chain of thought: "max is a c_1 ." ... "max is a c_h .",
then "max is [not] P .".

Preference pairs (`data.rejected = "derailed"`): each problem's correct chain of thought is chosen over a derailed
one that a programmatic checker knows to be wrong: the first j hops of the chain (j uniform in [0, h - 1]), then an
unsupported jump onto the distractor chain at a random concept, its hops to the end, the end's (opposite) property
and the wrong answer; without distractors, the correct chain with its conclusion and answer flipped.
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


def _facts(question) -> tuple[dict, dict]:
    """(concept -> the concept it is a, concept -> (negated, property)) of a question's "every ..." sentences."""
    edges, properties, sentence = {}, {}, []
    for word in question:
        sentence.append(word)
        if word in (".", "?"):
            if sentence[0] == "every" and sentence[3] == "a":
                edges[sentence[1]] = sentence[4]
            elif sentence[0] == "every":
                properties[sentence[1]] = (sentence[3] == "not", sentence[-2])
            sentence = []
    return edges, properties


def derailed(p: reasoning.Problem, rng) -> reasoning.Problem:
    """The problem with a wrong chain of thought and the wrong answer (the module docstring's derailment)."""
    name, chain = p.steps[0][0], [step[3] for step in p.steps[:-1]]  # c_1 .. c_h
    edges, properties = _facts(p.question)
    concepts = (set(edges) | set(properties)) - set(chain) - {p.question[3]}  # the distractor chain's
    starts = [c for c in concepts if c not in edges.values()]
    wrong = ("false",) if p.answer == ("true",) else ("true",)
    if not starts:  # no distractor chain: the right hops, the flipped conclusion
        negated, prop = properties[chain[-1]]
        conclusion = (name, "is", *(() if negated else ("not",)), prop, ".")
        return reasoning.Problem(p.question, (*p.steps[:-1], conclusion), wrong)
    distractors = [starts[0]]
    while distractors[-1] in edges:
        distractors.append(edges[distractors[-1]])
    kept = int(rng.integers(len(chain)))
    hops = distractors[int(rng.integers(len(distractors))):]
    negated, prop = properties[distractors[-1]]
    steps = tuple((name, "is", "a", c, ".") for c in chain[:kept] + hops)
    return reasoning.Problem(p.question, (*steps, (name, "is", *(("not",) if negated else ()), prop, ".")), wrong)


def validate(config) -> list[str]:
    p = prosqa.validate(config)
    if config.rejected and config.method == "coconut":
        p.append(f"data.rejected={config.rejected!r} pairs language chains of thought: set data.method to 'cot' or "
                 "'nocot'")
    return p
