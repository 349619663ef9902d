"""Answer accuracy of a finished reasoning run (`data.name = prosqa | prontoqa | prosqa_official | prosqa_lookup`) by
batched generation:

    python -m experiments.evaluation.reasoning_eval --workdir=RUN [--split=test] [--set=data.facts=16,seed=7]

The model reads each left-padded question (and `<bot>`, its thoughts and `<eot>` for Coconut), then
generates greedily; an answer counts when the words between `###` and `<eos>` equal the problem's answer.
Unlike the trainer's teacher-forced evaluation, chain of thought here runs on the model's own steps.
`--set` scores the run's model on other problems than its own: data keys (e.g. the lookup's `data.facts`) and
the seed (the seed draws the problems; a new seed's graphs are new to every run trained on another seed).
"""

import json
import sys

from absl import app, flags, logging
import jax.numpy as jnp
import numpy as np

import data as datasets
from data import reasoning
from experiments import restore
from experiments.training import cli
from models import coconut


def evaluate(config, workdir: str, split: str = "test", batch_size: int = 250) -> dict[str, float]:
    """{"accuracy", "tokens" (language tokens generated per answer, <eos> included), "thoughts"} on `split`."""
    model, variables = restore.load_variables(config, workdir)
    problems = datasets.reasoning_problems(config.data, config.seed)
    geo = datasets.reasoning_geometry(config.data, problems)
    vocab = datasets.GENERATORS[config.data.name].VOCABULARY
    prompts = reasoning.prompts(problems[split], vocab, geo, config.data.method)
    num_thoughts = config.model.max_thoughts if config.data.method == "coconut" else 0
    generated = []
    for start in range(0, len(prompts), batch_size):
        generated.append(np.asarray(coconut.generate(
            model, variables, jnp.asarray(prompts[start:start + batch_size]), num_thoughts=num_thoughts,
            num_tokens=geo.row_len - geo.question_len)))
    result = reasoning.score(np.concatenate(generated), problems[split], vocab)
    return {**result, "thoughts": float(num_thoughts)}


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    config = cli.override(cli.run_config(_WORKDIR.value), _SET.value, allowed=("data.", "seed"))
    if config.data.name not in datasets.GENERATORS:
        cli.fail(f"--workdir={_WORKDIR.value} trained on data.name={config.data.name!r}, not a reasoning task (one of "
                 f"{sorted(datasets.GENERATORS)})")
    if _SPLIT.value not in ("eval", "test"):
        cli.fail(f"--split={_SPLIT.value!r} is not one of ['eval', 'test']")
    print(json.dumps(evaluate(config, _WORKDIR.value, _SPLIT.value)), file=sys.stdout)


if __name__ == "__main__":  # the flags exist only for the command (studies import `evaluate`)
    _WORKDIR = flags.DEFINE_string("workdir", None, "A finished reasoning run's folder.", required=True)
    _SPLIT = flags.DEFINE_string("split", "test", "eval | test (for prosqa_official: the official valid / test split).")
    _SET = flags.DEFINE_list("set", [], "KEY=VALUE overrides of the run's data keys or seed: which problems to score.")
    app.run(main)
