"""ProsQA-style problems (Hao et al. 2024, §4.1): is Tom an A or a B, given a random DAG of "every X is a Y".

One problem, with h hops (h drawn from [min_hops, max_hops]) and invented concept names:

    true chain       v_0 -> v_1 -> ... -> v_h = A          (Tom is a v_0)
    distractor chain u_0 -> u_1 -> ... -> u_h = B          (no edge from the v's into it: B is unreachable)
    dead ends        v_i -> w or u_i -> w, `branches` of them, w fresh concepts with no outgoing edge

The facts are the edges in random order; the question lists A and B in an order that alternates with the
problem's index (balanced answers). The chain of thought is the path, one step per edge:
"every v_i is a v_{i+1} ."; the answer is A. Finding it needs a search from v_0 past the dead ends.
"""

import itertools

from data import reasoning

_ONSETS = ("b", "br", "d", "f", "g", "gr", "j", "k", "l", "m", "n", "p", "r", "s", "sh", "st", "t", "v", "w", "z")
_VOWELS = ("a", "e", "i", "o", "u")
_CODAS = ("mpus", "rpus")
CONCEPTS = tuple(o + v + c for c, o, v in itertools.product(_CODAS, _ONSETS, _VOWELS))  # 200 names
NAMES = ("tom", "alex", "sally", "max", "rex", "fae", "sam", "wren", "polly", "stella")
VOCABULARY = reasoning.Vocabulary(("every", "is", "a", "or", ".", "?") + NAMES + CONCEPTS)


def problem(rng, index: int, *, min_hops: int, max_hops: int, branches: int) -> reasoning.Problem:
    hops = int(rng.integers(min_hops, max_hops + 1))
    picked = [CONCEPTS[i] for i in rng.choice(len(CONCEPTS), 2 * (hops + 1) + branches, replace=False)]
    true_chain, false_chain, dead_ends = picked[:hops + 1], picked[hops + 1:2 * hops + 2], picked[2 * hops + 2:]
    edges = list(zip(true_chain, true_chain[1:])) + list(zip(false_chain, false_chain[1:]))
    for w in dead_ends:  # each dead end hangs off a non-final concept of either chain
        chain = true_chain if rng.random() < 0.5 else false_chain
        edges.append((chain[int(rng.integers(hops))], w))
    name = NAMES[int(rng.integers(len(NAMES)))]
    facts = [("every", x, "is", "a", y, ".") for x, y in (edges[i] for i in rng.permutation(len(edges)))]
    a, b = true_chain[-1], false_chain[-1]
    options = (a, b) if index % 2 == 0 else (b, a)
    question = (name, "is", "a", true_chain[0], ".", *itertools.chain(*facts),
                "is", name, "a", options[0], "or", "a", options[1], "?")
    steps = tuple(("every", x, "is", "a", y, ".") for x, y in zip(true_chain, true_chain[1:]))
    return reasoning.Problem(question=question, steps=steps, answer=(a,))


def rejected_problems(config) -> list[str]:
    """Preference pairs (`data.rejected`) exist for ProntoQA only."""
    if config.rejected and config.name != "prontoqa":
        return [f"data.rejected={config.rejected!r} needs data.name='prontoqa' (its answers have a programmatic "
                f"opposite), not {config.name!r}"]
    return []


def validate(config) -> list[str]:
    p = rejected_problems(config)
    if not 1 <= config.min_hops <= config.max_hops:
        p.append(f"data.min_hops={config.min_hops}, data.max_hops={config.max_hops}: need 1 <= min_hops <= max_hops")
    if config.branches < 0 or 2 * (config.max_hops + 1) + config.branches > len(CONCEPTS):
        p.append(f"data.branches={config.branches} must lie in [0, {len(CONCEPTS) - 2 * (config.max_hops + 1)}] "
                 f"({len(CONCEPTS)} concept names)")
    return p
