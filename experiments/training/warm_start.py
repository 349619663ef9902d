"""Starting a run from another run's weights (`train.init_from = RUN_FOLDER`): fine-tuning, context extension, router
tuning. The folder's newest intact checkpoint gives the parameters and the model state (e.g. router biases); the
optimizer, the step count and the data start fresh, and the model config may differ in anything that leaves the
parameter shapes unchanged (max_len under RoPE, RoPE scaling, dropout, kernels). Checked before anything compiles:
a folder without a run or a checkpoint, or whose parameters differ in a path or a shape, is a one-line ConfigError.
Only the first start reads the folder: a run that has its own checkpoints resumes from them. LoRA adapters
(`train.lora`, params["lora"]) are this run's own: they start fresh on top of the folder's (merged) weights.
A run may start from another family's run where its family says how (`from_family` and `starts_fresh` in
models.MODELS, e.g. Mixture-of-Depths from a transformer with the same blocks, router tuning: its layers map onto the
periods and the routers and predictors start fresh).
"""

import jax
import numpy as np
from jax.sharding import NamedSharding

import models
from data.config_fields import ConfigError
from experiments import restore
from experiments.posttrain import lora


def check(config, abstract_params) -> None:
    """ConfigError (one line) unless `config.train.init_from` holds a run whose parameters have abstract_params' paths
    and shapes (the init run's shapes come from its config, without reading or compiling anything)."""
    folder = config.train.init_from
    try:
        source = restore.load_config(folder)
    except FileNotFoundError:
        raise ConfigError(f"train.init_from={folder!r} has no config.json; pass the workdir of a training run") from None
    if not restore.checkpoint_steps(folder):
        raise ConfigError(f"train.init_from={folder!r} has no checkpoint yet")
    inputs = jax.ShapeDtypeStruct((1, min(source.model.max_len, config.model.max_len)), np.int32)
    theirs = jax.eval_shape(models.build(source.model).init, jax.random.key(0), inputs)["params"]
    theirs = jax.tree.map(lambda x: getattr(x, "value", x), theirs, is_leaf=lambda x: hasattr(x, "value"))
    want = _shapes({k: v for k, v in abstract_params.items() if k != lora.KEY})
    have = _shapes(jax.eval_shape(lambda p: _as_this_family(source.model, config.model, p), theirs))
    for path in sorted(set(want) | set(have)):
        if path not in have and _fresh(source.model, config.model, path):
            continue
        if want.get(path) != have.get(path):
            raise ConfigError(f"train.init_from={folder!r}: parameter {path} is {have.get(path, 'absent')} there and "
                              f"{want.get(path, 'absent')} here; the models must have the same parameter shapes")


def read(config) -> dict:
    """The init run's newest variables {"params", **model state}, on one device (read outside any mesh context)."""
    folder = config.train.init_from
    source = restore.load_config(folder)
    variables = restore.load_variables(source, folder)[1]
    return {**variables, "params": _as_this_family(source.model, config.model, variables["params"])}


def _as_this_family(source_model, model, params):
    """The source run's parameters in this run's layout (its family's `from_family`; unchanged within a family
    or where the family has no mapping, so that the shapes check names what differs)."""
    if source_model.name == model.name:
        return params
    mapped = models.MODELS[model.name][0].from_family(source_model.name, params, model)
    return params if mapped is None else mapped


def _fresh(source_model, model, path: str) -> bool:
    """Whether this run's parameter at `path` (a keystr) may start fresh, absent from the source run."""
    return source_model.name != model.name and models.MODELS[model.name][0].starts_fresh(source_model.name, path)


def place(variables, state_shardings, mesh, fresh_params) -> tuple[dict, dict]:
    """(params, model state) placed on `mesh` with the partitioning of the train state's (`state_shardings`);
    model-state collections this run does not keep are dropped; this run's LoRA adapters come from
    `fresh_params` (its initial parameters)."""
    def put(tree, shardings):
        return jax.device_put(tree, jax.tree.map(lambda s: NamedSharding(mesh, s.spec), shardings))

    model_state = {k: put(v, state_shardings.model_state[k]) for k, v in variables.items()
                   if k in state_shardings.model_state}
    loaded = _overlay(fresh_params, variables["params"])  # what the source lacks (MoD routers) starts fresh
    weights = {k: v for k, v in state_shardings.params.items() if k != lora.KEY}
    params = put({k: v for k, v in loaded.items() if k != lora.KEY}, weights)
    return ({**params, lora.KEY: fresh_params[lora.KEY]} if lora.KEY in fresh_params else params), model_state


def _overlay(fresh: dict, loaded: dict) -> dict:
    """`fresh` with every leaf that `loaded` has replaced by loaded's."""
    return {k: (_overlay(v, loaded[k]) if isinstance(v, dict) else loaded[k]) if k in loaded else v
            for k, v in fresh.items()}


def _shapes(tree) -> dict:
    return {jax.tree_util.keystr(path): tuple(leaf.shape) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}
