"""The compute-optimal test-time study (Snell et al. 2024): how accuracy grows with inference FLOPs under each way of
spending them, on tasks whose every step a program checks (chained sums of four and five terms, ProntoQA), split
by difficulty; against a larger policy.

    PYTHONPATH=. python scripts/studies/compute_optimal_study.py --out=runs/compute_optimal    (~80 min on 2 cores)

For each task (TASKS) the script trains, or reuses, a small policy (a short supervised run: partly right, so that
search has room), labels its sampled solutions of the task's training problems (experiments/test_time/label.py: the
checker's step labels and Math-Shepherd's rollout estimates), and trains three verifiers on them through the
trainer (experiments/configs/verifier.py): a PRM on the checker's labels, a PRM on the rollout labels, an ORM. Then,
on the first --problems test problems, at every --seeds seed:

    sampling    a pool of max(--budgets) responses a problem (T = 1, one batch from the prompt's cache); a budget of
                N reads the pool's first N: majority vote, best-of-N and weighted vote by each verifier (PRMs: the
                minimum over steps, Lightman et al.; the ORM: its one score), and best-of-N by the exact checker
                (a perfect PRM: some response's whole chain is right)
    tree        search guided by the checker-label PRM: beam search (4 expansions a node, width N / 4), lookahead
                search (each candidate scored one greedy step ahead) and MCTS (N simulations, 4 children a node),
                experiments/test_time/search.py, budgets 4 to the task's tree_budget

each point's generation FLOPs counted as the search command counts them (the policy's forward FLOPs per generated
token, the verifier's per token of every sequence it scores). Difficulty is Snell et al.'s: the small policy's pass
rate on each problem (64 samples of a separate seed) cut into --bins bins, hardest first; ProntoQA's also by its
number of hops, arithmetic's also by its chain length (the two arithmetic tasks). Beside them: the verifiers'
accuracy and calibration on the labelled solutions of held-out problems, the two labellings' agreement, greedy
decoding, and (four-term sums) two larger policies, twice the width, one trained for as many steps and one for the
same training FLOPs, sampled at equal inference FLOPs: the exchange rate between test-time compute and parameters.
Writes results.json (a finished task is read, not rerun), table.md and the plots; docs/studies/test_time.md
discusses them.
"""

import dataclasses
import json
import os
from typing import Callable

from absl import app, flags

flags.DEFINE_string("out", "runs/compute_optimal", "the study's folder: the runs and the results")
flags.DEFINE_string("tasks", "arithmetic,arithmetic5,prontoqa", "tasks of TASKS")
flags.DEFINE_integer("problems", 64, "test problems scored")
flags.DEFINE_string("budgets", "1,4,16,64,256", "the sampling strategies' budgets (samples a problem)")
flags.DEFINE_string("seeds", "0,1,2", "search seeds: each point's pool or search repeats at each")
flags.DEFINE_integer("bins", 4, "difficulty bins of the policy's pass rate")
flags.DEFINE_integer("label_problems", 0, "training problems whose solutions (4 each) the verifiers learn from "
                     "(0: the task's own number, TASKS)")
flags.DEFINE_float("scale", 1.0, "multiplies every training run's steps (a smoke test runs at 0.05)")
FLAGS = flags.FLAGS


def arithmetic():
    """x_1 + x_2 + x_3 + x_4 mod 17 with its three running sums: 130 steps leave it partly right."""
    from experiments.configs import grpo

    config = grpo.get_config("sft")
    config.data.update(p=17, terms=4)
    config.train.update(steps=130, eval_every=130, checkpoint_every=130)
    return config


def arithmetic5():
    """Longer chains: x_1 + ... + x_5 mod 11 with four running sums, 110 steps (p = 17 would hold 1.4M chains in
    memory); as partly right as the four-term policy at T = 1."""
    config = arithmetic()
    config.data.update(p=11, terms=5)
    config.train.update(steps=110, eval_every=110, checkpoint_every=110)
    return config


def prontoqa():
    """ProntoQA chains of thought of 1 to 4 hops with one distractor branch (data/prontoqa.py), on the preference
    study's small Coconut-family model trained as a plain chain-of-thought reasoner on 20,000 problems."""
    from experiments.configs import preference

    config = preference.task_config("prontoqa")
    config.data.update(rejected="", min_hops=1, max_hops=4, branches=1, train_examples=20_000)
    config.train.update(steps=4_000, eval_every=1_000, checkpoint_every=4_000)
    return config


