"""Sample a policy's solutions and label each step: the training data of outcome and process reward models.

    python -m experiments.test_time.label --policy=RUN --out=FILE.npz [--problems=512] [--samples=4] [--rollouts=8]
        [--temperature=1.0] [--seed=0]

For the first `--problems` prompts of the policy run's training split (experiments/test_time/tasks.py), `--samples`
responses each at `--temperature` (KV-cached, models/sampling.generate), cut at their end, and for each step two
labels:

    checker    the exact checker's: the response through the step is the reference's prefix
    rollouts   Math-Shepherd's (Wang et al. 2024) estimate, which needs no checker of steps, only of answers: the
               fraction of `--rollouts` continuations from the step (same temperature) whose answer is right
               (a finished response's last step: whether its own answer is)

written with the answer's correctness to FILE (data/verifier_rows.py reads it: `data.name = "verifier"`). Prints
how often the two labellings agree.
"""

import collections

import jax
import jax.numpy as jnp
import numpy as np

from data.config_fields import ConfigError
from experiments.test_time import tasks
from models import sampling


def continue_prompts(model, variables, prompts: list[tuple[int, ...]], total_len: int, rng, temperature: float,
                     batch_size: int = 256) -> list[np.ndarray]:
    """Each prompt continued by sampled tokens to `total_len` in all, prompts of one length in batches of
    `batch_size`."""
    by_length = collections.defaultdict(list)
    for i, prompt in enumerate(prompts):
        by_length[len(prompt)].append(i)
    out = [None] * len(prompts)
    for length, indices in sorted(by_length.items()):
        num_tokens = total_len - length
        for start in range(0, len(indices), batch_size):
            chunk = indices[start:start + batch_size]
            batch = jnp.asarray([prompts[i] for i in chunk], jnp.int32)
            cache = model.init_cache(len(chunk), length + num_tokens)
            rng, key = jax.random.split(rng)
            tokens = np.asarray(sampling.generate(model, variables, batch, cache, key, num_tokens=num_tokens,
                                                  temperature=temperature))
            for row, i in enumerate(chunk):
                out[i] = tokens[row]
    return out


def cut(task: tasks.StepTask, tokens, limit: int) -> tuple[int, ...]:
    """A sampled continuation up to its first finishing token (or `limit` tokens)."""
    response = []
    for token in tokens[:limit]:
        response.append(int(token))
        if token in task.finish_ids:
            break
    return tuple(response)


def label(model, variables, task: tasks.StepTask, problems, *, samples: int, rollouts: int, temperature: float,
          response_len: int, rng) -> dict:
    """The labelled solutions of `problems` [(prompt, reference)] (data/verifier_rows.py's keys but the vocabulary)."""
    prompts = [prompt for prompt, _ in problems for _ in range(samples)]
    references = [reference for _, reference in problems for _ in range(samples)]
    rng, key = jax.random.split(rng)
    total_len = len(prompts[0]) + response_len
    responses = [cut(task, tokens, response_len) for tokens in continue_prompts(
        model, variables, prompts, total_len, key, temperature)]
    prefixes, owners = [], []  # every step but a finished response's last, continued `rollouts` times
    for i, response in enumerate(responses):
        ends = np.cumsum([len(step) for step in task.steps(response)])
        for k, end in enumerate(ends):
            if end < len(response) or not _finished(task, response, response_len):
                prefixes += [prompts[i] + response[:end]] * rollouts
                owners.append((i, k))
    continued = continue_prompts(model, variables, prefixes, total_len, rng, temperature)
    estimates = collections.defaultdict(dict)
    for n, (i, k) in enumerate(owners):
        wins = [task.correct(response_of(task, prefixes[n * rollouts], prompts[i], continued[n * rollouts + r],
                                         response_len), references[i]) for r in range(rollouts)]
        estimates[i][k] = float(np.mean(wins))
    return _arrays(task, prompts, responses, references, estimates, problems_count=len(problems), samples=samples)


