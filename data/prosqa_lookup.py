"""One-hop lookups on ProsQA graphs: the diagnostic of whether a model can find a fact in its context, the step
every ProsQA reasoning step repeats (issue 24).

A problem keeps the facts of a problem drawn to the official distribution (data/prosqa_dag.py) and asks about
one edge instead of a path, in the official question and answer formats:

    question   FACTS  Is X a A or B?
    answer     X is a A.          (a person X)  /  Every X is a A.  (a concept X)

X is drawn uniformly among the graph's nodes with children, A uniformly among X's children, and B among the
graph's concepts that are neither X nor a child of X; the right option comes first in even-indexed problems and
second in odd ones. There are no steps (`data.method = nocot`): the answer needs the fact "X is a A" found
among ~36 in context, nothing the question alone gives away (chance 50%). Held-out problems are new graphs.

`data.facts = k` (0: all) keeps X's own facts, one fact whose object is B (both options stay objects of facts,
as in a whole graph, so "the option seen in context" is no shortcut) and other facts of the graph drawn
uniformly up to k in all, in the graph's order: shorter rows with fewer distractors, the first stages of a
curriculum whose later stages start from the previous one's weights (`train.init_from`) and end on whole graphs.
"""

from data import prosqa, prosqa_dag, reasoning
from data.prosqa_official import words

VOCABULARY = prosqa_dag.VOCABULARY


def problem(rng, index: int, *, min_hops: int, max_hops: int, branches: int, facts: int = 0) -> reasoning.Problem:
    del branches  # the official distribution has none (validate refuses them)
    record = prosqa_dag.record(rng, min_hops, max_hops)
    symbols, edges = record["idx_to_symbol"], record["edges"]
    children = {}
    for u, v in edges:
        children.setdefault(u, set()).add(v)
    x = sorted(children)[int(rng.integers(len(children)))]
    right = sorted(children[x])[int(rng.integers(len(children[x])))]
    is_person = symbols[x] in prosqa_dag.NAMES
    others = [n for n in range(len(symbols)) if n != x and n not in children[x] and symbols[n] not in prosqa_dag.NAMES]
    wrong = others[int(rng.integers(len(others)))]
    first, second = (right, wrong) if index % 2 == 0 else (wrong, right)
    context = _kept_facts(rng, record["question"].rsplit(" Is ", 1)[0], symbols[x], symbols[wrong], facts)
    question = f"{context} Is {symbols[x]} a {symbols[first]} or {symbols[second]}?"
    answer = f"{symbols[x]} is a {symbols[right]}." if is_person else f"Every {symbols[x]} is a {symbols[right]}."
    return reasoning.Problem(question=words(question), steps=(), answer=words(answer))


def _kept_facts(rng, context: str, subject: str, wrong: str, facts: int) -> str:
    """The facts of `context` about `subject`, one fact whose object is the wrong option (so that both options
    appear as objects, as in a whole graph), and others drawn uniformly up to `facts` in all (0: every fact)."""
    if not facts:
        return context
    sentences = [f"{s}." for s in context.removesuffix(".").split(". ")]
    subjects_objects = [s.removeprefix("Every ").removesuffix(".").split(" is a ") for s in sentences]
    own = [i for i, (x, _) in enumerate(subjects_objects) if x == subject]
    into_wrong = [i for i, (_, y) in enumerate(subjects_objects) if y == wrong]
    kept = own + [into_wrong[int(rng.integers(len(into_wrong)))]]
    others = [i for i in range(len(sentences)) if i not in kept]
    kept += rng.permutation(others)[:max(0, facts - len(kept))].tolist()
    return " ".join(sentences[i] for i in sorted(kept))


def splits(config, seed: int) -> dict[str, list[reasoning.Problem]]:
    """Generated train / eval / test problems with `config.facts` facts each (data.reasoning_problems' splits)."""
    return reasoning.generated_splits(problem, config, seed, facts=config.facts)


def validate(config) -> list[str]:
    p = prosqa.rejected_problems(config)
    if config.method != "nocot":
        p.append(f"data.method={config.method!r}: a one-hop lookup has no steps to reason through; use 'nocot'")
    if not min(prosqa_dag.HOPS) <= config.min_hops <= config.max_hops <= max(prosqa_dag.HOPS):
        p.append(f"data.min_hops={config.min_hops}, data.max_hops={config.max_hops}: the graphs are the official "
                 f"distribution's, {min(prosqa_dag.HOPS)}-{max(prosqa_dag.HOPS)} hops")
    if config.branches:
        p.append(f"data.branches={config.branches}: the official distribution has no dead-end count; leave it 0")
    return p

