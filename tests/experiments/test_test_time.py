"""Test-time search (experiments/test_time) against brute force on small trees: every path of a tree whose nodes
have fixed random verifier scores enumerated, each strategy's choice computed here by hand (the exhaustive best
path, the greedy path, the lookahead path) and compared; voting against counting by hand."""

import collections
import itertools
import json
import os

import numpy as np
import pytest

from experiments.test_time import beam, mcts, voting

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Tree:
    """A step problem of `depth` steps with `branching` choices each; a state is the tuple of choices so far, its
    score a fixed draw in [0, 1]. expand returns every child when n >= branching, else n distinct ones at random;
    the greedy rollout takes choice 0."""

    def __init__(self, branching: int, depth: int, seed: int):
        self.branching, self.depth, self.root = branching, depth, ()
        rng = np.random.default_rng(seed)
        nodes = [p for k in range(1, depth + 1) for p in itertools.product(range(branching), repeat=k)]
        self.scores = dict(zip(nodes, rng.uniform(size=len(nodes))))
        self.leaves = [p for p in nodes if len(p) == depth]
        self.expanded = 0

    def expand(self, states, n, rng):
        self.expanded += len(states)
        picks = [range(self.branching) if n >= self.branching else rng.choice(self.branching, n, replace=False)
                 for _ in states]
        return [[s + (int(c),) for c in pick] for s, pick in zip(states, picks)]

    def value(self, states):
        return np.array([self.scores[s] for s in states])

    def finished(self, state):
        return len(state) == self.depth

    def rollout(self, states, steps):
        return [s + (0,) * min(steps, self.depth - len(s)) for s in states]

    def path_scores(self, leaf):
        return [self.scores[leaf[:k]] for k in range(1, len(leaf) + 1)]


@pytest.mark.parametrize("how", voting.AGGREGATIONS)
def test_beam_search_as_wide_as_the_tree_is_exhaustive_search(how):
    tree = Tree(branching=3, depth=4, seed=0)
    found = beam.beam_search(tree, beam_width=3**4, expansions=3, max_steps=10, rng=np.random.default_rng(0), how=how)
    assert sorted(c.state for c in found) == sorted(tree.leaves) and all(c.finished for c in found)
    for c in found:
        np.testing.assert_allclose(c.step_scores, tree.path_scores(c.state))
    best = max(found, key=lambda c: c.score(how)).state
    reference = {"min": min, "product": np.prod, "last": lambda s: s[-1]}[how]
    assert best == max(tree.leaves, key=lambda leaf: reference(tree.path_scores(leaf)))


@pytest.mark.parametrize("lookahead", [0, 1, 2])
def test_beam_of_width_one_follows_the_best_scored_child_and_lookahead_scores_its_rollout(lookahead):
    """Width 1 with every child expanded is greedy descent on the verifier's score of each child (lookahead: of the
    child's greedy continuation `lookahead` steps further), computed here by hand."""
    tree = Tree(branching=4, depth=5, seed=1)
    found = beam.beam_search(tree, beam_width=1, expansions=4, max_steps=5, rng=np.random.default_rng(0),
                             lookahead=lookahead)
    ahead = lambda s: s + (0,) * min(lookahead, tree.depth - len(s))  # noqa: E731
    first = sorted(((c,) for c in range(4)), key=lambda s: -tree.scores[ahead(s)])[:1]  # round 1: 4 of the root
    state = first[0]
    while len(state) < tree.depth:
        state = max((state + (c,) for c in range(4)), key=lambda s: tree.scores[ahead(s)])
    assert [c.state for c in found if c.finished] and max(
        (c for c in found if c.finished), key=lambda c: c.score("last")).state == state