def response_of(task, prefix, prompt, continuation, response_len: int) -> tuple[int, ...]:
    """The whole response of a rollout: the prefix's response part and its continuation, cut."""
    done = prefix[len(prompt):]
    return done + cut(task, continuation, response_len - len(done))


def _finished(task, response, response_len: int) -> bool:
    return bool(response) and (response[-1] in task.finish_ids or len(response) >= response_len)


def _arrays(task, prompts, responses, references, estimates, *, problems_count: int, samples: int) -> dict:
    width = max(len(p) + len(r) for p, r in zip(prompts, responses))
    n = len(responses)
    arrays = {"tokens": np.zeros((n, width), np.int32), "length": np.zeros(n, np.int32),
              "step_end": np.zeros((n, width), np.int8), "checker": np.zeros((n, width), np.int8),
              "rollouts": np.zeros((n, width), np.float32), "outcome": np.zeros(n, np.int8),
              "problem": np.repeat(np.arange(problems_count), samples).astype(np.int32)}
    for i, (prompt, response, reference) in enumerate(zip(prompts, responses, references)):
        row = prompt + response
        arrays["tokens"][i, :len(row)] = row
        arrays["length"][i] = len(row)
        right = task.correct(response, reference)
        arrays["outcome"][i] = right
        position = len(prompt) - 1
        for k, (step, checked) in enumerate(zip(task.steps(response), task.step_labels(response, reference))):
            position += len(step)
            arrays["step_end"][i, position] = 1
            arrays["checker"][i, position] = checked
            arrays["rollouts"][i, position] = estimates[i].get(k, float(right))
    return arrays


def label_run(policy: str, out: str, *, problems: int = 512, samples: int = 4, rollouts: int = 8,
              temperature: float = 1.0, seed: int = 0) -> dict:
    """Writes `out` (module doc); returns the arrays."""
    import data as datasets
    from experiments import restore

    if min(problems, samples, rollouts) < 1 or temperature <= 0:
        raise ConfigError(f"--problems={problems}, --samples={samples}, --rollouts={rollouts}: each at least 1; "
                          f"--temperature={temperature} above 0")
    try:
        config = restore.load_config(policy)
    except FileNotFoundError as error:
        raise ConfigError(str(error)) from None
    task = tasks.of_config(config)
    splits = datasets.load(config.data, config.seed)
    rows = tasks.problems(splits.train)[:problems]
    model, variables = restore.load_variables(config, policy)
    response_len = splits.seq_len + 1 - len(rows[0][0])
    arrays = label(model, variables, task, rows, samples=samples, rollouts=rollouts, temperature=temperature,
                   response_len=response_len, rng=jax.random.key(seed))
    arrays["policy_vocab"] = np.int32(config.model.vocab_size)
    np.savez_compressed(out, **arrays)
    return arrays


def main(argv):
    from absl import flags

    from experiments.training import cli

    del argv
    f = flags.FLAGS
    try:
        arrays = label_run(f.policy, f.out, problems=f.problems, samples=f.samples, rollouts=f.rollouts,
                           temperature=f.temperature, seed=f.seed)
    except ConfigError as e:
        cli.fail(str(e))
    steps = arrays["step_end"] > 0
    agree = np.mean((arrays["checker"][steps] > 0) == (arrays["rollouts"][steps] > 0))
    print(f"wrote {f.out}: {len(arrays['length'])} solutions, {int(steps.sum())} steps, answers right "
          f"{arrays['outcome'].mean():.3f}, steps right (checker) {arrays['checker'][steps].mean():.3f}, "
          f"checker and rollout labels agree on {agree:.3f} of the steps")


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("policy", None, "The policy's run folder.", required=True)
    flags.DEFINE_string("out", None, "The .npz file to write.", required=True)
    flags.DEFINE_integer("problems", 512, "Training prompts labelled.")
    flags.DEFINE_integer("samples", 4, "Responses sampled per prompt.")
    flags.DEFINE_integer("rollouts", 8, "Math-Shepherd continuations per step.")
    flags.DEFINE_float("temperature", 1.0, "Of the samples and the rollouts.")
    flags.DEFINE_integer("seed", 0, "Of the samples and the rollouts.")
    app.run(main)
