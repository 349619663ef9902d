"""Scores a run on lm-evaluation-harness tasks through our own backend (experiments/training/harness_backend.py).

    python -m experiments.lm_eval --workdir=RUN --tasks=T[,T...] [--include_path=DIR] [--num_fewshot=K] \
        [--limit=N] [--batch_size=8] [--step=N] --output=FILE.json
    python -m experiments.lm_eval run --model beyond --model_args workdir=RUN --tasks T [lm_eval's flags]

The first form runs `lm_eval.simple_evaluate` with the `beyond` model on the run's checkpoint and writes what it
returns (the `results` per task, the task configs and versions, the number of shots) to `--output`, printing the
harness's table. Task names are the harness's own (on a machine that can download their data) or those of
`--include_path` folders; the project's shipped tasks (experiments/evaluation/harness_tasks/: shakespeare_next_line,
shakespeare_complete, shakespeare_rolling) are always included.

The second form is lm_eval's own command line (`run`, `ls`, `validate` and their flags) with the `beyond` model
registered first: lm_eval 0.4 discovers no models outside its source tree, so its `lm_eval` script cannot name
ours, and this runs that script's parser after the registration.
"""

import json
import os
import sys

from data.config_fields import ConfigError

from experiments.training.harness_keys import SHIPPED_TASKS, task_manager

HARNESS_SUBCOMMANDS = ("run", "ls", "validate")


def evaluate(workdir: str, tasks: list[str], *, include_path: str | None = None, num_fewshot: int | None = None,
             limit: int | None = None, batch_size: int = 8, step: int | None = None, **model_args) -> dict:
    """lm_eval.simple_evaluate of the run on `tasks` (the shipped tasks and `include_path` registered)."""
    import lm_eval

    from experiments.training import harness_backend

    paths = [SHIPPED_TASKS] + ([include_path] if include_path else [])
    manager = task_manager(tasks, paths)
    unknown = [t for t in tasks if not manager.match_tasks([t])]
    if unknown:
        raise ConfigError(f"--tasks names {unknown}, which no task folder defines (the shipped ones: "
                          f"{sorted(t for t in manager.all_tasks if t.startswith('shakespeare'))}; pass "
                          "--include_path=DIR for your own)")
    model = harness_backend.BeyondLM(workdir, step=step, batch_size=batch_size, **model_args)
    return lm_eval.simple_evaluate(model=model, tasks=tasks, num_fewshot=num_fewshot, limit=limit,
                                   task_manager=manager, log_samples=False, bootstrap_iters=0)


def summary(results: dict) -> dict:
    """What --output holds: the results per task, and how they were made."""
    keep = ("results", "configs", "versions", "n-shot", "higher_is_better")
    return json.loads(json.dumps({k: results[k] for k in keep if k in results}, default=str))


def main(argv):
    from absl import flags

    from experiments.training import cli

    del argv
    f = flags.FLAGS
    try:
        results = evaluate(f.workdir, f.tasks, include_path=f.include_path, num_fewshot=f.num_fewshot, limit=f.limit,
                           batch_size=f.batch_size, step=f.step)
    except (ConfigError, FileNotFoundError) as e:
        cli.fail(str(e))
    from lm_eval.utils import make_table

    print(make_table(results))
    os.makedirs(os.path.dirname(os.path.abspath(f.output)), exist_ok=True)
    with open(f.output, "w") as file:
        json.dump(summary(results), file, indent=1)
    print(f"wrote {f.output}")


def harness_command_line() -> None:
    """lm_eval's own command line, with the `beyond` backend registered."""
    from lm_eval.__main__ import cli_evaluate

    from experiments.training import harness_backend  # noqa: F401  (registers "beyond")

    cli_evaluate()


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in HARNESS_SUBCOMMANDS:
        harness_command_line()
    else:
        from absl import app, flags

        flags.DEFINE_string("workdir", None, "The run folder to score.", required=True)
        flags.DEFINE_list("tasks", None, "Task names (the harness's, the shipped ones, or --include_path's).",
                          required=True)
        flags.DEFINE_string("include_path", None, "A folder of task YAML files.")
        flags.DEFINE_integer("num_fewshot", None, "Examples in each prompt (default: each task's own).")
        flags.DEFINE_integer("limit", None, "Documents per task (default: all).")
        flags.DEFINE_integer("batch_size", 8, "Requests per forward pass.")
        flags.DEFINE_integer("step", None, "The checkpoint step (default: the newest intact one).")
        flags.DEFINE_string("output", None, "Where the results JSON goes.", required=True)
        app.run(main)
