"""The train state and what builds it: the optimizer by name, the initial state (with LoRA adapters and the
weights' moving average where the config asks), a curriculum stage's reset, and the abstract state with its
shardings. Below both the trainer and `experiments.restore`: reading a run's weights needs the model's
variables, not the trainer."""

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.training import train_state

import models
from experiments.optim import optimizers
from experiments.posttrain import lora
from experiments.training import sharding


class TrainState(train_state.TrainState):
    rng: jax.Array  # raw uint32 key; step s uses fold_in(rng, s)
    model_state: Any = flax.struct.field(default_factory=dict)  # the model's other collections (models/__init__.py)
    stage: jax.Array = 0  # int32 curriculum stage (0 without a curriculum)
    data_skipped: jax.Array = 0  # int32 batches skipped by NaN rollbacks: step s trains on batch s + data_skipped
    ema_params: Any = flax.struct.field(default_factory=dict)  # train.ema_decay > 0: the weights' moving average


def make_optimizer(config, model, example_inputs):
    """`config.optimizer` as an optax transformation; Muon and Shampoo also get the parameters' logical axis names."""
    names = models.axis_names(model, example_inputs) if config.optimizer.name in optimizers.NEEDS_AXIS_NAMES else None
    return optimizers.build(lora.optimizer_config(config), config.train.steps, axis_names=names)


def init_variables(model, example_inputs, rng, lora_config: lora.LoRAConfig = lora.LoRAConfig()):
    """(params, model state) of a fresh model: with `lora_config.rank` the parameters gain adapters; the model
    state is every collection the trainer keeps besides the parameters."""
    params_rng, _ = jax.random.split(rng)
    variables = dict(model.init(params_rng, jnp.zeros(example_inputs.shape, example_inputs.dtype)))  # traced: free
    params = variables.pop("params")
    if lora_config.rank:
        params = lora.add_adapters(params, lora_config, jax.random.fold_in(params_rng, 1))
    return params, {k: v for k, v in variables.items() if k not in models.NOT_STATE}


def init_state(model, tx, example_inputs, rng, ema: bool = False, lora_config: lora.LoRAConfig = lora.LoRAConfig()):
    """The initial train state; with `ema` its moving average of the weights starts at the weights; with
    `lora_config.rank` the parameters gain adapters and the state's apply function merges them in."""
    params, model_state = init_variables(model, example_inputs, rng, lora_config)
    apply_fn = lora.MergedApply(model.apply, lora_config.alpha, lora_config.dropout) if lora_config.rank else model.apply
    _, state_rng = jax.random.split(rng)
    return TrainState.create(apply_fn=apply_fn, params=params, tx=tx, rng=state_rng, model_state=model_state,
                             stage=jnp.zeros((), jnp.int32), data_skipped=jnp.zeros((), jnp.int32),
                             ema_params=params if ema else {})


def begin_stage(state: TrainState, stage, *, tx) -> TrainState:
    """The state at the start of curriculum stage `stage`: a fresh optimizer state, the same parameters."""
    return state.replace(opt_state=tx.init(state.params), stage=jnp.asarray(stage, jnp.int32))


def abstract_state_and_shardings(init_fn, rng, mesh):
    """(abstract train state, its NamedShardings by the logical rules); ConfigError if a dimension
    does not divide over its mesh axes. Nothing is computed."""
    with sharding.use_mesh(mesh):
        boxed_state = jax.eval_shape(init_fn, rng)
    state_shardings = sharding.logical_shardings(boxed_state, mesh)
    abstract_state = nn.meta.unbox(boxed_state)
    sharding.check_divisible(abstract_state, state_shardings)
    return abstract_state, state_shardings