def test_beam_search_keeps_the_width_and_returns_the_unfinished_after_max_steps():
    tree = Tree(branching=3, depth=6, seed=2)
    found = beam.beam_search(tree, beam_width=2, expansions=2, max_steps=3, rng=np.random.default_rng(3))
    assert len(found) == 2 and all(not c.finished and len(c.state) == 3 for c in found)
    assert tree.expanded == 1 + 2 + 2  # the root, then the two kept beams of each later round
    with pytest.raises(ValueError, match="beam_width=0"):
        beam.beam_search(tree, beam_width=0, expansions=2, max_steps=3, rng=np.random.default_rng(0))


@pytest.mark.parametrize("how,rollout_steps", [("min", 0), ("product", 0), ("last", 3)])
def test_mcts_with_enough_simulations_finds_the_verifier_optimal_path(how, rollout_steps):
    tree = Tree(branching=3, depth=3, seed=4)
    reference = {"min": min, "product": np.prod, "last": lambda s: s[-1]}[how]
    best = max(tree.leaves, key=lambda leaf: reference(tree.path_scores(leaf)))
    found = mcts.mcts(tree, simulations=3000, expansions=3, rng=np.random.default_rng(0), how=how,
                      rollout_steps=rollout_steps)
    assert found.finished and found.state == best
    np.testing.assert_allclose(found.step_scores, tree.path_scores(best))


def test_a_search_stopped_before_an_answer_is_finished_greedily():
    """Two MCTS simulations expand the root and one child: the most visited path ends two steps deep, unfinished;
    `finish` continues it by the greedy choice (0) to the tree's depth, and leaves a finished state as it is."""
    from experiments.test_time import search

    tree = Tree(branching=3, depth=4, seed=6)
    tree.max_response_tokens = tree.depth
    found = mcts.mcts(tree, simulations=2, expansions=3, rng=np.random.default_rng(0))
    assert len(found.state) == 2 and not found.finished
    assert search.finish(tree, found.state) == found.state + (0, 0)
    assert search.finish(tree, (2, 1, 0, 2)) == (2, 1, 0, 2)


def test_voting_against_counting_by_hand():
    rng = np.random.default_rng(5)
    for _ in range(20):
        answers = [tuple(a) for a in rng.integers(0, 3, (9, 1))]
        scores = rng.uniform(size=9)
        counts = collections.Counter(answers)
        top = max(counts.values())
        assert voting.majority_vote(answers) == next(a for a in answers if counts[a] == top)  # ties: first seen
        sums = {a: scores[[b == a for b in answers]].sum() for a in counts}
        assert voting.weighted_vote(answers, scores) == max(sums, key=sums.get)
        assert voting.best_of_n(answers, scores) == answers[int(np.argmax(scores))]
    steps = rng.uniform(size=5)
    assert voting.aggregate(steps, "min") == steps.min() and voting.aggregate(steps, "last") == steps[-1]
    assert voting.aggregate(steps, "product") == pytest.approx(np.prod(steps)) and voting.aggregate([], "min") == 1.0
    with pytest.raises(ValueError, match="how='mean': one of min, product, last"):
        voting.aggregate(steps, "mean")


@pytest.fixture(scope="module")
def tiny_policy():
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import ml_collections

    import models

    config = ml_collections.ConfigDict(dict(models.MODELS["transformer"][1]().__dict__))
    config.update(vocab_size=6, max_len=24, d_model=16, num_layers=2, num_heads=4, num_kv_heads=2, d_mlp=24)
    model = models.build(config)
    variables = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))
    return model, variables


