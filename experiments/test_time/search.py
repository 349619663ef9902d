"""Score a policy run with a test-time strategy and budget on its task's problems.

    python -m experiments.test_time.search --policy=RUN --strategy=beam --budget=16 [--verifier=RUN2|checker]
        [--aggregate=last] [--expansions=4] [--lookahead=2] [--rollout_steps=0] [--problems=64] [--split=eval]
        [--out=FILE.json]

strategies, with a budget of N:
    majority     N sampled responses (sharing their prompt's cache), the most frequent answer (no verifier)
    best_of_n    N responses, the one the verifier scores highest (--aggregate over its steps: min, product or last;
                 an outcome model reads the last)
    weighted     N responses, the answer whose responses' scores sum highest
    beam         verifier-guided beam search, N candidates a round: width N / M, M = --expansions (beam.py)
    lookahead    the same, each candidate scored at the end of a --lookahead-step greedy rollout
    mcts         N simulations of Monte Carlo tree search, --expansions children per node, each evaluated leaf
                 after a --rollout_steps greedy rollout (0: as it is) (mcts.py)
The tree searches answer with their best-scored finished candidate (beam, lookahead) or most visited path (mcts),
a path the search left unfinished continued greedily to its answer.
The verifier is a trained outcome or process reward model's run folder (data/verifier_rows.py) or `checker`, the
task's exact step checker (a perfect process reward model). Written to --out, and printed: per problem the answer's
correctness, the tokens generated and the FLOPs spent (the policy's forward FLOPs per generated token, and the
verifier's per token of every sequence it scores; experiments/training/throughput.py's count, a third of a training
step's), the reference's number of steps (its difficulty); and their means.

In a program: `prepare` loads a policy, its problems and a verifier once, `score` runs one strategy and budget on
them (a study's many searches share one load and its compiled functions).
"""

import dataclasses
import json
from typing import Any, Callable

import numpy as np

from data.config_fields import ConfigError
from experiments.test_time import beam, mcts, policy as policies, tasks, verifier as verifiers, voting

SAMPLING = ("majority", "best_of_n", "weighted")
STRATEGIES = SAMPLING + ("beam", "lookahead", "mcts")


