"""The default experiment (no --config): grokking a+b mod 113 on a 2-core CPU in a few minutes.

The grokking config (Nanda et al. 2023) with fewer steps; memorisation comes first (train accuracy
1.0 early) and generalisation later (test accuracy jumps). See the README for measured times.
"""

from experiments.configs import grokking


def get_config(arg=None):
    config = grokking.get_config(arg)
    config.train.update(steps=20_000, checkpoint_every=5_000)
    return config
