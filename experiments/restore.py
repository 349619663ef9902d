"""The model and its variables from the latest checkpoint of a run folder, on one device (for sampling and for
analyses of finished runs; a LoRA run's adapters merged into its weights); and the other way, variables made
elsewhere (an imported or merged model) written as a run folder at step 0 that every tool here reads and
`train.init_from` starts from."""

import json
import os

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

import models
from experiments.optim import optimizers
from experiments.posttrain import lora
from experiments.training import checkpointing, run_record, train_state, validation


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """The resolved config a run saved in `workdir`, with keys newer than the run at the schema's defaults (which
    leave behaviour as it was); FileNotFoundError if it has none."""
    config_path = os.path.join(workdir, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"--workdir={workdir!r} has no config.json; pass the folder of a training run")
    with open(config_path) as f:
        saved = json.load(f)
    try:
        defaults = validation.defaults(ml_collections.ConfigDict(saved))
    except KeyError:  # a family or dataset this version does not know: the saved keys as they are
        defaults = {}
    return ml_collections.ConfigDict(_with_defaults(saved, defaults))


def _with_defaults(saved: dict, defaults: dict) -> dict:
    merged = {k: v for k, v in defaults.items() if k not in saved}
    for key, value in saved.items():
        merged[key] = _with_defaults(value, defaults[key]) if isinstance(value, dict) and isinstance(
            defaults.get(key), dict) else value
    return merged


def checkpoint_steps(workdir: str) -> list[int]:
    return sorted(checkpointing.manager(workdir, keep=1, async_save=False).all_steps())


def load_variables(config, workdir: str, step: int | None = None):
    """(model, {"params", **model state}) of checkpoint `step` (default: the newest whose files match its
    manifest) in `workdir`, the parameters the run evaluates; FileNotFoundError if there is none. Only the
    parameters and the model state are read, and no optimizer is built, except for an optimizer whose evaluated
    weights come from its state (schedule-free: its averaged iterate)."""
    mngr = checkpointing.manager(workdir, keep=1, async_save=False)
    if step is None:
        intact = [s for s in mngr.all_steps() if checkpointing.damage(os.path.join(str(mngr.directory), str(s))) is None]
        step = max(intact, default=None)
    if step is None or step not in mngr.all_steps():
        raise FileNotFoundError(f"--workdir={workdir!r} has no checkpoint {'yet' if step is None else step}")
    model = models.build(config.model)
    inputs = models.example_inputs(config.model)
    lora_config = lora.LoRAConfig(**config.train.get("lora", {}))
    on_one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    place = lambda tree: jax.tree.map(  # noqa: E731
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=on_one_device), nn.meta.unbox(tree))
    if config.optimizer.name in optimizers.EVALUATED_ELSEWHERE:  # the whole state: the optimizer's is needed
        tx = train_state.make_optimizer(config, model, inputs)
        ema = config.train.get("ema_decay", 0.0) > 0
        abstract = place(jax.eval_shape(lambda r: train_state.init_state(model, tx, inputs, r, ema=ema,
                                                                         lora_config=lora_config),
                                        jax.random.PRNGKey(0)))
        state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))).state
        params, model_state = optimizers.evaluation_params(state.opt_state, state.params), state.model_state
    else:  # the parameters and the model state alone (orbax's partial restore)
        params, model_state = jax.eval_shape(lambda r: train_state.init_variables(model, inputs, r, lora_config),
                                             jax.random.PRNGKey(0))
        item = place({"params": params, "model_state": model_state})
        state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True))).state
        params, model_state = state["params"], state["model_state"]
    return model, {"params": lora.merged(params, lora_config.alpha), **model_state}


def save_variables(config, variables: dict, workdir: str) -> None:
    """Writes `workdir`: config.json (`config`, resolved) and a sealed orbax checkpoint at step 0 of the train
    state with these variables ({"params", **model state}) and a fresh optimizer state."""
    model = models.build(config.model)
    inputs = models.example_inputs(config.model)
    tx = train_state.make_optimizer(config, model, inputs)
    params = jax.tree.map(np.asarray, variables["params"])
    state = train_state.TrainState.create(
        apply_fn=model.apply, params=params, tx=tx, rng=jax.random.split(jax.random.PRNGKey(config.seed))[1],
        model_state={k: v for k, v in variables.items() if k != "params"}, stage=np.zeros((), np.int32),
        data_skipped=np.zeros((), np.int32), ema_params={})
    os.makedirs(workdir, exist_ok=True)
    mngr = checkpointing.manager(workdir, keep=1, async_save=False, writer=True)
    mngr.save(0, args=ocp.args.Composite(state=ocp.args.StandardSave(state)), force=True)
    mngr.wait_until_finished()
    mngr.close()
    checkpointing.seal(os.path.join(workdir, "checkpoints", "0"))
    run_record.write_json(os.path.join(workdir, "config.json"), json.loads(json.dumps(config.to_dict())))
