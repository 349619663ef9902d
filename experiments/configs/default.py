"""The default experiment (no --config): grokking a+b mod 59 in about five minutes on a 2-core CPU.

The grokking config of Nanda et al. 2023 with a smaller prime and half the pairs for training, so a
full-batch step is ~3x cheaper: train accuracy reaches 1.0 within a few hundred steps while test
accuracy stays low (memorisation), and test accuracy passes 0.99 thousands of steps later
(generalisation). Measured figures are in docs/guides/models.md.
"""

from experiments.configs import grokking


def get_config(arg=None):
    config = grokking.get_config(arg)
    config.data.update(p=59, train_fraction=0.5)
    config.train.update(steps=5_000, checkpoint_every=1_000)
    return config
