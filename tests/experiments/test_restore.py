"""Reading a run's weights (experiments/restore.load_variables) builds no optimizer: the parameters and model state
alone are read, equal to what the whole train state's restore (with its optimizer) gives."""

import jax
import numpy as np
import pytest

from experiments import restore
from experiments.optim import optimizers
from experiments.training import train_state


def test_the_weights_restore_without_the_optimizer_and_equal_the_whole_states(finished_tiny_run, monkeypatch):
    run = str(finished_tiny_run)
    config = restore.load_config(run)
    with monkeypatch.context() as patched:  # the whole state, optimizer included: the reference
        patched.setattr(optimizers, "EVALUATED_ELSEWHERE", (config.optimizer.name,))
        _, whole = restore.load_variables(config, run)

    def no_optimizer(*args, **kwargs):
        raise AssertionError("load_variables built an optimizer")

    monkeypatch.setattr(train_state, "make_optimizer", no_optimizer)
    monkeypatch.setattr(optimizers, "build", no_optimizer)
    _, alone = restore.load_variables(config, run)
    assert jax.tree.structure(alone) == jax.tree.structure(whole)
    for a, b in zip(jax.tree.leaves(alone), jax.tree.leaves(whole)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(FileNotFoundError, match="no checkpoint 99"):
        restore.load_variables(config, run, step=99)