def test_shared_prefix_caches_give_each_sequence_its_full_pass_logits(tiny_policy):
    """The prompt's cache copied to 4 samples, each sample's cache copied to its 3 children: every state's stored
    next-token logits equal the full pass over its tokens, and each step ends at its first step-end token (or runs
    max_step_tokens); the tokens generated are counted once per row and token."""
    from experiments.test_time import policy

    model, variables = tiny_policy
    problem = policy.PolicySteps(model, variables, prompt=(3, 1, 0, 1, 5), verifier=lambda seqs: np.ones(len(seqs)),
                                 max_len=20, max_step_tokens=4, max_response_tokens=12, step_ends=frozenset({2}),
                                 finish_ids=frozenset({4}))
    rng = np.random.default_rng(0)
    samples = problem.expand([problem.root], 4, rng)[0]
    children = [c for kids in problem.expand(samples, 3, rng) for c in kids]
    states = [problem.root] + samples + children
    padded = np.zeros((len(states), 20), np.int32)  # right-padded: a causal pass reads no position after its own
    for row, state in enumerate(states):
        padded[row, :len(state.tokens)] = state.tokens
    full = np.asarray(model.apply(variables, padded))
    for row, state in enumerate(states):
        np.testing.assert_allclose(state.logits, full[row, len(state.tokens) - 1], rtol=2e-5, atol=2e-5)
    for parent, kids in zip(samples, [children[i:i + 3] for i in range(0, 12, 3)]):
        for kid in kids:
            step = kid.tokens[len(parent.tokens):]
            assert kid.tokens[:len(parent.tokens)] == parent.tokens and 1 <= len(step) <= 4
            assert all(t not in (2, 4) for t in step[:-1]) and (len(step) == 4 or step[-1] in (2, 4))
    response_tokens = sum(len(s.tokens) - 5 for s in samples) + sum(
        len(c.tokens) - len(p.tokens) for p, kids in zip(samples, [children[i:i + 3] for i in range(0, 12, 3)])
        for c in kids)
    assert problem.tokens_generated == response_tokens
    greedy = problem.rollout([problem.root], 2)[0]
    assert greedy.tokens == problem.rollout(problem.rollout([problem.root], 1), 1)[0].tokens  # deterministic


def test_steps_answers_and_checker_labels_of_both_task_kinds():
    from experiments.test_time import tasks

    chain = tasks.StepTask(step_ends=None, finish_ids=frozenset(), answer_marker=None)
    assert chain.steps((4, 1, 3)) == [(4,), (1,), (3,)] and chain.answer((4, 1, 3)) == (3,)
    assert chain.step_labels((4, 2, 3), (4, 1, 3)) == [True, False, False]  # after a wrong step, wrong
    assert chain.correct((4, 2, 3), (4, 1, 3)) and not chain.correct((4, 1, 2), (4, 1, 3))
    dot, eos, marker = 9, 4, 5  # sentences end at ".", the answer follows "###" and ends at <eos>
    reasoning = tasks.StepTask(step_ends=frozenset({dot}), finish_ids=frozenset({eos}), answer_marker=marker)
    reference = (11, 12, dot, 13, dot, marker, 7, eos)
    assert reasoning.steps(reference) == [(11, 12, dot), (13, dot), (marker, 7, eos)]
    assert reasoning.answer(reference) == (7,) and reasoning.answer((11, 12, dot)) == ()
    assert reasoning.step_labels((11, 12, dot, 14, dot, marker, 7, eos), reference) == [True, False, False]
    assert reasoning.step_labels((11, 12, 13, dot, 13), reference) == [False, False]  # a longer step, a trailing one
    np.testing.assert_array_equal(tasks.step_mask(reasoning, reference), [0, 0, 1, 0, 1, 0, 0, 1])


