"""Declarative config fields: each key's bounds and choices live beside its default.

    vocab_size: int = field(0, min=0)
    norm: str = field("rmsnorm", choices=("rmsnorm", "layernorm", "none"))

`problems(cls, values, prefix)` checks a mapping of values (a ConfigDict section) against every field of
the dataclass `cls` and returns one-line messages; cross-field rules stay in each family's `validate`.
"""

import dataclasses
import math


class ConfigError(ValueError):
    """Bad input: the message is one line naming the bad value and what would be valid."""


def field(default, *, choices=None, min=None, max=None, above=None, below=None):  # noqa: A002 (the natural names)
    """A dataclass field with its valid values: `choices`, or bounds `min <= v <= max`, `above < v < below`."""
    if dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=lambda: default)
    return dataclasses.field(default=default, metadata=dict(choices=choices, min=min, max=max, above=above,
                                                            below=below))


def problems(cls, values, prefix: str) -> list[str]:
    """One message per value of `values` (keys of `cls`'s fields) outside its field's declared range."""
    found = []
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory()):
            found += problems(type(f.default_factory()), values[f.name], f"{prefix}{f.name}.")
            continue
        if not f.metadata:
            continue
        value, meta, path = values[f.name], f.metadata, f"{prefix}{f.name}"
        if meta["choices"] is not None and value not in meta["choices"]:
            found.append(f"{path}={value!r} is not one of {list(meta['choices'])}")
        elif meta["min"] is not None and not value >= meta["min"]:
            found.append(f"{path}={value} must be >= {meta['min']}")
        elif meta["max"] is not None and not value <= meta["max"]:
            found.append(f"{path}={value} must be <= {meta['max']}")
        elif meta["above"] is not None and not value > meta["above"]:
            found.append(f"{path}={value} must be > {meta['above']}")
        elif meta["below"] is not None and not value < meta["below"]:
            found.append(f"{path}={value} must be < {meta['below']}")
        elif isinstance(value, float) and math.isnan(value):
            found.append(f"{path}=nan is not a number")
    return found
