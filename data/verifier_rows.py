"""A policy's sampled solutions labelled step by step, as the training rows of a verifier: an outcome reward model
(ORM) or a process reward model (PRM), trained through the one trainer as a language model that predicts a label
token (Math-Shepherd's formulation: Wang et al. 2024).

    data.name = "verifier", data.path = FILE.npz      (written by python -m experiments.test_time.label)
    data.labels = "checker" | "rollouts",  data.reward = "process" | "outcome"

The file holds N solutions (prompt and sampled response) of P problems: `tokens` int32 [N, T] right-padded, `length`
[N], `step_end` [N, T] (1 at each step's last token), per step end the exact checker's label `checker` and
Math-Shepherd's estimate `rollouts` (the fraction of K continuations from that step that reach the right answer),
`outcome` [N] (the answer right), `problem` [N] and the policy's vocabulary size V. A row's inputs are its tokens;
its target is a label token, YES = V + 1 (right) or NO = V (wrong), read at

    process   every step's last token: the step's label (checker: the response through it is the reference's
              prefix; rollouts: some continuation from it reaches the right answer, Math-Shepherd's hard estimate)
    outcome   the response's last token: whether the answer is right (the same under both labellings)

and masked elsewhere; the verifier's vocabulary is V + 2 and its score of a prefix ending a step is
p = sigmoid(logit_YES - logit_NO) there. The problems from (1 - eval_fraction) P on are the evaluation split.
"""

import os

import numpy as np

LABELS = ("checker", "rollouts")
REWARDS = ("process", "outcome")
KEYS = ("tokens", "length", "step_end", "checker", "rollouts", "outcome", "problem", "policy_vocab")


def read(path: str) -> dict:
    with np.load(path) as f:
        return {k: f[k] for k in KEYS}


def validate(config) -> list[str]:
    if not os.path.isfile(config.path):
        return [f"data.path={config.path!r} is not a file: write one with python -m experiments.test_time.label"]
    try:
        with np.load(config.path) as f:
            missing = [k for k in KEYS if k not in f.files]
    except (OSError, ValueError) as error:
        return [f"data.path={config.path!r} is not a labelled-solutions file ({error})"]
    if missing:
        return [f"data.path={config.path!r} lacks {', '.join(missing)}: write it with python -m "
                "experiments.test_time.label"]
    solutions = read(config.path)
    if solutions["tokens"].max(initial=0) >= solutions["policy_vocab"]:
        return [f"data.path={config.path!r} holds token id {solutions['tokens'].max()}, outside its policy_vocab of "
                f"{int(solutions['policy_vocab'])}"]
    return []


def rows(solutions: dict, labels: str, reward: str) -> dict:
    """The trainer's examples of the solutions (module doc)."""
    vocab = int(solutions["policy_vocab"])
    step_end = solutions["step_end"].astype(bool)
    if reward == "process":
        right = solutions["checker"] > 0 if labels == "checker" else solutions["rollouts"] > 0
        mask = step_end
    else:
        mask = np.zeros_like(step_end)
        mask[np.arange(len(mask)), solutions["length"] - 1] = True
        right = np.broadcast_to(solutions["outcome"].astype(bool)[:, None], mask.shape)
    targets = np.where(mask, np.where(right, vocab + 1, vocab), 0).astype(np.int32)
    return {"inputs": solutions["tokens"].astype(np.int32), "targets": targets, "loss_mask": mask.astype(np.float32)}


def split(solutions: dict, eval_fraction: float) -> tuple[dict, dict]:
    """(train, eval) solutions: whole problems, the last `eval_fraction` of them evaluating."""
    problems = solutions["problem"]
    cutoff = int(round((problems.max() + 1) * (1 - eval_fraction)))
    pick = lambda keep: {k: (v[keep] if np.ndim(v) and len(v) == len(problems) else v)  # noqa: E731
                         for k, v in solutions.items()}
    return pick(problems < cutoff), pick(problems >= cutoff)