@pytest.mark.slow  # 64 rollouts of 24 prefixes compiled and run; by default the search and caching tests
def test_math_shepherd_labels_estimate_each_steps_chance_of_a_right_answer(tiny_policy):
    """Chained sums mod 5 (`x1 x2 x3 = s1 s2`) under a random policy: the checker's labels and the outcomes are the
    references' comparisons made here; a first step's rollout estimate (64 continuations) is within 4 standard
    errors of the policy's probability of the right last token after it, read from a full pass; a finished
    response's last step is labelled by its own answer."""
    import jax

    from data import algorithmic
    from experiments.test_time import label, tasks

    model, variables = tiny_policy
    rows = algorithmic.chain_examples(5, "a+b", 3)
    problems = tasks.problems({k: v[:6] for k, v in rows.items()})
    task = tasks.StepTask(step_ends=None, finish_ids=frozenset(), answer_marker=None)
    out = label.label(model, variables, task, problems, samples=2, rollouts=64, temperature=1.0, response_len=2,
                      rng=jax.random.key(0))
    assert out["tokens"].shape == (12, 6) and np.all(out["length"] == 6)
    np.testing.assert_array_equal(out["problem"], np.repeat(np.arange(6), 2))
    logits = np.asarray(model.apply(variables, out["tokens"][:, :5]), np.float64)[:, -1]  # after each first step
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    for i in range(12):
        prompt, reference = problems[i // 2]
        tokens = tuple(int(t) for t in out["tokens"][i])
        assert tokens[:4] == prompt
        response = tokens[4:]
        np.testing.assert_array_equal(out["step_end"][i], [0, 0, 0, 0, 1, 1])
        np.testing.assert_array_equal(out["checker"][i, 4:], [response[0] == reference[0],
                                                              response[:2] == reference])
        assert out["outcome"][i] == (response[1] == reference[1]) == out["rollouts"][i, 5]
        chance = p[i, reference[1]]
        assert abs(out["rollouts"][i, 4] - chance) <= 4 * np.sqrt(chance * (1 - chance) / 64) + 1e-9


def test_verifier_rows_put_a_label_token_at_each_step_or_at_the_end():
    from data import verifier_rows

    solutions = {"tokens": np.array([[3, 1, 2, 0], [3, 2, 2, 1]]), "length": np.array([3, 4]),
                 "step_end": np.array([[0, 1, 1, 0], [0, 1, 0, 1]]), "checker": np.array([[0, 1, 0, 0], [0, 0, 0, 0]]),
                 "rollouts": np.array([[0, 0.5, 0, 0], [0, 0.25, 0, 1.0]]), "outcome": np.array([0, 1]),
                 "problem": np.array([0, 1]), "policy_vocab": np.int32(4)}
    process = verifier_rows.rows(solutions, "checker", "process")  # NO = 4, YES = 5
    np.testing.assert_array_equal(process["targets"], [[0, 5, 4, 0], [0, 4, 0, 4]])
    np.testing.assert_array_equal(process["loss_mask"], solutions["step_end"])
    shepherd = verifier_rows.rows(solutions, "rollouts", "process")  # hard estimate: some rollout right
    np.testing.assert_array_equal(shepherd["targets"], [[0, 5, 4, 0], [0, 5, 0, 5]])
    outcome = verifier_rows.rows(solutions, "checker", "outcome")
    np.testing.assert_array_equal(outcome["targets"], [[0, 0, 4, 0], [0, 0, 0, 5]])
    np.testing.assert_array_equal(outcome["loss_mask"], [[0, 0, 1, 0], [0, 0, 0, 1]])
    train, held_out = verifier_rows.split(solutions, 0.5)
    assert train["problem"].tolist() == [0] and held_out["problem"].tolist() == [1] and train["policy_vocab"] == 4


@pytest.fixture(scope="module")
def labelled(tiny_policy, tmp_path_factory):
    """Labelled solutions of a random policy on sums of three terms mod 5, saved as the label command saves them."""
    import jax

    from data import algorithmic
    from experiments.test_time import label, tasks

    model, variables = tiny_policy
    rows = algorithmic.chain_examples(5, "a+b", 3)
    problems = tasks.problems({k: v[::5] for k, v in rows.items()})  # 25 problems
    task = tasks.StepTask(step_ends=None, finish_ids=frozenset(), answer_marker=None)
    out = label.label(model, variables, task, problems, samples=4, rollouts=4, temperature=1.0, response_len=2,
                      rng=jax.random.key(1))
    path = tmp_path_factory.mktemp("labels") / "labels.npz"
    np.savez_compressed(path, **out, policy_vocab=np.int32(6))  # the tiny policy's vocabulary
    return str(path)


def _verifier_config(path: str, reward: str):
    from experiments.configs import verifier

    config = verifier.get_config(reward)
    config.model.update(d_model=16, num_heads=2, d_mlp=32)
    config.data.update(path=path, batch_size=16, eval_batch_size=16, eval_fraction=0.2)
    config.train.update(steps=4, log_every=1, eval_every=4, checkpoint_every=4)
    config.optimizer.update(lr=1e-2, warmup_steps=1)
    return config


def test_a_verifier_scores_a_sequence_by_its_label_logits_at_its_last_token():
    """model_verifier reads sigmoid(logit_YES - logit_NO) at each sequence's last token (YES = V + 1, NO = V for a
    policy of V = 6 tokens), as a full pass over that sequence alone gives it, over two padded batches."""
    import flax.linen as nn
    import jax

    import models
    from experiments.test_time import verifier

    config = _verifier_config("", "process")
    config.model.update(vocab_size=8, max_len=6)
    model = models.build(config.model)
    variables = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), np.zeros((1, 6), np.int32)))
    score = verifier.model_verifier(model, variables, policy_vocab=6, width=6, batch_size=4)
    sequences = [(1, 2, 3, 5, 0), (4, 4, 4, 5, 1, 2), (0, 1)]  # policy tokens 0..5
    found = score(sequences + sequences[:2])  # two batches, the second padded
    padded = np.zeros((3, 6), np.int32)
    for row, sequence in enumerate(sequences):
        padded[row, :len(sequence)] = sequence
    logits = np.asarray(model.apply(variables, padded), np.float64)  # causal: the padding after is never read
    for row, p in zip([0, 1, 2, 0, 1], found):
        last = logits[row, len(sequences[row]) - 1]
        assert p == pytest.approx(1 / (1 + np.exp(last[6] - last[7])), rel=1e-5)