@dataclasses.dataclass(frozen=True)
class Task:
    config: Callable  # the small policy's config
    label_problems: int  # training problems whose solutions label the verifiers' data
    rollouts: int  # Math-Shepherd rollouts per step
    verifier_steps: int
    tree_budget: int  # the tree searches' largest budget
    larger: bool  # train the two larger policies (ProntoQA's would take 30 min)


TASKS = {"arithmetic": Task(arithmetic, label_problems=4_096, rollouts=8, verifier_steps=2_000, tree_budget=64,
                            larger=True),
         "arithmetic5": Task(arithmetic5, label_problems=4_096, rollouts=8, verifier_steps=2_000, tree_budget=16,
                             larger=False),
         "prontoqa": Task(prontoqa, label_problems=512, rollouts=4, verifier_steps=400, tree_budget=16, larger=False)}
VERIFIERS = {"prm": ("process", "checker"), "prm_rollouts": ("process", "rollouts"), "orm": ("outcome", "checker")}


def train(config, workdir: str):
    from experiments import studies

    steps = max(int(config.train.steps * FLAGS.scale), 2)
    config.train.update(steps=steps, eval_every=steps, checkpoint_every=steps, log_every=min(config.train.log_every,
                                                                                              steps))
    studies.run_or_reuse(config, workdir)
    return workdir


def larger(config, small_run: str, same_flops: bool):
    """Twice the width (about 4 times the parameters a token uses); `same_flops`: the steps cut to the small
    policy's training FLOPs."""
    from experiments import restore
    from experiments.training import throughput

    config.model.update(d_model=2 * config.model.d_model, d_mlp=2 * config.model.d_mlp)
    if same_flops:
        small = restore.load_config(small_run).model
        wide = small.copy_and_resolve_references()
        wide.update(d_model=config.model.d_model, d_mlp=config.model.d_mlp)
        ratio = throughput.model_flops_per_token(wide, small.max_len) / throughput.model_flops_per_token(
            small, small.max_len)
        config.train.steps = max(int(round(config.train.steps / ratio)), 1)
    return config


def policies(task: str, folder: str) -> dict[str, str]:
    small = train(TASKS[task].config(), os.path.join(folder, "policy"))
    if not TASKS[task].larger:
        return {"small": small}
    config = TASKS[task].config
    return {"small": small,
            "large, same steps": train(larger(config(), small, False), os.path.join(folder, "policy_large")),
            "large, same FLOPs": train(larger(config(), small, True), os.path.join(folder, "policy_large_flops"))}


def verifiers(task: str, policy: str, folder: str) -> dict[str, str]:
    """The three verifiers of the policy's labelled solutions (module doc)."""
    from experiments.configs import verifier
    from experiments.test_time import label

    labels, problems = os.path.join(folder, "labels.npz"), FLAGS.label_problems or TASKS[task].label_problems
    if not os.path.exists(labels):
        label.label_run(policy, labels, problems=problems, samples=4, rollouts=TASKS[task].rollouts)
    runs = {}
    for name, (reward, labelling) in VERIFIERS.items():
        config = verifier.get_config(reward)
        config.data.update(path=labels, labels=labelling, batch_size=min(256, 2 * problems))
        config.train.steps = TASKS[task].verifier_steps
        runs[name] = train(config, os.path.join(folder, name))
    return runs


def verifier_quality(run: str) -> dict:
    """On the held-out problems' labelled solutions: accuracy of p > 1/2 against the exact labels (the checker's
    step labels for a PRM, whichever labels it learnt from; the outcome for an ORM), expected calibration error over
    10 bins of p, and the reliability curve (mean p, frequency right, count per bin)."""
    import jax
    import numpy as np

    from data import verifier_rows
    from experiments import restore

    config = restore.load_config(run)
    model, variables = restore.load_variables(config, run)
    _, held_out = verifier_rows.split(verifier_rows.read(config.data.path), config.data.eval_fraction)
    exact = verifier_rows.rows(held_out, "checker", config.data.reward)
    vocab = config.model.vocab_size - 2
    logits = jax.jit(model.apply)(variables, exact["inputs"])
    p = np.asarray(jax.nn.sigmoid(logits[..., vocab + 1] - logits[..., vocab]))
    read = exact["loss_mask"] > 0
    p, truth = p[read], exact["targets"][read] == vocab + 1
    which = np.clip((p * 10).astype(int), 0, 9)
    curve = [(float(p[which == b].mean()), float(truth[which == b].mean()), int((which == b).sum()))
             for b in range(10) if (which == b).any()]
    ece = sum(n * abs(confidence - frequency) for confidence, frequency, n in curve) / len(p)
    return {"labels": config.data.labels, "reward": config.data.reward, "accuracy": float(np.mean((p > 0.5) == truth)),
            "ece": float(ece), "base_rate": float(truth.mean()), "positions": int(len(p)), "curve": curve}


