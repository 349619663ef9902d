"""What the command line does with a config: train it, or stop with one stderr line and an exit status.

    2   bad input, found before anything compiles (experiments/training/validation.py: a `ConfigError`)
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


def override(config, items, allowed=("",), flag="--set="):
    """`config` with each "section.key=value" of `items` set (the value cast to the key's current type), or one
    stderr line for an item that is not KEY=VALUE, names no key of the config, starts with none of `allowed`, or
    whose value the key's type cannot hold. `flag` is how the item was given, for the message."""
    for item in items:
        key, equals, value = item.partition("=")
        *parents, leaf = key.split(".")
        node = config
        for parent in parents:
            node = node.get(parent) if hasattr(node, "get") else None
        if not equals or not key.startswith(tuple(allowed)) or not hasattr(node, "get") or leaf not in node:
            fail(f"{flag}{item!r}: want KEY=VALUE with KEY an existing config key starting with one of {list(allowed)}")
        node[leaf] = _cast(f"{flag}{item!r}", value, node[leaf])
    return config


def _cast(given: str, value: str, current):
    booleans = {"True": True, "true": True, "1": True, "False": False, "false": False, "0": False}
    try:
        return booleans[value] if isinstance(current, bool) else type(current)(value)
    except (KeyError, TypeError, ValueError):
        fail(f"{given}: {value!r} is not a {type(current).__name__} (the key's current value is {current!r})")


SWITCHED_SECTIONS = ("model", "data")  # --config.model.name / --config.data.name rebuild their section


def split_section_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """(argv without the --config.S.KEY=VALUE flags of every section S that argv switches with --config.S.name,
    those flags as "S.KEY=VALUE" items). The config file's section is another family's (dataset's), so these
    overrides are applied after `switch_sections` rebuilds the section, not by the flag parser."""
    switched = [f"--config.{s}." for s in SWITCHED_SECTIONS if any(a.startswith(f"--config.{s}.name=") for a in argv)]
    items = [a for a in argv if a.startswith(tuple(switched))] if switched else []
    return [a for a in argv if a not in items], [a.removeprefix("--config.") for a in items]


def parse_flags(argv: list[str], config_flag, config_argv: list[str]):
    """absl flag parsing for a command with a --config file (`config_flag`, defined with sys_argv=config_argv), with
    any error (unknown or mistyped config key, bad flag) as one stderr line; a section switched by
    --config.model.name / --config.data.name is rebuilt before that section's other overrides apply."""
    from absl import flags

    argv, section_items = split_section_overrides(argv)
    config_argv[:] = argv
    try:
        parsed = flags.FLAGS(argv)
        if section_items:
            switch_sections(config_flag.value, section_items)
        return parsed
    except flags.Error as e:
        fail(str(e).splitlines()[0] if str(e) else repr(e))
    except (AttributeError, KeyError) as e:  # ml_collections: an override names a key the config lacks
        key = str(e).strip("\"'")
        overrides = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")
                     and a.split("=")[0].rsplit(".", 1)[-1] == key]
        fail(f"unknown config key {key!r} in {', '.join(overrides) or 'the --config overrides'}; "
             "valid keys are those of the config file (experiments/configs/base.py lists the common ones)")


def switch_sections(config, items: list[str]):
    """Applies `split_section_overrides`' items to a parsed config: "S.name=X" first for each switched section S
    (the family's or dataset's section with its defaults and the keys both share:
    `experiments.configs.base.switch_family` / `switch_dataset`), then the others in order, cast to the new
    section's types; an unknown name or a key the new section lacks is one stderr line."""
    import data
    import models
    from experiments.configs import base

    tables = {"model": (models.MODELS, base.switch_family), "data": (data.DATASETS, base.switch_dataset)}
    for section, (table, switch) in tables.items():
        names = [i.partition("=")[2] for i in items if i.startswith(f"{section}.name=")]
        if not names:
            continue
        if names[-1] not in table:
            fail(f"--config.{section}.name={names[-1]!r} is not one of {sorted(table)}")
        if names[-1] != config[section].name:
            switch(config, names[-1])
        for item in items:
            key = item.partition("=")[0]
            if key.startswith(f"{section}.") and key != f"{section}.name" and key.partition(".")[2] not in config[section]:
                fail(f"--config.{item}: {section}.name={names[-1]!r} has no key {key.partition('.')[2]!r} "
                     f"(its keys: {', '.join(sorted(config[section]))})")
    return override(config, [i for i in items if i.partition("=")[0] not in ("model.name", "data.name")],
                    flag="--config.")


def run(config, workdir: str) -> dict:
    """Trains `config` in `workdir` as the command line does: an expected failure becomes one stderr line and
    exit status 2 (bad input) or 1 (a failure mid-run)."""
    from experiments.training import checkpointing, trainer, validation

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