@pytest.mark.slow  # two trainer runs of each reward: one device, and the 2x2x2 mesh
@pytest.mark.parametrize("reward", ["process", "outcome"])
def test_outcome_and_process_reward_models_train_on_the_mesh_with_the_one_device_losses(labelled, reward, tmp_path):
    from tests.conftest import assert_mesh_run_matches_one_device

    assert_mesh_run_matches_one_device(lambda: _verifier_config(labelled, reward), tmp_path)


@pytest.mark.slow  # four strategies on three problems; by default each strategy against brute force on trees
def test_each_strategy_spends_its_budget_and_a_perfect_verifier_guides_beam_and_mcts_to_the_answer(tiny_policy):
    """A random policy on sums of three terms mod 5 (6 tokens, 2 steps): sampling and beam search generate exactly
    budget x 2 tokens; with the exact checker as process reward model, beam search and MCTS over 32 expansions
    reach the right answer on every problem (at temperature 10 every token is about as likely: the right one is
    missing from 32 samples with probability 0.3%), while majority voting over the same policy's samples does not."""
    from data import algorithmic
    from experiments.test_time import policy, search, tasks, verifier

    model, variables = tiny_policy
    rows = algorithmic.chain_examples(5, "a+b", 3)
    problems = tasks.problems({k: v[7::40] for k, v in rows.items()})  # 3 problems
    task = tasks.StepTask(step_ends=None, finish_ids=frozenset(), answer_marker=None)
    rng, right = np.random.default_rng(0), collections.Counter()
    for prompt, reference in problems:
        for strategy, budget in (("majority", 8), ("weighted", 8), ("beam", 32), ("mcts", 256)):
            checker = verifier.checker_verifier(task, len(prompt), reference)
            problem = policy.PolicySteps(model, variables, prompt, checker, max_len=6, max_step_tokens=2,
                                         max_response_tokens=2, step_ends=task.step_ends, temperature=10.0)
            answer = search.solve(problem, task, strategy, budget, rng, how="min", expansions=32 if strategy in (
                "beam", "mcts") else 4)
            right[strategy] += answer == task.answer(reference)
            if strategy in ("majority", "weighted", "beam"):
                assert problem.tokens_generated == 2 * budget, strategy
    assert right["beam"] == right["mcts"] == 3 and right["majority"] < 3
    with pytest.raises(search.ConfigError, match="--strategy=beam needs --verifier"):
        search.check("beam", 8, "", "last", 4, 2)


