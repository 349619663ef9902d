"""The default experiment shows grokking: memorisation first, generalisation thousands of steps later."""

import jax
import pytest

from experiments.training import metrics_writer, trainer
from experiments.configs import default


@pytest.mark.slow
@pytest.mark.optimised  # 5,000 steps: running, not compiling, dominates
def test_default_experiment_memorises_then_generalises(tmp_path):
    config = default.get_config()
    config.train.update(checkpoint_every=5_000)
    result = trainer.train_and_evaluate(config, str(tmp_path), devices=jax.devices()[:1], verbose=False)
    events = metrics_writer.read(str(tmp_path))
    train = {e["step"]: e["accuracy"] for e in events if e["split"] == "train"}
    test = {e["step"]: e["accuracy"] for e in events if e["split"] == "eval"}
    memorised = min(s for s, a in train.items() if a == 1.0)
    generalised = min(s for s, a in test.items() if a >= 0.99)
    assert test[memorised] < 0.5, "test accuracy should still be low when the training set is memorised"
    assert generalised >= memorised + 1000, (memorised, generalised)
    assert result["eval"]["accuracy"] >= 0.99
