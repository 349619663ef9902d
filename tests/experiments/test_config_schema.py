"""The config schema (every key of every section: its default, its choices and bounds) against the snapshot in
`config_schema.json` beside this file, and every section a frozen, hashable dataclass.

A default or a bound is part of what a run means: an experiment config sets only the keys it changes, so a default
that moves changes every earlier run's meaning on its next launch, and a bound that moves lets a value through that
a family cannot run. Changing one is a deliberate act: rewrite the snapshot with

    PYTHONPATH=. python -m tests.experiments.test_config_schema

and commit it with the change, which then shows the old and new values side by side in its diff."""

import json
import math
import os
import sys

from data import DATASETS, config_fields
from experiments.configs import base
from models import MODELS

SNAPSHOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config_schema.json")


def _plain(value):
    """value as JSON can hold it: tuples as lists, infinities as strings."""
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, float) and math.isinf(value):
        return str(value)
    return value


def _keys(cls) -> dict:
    """{key: {"default": ..., "choices" / "min" / "max" / "above" / "below": ...}}, nested groups as dotted keys."""
    return {key: {"default": _plain(config_fields.default(f)),
                  **{k: _plain(v) for k, v in (f.metadata or {}).items() if v is not None}}
            for key, f in config_fields.leaves(cls).items()}


def schema() -> dict:
    """{section: its keys} for the model section of every family, the data section of every dataset, and the
    train, optimizer and mesh sections."""
    any_dataset, any_model = next(iter(DATASETS)), next(iter(MODELS))
    found = {f"model:{name}": _keys(base.sections(name, any_dataset)["model"]) for name in MODELS}
    found.update({f"data:{name}": _keys(base.sections(any_model, name)["data"]) for name in DATASETS})
    found.update({s: _keys(cls) for s, cls in base.sections(any_model, any_dataset).items() if s not in ("model", "data")})
    return found


def test_every_default_and_bound_is_the_snapshots():
    with open(SNAPSHOT) as f:
        expected = json.load(f)
    got = json.loads(json.dumps(schema()))
    changed = [f"{section}.{key}: {expected.get(section, {}).get(key)} -> {got.get(section, {}).get(key)}"
               for section in sorted(set(got) | set(expected))
               for key in sorted(set(got.get(section, {})) | set(expected.get(section, {})))
               if got.get(section, {}).get(key) != expected.get(section, {}).get(key)]
    assert not changed, ("config keys differ from tests/experiments/config_schema.json (if deliberate, rewrite it "
                         "with `PYTHONPATH=. python -m tests.experiments.test_config_schema`): " + "; ".join(changed))


def test_every_config_section_is_frozen_and_hashable():
    """A section's defaults are one shared instance (an objective's `keys`, a family's config passed to its
    flax modules as a static, hashed attribute): mutating one would change every later run in the process."""
    classes = {c for model in MODELS for dataset in DATASETS
               for cls in base.sections(model, dataset).values() for c in config_fields.groups(cls)}
    assert len(classes) > len(MODELS) + len(DATASETS)
    for cls in classes:
        assert cls.__dataclass_params__.frozen, f"{cls.__module__}.{cls.__qualname__} is not frozen"
        hash(cls())


if __name__ == "__main__":
    sections = [f"  {json.dumps(section)}: {{\n" + ",\n".join(f"    {json.dumps(k)}: {json.dumps(v, sort_keys=True)}"
                                                           for k, v in sorted(keys.items())) + "\n  }"
                for section, keys in sorted(schema().items())]
    with open(SNAPSHOT, "w") as f:  # one line a key, so that a change's diff names it
        f.write("{\n" + ",\n".join(sections) + "\n}\n")
    print(f"wrote {SNAPSHOT}", file=sys.stderr)