@pytest.mark.slow  # two short training runs, a labelling, three searches and one command line
def test_the_commands_label_a_policy_train_its_verifier_and_search_with_it(tmp_path, finished_tiny_run):
    """A policy trained briefly on sums of three terms mod 5; its solutions labelled (label_run), a process reward
    model trained on them, and the search command run with it, with the checker, and from the command line: every
    problem scored, sampling spends budget x 2 tokens, the FLOPs are the policy's and the verifier's forward FLOPs per
    token times the tokens each handled; a run of data without checkable steps, or a verifier that is not this
    policy's, is a one-line error."""
    import subprocess
    import sys

    from data.config_fields import ConfigError
    from experiments.configs import grpo
    from experiments.test_time import label, search
    from experiments.training import throughput, trainer
    from tests.conftest import cpu_env

    config = grpo.get_config("sft")
    config.model.update(d_model=16, num_heads=2, d_mlp=32)
    config.data.update(p=5, terms=3, train_fraction=0.6, batch_size=16)
    config.train.update(steps=3, log_every=1, eval_every=3, checkpoint_every=3)
    trainer.train_and_evaluate(config, str(tmp_path / "policy"), verbose=False)
    solutions = label.label_run(str(tmp_path / "policy"), str(tmp_path / "labels.npz"), problems=10, samples=4,
                                rollouts=2)
    assert solutions["tokens"].shape == (40, 6) and int(solutions["policy_vocab"]) == 6
    verifier_config = _verifier_config(str(tmp_path / "labels.npz"), "process")
    trainer.train_and_evaluate(verifier_config, str(tmp_path / "prm"), verbose=False)

    found = search.search_run(str(tmp_path / "policy"), "best_of_n", 4, verifier=str(tmp_path / "prm"), how="min",
                              problems=3)
    assert len(found["problems"]) == 3 and all(p["tokens"] == 8 and p["steps"] == 2 for p in found["problems"])
    policy_flops = throughput.model_flops_per_token(search._config(str(tmp_path / "policy"), "").model, 5) / 3
    verifier_flops = throughput.model_flops_per_token(search._config(str(tmp_path / "prm"), "").model, 6) / 3
    for p in found["problems"]:
        assert p["flops"] == pytest.approx(p["tokens"] * policy_flops + p["verified_tokens"] * verifier_flops)
        assert p["verified_tokens"] == 4 * (5 + 6)  # min over two steps: each response's two prefixes scored
    beam = search.search_run(str(tmp_path / "policy"), "beam", 8, verifier="checker", expansions=4, problems=3)
    assert 0 <= beam["accuracy"] <= 1 and all(p["tokens"] == 16 for p in beam["problems"])

    out = tmp_path / "majority.json"
    done = subprocess.run([sys.executable, "-m", "experiments.test_time.search", f"--policy={tmp_path / 'policy'}",
                           "--strategy=majority", "--budget=2", "--problems=2", f"--out={out}"], cwd=REPO_ROOT,
                          env=cpu_env(1), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "majority with budget 2 on 2 problems" in done.stdout and len(json.loads(out.read_text())["problems"]) == 2
    with pytest.raises(ConfigError, match="test-time search needs steps a program checks"):
        label.label_run(str(finished_tiny_run), str(tmp_path / "x.npz"))
    with pytest.raises(ConfigError, match="is not a reward model of this policy"):
        search.search_run(str(tmp_path / "policy"), "beam", 8, verifier=str(finished_tiny_run))
