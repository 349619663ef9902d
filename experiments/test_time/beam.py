"""Verifier-guided beam search over reasoning steps (Snell et al. 2024, section 5.2), and lookahead search.

With beam width W and M expansions per beam (a budget of N = W M candidates a round):

    round 1      sample N first steps of the prompt
    each round   score every new candidate with the verifier; the finished ones (an answer reached) are set aside;
                 keep the W best of the others by their path's score (voting.aggregate: by default the last step's)
                 and sample M next steps of each
until no candidate is left unfinished or `max_steps` rounds have run. Lookahead search (lookahead = k > 0) scores
a candidate by the verifier's value of its greedy continuation k steps further (the rollout is only looked at: the
candidate keeps its own path). The finished candidates, and those left unfinished after `max_steps`, are returned
with their step scores; voting.py picks the answer (best-of-N or weighted voting, as after sampling).
"""

import dataclasses
from typing import Any

from experiments.test_time import voting


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A partial or whole solution: its state, the verifier's score of each of its steps, whether it is finished."""

    state: Any
    step_scores: tuple[float, ...]
    finished: bool

    def score(self, how: str) -> float:
        return voting.aggregate(self.step_scores, how)


def scored_children(problem, parents: list[Candidate], n: int, rng, lookahead: int = 0) -> list[Candidate]:
    """n sampled next steps of every parent, scored by the verifier (at the end of a `lookahead`-step rollout)."""
    children = [(parent, child) for parent, kids in zip(parents, problem.expand([p.state for p in parents], n, rng))
                for child in kids]
    states = [child for _, child in children]
    ahead = problem.rollout(states, lookahead) if lookahead else states
    values = problem.value(ahead)
    return [Candidate(child, parent.step_scores + (float(value),), bool(problem.finished(child)))
            for (parent, child), value in zip(children, values)]


def beam_search(problem, *, beam_width: int, expansions: int, max_steps: int, rng, how: str = "last",
                lookahead: int = 0) -> list[Candidate]:
    """The finished candidates, then the unfinished ones of the last round (module doc)."""
    if min(beam_width, expansions, max_steps) < 1 or lookahead < 0:
        raise ValueError(f"beam_width={beam_width}, expansions={expansions}, max_steps={max_steps}: each at least 1, "
                         f"lookahead={lookahead} at least 0")
    beams, finished = [Candidate(problem.root, (), False)], []
    for step in range(max_steps):
        candidates = scored_children(problem, beams, expansions if step else beam_width * expansions, rng, lookahead)
        finished += [c for c in candidates if c.finished]
        beams = sorted((c for c in candidates if not c.finished), key=lambda c: -c.score(how))[:beam_width]
        if not beams:
            break
    return finished + beams
