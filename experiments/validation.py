"""Config validation: every problem found before anything compiles, reported as one line.

The schema is the base config for the chosen model and dataset (`experiments.configs.base`):
a key it lacks is unknown, a value of another type is wrong, and the checks below bound the values.
"""

import jax
import ml_collections

import data
import models
from models import moe_dispatch

MESH_AXES = ("data", "fsdp", "tensor", "expert")


class ConfigError(ValueError):
    """Bad input: the message is one line naming the bad value and what would be valid."""


def _schema_problems(config, schema, prefix="") -> list[str]:
    problems = []
    for key, value in config.items():
        path = f"{prefix}{key}"
        if key not in schema:
            problems.append(f"unknown config key {path!r} (valid keys here: {', '.join(sorted(schema.keys()))})")
        elif isinstance(schema[key], ml_collections.ConfigDict):
            if not isinstance(value, ml_collections.ConfigDict):
                problems.append(f"config key {path!r} must be a group of keys, got {value!r}")
            else:
                problems += _schema_problems(value, schema[key], path + ".")
        elif not _same_type(value, schema[key]):
            problems.append(f"{path}={value!r} has type {type(value).__name__}, expected {type(schema[key]).__name__}")
    return problems


def _same_type(value, default) -> bool:
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(default, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    return isinstance(value, type(default))


def _choice(problems, path, value, choices):
    if value not in choices:
        problems.append(f"{path}={value!r} is not one of {list(choices)}")


def _positive(problems, path, value, minimum=1):
    if value < minimum:
        problems.append(f"{path}={value} must be >= {minimum}")


def _train_problems(t, o) -> list[str]:
    p = []
    for key in ("steps", "log_every", "checkpoint_every", "keep_checkpoints"):
        _positive(p, f"train.{key}", t[key])
    _positive(p, "train.eval_every", t.eval_every, minimum=0)
    _choice(p, "optimizer.name", o.name, ("adamw",))
    _choice(p, "optimizer.schedule", o.schedule, ("constant", "cosine"))
    if not o.lr > 0:
        p.append(f"optimizer.lr={o.lr} must be > 0")
    for key in ("b1", "b2"):
        if not 0 <= o[key] < 1:
            p.append(f"optimizer.{key}={o[key]} must lie in [0, 1)")
    if not 0 <= o.grokfast_alpha < 1:
        p.append(f"optimizer.grokfast_alpha={o.grokfast_alpha} must lie in [0, 1)")
    for key in ("eps", "weight_decay", "grad_clip", "warmup_steps", "min_lr_ratio", "grokfast_lambda"):
        _positive(p, f"optimizer.{key}", o[key], minimum=0)
    return p


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, ...]:
    """Sizes of (data, fsdp, tensor, expert) with -1 resolved; ConfigError if they do not fit the devices."""
    sizes = [mesh_config[a] for a in MESH_AXES]
    spec = ", ".join(f"{a}={s}" for a, s in zip(MESH_AXES, sizes))
    if any(s == 0 or s < -1 for s in sizes) or sizes.count(-1) > 1:
        raise ConfigError(f"mesh ({spec}) is invalid: sizes are >= 1, with at most one -1 (all devices left over)")
    fixed = 1
    for s in sizes:
        fixed *= s if s != -1 else 1
    if -1 in sizes:
        if num_devices % fixed:
            raise ConfigError(f"mesh ({spec}) does not fit {num_devices} devices: {fixed} does not divide {num_devices}")
        sizes[sizes.index(-1)] = num_devices // fixed
    elif fixed != num_devices:
        raise ConfigError(f"mesh ({spec}) has {fixed} devices but {num_devices} are available; "
                          f"make the product {num_devices} or set one axis to -1")
    return tuple(sizes)


def validate(config, num_devices: int, process_count: int = 1) -> tuple[int, ...]:
    """Raises ConfigError with every problem in `config`; returns the resolved mesh shape."""
    from experiments.configs import base  # the schema; imported late to keep this module light

    if config.model.name not in models.MODELS:
        raise ConfigError(f"model.name={config.model.name!r} is not one of {sorted(models.MODELS)}")
    if config.data.name not in data.DATASETS:
        raise ConfigError(f"data.name={config.data.name!r} is not one of {sorted(data.DATASETS)}")
    problems = _schema_problems(config, base.get_config(config.model.name, config.data.name))
    if problems:
        raise ConfigError("; ".join(problems))
    problems = models.MODELS[config.model.name][2](config.model) + _train_problems(config.train, config.optimizer)
    problems += data.DATASETS[config.data.name][2](config.data)
    if problems:
        raise ConfigError("; ".join(problems))
    shape = mesh_shape(config.mesh, num_devices)
    batch_shards = shape[0] * shape[1] * shape[3]  # data * fsdp * expert
    for key in ("batch_size", "eval_batch_size"):
        size = config.data[key]
        if size != -1 and (size < 1 or size % batch_shards or size % process_count):
            raise ConfigError(f"data.{key}={size} must be -1 (whole split) or a positive multiple of "
                              f"mesh data*fsdp*expert={batch_shards} and of the {process_count} processes")
    if config.model.name == "moe" and config.model.dispatch == "ragged":
        problem = moe_dispatch.check_ragged_supported(shape[3], jax.default_backend())
        if problem:
            raise ConfigError(problem)
    return shape
