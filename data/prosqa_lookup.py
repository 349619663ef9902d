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
"""

from data import prosqa, prosqa_dag, reasoning
from data.prosqa_official import words

VOCABULARY = prosqa_dag.VOCABULARY


def problem(rng, index: int, *, min_hops: int, max_hops: int, branches: int) -> reasoning.Problem:
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
    question = f"{record['question'].rsplit(' Is ', 1)[0]} Is {symbols[x]} a {symbols[first]} or {symbols[second]}?"
    answer = f"{symbols[x]} is a {symbols[right]}." if is_person else f"Every {symbols[x]} is a {symbols[right]}."
    return reasoning.Problem(question=words(question), steps=(), answer=words(answer))


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