def labelling_agreement(folder: str) -> dict:
    """How Math-Shepherd's rollout estimates compare with the checker's step labels on the labelled solutions."""
    import numpy as np

    solutions = np.load(os.path.join(folder, "labels.npz"))
    ends = solutions["step_end"] > 0
    checker, rollouts = solutions["checker"][ends] > 0, solutions["rollouts"][ends]
    return {"steps": int(ends.sum()), "checker_right": float(checker.mean()),
            "agreement_soft": float(np.mean((rollouts > 0.5) == checker)),
            "agreement_hard": float(np.mean((rollouts > 0) == checker)),
            "estimate_when_right": float(rollouts[checker].mean()) if checker.any() else float("nan"),
            "estimate_when_wrong": float(rollouts[~checker].mean()) if (~checker).any() else float("nan")}


def sample_pool(setup, scorers: dict, n: int, seed: int) -> list[dict]:
    """n responses of each problem and, per response, its correctness, answer, generated tokens, and each scorer's
    score with the tokens it read (module doc)."""
    import numpy as np

    from experiments.test_time import search

    rng, pool = np.random.default_rng(seed), []
    for row, (prompt, reference) in enumerate(setup.rows):
        problem, _ = search.problem_of(setup, row)
        states = problem.sample(n, rng)
        responses = [problem.response(s) for s in states]
        entry = {"correct": [setup.task.correct(r, reference) for r in responses],
                 "answer": [setup.task.answer(r) for r in responses], "tokens": [len(r) for r in responses],
                 "steps": len(setup.task.steps(reference))}
        ends = [np.cumsum([len(step) for step in setup.task.steps(r)]) for r in responses]
        for name, (verify, how) in scorers.items():
            problem.verifier = verify or search.verifiers.checker_verifier(setup.task, len(prompt), reference)
            entry[name] = search.path_scores(problem, setup.task, states, how)
            entry[name + "_read"] = [len(s.tokens) if how == "last" else int(sum(len(prompt) + e for e in end))
                                     for s, end in zip(states, ends)]
        pool.append(entry)
    return pool


def pool_points(pool, budget: int, scorers: dict, flops: dict) -> dict[str, list[tuple[bool, float]]]:
    """(correct, FLOPs) per problem of each sampling strategy with the pool's first `budget` responses."""
    from experiments.test_time import voting

    points = {}
    for entry in pool:
        answers, right = entry["answer"][:budget], dict(zip(entry["answer"], entry["correct"]))
        generated = sum(entry["tokens"][:budget]) * flops["policy"]
        choose = {"majority": (voting.majority_vote(answers), generated)}
        for name in scorers:
            scores, read = entry[name][:budget], sum(entry[name + "_read"][:budget]) * flops[name]
            choose[f"best_of_n {name}"] = (voting.best_of_n(answers, scores), generated + read)
            if name != "checker":
                choose[f"weighted {name}"] = (voting.weighted_vote(answers, scores), generated + read)
        for strategy, (answer, cost) in choose.items():
            points.setdefault(strategy, []).append((bool(answer) and right.get(answer, False), cost))
    return points


def pass_rates(setup, samples: int = 64) -> list[float]:
    """The policy's chance of a right answer on each problem (Snell et al.'s difficulty), from its own seed."""
    import numpy as np

    pool = sample_pool(setup, {}, samples, seed=10_000)
    return [float(np.mean(entry["correct"])) for entry in pool]


