"""What the command line does with a config: train it, or stop with one stderr line and an exit status.

    2   bad input, found before anything compiles (experiments/validation.py: a `ConfigError`)
    1   a failure mid-run: a non-finite loss (after `train.nan_rollbacks` rollbacks), a checkpoint that
        cannot be written, a workdir whose every checkpoint is damaged, a coordinator that never answers

Here rather than in experiments/train.py (which defines the absl flags) so that tests call it in process.
"""

import os
import sys


def fail(message: str, status: int = 2):
    """One line on stderr, then exit. A failure mid-run (status 1) exits at once, skipping the interpreter's
    teardown, where the libraries' broken background work (e.g. orbax's failed writes) would print pages."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    if status == 1:
        sys.stdout.flush()
        os._exit(status)
    sys.exit(status)


def run_config(workdir: str):
    """The resolved config of the run in `workdir` (for the tools that read finished runs), or one stderr line."""
    from experiments import restore

    try:
        return restore.load_config(workdir)
    except FileNotFoundError as e:
        fail(str(e))


def override(config, items, allowed=("",)):
    """`config` with each "section.key=value" of `items` set (the value cast to the key's current type), or one
    stderr line for an item that is not KEY=VALUE, names no key of the config, starts with none of `allowed`, or
    whose value the key's type cannot hold."""
    for item in items:
        key, equals, value = item.partition("=")
        *parents, leaf = key.split(".")
        node = config
        for parent in parents:
            node = node.get(parent) if hasattr(node, "get") else None
        if not equals or not key.startswith(tuple(allowed)) or not hasattr(node, "get") or leaf not in node:
            fail(f"--set={item!r}: want KEY=VALUE with KEY an existing config key starting with one of {list(allowed)}")
        node[leaf] = _cast(item, value, node[leaf])
    return config


def _cast(item: str, value: str, current):
    booleans = {"True": True, "true": True, "1": True, "False": False, "false": False, "0": False}
    try:
        return booleans[value] if isinstance(current, bool) else type(current)(value)
    except (KeyError, TypeError, ValueError):
        fail(f"--set={item!r}: {value!r} is not a {type(current).__name__} (the key's current value is {current!r})")


def run(config, workdir: str) -> dict:
    """Trains `config` in `workdir` as the command line does: an expected failure becomes one stderr line and
    exit status 2 (bad input) or 1 (a failure mid-run)."""
    from experiments import checkpointing, trainer, validation

    try:
        result = trainer.train_and_evaluate(config, workdir)
    except validation.ConfigError as e:
        fail(str(e))
    except (trainer.NonFiniteLossError, checkpointing.CheckpointWriteError, checkpointing.NoGoodCheckpointError) as e:
        fail(str(e), status=1)
    summary = "  ".join(f"{split} " + " ".join(f"{k} {v:.4g}" for k, v in m.items())
                        for split, m in result.items() if isinstance(m, dict))
    print(f"done at step {result['step']}: {summary}\nworkdir: {workdir}")
    return result
