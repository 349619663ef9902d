"""Knowledge distillation (Hinton et al. 2015, "Distilling the Knowledge in a Neural Network") from a finished
run: the teacher is `train.distill.teacher`'s workdir, restored once (the parameters it evaluates), placed on
the mesh by the same logical rules as the student, and run forward only inside the student's train step:

    objective = (1 - a) CE(student, targets) + a T^2 KL(softmax(teacher / T) || softmax(student / T))

(experiments/losses.Objective; a = `train.distill.weight`, T = `train.distill.temperature`; the T^2 keeps the
soft term's gradients on the scale of the hard one's.)
"""

import jax
import numpy as np

from data.config_fields import ConfigError
from experiments import sharding


def teacher_config(config, workdir: str, key: str = "train.distill.teacher"):
    """The frozen run's (a teacher's, or a preference loss's reference at train.init_from) resolved config, checked
    against the student's (resolved) config: ConfigError, one line naming `key`, when the folder has no run or the
    vocabularies or lengths do not fit."""
    from experiments import restore  # restore reads the trainer's state layout: imported when used

    if jax.process_count() > 1:
        raise ConfigError(f"{key}={workdir!r} in a {jax.process_count()}-process job: the teacher is "
                          "restored on one device and then sharded, which needs a single process (for now)")
    try:
        teacher = restore.load_config(workdir)
    except FileNotFoundError:
        raise ConfigError(f"{key}={workdir!r} has no config.json; pass the workdir of a finished "
                          "training run") from None
    if teacher.model.vocab_size != config.model.vocab_size:
        raise ConfigError(f"{key}={workdir!r} has model.vocab_size={teacher.model.vocab_size}, the "
                          f"student {config.model.vocab_size}: distillation needs the same vocabulary")
    if teacher.model.max_len < config.model.max_len:
        raise ConfigError(f"{key}={workdir!r} has model.max_len={teacher.model.max_len}, shorter "
                          f"than the student's {config.model.max_len}")
    return teacher


def load_teacher(teacher, workdir: str, mesh, seq_len: int):
    """(apply(variables, tokens) -> logits, the teacher's variables on `mesh`, their shardings)."""
    from experiments import restore

    model, variables = restore.load_variables(teacher, workdir)
    inputs = jax.ShapeDtypeStruct((sharding.batch_shards(mesh), seq_len), np.int32)
    with sharding.use_mesh(mesh):
        boxed = jax.eval_shape(model.init, jax.ShapeDtypeStruct((2,), np.uint32), inputs)
    boxed = {k: v for k, v in boxed.items() if k in variables}
    shardings = sharding.logical_shardings(boxed, mesh)
    return model.apply, jax.device_put(variables, shardings), shardings