def study_task(task: str) -> dict:
    """Every measurement of one task (module doc), from its runs trained or reused."""
    import numpy as np

    from experiments.test_time import search

    folder = os.path.join(FLAGS.out, task)
    runs = policies(task, folder)
    judges = verifiers(task, runs["small"], folder)
    points = []
    for policy_name, policy in runs.items():
        setups = {name: search.prepare(policy, verifier=run, problems=FLAGS.problems, split="eval")
                  for name, run in judges.items()}
        points += sampling_points(task, policy_name, setups)
        if policy_name == "small":
            points += tree_points(task, setups["prm"])
            small = checker_setup(setups["prm"])
    steps = [len(small.task.steps(reference)) for _, reference in small.rows]
    return {"task": task, "pass_rate": pass_rates(small), "steps": steps, "points": points,
            "verifiers": {name: verifier_quality(run) for name, run in judges.items()},
            "labelling": labelling_agreement(folder),
            "policies": {name: {"params": _params(run), "train_flops": _train_flops(run)} for name, run in runs.items()},
            "problems": int(np.size(steps))}


def checker_setup(setup):
    """The same policy and problems with each problem's exact checker as verifier (nothing reloaded)."""
    return dataclasses.replace(setup, verify=None, verifier="checker", verifier_flops=0.0)


def sampling_points(task: str, policy_name: str, setups: dict) -> list[dict]:
    """The sampling strategies' points of one policy at every budget and seed, from one pool a seed (the larger
    policies: majority voting and best-of-N by the checker and the checker-label PRM)."""

    budgets, points = [int(b) for b in FLAGS.budgets.split(",")], []
    base = checker_setup(setups["prm"])
    scorers = {"checker": (None, "last")} | {name: (setup.verify, "last" if name == "orm" else "min")
                                             for name, setup in setups.items()}
    if policy_name != "small":
        scorers = {name: scorers[name] for name in ("checker", "prm")}
    flops = {"policy": base.policy_flops, "checker": 0.0} | {n: s.verifier_flops for n, s in setups.items()}
    for seed in (int(s) for s in FLAGS.seeds.split(",")):
        pool = sample_pool(base, scorers, max(budgets), seed)
        for budget in budgets:
            for strategy, per_problem in pool_points(pool, budget, scorers, flops).items():
                points.append(_point(policy_name, strategy, budget, seed, per_problem))
        print(f"{task} {policy_name} seed {seed}: pool of {max(budgets)} scored", flush=True)
    return points


def tree_points(task: str, setup) -> list[dict]:
    """Beam, lookahead and MCTS guided by the setup's verifier (the checker-label PRM), budgets 4 to the task's
    tree_budget, every seed."""
    from experiments.test_time import search

    budgets, points = [int(b) for b in FLAGS.budgets.split(",")], []
    for strategy in ("beam", "lookahead", "mcts"):
        for budget in [b for b in budgets if 4 <= b <= TASKS[task].tree_budget]:
            for seed in (int(s) for s in FLAGS.seeds.split(",")):
                found = search.score(setup, strategy, budget, how="min", expansions=4, lookahead=1, seed=seed)
                points.append(_point("small", f"{strategy} prm", budget, seed,
                                     [(p["correct"], p["flops"]) for p in found["problems"]]))
            print(f"{task} {strategy} budget {budget}: {points[-1]['accuracy']:.3f}", flush=True)
    return points


def greedy(runs: dict) -> dict:
    """Each policy's accuracy and FLOPs with one greedy (T = 0) response a problem: the baseline every sampled
    strategy is measured against."""
    from experiments.test_time import search

    out = {}
    for name, run in runs.items():
        found = search.score(search.prepare(run, problems=FLAGS.problems), "majority", 1, temperature=0.0)
        out[name] = {"accuracy": found["accuracy"], "flops": found["flops"]}
    return out


def _point(policy: str, strategy: str, budget: int, seed: int, per_problem) -> dict:
    import numpy as np

    return {"policy": policy, "strategy": strategy, "budget": budget, "seed": seed,
            "accuracy": float(np.mean([c for c, _ in per_problem])), "flops": float(np.mean([f for _, f in per_problem])),
            "correct": [bool(c) for c, _ in per_problem]}


def _params(run: str) -> int:
    import models
    from experiments import restore

    config = restore.load_config(run)
    return int(models.parameter_count(config.model, config.model.max_len))


def _train_flops(run: str) -> float:
    from experiments import restore
    from experiments.training import throughput

    config = restore.load_config(run)
    tokens = config.train.steps * config.data.batch_size * config.model.max_len
    return float(throughput.model_flops_per_token(config.model, config.model.max_len) * tokens)


# The report: tables and plots from results.json.

def groups(points, **where) -> dict:
    """{(strategy, budget): [points of every seed]} of the points matching `where`."""
    out = {}
    for p in points:
        if all(p[k] == v for k, v in where.items()):
            out.setdefault((p["strategy"], p["budget"]), []).append(p)
    return out


