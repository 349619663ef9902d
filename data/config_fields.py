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


def default(f: dataclasses.Field):
    """A field's default value (for a nested key group, a fresh instance of it)."""
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def leaves(cls, prefix: str = "") -> dict:
    """{dotted key: dataclasses.Field} of every key of the dataclass `cls`, its nested groups' keys included."""
    found = {}
    for f in dataclasses.fields(cls):
        value = default(f)
        found.update(leaves(type(value), f"{prefix}{f.name}.") if dataclasses.is_dataclass(value) else {prefix + f.name: f})
    return found


def groups(cls) -> list:
    """The dataclass `cls` and every key group nested in its defaults."""
    return [cls] + [g for f in dataclasses.fields(cls) if dataclasses.is_dataclass(default(f))
                    for g in groups(type(default(f)))]


def problems(cls, values, prefix: str) -> list[str]:
    """One message per value of `values` (keys of `cls`'s fields) outside its field's declared range."""
    found = []
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        if dataclasses.is_dataclass(default(f)):
            found += problems(type(default(f)), values[f.name], f"{prefix}{f.name}.")
            continue
        if not f.metadata:
            continue
        value, meta, path = values[f.name], f.metadata, f"{prefix}{f.name}"
        if meta["choices"] is not None:
            if value not in meta["choices"]:
                found.append(f"{path}={value!r} is not one of {list(meta['choices'])}")
        elif isinstance(value, float) and math.isnan(value):
            found.append(f"{path}=nan is not a number")
        elif not _in_range(value, meta):
            found.append(f"{path}={value} must {_describe_range(meta)}")
    return found


def _in_range(value, meta) -> bool:
    return ((meta["min"] is None or value >= meta["min"]) and (meta["max"] is None or value <= meta["max"])
            and (meta["above"] is None or value > meta["above"]) and (meta["below"] is None or value < meta["below"]))


def _describe_range(meta) -> str:
    """The declared range in words: be >= 1, be < 1, lie in (0, 1), lie in [0, 1), ..."""
    low = ("[", meta["min"]) if meta["min"] is not None else ("(", meta["above"]) if meta["above"] is not None else None
    high = ("]", meta["max"]) if meta["max"] is not None else (")", meta["below"]) if meta["below"] is not None else None
    if low and high:
        return f"lie in {low[0]}{low[1]}, {high[1]}{high[0]}"
    if low:
        return f"be {'>=' if low[0] == '[' else '>'} {low[1]}"
    return f"be {'<=' if high[0] == ']' else '<'} {high[1]}"
