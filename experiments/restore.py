"""The model and its variables from the latest checkpoint of a run folder, on one device (for sampling
and for analyses of finished runs)."""

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp

import models
from experiments import checkpointing, optimizers, trainer


def load_variables(config, workdir: str):
    """(model, {"params", **model state}) of the latest checkpoint in `workdir`; FileNotFoundError if none."""
    mngr = checkpointing.manager(workdir, keep=1, async_save=False)
    if mngr.latest_step() is None:
        raise FileNotFoundError(f"--workdir={workdir!r} has no checkpoint yet")
    model = models.build(config.model)
    tx = optimizers.build(config.optimizer, config.train.steps)
    inputs = jax.ShapeDtypeStruct((1, config.model.max_len), np.int32)
    abstract = nn.meta.unbox(jax.eval_shape(lambda r: trainer.init_state(model, tx, inputs, r), jax.random.PRNGKey(0)))
    on_one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=on_one_device), abstract)
    restored = mngr.restore(mngr.latest_step(), args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
    return model, {"params": restored.state.params, **restored.state.model_state}