def mean_range(values) -> str:
    import numpy as np

    return f"{np.mean(values):.3f} [{min(values):.2f}, {max(values):.2f}]" if len(values) > 1 else f"{values[0]:.3f}"


def bins_of(result: dict, bins: int) -> list[list[int]]:
    """Problem indices in `bins` bins of the small policy's pass rate, hardest (lowest) first; ties kept together
    by a stable sort."""
    import numpy as np

    order = np.argsort(result["pass_rate"], kind="stable")
    return [sorted(int(i) for i in chunk) for chunk in np.array_split(order, bins)]


def accuracy_on(point_list, problems) -> float:
    import numpy as np

    return float(np.mean([np.mean([p["correct"][i] for i in problems]) for p in point_list]))


def report(results: dict, out: str, bins: int):
    from experiments import studies

    results = {task: results[task] for task in TASKS if task in results}  # in TASKS' order
    lines = []
    for task, result in results.items():
        lines += task_tables(task, result, bins)
    lines += length_table(results)
    studies.write_table(out, lines)
    plot_scaling(results, os.path.join(out, "accuracy_vs_flops.png"))
    plot_difficulty(results, bins, os.path.join(out, "difficulty.png"))
    plot_calibration(results, os.path.join(out, "calibration.png"))


def task_tables(task: str, result: dict, bins: int) -> list[str]:
    import numpy as np

    small = groups(result["points"], policy="small")
    budgets = sorted({b for _, b in small})
    strategies = sorted({s for s, _ in small}, key=lambda s: (s.split()[0] != "majority", s))
    lines = [f"### {task}: accuracy on {result['problems']} test problems (mean [min, max] over seeds) and "
             "generation FLOPs per problem", "", "| strategy | " + " | ".join(f"N = {b}" for b in budgets) + " |",
             "|---|" + "---|" * len(budgets)]
    for strategy in strategies:
        cells = [f"{mean_range([p['accuracy'] for p in small[strategy, b]])}, "
                 f"{np.mean([p['flops'] for p in small[strategy, b]]):.2g}" if (strategy, b) in small else "-"
                 for b in budgets]
        lines.append(f"| {strategy} | " + " | ".join(cells) + " |")
    if "small" in result.get("greedy", {}):
        greedy_small = result["greedy"]["small"]
        lines.append(f"| greedy (T = 0), one response | {greedy_small['accuracy']:.3f}, {greedy_small['flops']:.2g} | "
                     + " | ".join("-" for _ in budgets[1:]) + " |")
    lines += ["", f"### {task}: the best strategy by difficulty (pass-rate bins of the small policy, hardest first; "
              "oracle best-of-N left out)", "", "| bin (pass rate) | " + " | ".join(f"N = {b}" for b in budgets) + " |",
              "|---|" + "---|" * len(budgets)]
    rates = np.asarray(result["pass_rate"])
    for k, problems in enumerate(bins_of(result, bins)):
        cells = []
        for b in budgets:
            scored = {s: accuracy_on(small[s, b], problems) for s in strategies if (s, b) in small and
                      s != "best_of_n checker"}
            best = max(scored, key=scored.get)
            cells.append(f"{best} {scored[best]:.2f} (majority {scored['majority']:.2f})")
        lines.append(f"| {k + 1} ({rates[problems].min():.2f}-{rates[problems].max():.2f}, {len(problems)}) | "
                     + " | ".join(cells) + " |")
    if len(set(result["steps"])) > 1:
        lines += hops_table(task, result, small, budgets)
    lines += ["", f"### {task}: the verifiers on held-out problems' solutions (against the exact labels)", "",
              "| verifier | trained on | accuracy | base rate | ECE | positions |", "|---|---|---|---|---|---|"]
    for name, q in result["verifiers"].items():
        lines.append(f"| {name} | {q['reward']} labels by {q['labels']} | {q['accuracy']:.3f} | {q['base_rate']:.3f} | "
                     f"{q['ece']:.3f} | {q['positions']} |")
    a = result["labelling"]
    lines += ["", f"{task}: of {a['steps']} labelled steps, {a['checker_right']:.3f} right by the checker; Math-Shepherd's "
              f"hard estimate (some rollout right) agrees with the checker on {a['agreement_hard']:.3f}, the soft one "
              f"(more than half right) on {a['agreement_soft']:.3f}; mean estimate {a['estimate_when_right']:.3f} on "
              f"right steps, {a['estimate_when_wrong']:.3f} on wrong ones."]
    lines += exchange_table(task, result, budgets)
    return lines + [""]


