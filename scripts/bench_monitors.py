"""What the monitors (`train.monitors`, experiments/monitors.py) cost: the train step of the LM config with
them against the same step without, compiled side by side and timed interleaved (median of `--repeats`
rounds of `--steps` steps each), on the machine's own devices.

    PYTHONPATH=. python scripts/bench_monitors.py [--repeats=7] [--steps=20]

The step is the trainer's own (`trainer.train_step`, donated state) at experiments/configs/lm_shakespeare.py's
shape (4 layers, width 128, context 64, batch 12). The target: monitors < 5% of step time.
"""

import functools
import time

from absl import app, flags
import flax.linen as nn
import jax
import numpy as np

import models
from experiments import optimizers, trainer
from experiments.configs import lm_shakespeare

_REPEATS = flags.DEFINE_integer("repeats", 7, "Interleaved timing rounds.")
_STEPS = flags.DEFINE_integer("steps", 20, "Steps per round.")


def main(argv):
    del argv
    config = lm_shakespeare.get_config()
    config.model.update(vocab_size=65, max_len=64)
    batch_size, seq_len = config.data.batch_size, config.data.seq_len
    model = models.build(config.model)
    tokens = np.random.default_rng(0).integers(0, 65, size=(batch_size, seq_len + 1)).astype(np.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": np.ones((batch_size, seq_len), np.float32)}
    tx = optimizers.build(config.optimizer, config.train.steps)
    schedule = optimizers.learning_rate_schedule(config.optimizer, config.train.steps)
    fresh = jax.jit(lambda r: nn.meta.unbox(trainer.init_state(model, tx, batch["inputs"], r)))
    steps, states = {}, {}
    for name, on in (("off", False), ("on", True)):
        steps[name] = jax.jit(functools.partial(trainer.train_step, schedule=schedule, with_monitors=on),
                              donate_argnums=0)
        states[name], metrics = steps[name](fresh(jax.random.PRNGKey(0)), batch)
        jax.block_until_ready(metrics)
        print(f"monitors {name}: {len(metrics)} metrics per step")
    seconds = {name: [] for name in steps}
    for _ in range(_REPEATS.value):
        for name in steps:
            start = time.perf_counter()
            for _ in range(_STEPS.value):
                states[name], metrics = steps[name](states[name], batch)
            jax.block_until_ready((states[name], metrics))
            seconds[name].append((time.perf_counter() - start) / _STEPS.value)
    off, on = np.median(seconds["off"]), np.median(seconds["on"])
    print(f"\n| LM step ({jax.devices()[0].device_kind}, {jax.device_count()} device) | ms | ratio |\n|---|---|---|")
    print(f"| monitors off | {1e3 * off:.2f} | 1.00 |\n| monitors on | {1e3 * on:.2f} | {on / off:.3f} |")


if __name__ == "__main__":
    app.run(main)
