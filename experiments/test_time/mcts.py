"""Monte Carlo tree search over reasoning steps with the verifier as value (UCT: Kocsis and Szepesvari 2006; over
an LLM's steps, e.g. Feng et al. 2023, "AlphaZero-like tree search can guide LLM decoding and training").

Each simulation from the root:

    select     descend while the node has children, to the child with the largest
                   Q(child) + c sqrt(ln N(node) / N(child))        (an unvisited child first, in order)
               Q the mean of the child's evaluations, N the visit counts
    expand     a leaf that is not finished gets `expansions` sampled next steps, each scored by the verifier
    evaluate   the leaf: the aggregate (voting.aggregate) of its path's step scores; with rollout_steps = k > 0, of
               its path's scores and the verifier's value of its greedy continuation k steps further
    back up    every node of the path: N += 1, its evaluations' sum += the evaluation

After `simulations`, the answer is the path that follows the most visited child (ties: the higher Q) from the root
to a node without children.
"""

import math

from experiments.test_time import beam, voting


class _Node:
    def __init__(self, candidate: beam.Candidate):
        self.candidate, self.children, self.visits, self.total = candidate, [], 0, 0.0

    def mean(self) -> float:
        return self.total / self.visits if self.visits else 0.0


def mcts(problem, *, simulations: int, expansions: int, rng, c_uct: float = 1.0, how: str = "min",
         rollout_steps: int = 0) -> beam.Candidate:
    """The end of the most visited path (module doc): finished when the search reached an answer along it."""
    if min(simulations, expansions) < 1 or rollout_steps < 0:
        raise ValueError(f"simulations={simulations}, expansions={expansions}: each at least 1, rollout_steps="
                         f"{rollout_steps} at least 0")
    root = _Node(beam.Candidate(problem.root, (), False))
    for _ in range(simulations):
        path = [root]
        while path[-1].children:
            path.append(_select(path[-1], c_uct))
        leaf = path[-1]
        if not leaf.candidate.finished:
            leaf.children = [_Node(c) for c in beam.scored_children(problem, [leaf.candidate], expansions, rng)]
        value = _evaluate(problem, leaf.candidate, how, rollout_steps)
        for node in path:
            node.visits += 1
            node.total += value
    node = root
    while node.children:
        node = max(node.children, key=lambda child: (child.visits, child.mean()))
    return node.candidate


def _select(node: _Node, c_uct: float) -> _Node:
    for child in node.children:
        if not child.visits:
            return child
    log_visits = math.log(node.visits)
    return max(node.children, key=lambda child: child.mean() + c_uct * math.sqrt(log_visits / child.visits))


def _evaluate(problem, candidate: beam.Candidate, how: str, rollout_steps: int) -> float:
    scores = candidate.step_scores
    if rollout_steps and not candidate.finished:
        scores = scores + (float(problem.value(problem.rollout([candidate.state], rollout_steps))[0]),)
    return voting.aggregate(scores, how)