def length_table(results: dict) -> list[str]:
    """Difficulty by chain length: each strategy's accuracy on the four- and five-term sums at N = 4 and 16."""
    import numpy as np

    chains = [t for t in ("arithmetic", "arithmetic5") if t in results]
    if len(chains) < 2:
        return []
    columns = [(t, n) for n in (4, 16) for t in chains]
    lines = ["### arithmetic by chain length: accuracy with 4 terms (mod 17) and 5 terms (mod 11)", "",
             "| strategy | " + " | ".join(f"{results[t]['steps'][0] + 1} terms, N = {n}" for t, n in columns) + " |",
             "|---|" + "---|" * len(columns)]
    per_task = {t: groups(results[t]["points"], policy="small") for t in chains}
    for strategy in sorted(set.intersection(*({s for s, _ in g} for g in per_task.values()))):
        cells = [f"{np.mean([p['accuracy'] for p in per_task[t][strategy, n]]):.3f}"
                 if (strategy, n) in per_task[t] else "-" for t, n in columns]
        lines.append(f"| {strategy} | " + " | ".join(cells) + " |")
    return lines + [""]


def hops_table(task, result, small, budgets) -> list[str]:
    import numpy as np

    steps = np.asarray(result["steps"])
    lines = ["", f"### {task}: accuracy by reasoning steps of the reference (difficulty by hops) at N = 16", "",
             "| strategy | " + " | ".join(f"{k} steps ({(steps == k).sum()})" for k in sorted(set(steps))) + " |",
             "|---|" + "---|" * len(set(steps))]
    budget = 16 if 16 in budgets else budgets[-1]
    for strategy in sorted({s for s, b in small if b == budget}):
        lines.append(f"| {strategy} | " + " | ".join(
            f"{accuracy_on(small[strategy, budget], np.flatnonzero(steps == k)):.2f}" for k in sorted(set(steps)))
            + " |")
    return lines


def exchange_table(task, result, budgets) -> list[str]:
    """Each larger policy's accuracy at each budget beside the small policy's best at no more inference FLOPs."""
    import numpy as np

    if len(result["policies"]) == 1:
        return []
    small = groups(result["points"], policy="small")
    lines = ["", f"### {task}: test-time compute against parameters (equal inference FLOPs)", "",
             "| policy (params, training FLOPs) | strategy | N | accuracy | FLOPs | small policy's best at no more "
             "FLOPs |", "|---|---|---|---|---|---|"]
    for name, info in result["policies"].items():
        if name == "small":
            continue
        large = groups(result["points"], policy=name)
        if name in result.get("greedy", {}):
            large[("greedy (T = 0)", 1)] = [{**result["greedy"][name], "seed": 0}]
        for strategy in ("greedy (T = 0)", "majority", "best_of_n prm"):
            for b in budgets:
                if (strategy, b) not in large:
                    continue
                flops = np.mean([p["flops"] for p in large[strategy, b]])
                rivals = {(s, n): np.mean([p["accuracy"] for p in ps]) for (s, n), ps in small.items()
                          if s != "best_of_n checker" and np.mean([p["flops"] for p in ps]) <= flops}
                if "small" in result.get("greedy", {}) and result["greedy"]["small"]["flops"] <= flops:
                    rivals[("greedy (T = 0)", 1)] = result["greedy"]["small"]["accuracy"]
                best = max(rivals, key=rivals.get) if rivals else None
                lines.append(f"| {name} ({info['params']:,}, {info['train_flops']:.2g}) | {strategy} | {b} | "
                             f"{mean_range([p['accuracy'] for p in large[strategy, b]])} | {flops:.2g} | "
                             + (f"{best[0]} N = {best[1]}: {rivals[best]:.3f} |" if best else "- |"))
    small_info = result["policies"]["small"]
    return lines + ["", f"The small policy: {small_info['params']:,} parameters, {small_info['train_flops']:.2g} "
                    "training FLOPs."]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_scaling(results: dict, path: str):
    import numpy as np

    plt = _pyplot()
    fig, axes = plt.subplots(1, len(results), figsize=(7 * len(results), 5), squeeze=False)
    for ax, (task, result) in zip(axes[0], results.items()):
        small = groups(result["points"], policy="small")
        strategies = sorted({s for s, _ in small})
        colors = dict(zip(strategies, plt.cm.tab20(np.linspace(0, 1, len(strategies)))))
        for policy, style in (("small", "-"), ("large, same steps", ":"), ("large, same FLOPs", "--")):
            grouped = groups(result["points"], policy=policy)
            for strategy in sorted({s for s, _ in grouped}):
                if policy != "small" and strategy != "majority":
                    continue
                keys = sorted(k for k in grouped if k[0] == strategy)
                flops = [np.mean([p["flops"] for p in grouped[k]]) for k in keys]
                accuracy = [[p["accuracy"] for p in grouped[k]] for k in keys]
                color = colors[strategy] if policy == "small" else "black"
                ax.plot(flops, [np.mean(a) for a in accuracy], style, marker="o", markersize=3, color=color,
                        label=strategy if policy == "small" else f"{policy} policy: {strategy}")
                ax.fill_between(flops, [min(a) for a in accuracy], [max(a) for a in accuracy], alpha=0.15,
                                color=color)
        for policy, point in result.get("greedy", {}).items():
            ax.scatter([point["flops"]], [point["accuracy"]], marker="*", s=90, zorder=3,
                       color="red" if policy == "small" else "black", label=f"{policy} policy: greedy (T = 0)")
        ax.set(xscale="log", xlabel="generation FLOPs per problem (policy + verifier)", ylabel="accuracy",
               title=f"{task} (band: min to max over seeds)", ylim=(0, 1.02))
        ax.legend(fontsize=6, ncol=2, loc="lower right")
    _save(fig, path)


