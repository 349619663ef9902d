"""Config validation: every problem found before anything compiles, reported as one line.

The schema is the base config for the chosen model and dataset (`experiments.configs.base`): a key it
lacks is unknown and a value of another type is wrong; each key's declared range (its dataclass field,
data/config_fields.py) bounds its value; then the family's, the dataset's and the mesh's cross-field rules.
"""

import jax
import ml_collections

import data
import models
from experiments import objectives
from experiments.optim import optimizers
from experiments.posttrain import lora
from experiments.training import harness_keys, sharding, throughput, wandb_run
from experiments.configs import base
from models import moe_dispatch, packing
from data.config_fields import ConfigError, problems as field_problems

__all__ = ["ConfigError", "validate", "validate_resolved"]


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


def _raise(problems):
    if problems:
        raise ConfigError("; ".join(problems))


def validate(config, num_devices: int, process_count: int = 1) -> tuple[int, ...]:
    """Raises ConfigError with every problem in `config`; returns the resolved mesh shape."""
    if config.model.name not in models.MODELS:
        raise ConfigError(f"model.name={config.model.name!r} is not one of {sorted(models.MODELS)}")
    if config.data.name not in data.DATASETS:
        raise ConfigError(f"data.name={config.data.name!r} is not one of {sorted(data.DATASETS)}")
    schema = base.get_config(config.model.name, config.data.name)
    missing = sorted(set(schema.model) - set(config.model))
    if missing:
        raise ConfigError(f"model.name={config.model.name!r}, but config.model lacks that family's keys "
                          f"({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''}): on the command line "
                          f"--config.model.name switches the family with its defaults; in Python, "
                          f"experiments.configs.base.switch_family(config, {config.model.name!r})")
    _raise(_schema_problems(config, schema))
    _raise([p for name, cls in base.sections(config.model.name, config.data.name).items()
            for p in field_problems(cls, config[name], f"{name}.")])
    _raise(models.MODELS[config.model.name][2](config.model) + data.DATASETS[config.data.name][2](config.data)
           + optimizers.validate(lora.optimizer_config(config)) + lora.problems(config) + objectives.problems(config)
           + (packing.problems(config.model) if "packing" in config.data else []) + harness_keys.problems(config)
           + throughput.problems(config) + wandb_run.problems(config))
    shape = sharding.mesh_shape(config.mesh, num_devices)
    batch_shards = sharding.logical_axis_size(shape, "activation_batch")
    for key, micro_batches in (("batch_size", config.train.grad_accum_steps), ("eval_batch_size", 1)):
        size, per = config.data[key], batch_shards * micro_batches
        if size != -1 and (size < 1 or size % per or size % process_count):
            accumulated = f" times train.grad_accum_steps={micro_batches}" if micro_batches > 1 else ""
            raise ConfigError(f"data.{key}={size} must be -1 (whole split) or a positive multiple of the "
                              f"{batch_shards} batch shards (mesh {' * '.join(sharding.BATCH_AXES)}){accumulated} "
                              f"and of the {process_count} processes")
    if config.data.get("streams") and config.data.streams % process_count:
        raise ConfigError(f"data.streams={config.data.streams} must be a multiple of the {process_count} processes "
                          "(each process reads whole streams); use a multiple, or 0 for one stream per process")
    if config.model.get("dispatch") == "ragged":
        _raise([p for p in [moe_dispatch.check_ragged_supported(sharding.logical_axis_size(shape, "expert"),
                                                                jax.default_backend())] if p])
    return shape


def defaults(config) -> dict:
    """The schema's default config for `config`'s model family and dataset, as a dict."""
    return base.get_config(config.model.name, config.data.name).to_dict()


def validate_resolved(config) -> None:
    """After the data has filled in what it decides: keys still at -1 ("from the data") and the family's
    cross-field rules on the filled-in values; before anything compiles."""
    unresolved = [k for k, v in config.model.items() if v == -1]
    if unresolved:
        raise ConfigError(f"model.{unresolved[0]}=-1 was not filled in: data.name={config.data.name!r} does not "
                          "decide it; set it or use a dataset that does")
    _raise(models.MODELS[config.model.name][2](config.model))
