"""The headline behaviour, cheaply, on every run: a small a+b mod 31 task memorises first and generalises
a thousand steps later (grokking), through the one trainer, in about 15 s on one CPU device (compiled with
XLA's optimisations: 2,000 steps, where running dominates). Measured: train accuracy 0.99 at step 100, test
accuracy 0.95 at step 1,350 and 1.0 at step 2,000 (earlier, without the optimisations: 1,200 / 1,300, seeds 1
and 3 alike at 1,000 and 1,150)."""

import jax
import pytest

from experiments.training import metrics_writer, trainer
from experiments.configs import grokking


@pytest.mark.slow
@pytest.mark.optimised
def test_memorises_first_then_generalises(tmp_path):
    config = grokking.get_config()
    config.model.update(d_model=64, num_heads=4, d_mlp=256)
    config.data.update(p=31, train_fraction=0.5)
    config.train.update(steps=2000, log_every=50, eval_every=50, checkpoint_every=2000)
    config.optimizer.update(lr=5e-3)
    config.optimizer.adamw.update(weight_decay=2.0)
    trainer.train_and_evaluate(config, str(tmp_path), devices=jax.devices()[:1], verbose=False)
    train = {e["step"]: e["accuracy"] for e in metrics_writer.read(str(tmp_path), "train")}
    test = {e["step"]: e["accuracy"] for e in metrics_writer.read(str(tmp_path), "eval")}
    memorised = min(s for s, a in train.items() if a >= 0.99)
    generalised = min(s for s, a in test.items() if a >= 0.95)
    assert memorised <= 300 and test[memorised] < 0.5, (memorised, test[memorised])  # memorisation, not learning
    assert generalised >= 5 * memorised, (memorised, generalised)  # a long plateau, then the jump
    assert test[2000] >= 0.99