def plot_difficulty(results: dict, bins: int, path: str):
    import numpy as np

    plt = _pyplot()
    fig, axes = plt.subplots(len(results), bins, figsize=(3.2 * bins, 3 * len(results)), squeeze=False)
    for row, (task, result) in zip(axes, results.items()):
        small = groups(result["points"], policy="small")
        for k, (ax, problems) in enumerate(zip(row, bins_of(result, bins))):
            for strategy in ("majority", "best_of_n prm", "weighted prm", "beam prm", "lookahead prm", "mcts prm",
                             "best_of_n orm", "weighted prm_rollouts"):
                keys = sorted(key for key in small if key[0] == strategy)
                if keys:
                    ax.plot([np.mean([p["flops"] for p in small[key]]) for key in keys],
                            [accuracy_on(small[key], problems) for key in keys], marker="o", markersize=3,
                            label=strategy)
            ax.set(xscale="log", ylim=(0, 1.02), title=f"{task}: bin {k + 1} of {bins}", xlabel="FLOPs")
        row[0].legend(fontsize=6)
    _save(fig, path)


def plot_calibration(results: dict, path: str):
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(results), figsize=(4.5 * len(results), 4), squeeze=False)
    for ax, (task, result) in zip(axes[0], results.items()):
        ax.plot([0, 1], [0, 1], color="gray", linestyle=":")
        for name, q in result["verifiers"].items():
            ax.plot([c for c, _, _ in q["curve"]], [f for _, f, _ in q["curve"]], marker="o", markersize=3,
                    label=f"{name} (ECE {q['ece']:.3f})")
        ax.set(xlabel="verifier's p", ylabel="fraction right", title=task, xlim=(0, 1), ylim=(0, 1))
        ax.legend(fontsize=7)
    _save(fig, path)


def _save(fig, path: str):
    from experiments.training import plots

    plots.save_figure(fig, path)


def main(argv):
    del argv
    os.makedirs(FLAGS.out, exist_ok=True)
    path = os.path.join(FLAGS.out, "results.json")
    results = json.load(open(path)) if os.path.exists(path) else {}
    for task in FLAGS.tasks.split(","):
        if task not in TASKS:
            raise SystemExit(f"--tasks: {task!r} is not one of {', '.join(TASKS)}")
        if task not in results or "greedy" not in results[task]:
            result = results.get(task) or study_task(task)
            result["greedy"] = greedy(policies(task, os.path.join(FLAGS.out, task)))
            done = json.load(open(path)) if os.path.exists(path) else {}  # another task's process may have written
            results = {**done, task: result}
            with open(path, "w") as f:
                json.dump(results, f)
    report(results, FLAGS.out, FLAGS.bins)


if __name__ == "__main__":
    app.run(main)
