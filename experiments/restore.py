"""The model and its variables from the latest checkpoint of a run folder, on one device (for sampling
and for analyses of finished runs)."""

import json
import os

import flax.linen as nn
import jax
import ml_collections
import orbax.checkpoint as ocp

import models
from experiments import checkpointing, optimizers, trainer


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """The resolved config a run saved in `workdir`; FileNotFoundError if it has none."""
    config_path = os.path.join(workdir, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"--workdir={workdir!r} has no config.json; pass the folder of a training run")
    with open(config_path) as f:
        return ml_collections.ConfigDict(json.load(f))


def checkpoint_steps(workdir: str) -> list[int]:
    return sorted(checkpointing.manager(workdir, keep=1, async_save=False).all_steps())


def load_variables(config, workdir: str, step: int | None = None):
    """(model, {"params", **model state}) of checkpoint `step` (default: the newest whose files match its
    manifest) in `workdir`, the parameters the run evaluates (schedule-free: its average); FileNotFoundError
    if there is none."""
    mngr = checkpointing.manager(workdir, keep=1, async_save=False)
    if step is None:
        intact = [s for s in mngr.all_steps() if checkpointing.damage(os.path.join(str(mngr.directory), str(s))) is None]
        step = max(intact, default=None)
    if step is None or step not in mngr.all_steps():
        raise FileNotFoundError(f"--workdir={workdir!r} has no checkpoint {'yet' if step is None else step}")
    model = models.build(config.model)
    inputs = models.example_inputs(config.model)
    tx = trainer.make_optimizer(config, model, inputs)
    ema = config.train.get("ema_decay", 0.0) > 0
    abstract = nn.meta.unbox(jax.eval_shape(lambda r: trainer.init_state(model, tx, inputs, r, ema=ema),
                                            jax.random.PRNGKey(0)))
    on_one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=on_one_device), abstract)
    restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
    params = optimizers.evaluation_params(restored.state.opt_state, restored.state.params)  # schedule-free: x
    return model, {"params": params, **restored.state.model_state}
