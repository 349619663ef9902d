"""The frozen model an objective reads beside the policy: a distillation teacher, or the reference of a preference
loss or of GRPO's KL. It is a finished run folder, restored once (the parameters it evaluates), checked against the
trained config, placed on the mesh by the same logical rules as the policy, and run forward only inside the train
step (under a stop-gradient)."""

import jax
import numpy as np

from data.config_fields import ConfigError
from experiments import restore
from experiments.training import sharding


def check(config, workdir: str, key: str):
    """The frozen run's resolved config, checked against the trained (resolved) config: ConfigError, one line
    naming `key`, when the folder has no run or the vocabularies or lengths do not fit."""
    if jax.process_count() > 1:
        raise ConfigError(f"{key}={workdir!r} in a {jax.process_count()}-process job: the frozen model is "
                          "restored on one device and then sharded, which needs a single process (for now)")
    try:
        frozen = restore.load_config(workdir)
    except FileNotFoundError:
        raise ConfigError(f"{key}={workdir!r} has no config.json; pass the workdir of a finished "
                          "training run") from None
    if frozen.model.vocab_size != config.model.vocab_size:
        raise ConfigError(f"{key}={workdir!r} has model.vocab_size={frozen.model.vocab_size}, the "
                          f"trained model {config.model.vocab_size}: they need the same vocabulary")
    if frozen.model.max_len < config.model.max_len:
        raise ConfigError(f"{key}={workdir!r} has model.max_len={frozen.model.max_len}, shorter "
                          f"than the trained model's {config.model.max_len}")
    return frozen


def load(frozen_config, workdir: str, mesh, seq_len: int, step: int | None = None):
    """(apply(variables, tokens) -> logits, the frozen variables on `mesh`, their shardings) of checkpoint `step`
    (default: the newest intact one)."""
    model, variables = restore.load_variables(frozen_config, workdir, step)
    inputs = jax.ShapeDtypeStruct((sharding.batch_shards(mesh), seq_len), np.int32)
    with sharding.use_mesh(mesh):
        boxed = jax.eval_shape(model.init, jax.ShapeDtypeStruct((2,), np.uint32), inputs)
    boxed = {k: v for k, v in boxed.items() if k in variables}
    shardings = sharding.logical_shardings(boxed, mesh)
    return model.apply, jax.device_put(variables, shardings), shardings
