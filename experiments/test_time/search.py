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
The tree searches answer with their best-scored finished candidate (beam, lookahead) or most visited path (mcts).
The verifier is a trained outcome or process reward model's run folder (data/verifier_rows.py) or `checker`, the
task's exact step checker (a perfect process reward model). Written to --out, and printed: per problem the answer's
correctness, the tokens generated and the FLOPs spent (the policy's forward FLOPs per generated token, and the
verifier's per token of every sequence it scores; experiments/training/throughput.py's count, a third of a training
step's), the reference's number of steps (its difficulty); and their means.
"""

import json

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
        scores = [path_score(problem, task, state, how) for state in responses]
        return (voting.best_of_n if strategy == "best_of_n" else voting.weighted_vote)(answers, scores)
    if strategy == "mcts":
        return answer_of(mcts.mcts(problem, simulations=budget, expansions=expansions, rng=rng, how=how,
                                   rollout_steps=rollout_steps).state)
    found = beam.beam_search(problem, beam_width=max(budget // expansions, 1), expansions=expansions,
                             max_steps=problem.max_response_tokens, rng=rng, how=how,
                             lookahead=lookahead if strategy == "lookahead" else 0)
    finished = [c for c in found if c.finished] or found
    return answer_of(max(finished, key=lambda c: c.score(how)).state)


def path_score(problem, task, state, how: str) -> float:
    """A whole response's score: the verifier's at its end (how = last), or aggregated over its steps' ends."""
    if how == "last":
        return float(problem.value([state])[0])
    ends = np.cumsum([len(step) for step in task.steps(problem.response(state))])
    return voting.aggregate(problem.verifier([state.tokens[:len(problem.prompt) + end] for end in ends]), how)


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


def search_run(policy: str, strategy: str, budget: int, *, verifier: str = "", how: str = "last",
               expansions: int = 4, lookahead: int = 2, rollout_steps: int = 0, problems: int = 64,
               split: str = "eval", temperature: float = 1.0, seed: int = 0) -> dict:
    """{"problems": [{"correct", "tokens", "flops", "steps"}, ...], "accuracy", "tokens", "flops", ...}."""
    import data as datasets
    from experiments import restore
    from experiments.training import throughput

    check(strategy, budget, verifier, how, expansions, lookahead, rollout_steps)
    config = _config(policy, "--policy")
    task = tasks.of_config(config)
    splits = datasets.load(config.data, config.seed)
    if split not in ("train", *splits.evals):
        raise ConfigError(f"--split={split!r}: one of train, {', '.join(splits.evals)}")
    rows = tasks.problems(splits.train if split == "train" else splits.evals[split])[:problems]
    max_len = splits.seq_len + 1
    model, variables = restore.load_variables(config, policy)
    verify, verifier_flops = _verifier(verifier, config, max_len)
    policy_flops = throughput.model_flops_per_token(config.model, splits.seq_len) / 3
    rng, results = np.random.default_rng(seed), []
    for prompt, reference in rows:
        counted = Counted(verify or verifiers.checker_verifier(task, len(prompt), reference))
        problem = policies.PolicySteps(model, variables, prompt, counted, max_len=max_len,
                                       max_step_tokens=max_len - len(prompt),
                                       max_response_tokens=max_len - len(prompt), step_ends=task.step_ends,
                                       finish_ids=task.finish_ids, temperature=temperature)
        answer = solve(problem, task, strategy, budget, rng, how=how, expansions=expansions, lookahead=lookahead,
                       rollout_steps=rollout_steps)
        results.append({"correct": bool(answer) and answer == task.answer(reference),
                        "tokens": problem.tokens_generated, "verified_tokens": counted.tokens,
                        "flops": problem.tokens_generated * policy_flops + counted.tokens * verifier_flops,
                        "steps": len(task.steps(reference))})
    mean = lambda key: float(np.mean([r[key] for r in results]))  # noqa: E731
    return {"policy": policy, "strategy": strategy, "budget": budget, "verifier": verifier, "aggregate": how,
            "expansions": expansions, "lookahead": lookahead, "rollout_steps": rollout_steps, "split": split,
            "accuracy": mean("correct"), "tokens": mean("tokens"), "flops": mean("flops"), "problems": results}


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