def solve(problem, task, strategy: str, budget: int, rng, *, how: str = "last", expansions: int = 4,
          lookahead: int = 2, rollout_steps: int = 0):
    """The answer `strategy` picks for one step problem (module doc)."""
    answer_of = lambda state: task.answer(problem.response(state))  # noqa: E731
    if strategy in SAMPLING:
        responses = problem.sample(budget, rng)
        answers = [answer_of(state) for state in responses]
        if strategy == "majority":
            return voting.majority_vote(answers)
        scores = path_scores(problem, task, responses, how)
        return (voting.best_of_n if strategy == "best_of_n" else voting.weighted_vote)(answers, scores)
    if strategy == "mcts":
        return answer_of(finish(problem, mcts.mcts(problem, simulations=budget, expansions=expansions, rng=rng,
                                                   how=how, rollout_steps=rollout_steps).state))
    found = beam.beam_search(problem, beam_width=max(budget // expansions, 1), expansions=expansions,
                             max_steps=problem.max_response_tokens, rng=rng, how=how,
                             lookahead=lookahead if strategy == "lookahead" else 0)
    finished = [c for c in found if c.finished] or found
    return answer_of(finish(problem, max(finished, key=lambda c: c.score(how)).state))


def finish(problem, state):
    """The state continued greedily to an answer when the search stopped before one (its tokens are counted)."""
    return state if problem.finished(state) else problem.rollout([state], problem.max_response_tokens)[0]


def path_scores(problem, task, states, how: str) -> list[float]:
    """Each whole response's score: the verifier's at its end (how = last), or aggregated over its steps' ends
    (every step's prefix scored, all of them in one call)."""
    if how == "last":
        return [float(v) for v in problem.value(states)]
    ends = [np.cumsum([len(step) for step in task.steps(problem.response(s))]) for s in states]
    prefixes = [s.tokens[:len(problem.prompt) + end] for s, state_ends in zip(states, ends) for end in state_ends]
    scores, start = np.asarray(problem.verifier(prefixes)) if prefixes else np.zeros(0), 0
    out = []
    for state_ends in ends:
        out.append(voting.aggregate(scores[start:start + len(state_ends)], how))
        start += len(state_ends)
    return out


class Counted:
    """A verifier that counts the tokens of the sequences it scores."""

    def __init__(self, verify):
        self.verify, self.tokens = verify, 0

    def __call__(self, sequences):
        self.tokens += sum(len(s) for s in sequences)
        return self.verify(sequences)


def check(strategy: str, budget: int, verifier: str, how: str, expansions: int, lookahead: int,
          rollout_steps: int = 0) -> None:
    if strategy not in STRATEGIES:
        raise ConfigError(f"--strategy={strategy!r}: one of {', '.join(STRATEGIES)}")
    if how not in voting.AGGREGATIONS:
        raise ConfigError(f"--aggregate={how!r}: one of {', '.join(voting.AGGREGATIONS)}")
    if min(budget, expansions) < 1 or min(lookahead, rollout_steps) < 0:
        raise ConfigError(f"--budget={budget}, --expansions={expansions}: each at least 1; --lookahead={lookahead}, "
                          f"--rollout_steps={rollout_steps}: each at least 0")
    if strategy != "majority" and not verifier:
        raise ConfigError(f"--strategy={strategy} needs --verifier: a reward model's run folder, or 'checker'")


@dataclasses.dataclass(frozen=True)
class Setup:
    """A policy, its task's problems and a verifier, loaded once for any number of searches (`score`)."""

    name: str
    task: tasks.StepTask
    rows: list  # (prompt, reference) of the scored problems
    model: Any
    variables: dict
    max_len: int
    verify: Callable | None  # None: each problem's exact checker
    verifier: str
    policy_flops: float  # forward FLOPs per generated token
    verifier_flops: float  # forward FLOPs per scored token


def prepare(policy: str, *, verifier: str = "", problems: int = 64, split: str = "eval") -> Setup:
    """The policy run's model and the first `problems` of its `split`, and the verifier (a run folder, `checker` or
    "")."""
    import data as datasets
    from experiments import restore
    from experiments.training import throughput

    config = _config(policy, "--policy")
    task = tasks.of_config(config)
    splits = datasets.load(config.data, config.seed)
    if split not in ("train", *splits.evals):
        raise ConfigError(f"--split={split!r}: one of train, {', '.join(splits.evals)}")
    rows = tasks.problems(splits.train if split == "train" else splits.evals[split])[:problems]
    max_len = splits.seq_len + 1
    model, variables = restore.load_variables(config, policy)
    verify, verifier_flops = _verifier(verifier, config, max_len)
    return Setup(policy, task, rows, model, variables, max_len, verify, verifier, verifier_flops=verifier_flops,
                 policy_flops=throughput.model_flops_per_token(config.model, splits.seq_len) / 3)


def problem_of(setup: Setup, row: int, temperature: float = 1.0) -> tuple[policies.PolicySteps, Counted]:
    """Problem `row` of the setup as a step problem, and its verifier counting the tokens it scores."""
    prompt, reference = setup.rows[row]
    counted = Counted(setup.verify or verifiers.checker_verifier(setup.task, len(prompt), reference))
    room = setup.max_len - len(prompt)
    return policies.PolicySteps(setup.model, setup.variables, prompt, counted, max_len=setup.max_len,
                                max_step_tokens=room, max_response_tokens=room, step_ends=setup.task.step_ends,
                                finish_ids=setup.task.finish_ids, temperature=temperature), counted


def score(setup: Setup, strategy: str, budget: int, *, how: str = "last", expansions: int = 4, lookahead: int = 2,
          rollout_steps: int = 0, temperature: float = 1.0, seed: int = 0) -> dict:
    """{"problems": [{"correct", "tokens", "verified_tokens", "flops", "steps"}, ...], "accuracy", "tokens",
    "flops", ...}: `strategy` with `budget` on every problem of the setup."""
    check(strategy, budget, setup.verifier, how, expansions, lookahead, rollout_steps)
    rng, results = np.random.default_rng(seed), []
    for row, (_, reference) in enumerate(setup.rows):
        problem, counted = problem_of(setup, row, temperature)
        answer = solve(problem, setup.task, strategy, budget, rng, how=how, expansions=expansions,
                       lookahead=lookahead, rollout_steps=rollout_steps)
        results.append({"correct": bool(answer) and answer == setup.task.answer(reference),
                        "tokens": problem.tokens_generated, "verified_tokens": counted.tokens,
                        "flops": problem.tokens_generated * setup.policy_flops + counted.tokens * setup.verifier_flops,
                        "steps": len(setup.task.steps(reference))})
    mean = lambda key: float(np.mean([r[key] for r in results]))  # noqa: E731
    return {"policy": setup.name, "strategy": strategy, "budget": budget, "verifier": setup.verifier,
            "aggregate": how, "expansions": expansions, "lookahead": lookahead, "rollout_steps": rollout_steps,
            "accuracy": mean("correct"), "tokens": mean("tokens"), "flops": mean("flops"), "problems": results}


def search_run(policy: str, strategy: str, budget: int, *, verifier: str = "", how: str = "last",
               expansions: int = 4, lookahead: int = 2, rollout_steps: int = 0, problems: int = 64,
               split: str = "eval", temperature: float = 1.0, seed: int = 0) -> dict:
    """`score` of a freshly prepared setup, the flags checked before anything loads."""
    check(strategy, budget, verifier, how, expansions, lookahead, rollout_steps)
    setup = prepare(policy, verifier=verifier, problems=problems, split=split)
    result = score(setup, strategy, budget, how=how, expansions=expansions, lookahead=lookahead,
                   rollout_steps=rollout_steps, temperature=temperature, seed=seed)
    return {**result, "split": split}


def _config(folder: str, flag: str):
    from experiments import restore

    try:
        return restore.load_config(folder)
    except FileNotFoundError as error:
        raise ConfigError(f"{flag}: {error}") from None


def _verifier(verifier: str, policy_config, width: int):
    """(the verifier's function, or None for the per-problem checker; its forward FLOPs per token)."""
    from experiments import restore
    from experiments.training import throughput

    if verifier in ("", "checker"):
        return None, 0.0
    config = _config(verifier, "--verifier")
    if config.data.name != "verifier" or config.model.vocab_size != policy_config.model.vocab_size + 2:
        raise ConfigError(f"--verifier={verifier!r} is not a reward model of this policy: a run on data.name="
                          f"'verifier' with model.vocab_size {policy_config.model.vocab_size + 2} (the policy's + 2); "
                          f"it has data.name={config.data.name!r}, model.vocab_size={config.model.vocab_size}")
    model, variables = restore.load_variables(config, verifier)
    return (verifiers.model_verifier(model, variables, policy_config.model.vocab_size, width),
            throughput.model_flops_per_token(config.model, config.model.max_len) / 3)


def main(argv):
    from absl import flags

    from experiments.training import cli

    del argv
    f = flags.FLAGS
    try:
        result = search_run(f.policy, f.strategy, f.budget, verifier=f.verifier, how=f.aggregate,
                            expansions=f.expansions, lookahead=f.lookahead, rollout_steps=f.rollout_steps,
                            problems=f.problems, split=f.split, temperature=f.temperature, seed=f.seed)
    except ConfigError as e:
        cli.fail(str(e))
    if f.out:
        with open(f.out, "w") as out:
            json.dump(result, out, indent=1)
    print(f"{f.strategy} with budget {f.budget} on {len(result['problems'])} problems of {f.policy}: accuracy "
          f"{result['accuracy']:.3f}, {result['tokens']:.0f} tokens and {result['flops']:.3g} FLOPs per problem")


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("policy", None, "The policy's run folder.", required=True)
    flags.DEFINE_enum("strategy", "best_of_n", STRATEGIES, "How the budget is spent.")
    flags.DEFINE_integer("budget", 8, "Samples, candidates a round (beam) or simulations (mcts).")
    flags.DEFINE_string("verifier", "", "A reward model's run folder, or 'checker' (the exact step checker).")
    flags.DEFINE_enum("aggregate", "last", voting.AGGREGATIONS, "A path's score from its steps' scores.")
    flags.DEFINE_integer("expansions", 4, "Beam and MCTS: children sampled per expanded node.")
    flags.DEFINE_integer("lookahead", 2, "Lookahead search: greedy steps rolled out before scoring.")
    flags.DEFINE_integer("rollout_steps", 0, "MCTS: greedy steps rolled out from each evaluated leaf (0: none).")
    flags.DEFINE_integer("problems", 64, "The split's first problems scored.")
    flags.DEFINE_string("split", "eval", "train, or an evaluation split of the policy's data.")
    flags.DEFINE_float("temperature", 1.0, "Of the policy's samples.")
    flags.DEFINE_integer("seed", 0, "Of the search.")
    flags.DEFINE_string("out", "", "A JSON file for the per-problem results.")
    app.run(main)
